"""Skip-mask and KL-recording operations on any module that contains layer-attention stages.

These work on a timm ``LayerAttentionResNet``, on the transformers wrappers, and on a user's module
that wraps either (DDP, a detector, ...): they look for :class:`LayerAttentionStage` children in
registration order, which is network order.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from .ela_resnet import LayerAttentionStage, SkipMask, _LayerAttentionBlockMixin, validate_skip_mask

__all__ = [
    "find_stages",
    "attention_layers",
    "get_skip_mask",
    "set_skip_mask",
    "set_kl_recording",
    "kl_recording",
    "reset_kl_statistics",
    "kl_accumulators",
    "kl_statistics",
    "slim_state_dict",
]


def find_stages(module: nn.Module) -> List[LayerAttentionStage]:
    """The layer-attention stages inside ``module`` that carry attention, in network order."""
    stages = [m for m in module.modules() if isinstance(m, LayerAttentionStage) and m.has_attention]
    if not stages:
        raise ValueError(f"{type(module).__name__} contains no layer-attention (MRLA/ELA) stages")
    return stages


def attention_layers(module: nn.Module) -> Iterator[Tuple[int, int, nn.Module]]:
    """``(stage_idx, block_idx, block)`` for every block with an attention type, in network order."""
    for i, stage in enumerate(find_stages(module)):
        for j, blk in enumerate(stage):
            yield i, j, blk


def get_skip_mask(module: nn.Module) -> SkipMask:
    return [stage.skip_mask for stage in find_stages(module)]


def set_skip_mask(module: nn.Module, mask: SkipMask) -> None:
    """Skip attention layers in place. Parameters are kept (optimizers, DDP and checkpoints stay valid).

    A transformers model inside ``module`` (or ``module`` itself) gets its ``config.skip_mask`` updated too.

    Skips are cumulative: a mask that would bring back a skipped layer raises ``ValueError``, as does a
    mask of the wrong shape or one that skips a stage's first block.
    """
    stages = find_stages(module)
    mask = validate_skip_mask(mask, [len(s) for s in stages])
    for i, (stage, stage_mask) in enumerate(zip(stages, mask)):
        for j, (blk, skip) in enumerate(zip(stage, stage_mask)):
            if blk.is_skipped and not skip:
                raise ValueError(
                    f"skip_mask[{i}][{j}] is False but that attention layer is already skipped; skips are cumulative"
                )
    for stage, stage_mask in zip(stages, mask):
        for blk, skip in zip(stage, stage_mask):
            if skip and not blk.is_skipped:
                blk.skip_attention()
    # wrappers that keep the mask elsewhere too (the transformers models' config) bring it up to date
    for m in module.modules():
        on_change = getattr(m, "_skip_mask_changed", None)
        if callable(on_change):
            on_change()


def set_kl_recording(module: nn.Module, enabled: bool) -> None:
    """Switch KL recording on or off for every active attention layer (only training-mode passes record)."""
    for _, _, blk in attention_layers(module):
        if blk.attn is not None:
            blk.attn.recording = bool(enabled)


@contextlib.contextmanager
def kl_recording(module: nn.Module, enabled: bool = True):
    """Context manager: record the adjacent-layer KL statistics of training-mode forward passes."""
    set_kl_recording(module, enabled)
    try:
        yield module
    finally:
        set_kl_recording(module, False)


def reset_kl_statistics(module: nn.Module) -> None:
    for _, _, blk in attention_layers(module):
        if blk.attn is not None:
            blk.attn.reset_kl()


def kl_accumulators(module: nn.Module) -> List[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(stage, block, sum, count)`` device tensors of every active, non-first attention layer.

    The tensors are the live accumulators (reduce them across processes, then read them).
    """
    out = []
    for i, j, blk in attention_layers(module):
        if j == 0 or blk.is_skipped:
            continue
        out.append((i, j, blk.attn.kl_sum, blk.attn.kl_count))
    return out


def kl_statistics(module: nn.Module) -> Dict[Tuple[int, int], float]:
    """Mean recorded d_t per active non-first layer, keyed ``(stage, block)``; NaN where nothing was recorded."""
    stats = {}
    for i, j, s, c in kl_accumulators(module):
        count = float(c)
        stats[(i, j)] = float(s) / count if count > 0 else float("nan")
    return stats


def slim_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` without the weights of skipped attention layers.

    Loads into the same architecture built with ``skip_mask=get_skip_mask(module)``, whose skipped
    layers do not exist.
    """
    prefixes = []
    for name, sub in module.named_modules():
        # a skipped layer built in place still has its weights (attn); plain blocks have attn None
        if isinstance(sub, _LayerAttentionBlockMixin) and sub.is_skipped and sub.attn is not None:
            prefixes.append(f"{name}.attn." if name else "attn.")
    return {k: v for k, v in module.state_dict().items() if not any(k.startswith(p) for p in prefixes)}
