"""ela_hf: Efficient Layer Attention (ELA) for timm and Hugging Face transformers.

``import ela_hf`` registers the layer-attention ResNets with timm. ``ela_hf.pruning`` (and
``ela_hf.ElaPruningCallback``) load on first use: they import transformers' Trainer machinery, which a
timm-only user should not pay for.
"""
import importlib
from . import layers, models
from .models import (
    LayerAttentionResNet,
    get_skip_mask,
    kl_recording,
    kl_statistics,
    reset_kl_statistics,
    set_kl_recording,
    set_skip_mask,
)

__version__ = "0.1.0"

__all__ = [
    "LayerAttentionResNet",
    "get_skip_mask",
    "kl_recording",
    "kl_statistics",
    "reset_kl_statistics",
    "set_kl_recording",
    "set_skip_mask",
    "ElaPruningCallback",
    "pruning",
    "__version__",
]


def __getattr__(name):
    if name == "pruning":
        return importlib.import_module(".pruning", __name__)
    if name == "ElaPruningCallback":
        return importlib.import_module(".pruning", __name__).ElaPruningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
