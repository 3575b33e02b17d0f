"""Skip-mask and KL-recording operations on any module that contains layer-attention stages.

These work on a timm ``LayerAttentionResNet``, on the transformers wrappers, and on a user's module
that wraps either (DDP, a detector, ...): they look for :class:`LayerAttentionStage` children in
registration order, which is network order.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from ela_hf.layers.mrla import _LayerAttentionBase

from .ela_resnet import LayerAttentionStage, SkipMask, _LayerAttentionBlockMixin, kl_buffer_names, validate_skip_mask

__all__ = [
    "find_stages",
    "attention_layers",
    "get_skip_mask",
    "set_skip_mask",
    "follow_skip_buffers",
    "set_kl_recording",
    "kl_recording",
    "check_ddp_keeps_kl_statistics",
    "reset_kl_statistics",
    "kl_accumulators",
    "kl_statistics",
    "slim_state_dict",
]

# attributes through which wrappers hold the module they wrap: FSDP1's FullyShardedDataParallel,
# torch.distributed's checkpoint_wrapper, torch.compile's OptimizedModule. Their state dicts (but the last's)
# and the names users know leave these hops out.
_WRAPPER_HOPS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _clean_name(name: str) -> str:
    """A module, parameter or buffer name without the hops into wrappers (see ``_WRAPPER_HOPS``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_HOPS)


def _module_names(module: nn.Module) -> Dict[int, str]:
    """``id(submodule) -> name`` for every module inside ``module``, named as in the model you built: without
    the ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module`` / ``_orig_mod`` hops that FSDP, activation
    checkpoint wrappers and ``torch.compile`` add (a wrapper and the module it wraps share a name)."""
    names: Dict[int, str] = {}
    for name, sub in module.named_modules():
        names.setdefault(id(sub), _clean_name(name))
    return names


def _inner(module: nn.Module, cls: type) -> nn.Module:
    """The ``cls`` module that ``module`` is, or that a wrapper in its place holds (FSDP1 wraps blocks and
    attention layers in place: its ``FullyShardedDataParallel`` forwards attribute reads to them, but an
    attribute set on it stays on the wrapper)."""
    if isinstance(module, cls):
        return module
    return next((m for m in module.modules() if isinstance(m, cls)), module)


def _attention(blk: nn.Module):
    """The block's attention layer itself (not a wrapper around it), or None where it was built skipped."""
    return None if blk.attn is None else _inner(blk.attn, _LayerAttentionBase)


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
            yield i, j, _inner(blk, _LayerAttentionBlockMixin)


def follow_skip_buffers(module: nn.Module) -> None:
    """Make every block run what its ``attn_skipped`` buffer says, as ``eval()`` does (a host read per block).

    Flags copied into the buffers in place (timm's ``ModelEmaV3.update``, ``AveragedModel(use_buffers=True)``)
    otherwise take effect only at the next ``eval()`` or switch to training mode; the helpers that read or
    save the mask call this first, so an EMA copy exports with its model's mask. A transformers model's
    ``config.skip_mask`` follows.
    """
    changed = False
    for m in module.modules():
        if isinstance(m, _LayerAttentionBlockMixin):
            changed |= m._follow_skip_buffer()
    if changed:
        _announce_mask_change(module)


def _announce_mask_change(module: nn.Module) -> None:
    # wrappers that keep the mask elsewhere too (the transformers models' config) bring it up to date
    for m in module.modules():
        on_change = getattr(m, "_skip_mask_changed", None)
        if callable(on_change):
            on_change()


def get_skip_mask(module: nn.Module) -> SkipMask:
    """One list of bools per stage (True = attention layer skipped), as the blocks' ``attn_skipped`` buffers say."""
    stages = find_stages(module)
    follow_skip_buffers(module)
    return [stage.skip_mask for stage in stages]


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
    _announce_mask_change(module)


def set_kl_recording(module: nn.Module, enabled: bool) -> None:
    """Switch KL recording on or off for every active attention layer (only training-mode passes record).

    Switching it on through a ``DistributedDataParallel`` wrapper checks that DDP leaves the accumulators
    alone (see :func:`check_ddp_keeps_kl_statistics`)."""
    enabled = _as_switch(enabled, "enabled")
    if enabled:
        check_ddp_keeps_kl_statistics(module)
    for _, _, blk in attention_layers(module):
        if blk.attn is not None:
            _attention(blk).recording = enabled


def _as_switch(value: object, name: str) -> bool:
    # bool("no") is True: only booleans (NumPy's too) and 0 / 1 are read as a switch
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


@contextlib.contextmanager
def kl_recording(module: nn.Module, enabled: bool = True):
    """Context manager: record (or, with ``enabled=False``, do not record) the adjacent-layer KL statistics of
    training-mode forward passes; each layer's earlier setting comes back on exit, so it nests."""
    layers = [_attention(blk) for _, _, blk in attention_layers(module) if blk.attn is not None]
    before = [attn.recording for attn in layers]
    set_kl_recording(module, enabled)
    try:
        yield module
    finally:
        for attn, was in zip(layers, before):
            attn.recording = was


def check_ddp_keeps_kl_statistics(module: nn.Module) -> None:
    """Raise ``ValueError`` where a ``DistributedDataParallel`` in ``module`` (``module`` itself, typically:
    what ``accelerator.prepare`` returns) would overwrite the attention layers' KL accumulators.

    DDP copies rank 0's buffers to every other rank at each forward pass (``broadcast_buffers=True``, the
    default) except those named in ``_ddp_params_and_buffers_to_ignore`` of the module it wraps when it is
    built. The models name their accumulators themselves, but a module around them (a detector, a
    ``torch.compile``d model, any wrapper of yours) must be named by
    :func:`~ela_hf.models.keep_kl_statistics_out_of_ddp` before DDP wraps it; otherwise every rank would
    record rank 0's statistics, and a decision would rest on them alone.
    """
    from torch.nn.parallel import DistributedDataParallel

    for ddp in module.modules():
        if not isinstance(ddp, DistributedDataParallel):
            continue
        if not getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", True)):
            continue
        ignored = set(getattr(ddp, "parameters_to_ignore", ()))
        exposed = [name for name in kl_buffer_names(ddp.module) if name not in ignored]
        if exposed:
            raise ValueError(
                f"DistributedDataParallel copies rank 0's buffers to the other ranks at every forward pass, and it "
                f"was built without leaving out {len(exposed)} KL accumulators of the attention layers (e.g. "
                f"{exposed[0]!r}): every rank would record rank 0's statistics. Call "
                "ela_hf.models.keep_kl_statistics_out_of_ddp(module) on the module you hand to DDP (or to "
                "accelerator.prepare) before wrapping it, or build DDP with broadcast_buffers=False"
            )


def reset_kl_statistics(module: nn.Module) -> None:
    for _, _, blk in attention_layers(module):
        if blk.attn is not None:
            _attention(blk).reset_kl()


def kl_accumulators(module: nn.Module) -> List[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(stage, block, sum, count)`` device tensors of every active, non-first attention layer.

    The tensors are the live accumulators (reduce them across processes, then read them).
    """
    out = []
    for i, j, blk in attention_layers(module):
        if j == 0 or blk.is_skipped:
            continue
        attn = _attention(blk)
        out.append((i, j, attn.kl_sum, attn.kl_count))
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
    follow_skip_buffers(module)
    prefixes = []
    for name, sub in module.named_modules():
        # a skipped layer built in place still has its weights (attn); plain blocks have attn None
        if isinstance(sub, _LayerAttentionBlockMixin) and sub.is_skipped and sub.attn is not None:
            name = _clean_name(name)
            prefixes.append(f"{name}.attn." if name else "attn.")
    # keys compared without wrapper hops: FSDP's full state dict leaves them out, a compiled model's keeps them
    return {k: v for k, v in module.state_dict().items() if not any(_clean_name(k).startswith(p) for p in prefixes)}
