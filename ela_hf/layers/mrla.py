"""Multi-head recurrent layer attention (MRLA-L and MRLA-B), SPEC.md sections 1-3.

Both layers sit after a ResNet block's residual add and ReLU. They are called by
:class:`ela_hf.models.ela_resnet.LayerAttentionStage`, which owns one :class:`StageState` per forward
pass of a stage: the MRLA-B key/value cache, and (only while KL recording is on) what is needed to
compute the adjacent-layer KL divergence of SPEC section 3.
"""
from __future__ import annotations

import math
import numbers
import os
import threading
import warnings
from collections import OrderedDict, deque
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from .fast_ops import (
    _dw_eligible,
    _heads_to_channels,
    _hooked,
    attention_tail,
    attention_weights,
    depthwise_conv3x3,
    first_order_only,
    light_gate,
    light_gate_grad,
    light_layer,
    plain_autograd_enabled,
    relu_sum_depthwise_conv3x3,
    slot_dots,
    slot_weighted_sum,
)

__all__ = [
    "eca_kernel_size",
    "MrlaLight",
    "MrlaBase",
    "StageState",
    "kl_with_appended_eps",
    "DEFAULT_KL_EPS",
    "recording_paused",
]

DEFAULT_KL_EPS = 1e-8

# recording_paused() depth per thread: a manual switch (activation checkpointing's recompute needs none:
# the layers never record inside a backward pass, see _LayerAttentionBase._records)
_recording_pause = threading.local()


class recording_paused:
    """Context manager: no KL recording in this thread while inside (re-entrant)."""

    def __enter__(self):
        _recording_pause.depth = getattr(_recording_pause, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        _recording_pause.depth -= 1
        return False


def eca_kernel_size(channels: int) -> int:
    """ECA rule for the Conv1d kernel of Q and K: odd, growing with log2(channels)."""
    t = int(abs((math.log2(channels) + 1) / 2))
    return t if t % 2 else t + 1


def kl_with_appended_eps(prev: torch.Tensor, cur: torch.Tensor, eps: float = DEFAULT_KL_EPS) -> torch.Tensor:
    """``KL(p || cur)`` with ``p = renormalise([prev..., eps])`` over the last dim (SPEC section 3).

    ``prev`` has one entry fewer than ``cur`` along the last dim. Computed in float32; ``cur`` is
    clamped by ``eps`` so the divergence stays finite. Returns the divergence with the last dim reduced.
    """
    prev = prev.float()
    cur = cur.float()
    p = torch.cat([prev, prev.new_full(prev.shape[:-1] + (1,), eps)], dim=-1)
    p = p / p.sum(dim=-1, keepdim=True)
    q = cur.clamp_min(eps)
    return (torch.xlogy(p, p) - p * torch.log(q)).sum(dim=-1)


class StageState:
    """What flows between the blocks of one stage during one forward pass.

    ``keys`` and ``values`` hold the MRLA-B cache, one entry per active layer so far (keys
    ``[B, heads, d]``). In eager mode the values live in one preallocated per-stage buffer
    (:class:`_StageValueBuffer`) so that a block reads all earlier values in one batched contraction and
    nothing is ever concatenated; ``values`` then holds per-head views ``[B, heads, d, H, W]`` of its
    slots, valid during the forward pass. Under ``torch.compile`` they are the ``[B, C, H, W]`` values
    themselves. ``capacity`` is the number of MRLA-B layers the stage will cache (the buffer grows if a
    caller under-estimates it).

    A plain class, not a dataclass: the blocks must share this one object, and wrappers that map over a
    module's inputs (FSDP's input casting, ``torch.distributed.utils._apply_to_tensors``) rebuild dataclasses,
    which gave each FSDP-wrapped block a copy of its own, so that the next block saw none of its writes.
    """

    def __init__(self, keys: Optional[List[torch.Tensor]] = None, values: Optional[List[torch.Tensor]] = None,
                 capacity: int = 0, value_buffer: Optional["_StageValueBuffer"] = None,
                 prev_alpha: Optional[torch.Tensor] = None, unrolled: Optional[torch.Tensor] = None,
                 plain: Optional[bool] = None):
        self.keys: List[torch.Tensor] = [] if keys is None else keys
        self.values: List[torch.Tensor] = [] if values is None else values
        self.capacity = capacity
        self.value_buffer = value_buffer
        # recording only: the previous active layer's attention distribution over the stage's layers
        self.prev_alpha = prev_alpha
        # recording only (MRLA-L): unrolled per-channel weights w_{t,s,c}, shape [B, n_layers, C]
        self.unrolled = unrolled
        # ela_hf.layers.plain_autograd() (process-wide, for DataParallel's replica threads) or a torch.func
        # transform, as the stage's first MRLA-B layer saw it: another thread entering or leaving
        # plain_autograd() mid-stage must not switch the stage between its buffer and the plain formulation
        self.plain = plain

    def close(self) -> None:
        """End of the stage's forward: drop the state's own reference to the value buffer.

        The autograd nodes keep the buffer as a saved tensor, so it is freed after their backward
        (and recomputed under activation checkpointing) instead of living as long as the graph.
        """
        self.values = []  # views of the buffer's slots: only valid during the forward pass
        if self.value_buffer is not None:
            self.value_buffer.release_forward()


class _StageValueBuffer:
    """The values ``V_s`` of one stage's MRLA-B layers in one preallocated buffer, and its backward state.

    The buffer is ``[capacity, B*heads, d*H*W]``: every (sample, head) of a slot is one contiguous block,
    ``[d, H, W]`` for NCHW values (a plain view of them) and ``[H, W, d]`` for channels_last values (so
    that NHWC memory needs no per-element transpose: runs of d channels move together). Layer t writes
    slot t once, and ``sum_s A_{t,s} V_s`` is one batched matrix product ``[B*heads, 1, t+1] x
    [B*heads, t+1, d*H*W]`` over views of the slots. Slots never change after they are written, which
    lets every layer's autograd node keep the same buffer (writes go through ``.data`` so that later
    slots do not bump the version of the buffer saved by earlier nodes).

    Backward (see :class:`_AttendOverStageValues`): the nodes of a stage run in reverse layer order
    (layer t' > t consumes, through the residual stream, the output of layer t), so when layer t's node
    runs, the output gradients of all later layers are known. Each node stores its output gradient in
    ``grad_out[t]`` and gets ``dL/dV_t = sum_{t'>=t} A_{t',t} dL/dO_{t'}`` in one contraction.
    """

    def __init__(self, capacity: int, heads: int):
        self.capacity = max(int(capacity), 1)
        self.heads = heads
        self.buffer: Optional[torch.Tensor] = None
        self.channels_last = False
        self.shape = ()  # [B, C, H, W] of the values
        self.slot_shape = ()  # [B*heads, d*H*W]
        self._like: Optional[torch.Tensor] = None  # an empty tensor of the values' dtype and device
        self.count = 0
        self.attn: List[torch.Tensor] = []  # detached A_t, [B, heads, t+1] (for dL/dV of earlier layers)
        self.first_graph: Optional[int] = None  # the first layer with an autograd node (earlier ones frozen)
        self.has_graph = False  # an autograd node saved the buffer
        self._pooled: List[torch.Tensor] = []  # buffers to hand back to the pool when nothing reads them
        # backward state, per graph task (a new backward pass starts afresh)
        self.grad_task: Optional[int] = None
        self.grad_out: Optional[torch.Tensor] = None
        self.grad_filled: List[bool] = []

    def append(self, v: torch.Tensor) -> int:
        """Copy ``v`` into the next slot (unless it was written there, see :meth:`next_slot`); returns its index."""
        t = self._reserve(v)
        slot = self.buffer.data[t]
        if not self.in_slot(v, slot):
            self.to_slot(slot, v)
        self.count += 1
        return t

    def in_slot(self, x: torch.Tensor, slot: torch.Tensor) -> bool:
        """Whether the ``[B, C, H, W]`` tensor ``x`` is ``slot`` itself (a kernel wrote it there)."""
        return x.data_ptr() == slot.data_ptr() and x.is_contiguous() and not self.channels_last

    def next_slot(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The next slot as a ``[B, C, H, W]`` tensor for a kernel to write V into, for values shaped and
        typed like ``like``; :meth:`append` then finds V in place and copies nothing. None where the
        slot is not an NCHW-contiguous block (values stored channels_last)."""
        if not like.is_contiguous():
            return None
        t = self._reserve(like)
        if self.channels_last:
            return None
        return self.buffer.data[t].view(self.shape)

    def _reserve(self, v: torch.Tensor) -> int:
        """Make sure slot ``count`` exists for values like ``v`` (allocating or growing the buffer)."""
        if self.buffer is None:
            if v.dim() != 4 or v.shape[1] % self.heads:
                raise ValueError(f"MRLA-B values must be [B, C, H, W] with C divisible by {self.heads} heads, got {tuple(v.shape)}")
            self.shape = tuple(v.shape)
            self.channels_last = not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last)
            self.buffer = _SLOT_POOL.take(self.capacity, v, self.heads)
            self.slot_shape, self._like = tuple(self.buffer.shape[1:]), v.new_empty(0)
            self._pooled.append(self.buffer)
        elif tuple(v.shape) != self.shape or self.buffer.dtype != v.dtype:
            raise ValueError(
                f"MRLA-B values of one stage must share shape and dtype: got {tuple(v.shape)} {v.dtype}, "
                f"the stage's buffer holds {self.shape} {self.buffer.dtype}"
            )
        elif self.count == self.buffer.shape[0]:
            # more layers than announced: a bigger buffer; earlier nodes keep the old one (their slots
            # are the same values)
            grown = _SLOT_POOL.take(2 * self.count, v, self.heads)
            grown[: self.count].copy_(self.buffer)
            self.buffer = grown
            self._pooled.append(grown)
        return self.count

    def per_head(self, slot: torch.Tensor) -> torch.Tensor:
        """``[B*heads, d*H*W]`` slot -> ``[B, heads, d, H, W]`` view (the values, head by head)."""
        b, c, h, w = self.shape
        d = c // self.heads
        if self.channels_last:
            return slot.view(b, self.heads, h, w, d).permute(0, 1, 4, 2, 3)
        return slot.view(b, self.heads, d, h, w)

    def to_slot(self, slot: torch.Tensor, x: torch.Tensor) -> None:
        """Write a ``[B, C, H, W]`` tensor (any memory format) into a slot."""
        self.per_head(slot).copy_(x.unflatten(1, (self.heads, self.shape[1] // self.heads)))

    def from_slot(self, slot: torch.Tensor) -> torch.Tensor:
        """A ``[B*heads, d*H*W]`` result -> ``[B, C, H, W]`` in the values' memory format (a view for NCHW)."""
        b, c, h, w = self.shape
        if not self.channels_last:
            return slot.view(b, c, h, w)
        out = torch.empty((b, h, w, c), dtype=slot.dtype, device=slot.device).permute(0, 3, 1, 2)
        out.unflatten(1, (self.heads, c // self.heads)).copy_(self.per_head(slot))
        return out

    def release_forward(self) -> None:
        """End of the stage's forward. Without autograd nodes nothing reads the buffer any more."""
        self.buffer = None
        if not self.has_graph:
            self._give_back()

    def grad_slot(self, t: int) -> torch.Tensor:
        """Layer t's output-gradient slot in the running backward pass; the first node of a pass that
        asks starts the pass's gradient buffer (``[count, B*heads, d*H*W]``, like the value buffer)."""
        task = _current_graph_task_id()
        if self.grad_task != task or self.grad_out is None:
            self.grad_task = task
            self.grad_out = _SLOT_POOL._take((self.count, *self.slot_shape), self._like)
            self.grad_filled = [False] * self.count
        return self.grad_out[t]

    def grad_destination(self, t: int):
        """For layer t's tail: a function that, in backward, returns the layer's output-gradient slot as
        a ``[B, C, H, W]`` tensor to write dL/dO_t into (then :class:`_AttendOverStageValues` copies
        nothing); None where the slot is not NCHW-contiguous. It holds no tensor: a view of the value
        buffer kept by the tail's autograd node would keep the pool from reusing the buffer."""
        if self.channels_last:
            return None
        return lambda: self.grad_slot(t).view(self.shape)

    def end_backward(self) -> None:
        """After the stage's first layer's node: every node of this backward pass has run.

        The value buffer is still saved by the nodes (until autograd frees their saved tensors, or never
        with ``retain_graph=True``): the pool takes buffers back only once no view of them is left.
        """
        if self.grad_out is not None:
            # deferred as well: the calling node still holds a view of its slot
            _SLOT_POOL.give(self.grad_out, deferred=True)
        self.grad_out = None
        self.grad_filled = []
        self.grad_task = None
        self._give_back(deferred=True)
        _SLOT_POOL.collect_after_backward()

    def _give_back(self, deferred: bool = False) -> None:
        for buf in self._pooled:
            _SLOT_POOL.give(buf, deferred=deferred)
        self._pooled = []

    def __del__(self):
        # The graph that held this stage went away without a (complete) backward pass: an eval loop
        # without no_grad, an exception mid-forward, a loss never backpropagated. Its buffers go back for
        # reuse once nothing reads them, instead of fresh, page-faulting allocations every pass.
        bufs = getattr(self, "_pooled", [])
        grad_out = getattr(self, "grad_out", None)
        if grad_out is not None:
            bufs = [*bufs, grad_out]
        if bufs:
            try:
                _SLOT_POOL.give_orphans(bufs)
            except Exception:  # interpreter shutdown: the module's globals may be gone
                pass


def _physical_memory() -> int:
    """The machine's memory, or a container's limit when lower (cgroup v2 / v1)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        total = 8 << 30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
            if text.isdigit():
                total = min(total, int(text))
        except OSError:
            pass
    return total


class _SlotBufferPool:
    """Keeps the large CPU stage buffers of one step for the next (CUDA has its caching allocator).

    Why: glibc's malloc maps every block above 32 MiB afresh, and first-touching it page-faults: a
    200 MB value buffer (CIFAR ResNet-110, batch 64) costs ~85 ms to fill fresh against ~8 ms reused,
    more than the attention's arithmetic. A buffer comes back only once nothing can read it: at the end
    of a forward without autograd, or after the stage's last backward node. Reuse bumps its version
    counter, so an autograd graph kept with ``retain_graph=True`` across a later forward raises instead
    of reading overwritten values; a buffer with live views (someone kept a slot) is not reused.
    """

    # a value and a gradient buffer per stage and step; more for steps with several forwards before one
    # backward (two augmented views, contrastive losses); the byte cap below bounds the total
    max_per_key = 4
    max_pending = 32
    # bytes kept for reuse at most (1/8 of the machine's memory, at least 1 GiB): beyond it the shapes asked
    # for least recently are let go, so inputs of ever new sizes (detection's multi-scale batches) cannot
    # keep a buffer for every size seen, while a fixed set of sizes that fits keeps being reused
    max_free_bytes = max(1 << 30, _physical_memory() // 8)
    # a buffer is kept only for a shape that this many forward passes asked for (value buffers; a backward's
    # gradient buffer does not count): a training loop asks for the same shapes at every step (its second
    # step's buffers are kept), while a server fed ever new image sizes asks for most of them once, and
    # keeping those (up to max_free_bytes, never reused) would only hold memory
    min_passes_to_keep = 2

    def __init__(self):
        self._free: Dict[tuple, List[torch.Tensor]] = {}  # shape key -> buffers ready for reuse (never empty)
        self._held = 0  # bytes in self._free
        self._pending: List[torch.Tensor] = []  # given back while autograd may still hold views
        # given back by stage buffers that died with their graph (see give_orphans); a deque because its
        # append needs no lock
        self._orphans: "deque[torch.Tensor]" = deque(maxlen=self.max_pending)
        self._lock = threading.Lock()
        # shape key -> how many forward passes asked for it, by last request, least recent first (every key
        # of self._free is in it)
        self._recent: "OrderedDict[tuple, int]" = OrderedDict()
        self.allocations = 0  # buffers made fresh (not reused): a steady training loop stops adding

    def take(self, n: int, v: torch.Tensor, heads: int) -> torch.Tensor:
        """A ``[n, B*heads, d*H*W]`` buffer for values like ``v``."""
        b, c, h, w = v.shape
        return self._take((n, b * heads, (c // heads) * h * w), v, forward=True)

    def _take(self, shape: tuple, like: torch.Tensor, forward: bool = False) -> torch.Tensor:
        # inference tensors (made under torch.inference_mode) only serve inference-mode passes
        key = (shape, like.dtype, like.device, torch.is_inference_mode_enabled())
        if like.device.type == "cpu":
            with self._lock:
                self._recent[key] = self._recent.get(key, 0) + int(forward)
                self._recent.move_to_end(key)
                self._collect_pending()
                free = self._free.get(key)
                buf = None
                if free:
                    buf = free.pop()
                    self._held -= _nbytes(buf)
                    if not free:
                        del self._free[key]
            if buf is not None:
                if not buf.is_inference():
                    torch.autograd.graph.increment_version(buf)
                return buf
        buf = like.new_empty(shape)
        self.allocations += 1
        buf._ela_pool_key = key
        buf._ela_storage_refs = _storage_refs(buf)
        return buf

    @staticmethod
    def _poolable(buf: torch.Tensor) -> bool:
        key = getattr(buf, "_ela_pool_key", None)
        return key is not None and key[2].type == "cpu" and buf._ela_storage_refs >= 0

    def give(self, buf: torch.Tensor, deferred: bool = False) -> None:
        if not self._poolable(buf):
            return
        with self._lock:
            if deferred:
                self._pending.append(buf)
                del self._pending[: -self.max_pending]  # a graph kept alive forever keeps its buffer
            else:
                self._add_free(buf)

    def give_orphans(self, bufs: List[torch.Tensor]) -> None:
        """Buffers of a stage whose graph died without a complete backward pass, handed back from
        ``_StageValueBuffer.__del__``. Takes no lock: the garbage collector may run that ``__del__`` while
        this very thread holds the pool's lock (a deque's append is atomic). The next request moves them
        to the pending ones, reused once no view of them is left."""
        for buf in bufs:
            if self._poolable(buf):
                self._orphans.append(buf)

    def collect_after_backward(self) -> None:
        """Once the running backward pass is over (its nodes have let go of their saved views), move the
        buffers given back deferred to the reusable ones, where the byte cap applies: after a run's last step
        they would otherwise wait, uncounted, for the next forward pass."""
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self.collect)
        except (AttributeError, RuntimeError):  # not inside a backward pass, or an engine without callbacks
            pass

    def collect(self) -> None:
        with self._lock:
            self._collect_pending()

    def _collect_pending(self) -> None:
        while self._orphans:
            try:
                self._pending.append(self._orphans.popleft())
            except IndexError:  # emptied meanwhile by another thread's popleft
                break
        del self._pending[: -self.max_pending]
        still = []
        for buf in self._pending:
            (self._add_free if _storage_refs(buf) == buf._ela_storage_refs else still.append)(buf)
        self._pending = still

    def free_bytes(self) -> int:
        """Bytes held for reuse (not counting buffers still in use)."""
        with self._lock:
            self._collect_pending()
            return self._held

    def _shrink(self) -> None:
        """Let go of the least recently asked-for shapes until the kept bytes fit ``max_free_bytes``."""
        if self._held > self.max_free_bytes:
            for key in list(self._recent):
                if self._held <= self.max_free_bytes:
                    break
                self._held -= sum(_nbytes(b) for b in self._free.pop(key, ()))
                del self._recent[key]
        self._forget_old_shapes()

    def _forget_old_shapes(self) -> None:
        if len(self._recent) > 256 + len(self._free):  # shapes seen once and long gone: forget most of them
            for key in list(self._recent)[:-128]:
                if key not in self._free:
                    del self._recent[key]

    def _add_free(self, buf: torch.Tensor) -> None:
        if _storage_refs(buf) != buf._ela_storage_refs:  # a view of it is alive somewhere
            return
        key = buf._ela_pool_key
        if self._recent.get(key, 0) < self.min_passes_to_keep:  # (also a shape asked for before a clear())
            self._forget_old_shapes()  # a server's one-off shapes: their counts must not pile up either
            return
        free = self._free.setdefault(key, [])
        if len(free) < self.max_per_key and not any(b is buf for b in free):  # never handed out twice
            free.append(buf)
            self._held += _nbytes(buf)
            self._shrink()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0
            self._pending.clear()
            self._orphans.clear()
            self._recent.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _storage_refs(t: torch.Tensor) -> int:
    """References to ``t``'s storage (every view holds one); -1 where PyTorch does not expose it."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return -1 if use_count is None else int(use_count(t.untyped_storage()._cdata))


_SLOT_POOL = _SlotBufferPool()


def clear_value_buffer_pool() -> None:
    """Free the MRLA-B stage buffers kept between steps on CPU (for memory measurements)."""
    _SLOT_POOL.clear()


def _weighted_slot_sum(weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``sum_s weights[:, s] * slots[s]``: weights ``[B*heads, S]``, slots ``[S, B*heads, n]`` -> ``[B*heads, n]``.

    On the CPU the C++ kernel (``fast_ops.slot_weighted_sum``); else one batched matrix product on a view
    of the slots (one read of each), or a multiply for one slot.
    """
    fast = slot_weighted_sum(weights, slots)
    if fast is not None:
        return fast
    if slots.shape[0] == 1:
        return slots[0] * weights
    return torch.bmm(weights.unsqueeze(1), slots.transpose(0, 1)).squeeze(1)


def _slot_dots(grad: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``<grad, slots[s]>`` per (sample, head): grad ``[B*heads, n]``, slots ``[S, B*heads, n]`` -> ``[B*heads, S]``
    (on the CPU the C++ kernel ``fast_ops.slot_dots``, else a batched matrix product)."""
    fast = slot_dots(grad, slots)
    if fast is not None:
        return fast
    return torch.bmm(grad.unsqueeze(1), slots.permute(1, 2, 0)).squeeze(1)


def _current_graph_task_id() -> Optional[int]:
    """Id of the running backward pass (autograd's graph task), so a new pass starts a fresh gradient buffer."""
    get = getattr(torch._C, "_current_graph_task_id", None)
    return None if get is None else get()


class _AttendOverStageValues(torch.autograd.Function):
    """``O_t = sum_{s<=t} A_t[:, h, s] V_{s,h}`` over a :class:`_StageValueBuffer`, with a fused backward.

    Forward writes ``V_t`` into slot t and reads slots ``0..t`` once. Backward per layer: one read of
    slots ``0..t`` for ``dL/dA_t`` and one read of the later layers' output gradients for ``dL/dV_t``,
    instead of autograd's per-(t, s) products, sums and gradient accumulations.
    """

    @staticmethod
    def forward(ctx, attn: torch.Tensor, v: torch.Tensor, cache: _StageValueBuffer) -> torch.Tensor:
        with torch.autocast(v.device.type, enabled=False):
            t = cache.append(v)
            buffer = cache.buffer
            weights = attn.detach().to(buffer.dtype)
            cache.attn.append(weights)
            out = cache.from_slot(_weighted_slot_sum(weights.flatten(0, 1), buffer[: t + 1]))
            if cache.first_graph is None:
                cache.first_graph = t
        # a view, not the buffer itself: each saved view holds a storage reference, which is how the
        # pool knows when autograd has let go of the buffer
        # (attn too: a create_graph backward ties the gradients to it, see first_order_only)
        ctx.save_for_backward(buffer[:], attn)
        cache.has_graph = True
        ctx.cache, ctx.t = cache, t
        ctx.attn_dtype, ctx.v_dtype = attn.dtype, v.dtype
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out: Optional[torch.Tensor]):
        buffer, _ = ctx.saved_tensors
        cache, t = ctx.cache, ctx.t
        grad_attn = grad_v = None
        with torch.autocast(buffer.device.type, enabled=False):
            slot = cache.grad_slot(t)
            if grad_out is None:
                slot.zero_()
            else:
                if not cache.in_slot(grad_out, slot):  # else the tail wrote it there
                    cache.to_slot(slot, grad_out.to(buffer.dtype))
                if ctx.needs_input_grad[0]:
                    dots = _slot_dots(slot, buffer[: t + 1])  # [B*heads, t+1]
                    grad_attn = dots.view(-1, cache.heads, t + 1).to(ctx.attn_dtype)
            cache.grad_filled[t] = True
            # later layers whose node never ran (their output reached no loss) contribute nothing
            for later in range(t + 1, cache.count):
                if not cache.grad_filled[later]:
                    cache.grad_out[later].zero_()
                    cache.grad_filled[later] = True
            if ctx.needs_input_grad[1]:
                weights = torch.stack([cache.attn[u][..., t] for u in range(t, cache.count)], dim=-1)
                grad_v = cache.from_slot(_weighted_slot_sum(weights.flatten(0, 1), cache.grad_out[t:]))
                grad_v = grad_v.to(ctx.v_dtype)
        if t == cache.first_graph:  # (layers before it, frozen, have no node)
            cache.end_backward()
        return grad_attn, grad_v, None


class _LayerAttentionBase(nn.Module):
    """Shared pieces: Q/K Conv1d on the pooled descriptor, depthwise V, BN, DropPath, KL accumulators."""

    def __init__(self, channels: int, dim_per_head: int, k_size: Optional[int], drop_path: float, dilation: int = 1):
        super().__init__()
        if isinstance(dilation, bool) or not isinstance(dilation, numbers.Integral) or dilation < 1:
            raise ValueError(f"dilation must be a positive int (the stage's, for output_stride), got {dilation!r}")
        if isinstance(dim_per_head, bool) or not isinstance(dim_per_head, numbers.Integral):
            raise TypeError(
                f"dim_per_head must be an int (channels per attention head), got {dim_per_head!r} "
                f"({type(dim_per_head).__name__})"
            )
        if dim_per_head < 1:
            raise ValueError(f"dim_per_head must be a positive number of channels per attention head, got {dim_per_head}")
        dim_per_head = int(dim_per_head)
        if channels % dim_per_head != 0:
            raise ValueError(
                f"channels ({channels}) must be a multiple of dim_per_head ({dim_per_head}) for layer attention"
            )
        self.channels = channels
        self.dim_per_head = dim_per_head
        self.heads = channels // dim_per_head
        self.k_size = k_size if k_size is not None else eca_kernel_size(channels)
        self.scale = 1.0 / math.sqrt(dim_per_head)
        pad = (self.k_size - 1) // 2
        self.wq = nn.Conv1d(1, 1, self.k_size, padding=pad, bias=False)
        self.wk = nn.Conv1d(1, 1, self.k_size, padding=pad, bias=False)
        # dilated like the stage's 3x3 convs where output_stride keeps a stage at a finer resolution: the
        # network stays the stride-32 one evaluated more densely
        self.wv = nn.Conv2d(channels, channels, 3, padding=int(dilation), dilation=int(dilation), groups=channels,
                            bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        nn.init.kaiming_normal_(self.wv.weight, mode="fan_out", nonlinearity="relu")
        # KL statistics (SPEC section 3): on-device float32 sums, never synced per step. Not persistent:
        # they are training-time bookkeeping, saved for resume by the pruning callback, not by checkpoints.
        self.register_buffer("kl_sum", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("kl_count", torch.zeros((), dtype=torch.float32), persistent=False)
        self.recording = False
        self.kl_eps = DEFAULT_KL_EPS

    def _values_pooled(self, y: torch.Tensor, sc: Optional[torch.Tensor] = None, pre_act: Optional[nn.Module] = None,
                       out: Optional[torch.Tensor] = None):
        """``(y, V, g)``: the layer's input, ``V = wv(y)`` and the pooled descriptor ``g = GAP(y)`` (``[B, C]``).

        With ``pre_act``, ``y`` comes in as the block's conv branch and the input is ``pre_act(y + sc)``;
        a plain ReLU there is folded into the conv's CPU kernel (:func:`relu_sum_depthwise_conv3x3`).
        On the CPU the depthwise conv and the pooling share one read of ``y`` (fast_ops.py), and the conv
        writes V into ``out`` where given (MRLA-B's stage slot).
        """
        if pre_act is not None:
            folded = relu_sum_depthwise_conv3x3(self.wv, y, sc, out=out) if _plain_relu(pre_act) else None
            if folded is not None:
                return folded
            y = pre_act(y + sc)
        v, g = depthwise_conv3x3(self.wv, y, with_mean=True, out=out)
        return y, v, g

    def _query_key(self, g: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor):
        """Q and K (``[B, heads, d]``) from the pooled descriptor ``g`` (``[B, C]``) and the Conv1d weights.

        ``wq`` and ``wk`` are Conv1d(1, 1, k) over the channel axis; they are applied here as one
        ``[B, C, k] x [k, 2]`` product over the unfolded windows of ``g``: nn.Conv1d on a ``[B, 1, C]``
        input costs milliseconds per call on CPU (oneDNN primitive setup), more than the rest of the
        layer, and a backward through two of them is slower still.
        """
        _, _, qk = self._windows_qk(g, wq, wk)
        b = g.shape[0]
        q = qk[..., 0].view(b, self.heads, self.dim_per_head)
        k = qk[..., 1].view(b, self.heads, self.dim_per_head)
        return q, k

    def _qk_as_modules(self) -> bool:
        """``wq`` / ``wk`` must run as modules: hooked (forward, pre-forward or backward hooks of their own or
        global ones: ``torch.nn.utils.prune`` and weight/spectral norm recompute the weight in a pre-hook,
        feature capture and FLOP counters watch the call) or not plain ``nn.Conv1d`` (parametrizations,
        adapters such as LoRA wrapping them) or a Conv1d of another layout than the layer's own: their
        ``weight`` alone is not what they compute."""
        return not (self._plain_qk_conv(self.wq) and self._plain_qk_conv(self.wk))

    def _plain_qk_conv(self, conv: nn.Module) -> bool:
        return (
            type(conv) is nn.Conv1d
            and not _hooked(conv)
            and conv.in_channels == conv.out_channels == conv.groups == 1
            and conv.kernel_size == (self.k_size,)
            and conv.padding == ((self.k_size - 1) // 2,)
            and conv.stride == (1,)
            and conv.dilation == (1,)
            and conv.padding_mode == "zeros"
            and conv.bias is None
        )

    def _query_key_by_modules(self, g: torch.Tensor):
        """Q and K (``[B, heads, d]``) by calling ``wq`` and ``wk`` on ``g`` as ``[B, 1, C]`` (see
        :meth:`_qk_as_modules`; the same values as :meth:`_query_key` for plain convs)."""
        b = g.shape[0]
        x = g.unsqueeze(1)
        q, k = self.wq(x), self.wk(x)
        for name, t in (("wq", q), ("wk", k)):
            if t.shape != x.shape:
                raise ValueError(
                    f"{type(self).__name__}.{name} must map the pooled descriptor [B, 1, C] = {tuple(x.shape)} to "
                    f"the same shape (a Conv1d(1, 1, k) with padding (k - 1) // 2), got {tuple(t.shape)}"
                )
        return q.view(b, self.heads, self.dim_per_head), k.view(b, self.heads, self.dim_per_head)

    def _windows_qk(self, g: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor):
        """``(windows, w, qk)``: the unfolded windows of ``g`` (``[B, C, k]``, ``windows[b, c, j] =
        g[b, c + j - pad]``, zero outside), the two Conv1d weights as rows of ``w`` (``[2, k]``), and
        ``qk = windows @ w^T`` (``[B, C, 2]``: Q and K per channel). Shared by :meth:`_query_key` and
        MRLA-L's gate backward."""
        pad = (self.k_size - 1) // 2
        windows = F.pad(g, (pad, pad)).unfold(1, self.k_size, 1)
        w = torch.cat([wq.reshape(1, -1), wk.reshape(1, -1)], dim=0)
        return windows, w, torch.matmul(windows, w.t())

    def _residual_tail(self, y: torch.Tensor, v: torch.Tensor, **tail) -> torch.Tensor:
        """``y + DropPath(act(BN(...)))`` (see ``fast_ops.attention_tail``); without an active DropPath the
        residual sum is part of the fused tail."""
        if isinstance(self.drop_path, nn.Identity):
            return attention_tail(self.bn, v, y, **tail)
        return y + self.drop_path(attention_tail(self.bn, v, **tail))

    def _per_channel(self, per_head: torch.Tensor) -> torch.Tensor:
        """[B, heads, ...] -> [B, C, ...]: head h covers the contiguous channels h*d .. (h+1)*d - 1."""
        return per_head.repeat_interleave(self.dim_per_head, dim=1)

    def _records(self) -> bool:
        # a forward run inside a backward pass is activation checkpointing's recompute (ours, timm's
        # features_only per-stage checkpointing, or a user's torch.utils.checkpoint): that step's KL is
        # already recorded. (A compiled graph never re-runs Python in backward, and dynamo cannot trace the
        # graph-task query.)
        return (
            self.recording
            and self.training
            and not getattr(_recording_pause, "depth", 0)
            and (torch.compiler.is_compiling() or _current_graph_task_id() in (None, -1))
        )

    @torch.no_grad()
    def _accumulate(self, d: torch.Tensor) -> None:
        """d: [B] (already averaged over heads) -> add to the running float32 sum and count."""
        if self.kl_sum.dtype != torch.float32 or self.kl_count.dtype != torch.float32:
            self._restore_kl_precision()
        self.kl_sum += d.float().sum()
        self.kl_count += d.shape[0]

    @torch.compiler.disable
    def _restore_kl_precision(self) -> None:
        # FSDP's mixed precision (MixedPrecision(buffer_dtype=torch.bfloat16), accelerate's FSDP bf16) casts
        # every buffer through `buffer.data = ...`, which _apply never sees: bf16 cannot count past 256 images.
        # Back to float32 in place (the same tensor objects). FSDP casts once, before the first forward pass,
        # when nothing is recorded yet; a cast after recording began has rounded the sums already.
        rounded = bool(self.kl_count.ne(0).any())
        for t in (self.kl_sum, self.kl_count):
            t.data = t.data.float()
        if rounded:
            warnings.warn(
                "the KL statistics of an attention layer were cast to a lower precision after recording began "
                "(FSDP mixed precision with a buffer_dtype casts buffers when it switches precision, e.g. with "
                "FSDP_USE_FULL_PREC_IN_EVAL=1 around an evaluation): this window's d_t values carry that rounding. "
                "They are float32 again from here on",
                RuntimeWarning,
                stacklevel=3,
            )

    def reset_kl(self) -> None:
        self.kl_sum.zero_()
        self.kl_count.zero_()

    def init_non_persistent_buffers(self) -> None:
        """timm's hook for buffers that checkpoints do not hold (``reinit_non_persistent_buffers`` from
        ``timm.models._manipulate``, after building on the meta device and ``to_empty``): the KL statistics
        start from zero."""
        with torch.no_grad():
            self.reset_kl()

    def _apply(self, fn, recurse=True):
        # the KL sums and counts stay float32 when the model is cast (model.to(torch.bfloat16), .half()):
        # bf16 cannot even count past 256 images. They follow device moves, values kept exactly.
        before = {name: self._buffers.get(name) for name in ("kl_sum", "kl_count")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, k_size={self.k_size}"


def _plain_relu(act: nn.Module) -> bool:
    """``act`` is exactly ``nn.ReLU`` with no hooks of its own: the fused kernels may apply it instead."""
    return type(act) is nn.ReLU and not (act._forward_hooks or act._forward_pre_hooks)


class MrlaLight(_LayerAttentionBase):
    """MRLA-L: ``out = y + DropPath(BN(sigmoid(<Q_h,K_h>/sqrt d) * V_h + lambda * sc))``.

    The previous layers reach layer t through the shortcut ``sc`` (the residual stream), so nothing is
    cached. Extra parameters: 12C + 2*k_size.
    """

    def __init__(self, channels: int, dim_per_head: int = 32, k_size: Optional[int] = None, drop_path: float = 0.0,
                 dilation: int = 1):
        super().__init__(channels, dim_per_head, k_size, drop_path, dilation)
        self.lam = nn.Parameter(torch.randn(channels, 1, 1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``lam`` drawn afresh as at construction (the network's ``init_weights(needs_reset=True)``, after
        ``to_empty``; the layer's sub-modules reset themselves)."""
        self.lam.normal_()

    def forward(
        self, y: torch.Tensor, sc: torch.Tensor, state: StageState, pre_act: Optional[nn.Module] = None
    ) -> torch.Tensor:
        """``y``: the block's output; or, with ``pre_act`` (the block's final activation), its conv branch
        before the residual sum, the layer's input then being ``pre_act(y + sc)``. A plain ``nn.ReLU``
        there (without hooks) is folded into the CPU kernels (the fused layer's, or else the conv's)."""
        if pre_act is not None and not _plain_relu(pre_act):
            y, pre_act = pre_act(y + sc), None
        # on the CPU: the conv, the pooling and the tail in one kernel set that never stores V
        # (timm's DropPath is the identity in eval mode)
        qk_modules = self._qk_as_modules()
        if not qk_modules and (
            isinstance(self.drop_path, nn.Identity) or (type(self.drop_path) is DropPath and not self.drop_path.training)
        ):
            fused = light_layer(self.bn, self.wv, y, sc, self.lam, self._gate, self.heads, self.wq.weight,
                                self.wk.weight, pre_relu=pre_act is not None, gate_grad=self._gate_grad)
            if fused is not None:
                out, gate = fused
                if self._records():
                    self._record(gate, state)
                return out
        y, v, g = self._values_pooled(y, sc, pre_act)
        if qk_modules:
            q, k = self._query_key_by_modules(g)
            gate = torch.sigmoid((q * k).sum(-1) * self.scale)
        else:
            gate = self._gate(g, self.wq.weight, self.wk.weight)  # [B, heads]
        # the per-channel gate is tiny ([B, C, 1, 1]); lambda and the gate are cast to the values' dtype:
        # under autocast the large tensors stay in bf16 instead of being promoted to float32 by the
        # float32 parameter. On the CPU the whole tail is one fused kernel pair (fast_ops.py).
        gate_c = _heads_to_channels(gate, self.channels)[..., None, None].to(v.dtype)
        if self._records():
            self._record(gate, state)
        return self._residual_tail(y, v, sc=sc.to(v.dtype), gate=gate_c, lam=self.lam.to(v.dtype))  # BN(gate*V + lam*sc)

    def _gate(self, g: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        """The per-head gate ``sigmoid(<Q_h, K_h> / sqrt d)`` (``[B, heads]``) from the pooled descriptor (on
        the CPU one C++ kernel, ``fast_ops.light_gate``: as a dozen tiny PyTorch ops it cost 0.3-1.5 ms per
        layer with its backward)."""
        fast = light_gate(g, wq, wk, self.heads, self.scale)
        if fast is not None:
            return fast
        q, k = self._query_key(g, wq, wk)
        return torch.sigmoid((q * k).sum(-1) * self.scale)

    @torch.no_grad()
    def _gate_grad(self, g: torch.Tensor, gate: torch.Tensor, grad_gate: torch.Tensor, wq: torch.Tensor,
                   wk: torch.Tensor):
        """The backward of :meth:`_gate` without an autograd graph: ``(dL/dg, dL/dwq, dL/dwk)`` from ``g``
        (``[B, C]``), the gate (``[B, heads]``) and its gradient, on the C++ kernel where it applies
        (``fast_ops.light_gate_grad``), else in the plain ops below. The fused layer calls it in its
        backward instead of recomputing the gate under autograd.

        With ``windows[b, c, j] = g[b, c + j - pad]`` (zero outside), ``q = windows @ wq`` and
        ``k = windows @ wk``, and ``s = gate * (1 - gate) * dL/dgate / sqrt(d)`` spread over each head's
        channels: ``dq = s * k``, ``dk = s * q``; the weights' gradients are ``windows^T @ (dq, dk)``, and
        ``dL/dg[b, i] = sum_j (dq[b, i - j + pad] wq[j] + dk[b, i - j + pad] wk[j])``.
        """
        fast = light_gate_grad(g, gate, grad_gate, wq, wk, self.heads, self.scale)
        if fast is not None:
            return fast
        b, c = g.shape
        k_size, pad = self.k_size, (self.k_size - 1) // 2
        windows, w, qk = self._windows_qk(g, wq, wk)
        s = (grad_gate * gate * (1 - gate) * self.scale).unsqueeze(-1).expand(b, self.heads, self.dim_per_head)
        dqk = qk.flip(-1) * s.reshape(b, c, 1)  # [B, C, 2]: (s * k, s * q)
        grad_w = torch.matmul(dqk.reshape(-1, 2).t(), windows.reshape(-1, k_size))  # [2, k]
        dwin = torch.matmul(dqk, w)  # [B, C, k]: the gradient of each window
        grad_pad = g.new_zeros(b, c + 2 * pad)
        for j in range(k_size):  # each window entry j came from g[:, c + j - pad]
            grad_pad[:, j:j + c] += dwin[:, :, j]
        return grad_pad[:, pad:pad + c], grad_w[0].view_as(wq), grad_w[1].view_as(wk)

    @torch.no_grad()
    def _record(self, gate: torch.Tensor, state: StageState) -> None:
        # w_{t,s,c} = a_{s,h(c)} * prod_{active j, s<j<=t} lambda_{j,c}: scale the earlier layers by this
        # layer's lambda, then append this layer's own gate (empty product).
        # statistics only, no graph; in float32, or float64 for a float64 model (whose tiny gates float32
        # would flush to zero)
        dtype = torch.float64 if gate.dtype == torch.float64 else torch.float32
        own = self._per_channel(gate.detach().to(dtype)).unsqueeze(1)  # [B, 1, C]
        if state.unrolled is None:
            unrolled = own
        else:
            unrolled = torch.cat([state.unrolled * self.lam.detach().to(dtype).view(1, 1, -1), own], dim=1)
        alpha = unrolled.abs().mean(dim=-1)
        total = alpha.sum(dim=-1, keepdim=True)
        # weights that all underflowed to zero (gate logits below about -100) carry no ranking: uniform, so
        # that a lone layer's distribution is [1] as the formula gives, not [0]
        alpha = torch.where(total > 0, alpha / total.clamp_min(torch.finfo(dtype).tiny), 1.0 / alpha.shape[-1])
        if state.prev_alpha is not None:
            self._accumulate(kl_with_appended_eps(state.prev_alpha, alpha, self.kl_eps))
        state.unrolled = unrolled
        state.prev_alpha = alpha


class MrlaBase(_LayerAttentionBase):
    """MRLA-B: softmax attention of layer t over the stage's cached (K_s, V_s) of active layers.

    ``out = y + DropPath(relu(BN(sum_s A_s V_s)))``. Extra parameters: 11C + 2*k_size.
    """

    def __init__(self, channels: int, dim_per_head: int = 16, k_size: Optional[int] = None, drop_path: float = 0.0,
                 dilation: int = 1):
        super().__init__(channels, dim_per_head, k_size, drop_path, dilation)

    def forward(
        self,
        y: torch.Tensor,
        state: StageState,
        sc: Optional[torch.Tensor] = None,
        pre_act: Optional[nn.Module] = None,
    ) -> torch.Tensor:
        """``y``: the block's output; or, with ``pre_act`` (the block's final activation) and ``sc`` (its
        shortcut), its conv branch before the residual sum, the layer's input then being
        ``pre_act(y + sc)``. A plain ``nn.ReLU`` there (without hooks) is folded into the conv's CPU
        kernel."""
        if (pre_act is None) != (sc is None):
            raise ValueError(
                "MrlaBase: pre_act and sc go together (the block's final activation and the shortcut of its "
                "residual sum; MRLA-B itself does not use the shortcut)"
            )
        if state.plain is None and (type(y) is not torch.Tensor or y.device.type == "meta"):
            # a tensor subclass (a fake tensor among them) or the meta device: the plain formulation, which keeps
            # the subclass and needs no memory (the stage buffer writes into real slots)
            state.plain = True
        # on the CPU kernel the conv writes V straight into the stage buffer's next slot (no copy)
        slot = None
        if _dw_eligible(self.wv, y) and not self._plain_attention(state):
            slot = self._value_cache(state).next_slot(y)
        y, v, g = self._values_pooled(y, sc, pre_act, out=slot)
        attn = self._attention_weights(g, state)
        o, grad_into = self._attend(attn, v, state)
        if self._records():
            self._record(attn, state)
        return self._residual_tail(y, o, relu=True, grad_into=grad_into)

    def _attention_weights(self, g: torch.Tensor, state: StageState) -> torch.Tensor:
        """``A_t = softmax(<Q_t, K_s> / sqrt d)`` over the stage's keys and this layer's (``[B, heads, t+1]``);
        appends this layer's key to ``state.keys``. On the CPU one C++ kernel pair
        (``fast_ops.attention_weights``); the tensors are tiny, and in PyTorch ops their fixed costs were
        0.3-2 ms per layer."""
        if self._qk_as_modules():
            q, k = self._query_key_by_modules(g)
        else:
            fast = attention_weights(g, self.wq.weight, self.wk.weight, state.keys, self.heads, self.scale)
            if fast is not None:
                attn, k = fast
                state.keys.append(k)
                return attn
            q, k = self._query_key(g, self.wq.weight, self.wk.weight)
        state.keys.append(k)
        keys = torch.stack(state.keys, dim=2)  # [B, heads, t, d]
        return torch.softmax(torch.einsum("bhd,bhtd->bht", q, keys) * self.scale, dim=-1)

    def _attend(self, attn: torch.Tensor, v: torch.Tensor, state: StageState):
        """``sum_s attn[:, h, s] * V_{s,h}`` over this layer's and the earlier cached values, and where the
        tail may write this output's gradient (see :meth:`_StageValueBuffer.grad_destination`; None
        where nothing is gained)."""
        cache = state.value_buffer
        if self._plain_attention(state):
            if cache is not None:  # the eager blocks' values are per-head views in the stage buffer
                raise RuntimeError(
                    "an MRLA-B stage ran partly eagerly and partly under torch.compile; compile the whole "
                    "model, the whole stage (LayerAttentionStage) or every block of the stage, not some of them"
                )
            state.values.append(v)
            weights = _heads_to_channels(attn.transpose(1, 2), self.channels)[..., None, None].to(v.dtype)
            o = state.values[0] * weights[:, 0]
            for s in range(1, len(state.values)):
                o = o + state.values[s] * weights[:, s]
            return o, None
        cache = self._value_cache(state)
        grad_into = None
        if torch.is_grad_enabled() and (attn.requires_grad or v.requires_grad):
            o = _AttendOverStageValues.apply(attn, v, cache)
            grad_into = cache.grad_destination(cache.count - 1)
        else:
            t = cache.append(v)
            # (kept for the later layers' backward, where this layer's inputs need no gradient but theirs do:
            # the stage's first blocks frozen)
            cache.attn.append(attn.detach().to(cache.buffer.dtype))
            o = cache.from_slot(_weighted_slot_sum(attn.to(v.dtype).flatten(0, 1), cache.buffer[: t + 1]))
        state.values.append(cache.per_head(cache.buffer[cache.count - 1]))
        return o, grad_into

    @staticmethod
    def _plain_attention(state: StageState) -> bool:
        """Graph capture (compile, export, jit.trace), or a stage begun that way: the plain formulation
        over ``state.values``; the compiler fuses the sum into one pass over the values (the eager stage
        buffer relies on in-place slot writes that a trace cannot record)."""
        if state.plain is None:
            state.plain = plain_autograd_enabled()
        return (
            torch.compiler.is_compiling() or torch.jit.is_tracing() or state.plain
            or (state.value_buffer is None and bool(state.values))
        )

    def _value_cache(self, state: StageState) -> _StageValueBuffer:
        """The stage's value buffer (made by the stage's first layer)."""
        cache = state.value_buffer
        if cache is None:
            cache = state.value_buffer = _StageValueBuffer(state.capacity, self.heads)
        elif cache.heads != self.heads:
            raise ValueError(f"MRLA-B layers of one stage must share their heads ({cache.heads} vs {self.heads})")
        return cache

    @torch.no_grad()
    def _record(self, attn: torch.Tensor, state: StageState) -> None:
        attn = attn.detach().float()
        if state.prev_alpha is not None:
            self._accumulate(kl_with_appended_eps(state.prev_alpha, attn, self.kl_eps).mean(dim=1))
        state.prev_alpha = attn
