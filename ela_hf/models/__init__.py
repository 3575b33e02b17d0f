"""Network families built on timm's ResNet pieces; importing this registers them with timm."""
from .ela_resnet import (
    MODEL_ARGS,
    ElaBasicBlock,
    ElaBottleneck,
    LayerAttentionResNet,
    LayerAttentionStage,
    SkipMask,
    keep_kl_statistics_out_of_ddp,
    validate_skip_mask,
)
from .attention_tools import (
    attention_layers,
    find_stages,
    get_skip_mask,
    kl_accumulators,
    kl_recording,
    kl_statistics,
    reset_kl_statistics,
    set_kl_recording,
    set_skip_mask,
    slim_state_dict,
)

__all__ = [
    "MODEL_ARGS",
    "ElaBasicBlock",
    "ElaBottleneck",
    "LayerAttentionResNet",
    "LayerAttentionStage",
    "SkipMask",
    "validate_skip_mask",
    "keep_kl_statistics_out_of_ddp",
    "attention_layers",
    "find_stages",
    "get_skip_mask",
    "kl_accumulators",
    "kl_recording",
    "kl_statistics",
    "reset_kl_statistics",
    "set_kl_recording",
    "set_skip_mask",
    "slim_state_dict",
]
