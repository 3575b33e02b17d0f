"""Layer-attention modules: MRLA-L, MRLA-B, their stage state and the KL helper."""
from .fast_ops import plain_autograd
from .mrla import (
    DEFAULT_KL_EPS,
    MrlaBase,
    MrlaLight,
    StageState,
    eca_kernel_size,
    kl_with_appended_eps,
    recording_paused,
)

__all__ = [
    "DEFAULT_KL_EPS",
    "MrlaBase",
    "MrlaLight",
    "StageState",
    "eca_kernel_size",
    "kl_with_appended_eps",
    "plain_autograd",
    "recording_paused",
]
