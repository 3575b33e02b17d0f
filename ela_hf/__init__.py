"""ela_hf: Efficient Layer Attention (ELA) for timm and Hugging Face transformers.

``import ela_hf`` registers the layer-attention ResNets with timm.
"""
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
    "__version__",
]
