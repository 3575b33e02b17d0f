"""ela_hf: Efficient Layer Attention (ELA) for timm and Hugging Face transformers.

``import ela_hf`` registers the layer-attention ResNets with timm and ``model_type="ela"`` with
transformers' Auto classes (config, models, image processor). ``ela_hf.ElaPruningCallback`` (and the
selectors in ``ela_hf.pruning``) run ELA's staged KL/EBQM pruning inside ``transformers.Trainer``;
``ela_hf.skip_redundant_layers`` takes one such decision in a training loop of your own.
"""
from . import layers, models, pruning
from .models import (
    LayerAttentionResNet,
    get_skip_mask,
    kl_recording,
    kl_statistics,
    reset_kl_statistics,
    set_kl_recording,
    set_skip_mask,
)
from .models.from_resnet import ResNetInitReport, init_from_resnet
from .hf import ElaBackbone, ElaConfig, ElaForImageClassification, ElaImageProcessor, ElaModel, ElaPreTrainedModel
from .hub import export_pruned, load_pruning_history, push_pruned_to_hub, render_model_card
from .pruning import ElaPruningCallback, skip_redundant_layers

__version__ = "0.1.0"

__all__ = [
    "LayerAttentionResNet",
    "get_skip_mask",
    "kl_recording",
    "kl_statistics",
    "reset_kl_statistics",
    "set_kl_recording",
    "set_skip_mask",
    "ElaConfig",
    "ElaModel",
    "ElaForImageClassification",
    "ElaBackbone",
    "ElaPreTrainedModel",
    "ElaImageProcessor",
    "init_from_resnet",
    "ResNetInitReport",
    "export_pruned",
    "push_pruned_to_hub",
    "render_model_card",
    "load_pruning_history",
    "ElaPruningCallback",
    "skip_redundant_layers",
    "__version__",
]
