"""CPU fast paths for the attention layers: fused C++ kernels, and pure-PyTorch fallbacks.

They compute exactly what the plain modules compute (``tests/test_fast_ops.py``,
``tests/test_cpu_kernels.py`` and ``tests/test_perf_equivalence.py`` check forward, backward and the
running statistics); they only choose cheaper kernels for NCHW float32/float64 tensors on the CPU in
eager mode. Everywhere else (CUDA, channels_last, autocast, under ``torch.compile``, SyncBatchNorm) the
plain modules run.

Two tiers:

1. ``cpu_kernels.cpp``, compiled once per machine with the system C++ compiler (about 2 s, cached under
   ``~/.cache/ela_hf/kernels``; see :func:`cpu_kernels`) and called through ctypes:

   - :func:`attention_tail`: a layer's whole tail, ``y + act(BN(gate * V + lambda * sc))``, in two passes
     forward and two backward, where PyTorch needs a product, a batch-norm statistics pass, a
     normalisation, an activation and a sum forward, and twice as many passes backward. ``gate * V +
     lambda * sc`` is never stored.
   - :func:`depthwise_conv3x3`: the value projection. oneDNN's NCHW depthwise convolution takes ~20 ms
     forward for ``[64, 64, 32, 32]`` on one thread; a plane-at-a-time kernel takes ~2.5 ms.
   - :func:`light_layer`: MRLA-L's whole layer, ``y + BN(gate * wv(y) + lambda * sc)`` with the pooled
     descriptor and the gate, where V is never stored: each of its two forward and two backward passes
     recomputes V plane by plane from y, and the statistics come from per-(sample, channel) moments.
     It keeps less memory than the conv and the tail as two kernels (V is not saved for backward) and
     takes planes of ``LIGHT_MIN_PLANE`` elements and more.
   - :func:`slot_weighted_sum` and :func:`slot_dots`: MRLA-B's contractions over its stage buffer (a
     weighted sum of the slots, and an output gradient's dot product with each slot), reading several
     slots at once; 1.2-2x the bandwidth of ``torch.bmm`` on these shapes.
   - :func:`attention_weights` (MRLA-B: Q, K and the softmax over the stage's keys) and :func:`light_gate`
     / :func:`light_gate_grad` (MRLA-L's gate): tiny tensors, one C++ call forward and one backward per
     layer instead of some twenty PyTorch ops and autograd nodes with milliseconds of fixed cost.

2. Without a compiler (or with ``ELA_HF_CPU_KERNELS=0``), pure-PyTorch paths: one-pass batch-norm
   statistics for large tensors (:func:`batch_norm`) and MRLA-L's value path with one hand-written
   backward (:func:`light_tail`).

Why tier 2 helps (one thread, inside a training step of CIFAR ResNet-110):

- ``F.batch_norm`` in training mode spends most of its time on the per-channel statistics of a large
  NCHW tensor: about 7.5 ms for ``[64, 64, 32, 32]`` float32, of which the normalisation is ~1.2 ms. A
  per-(sample, channel) sum and a batched dot product give the same statistics in about a third of
  that; the normalisation and the backward are PyTorch's own kernels, fed with these statistics. On
  tensors below ``FAST_STATS_MIN_BYTES`` the native kernel is as fast and runs instead.
- MRLA-L's ``BN(gate * V + lambda * sc)`` through autograd costs four full-size products, two sums and
  their temporaries in backward. One hand-written backward needs PyTorch's batch-norm backward, two
  products and two batched dot products (about 0.1 of a plain ResNet-110 training step less).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import forward_ad as _forward_ad
from torch.nn.modules import module as _module_hooks

__all__ = [
    "attention_tail", "depthwise_conv3x3", "relu_sum_depthwise_conv3x3", "light_layer", "cpu_kernels",
    "kernel_cache_dir", "kernel_features", "describe_kernels", "batch_norm", "light_tail",
    "FAST_CPU_PATHS", "slot_weighted_sum", "slot_dots", "attention_weights",
    "light_gate", "light_gate_grad", "plain_autograd", "plain_autograd_enabled", "first_order_only",
]

logger = logging.getLogger(__name__)

_SECOND_ORDER = (
    "ela_hf's fast layer-attention paths compute first-order gradients only, so this double backward (a "
    "gradient penalty, a Hessian-vector product) cannot go through them: run the forward pass inside "
    "`with ela_hf.layers.plain_autograd():` (PyTorch's own differentiable ops throughout, slower)"
)


class _RefuseSecondOrder(torch.autograd.Function):
    """Passes gradients through, tied to what they depend on; differentiating them again is an error."""

    @staticmethod
    def forward(ctx, count: int, *tensors):
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_SECOND_ORDER)


def first_order_only(backward):
    """For an autograd Function's ``backward`` whose gradients are not differentiable (C++ kernels, values
    saved from a no-grad forward): an ordinary backward runs as is; with ``create_graph=True`` the gradients
    come back tied to the tensors they depend on (the saved tensors and incoming gradients that require grad),
    so that differentiating them again raises a clear error instead of silently leaving out the second-order
    terms. (``once_differentiable`` ties them to new leaves, which ``torch.autograd.grad(..., inputs=params)``
    never reaches.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():  # an ordinary backward
            return backward(ctx, *grads)
        anchors = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        many = isinstance(outputs, tuple)
        parts = list(outputs if many else (outputs,))
        index = [i for i, g in enumerate(parts) if isinstance(g, torch.Tensor)]
        if anchors and index:
            for i, marked in zip(index, _RefuseSecondOrder.apply(len(index), *[parts[i] for i in index], *anchors)):
                parts[i] = marked
        return tuple(parts) if many else parts[0]

    return wrapper

# Set to False to run the plain modules instead of the C++ kernels (for comparisons and debugging); MRLA-B keeps
# its stage buffer (plain_autograd() replaces that too).
FAST_CPU_PATHS = True
# Set to False to run MRLA-L's value convolution and tail as two kernels (depthwise_conv3x3, then
# attention_tail) instead of the one fused layer (light_layer); for comparisons.
FUSED_LIGHT_LAYER = True
# Set to False to run MRLA-B's slot contractions as torch.bmm instead of the C++ slot kernels
# (slot_weighted_sum, slot_dots); for comparisons.
SLOT_KERNELS = True
# Set to False to compute MRLA-B's attention weights (Q, K, softmax over the stage's keys) and MRLA-L's
# gate in PyTorch ops instead of their C++ kernels (attention_weights, light_gate); for comparisons.
WEIGHT_KERNELS = True
# Below this size the native batch-norm statistics are as fast as the one-pass ones.
FAST_STATS_MIN_BYTES = 6 << 20
# The one-pass variance E[x^2] - E[x]^2 loses precision when the mean dominates; beyond this ratio of
# E[x^2] to the variance (float32 then keeps ~3 significant digits of the variance) the native
# two-pass kernel runs instead.
VARIANCE_CONDITION_LIMIT = 1e4
# The C++ kernels work plane by plane (one sample, one channel); on small planes their fixed costs win
# over the saved passes. Measured with bench/bench_kernels.py (cold cache, one thread, the benchmark
# networks' shapes): the depthwise conv is 0.25-0.42 of PyTorch's time on 32x32 and 16x16 planes,
# 0.33-0.41 on 8x8 (its row path: cpu_kernels.cpp, 2b), 1.6-1.9x on 4x4; the tails 0.15-0.99 down to
# 8x8, 1.0-1.5 on 4x4. Smaller planes take the PyTorch paths.
DEPTHWISE_MIN_PLANE = 64
TAIL_MIN_PLANE = 64
# MRLA-L's fused layer (light_layer) recomputes the value conv in each of its four passes: it saves
# memory traffic and allocations on large planes and costs arithmetic on small ones. bench_kernels.py
# against the conv and tail kernels: 0.40-0.81 on CIFAR's 32x32 and 16x16 planes, 0.94-1.24 on
# ImageNet's (batch 8), 1.07-1.24 on 8x8 (noisy; even within the noise in whole training steps, and it
# keeps less memory). With the row path, 8x8 planes on the fused layer were within the noise in
# training steps too (CIFAR 1.249 either way, ImageNet 1.163 against 1.200, in-process A/B).
LIGHT_MIN_PLANE = 256


_plain_depth = 0  # open plain_autograd() contexts (a global, not thread-local: DataParallel's replica threads)


@contextlib.contextmanager
def plain_autograd():
    """Run the layer-attention layers in PyTorch's own differentiable ops: no C++ kernel or hand-written
    backward, and MRLA-B's plain formulation instead of its stage buffer. Slower; for what needs autograd
    all the way through: double backward (gradient penalties, Hessian-vector products), ``torch.func``
    transforms. The forward pass decides, so the forward must run inside the context."""
    global _plain_depth
    _plain_depth += 1
    try:
        yield
    finally:
        _plain_depth -= 1


def plain_autograd_enabled() -> bool:
    """Inside :func:`plain_autograd`, or a ``torch.func`` transform (grad, vmap, jacrev: they cannot see into
    the kernels or the custom autograd functions either), or a ``FakeTensorMode`` (fake tensors have no memory
    for the kernels to read: shape propagation and memory estimates take PyTorch's ops), or a forward-mode AD
    level (``torch.autograd.forward_ad.dual_level``: the custom functions have no jvp)."""
    return (
        _plain_depth > 0 or torch._C._are_functorch_transforms_active()
        # (not while compiling: graph capture runs in a fake mode of its own, and the query would break the graph)
        or (not torch.compiler.is_compiling() and (_fake_mode_active() or _forward_ad._current_level >= 0))
    )


def _fake_mode_active() -> bool:
    get, key = getattr(torch._C, "_get_dispatch_mode", None), getattr(torch._C, "_TorchDispatchModeKey", None)
    return get is not None and key is not None and get(key.FAKE) is not None


def _hooked(module: nn.Module) -> bool:
    """Hooks on ``module`` (its own or global ones) must see it run: the kernels read its weight directly, so
    a forward hook (feature capture, FLOP counters), a pre-hook (``torch.nn.utils.prune``) or a backward
    hook takes the plain module instead. So do accelerate's hooks (``device_map`` offloading to the CPU or disk):
    they replace ``forward`` to bring the weights in from a meta tensor, and only a call runs them."""
    return bool(
        hasattr(module, "_hf_hook")
        or module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks or _module_hooks._global_backward_hooks
        or _module_hooks._global_backward_pre_hooks
    )


def _fast_mode() -> bool:
    """The fast paths are on and may run: no CPU autocast, no compile, no trace (a trace records tensor
    ops, and the C++ kernels write through pointers it cannot see), no :func:`plain_autograd`."""
    return (
        FAST_CPU_PATHS
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not plain_autograd_enabled()  # (after is_compiling: graph capture need not trace the functorch query)
    )


def _cpu_eager(x: torch.Tensor) -> bool:
    return (
        type(x) is torch.Tensor  # (not a subclass: it would come out as a plain tensor; not a fake tensor)
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous()
        and _fast_mode()
    )


def _bn_eligible(bn: nn.Module, x: torch.Tensor) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and not _hooked(bn)
        and bn.track_running_stats
        and bn.running_mean is not None
        and _cpu_eager(x)
        and (bn.weight is None or bn.weight.dtype == x.dtype)
        and bn.running_mean.device == x.device and (bn.weight is None or bn.weight.device == x.device)
        and x.shape[0] * x.shape[2] * x.shape[3] > 1
    )


def _same_layout(t: Optional[torch.Tensor], v: torch.Tensor) -> bool:
    return t is None or (t.shape == v.shape and t.dtype == v.dtype and t.device == v.device and t.is_contiguous())


def _fast_batch_stats(x: torch.Tensor):
    """Per-channel mean and biased variance of an NCHW tensor, or None where one pass is ill-conditioned."""
    b, c = x.shape[:2]
    flat = x.view(b, c, -1)
    acc = torch.float64
    n = flat.shape[0] * flat.shape[2]
    mean = flat.sum(dim=2, dtype=acc).sum(0) / n
    second = torch.linalg.vecdot(flat, flat).to(acc).sum(0) / n
    var = (second - mean * mean).clamp_min(0)
    if bool((second > VARIANCE_CONDITION_LIMIT * var).any()):
        return None
    return mean.to(x.dtype), var.to(x.dtype)


def _count_batch(bn: nn.BatchNorm2d) -> float:
    """Counts a training batch as ``nn.BatchNorm2d`` does; returns its momentum (cumulative if None)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int, momentum: float):
    """``nn.BatchNorm2d``'s running averages from a batch's mean and biased variance over ``n`` values.

    Updated through ``.data``, leaving their version counters alone, as PyTorch's batch norm kernel does: an
    earlier forward pass through ``F.batch_norm`` (a smaller input, under the kernels' size limits) saved them
    for its backward, which a bumped version would fail (two passes, one backward: multi-crop training)."""
    bn.running_mean.data.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.data.lerp_((var * (n / (n - 1))).to(bn.running_var.dtype), momentum)


def _fold_batch_norm(bn: nn.BatchNorm2d, weight, bias, mean: torch.Tensor, var: torch.Tensor):
    """``(invstd, scale, shift)`` in float64, with ``bn(x) = scale * x + shift`` per channel for the
    statistics ``mean`` and ``var`` (the batch's in training, the running ones in eval)."""
    invstd = torch.rsqrt(var + bn.eps)
    scale = invstd if weight is None else invstd * weight.detach().double()
    shift = -mean * scale if bias is None else bias.detach().double() - mean * scale
    return invstd, scale, shift


def _plane_centres(x: torch.Tensor) -> torch.Tensor:
    """Per channel, the first element of the channel's first plane (``x[0, :, 0, 0]``; 0 where it is not
    finite or there is none): a value of the data to subtract before the folded batch norm's product."""
    if x.numel() == 0:
        return x.new_zeros(x.shape[1])
    first = x[0, :, 0, 0]
    return torch.where(torch.isfinite(first), first, torch.zeros_like(first)).contiguous()


def _train_forward(bn: nn.BatchNorm2d, x: torch.Tensor):
    """``bn(x)`` in training mode without autograd, with ``nn.BatchNorm2d``'s running-statistics update.

    Returns ``(out, mean, invstd)``, what ``native_batch_norm_backward`` needs.
    """
    momentum = _count_batch(bn)
    stats = _fast_batch_stats(x) if x.numel() * x.element_size() >= FAST_STATS_MIN_BYTES else None
    if stats is None:
        return torch.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, momentum, bn.eps)
    mean, var = stats
    _update_running_stats(bn, mean, var, x.numel() // x.shape[1], momentum)
    out = F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return out, mean, torch.rsqrt(var + bn.eps)


# ------------------------------------------------------------------------------------------------
# batch norm in training mode, with fast statistics


class _BatchNormFastStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn: nn.BatchNorm2d):
        out, mean, invstd = _train_forward(bn, x)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = bn.eps
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(), x, weight, None, None, mean, invstd, True, ctx.eps,
            (need[0], weight is not None and need[1], need[2]),
        )
        return gx, gw, gb, None


def batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)``, with fast batch statistics for large NCHW float tensors on the CPU in training mode."""
    if bn.training and _bn_eligible(bn, x) and x.numel() * x.element_size() >= FAST_STATS_MIN_BYTES:
        return _BatchNormFastStats.apply(x, bn.weight, bn.bias, bn)
    return bn(x)


# ------------------------------------------------------------------------------------------------
# MRLA-L: BN(gate * V + lambda * sc) with one hand-written backward


class _LightTail(torch.autograd.Function):
    """``BN(gate_c * v + lam * sc)``; backward: PyTorch's batch-norm backward, then two products and two
    batched dot products instead of autograd's four products, two sums and their temporaries."""

    @staticmethod
    def forward(ctx, v, sc, gate_c, lam, weight, bias, bn: nn.BatchNorm2d):
        o = v * gate_c
        o.addcmul_(sc, lam)
        training = bn.training
        if training:
            out, mean, invstd = _train_forward(bn, o)
        else:
            mean = bn.running_mean.clone()
            invstd = torch.rsqrt(bn.running_var + bn.eps)
            out = F.batch_norm(o, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)
        ctx.save_for_backward(o, v, sc, gate_c, lam, weight, mean, invstd)
        ctx.training, ctx.eps = training, bn.eps
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        o, v, sc, gate_c, lam, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        if ctx.training:
            grad_o, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_out, o, weight, None, None, mean, invstd, True, ctx.eps,
                (any(need[:4]), weight is not None and need[4], need[5]),
            )
        else:  # eval-mode statistics are constants
            scale = invstd if weight is None else weight * invstd
            grad_o = grad_out * scale.view(1, -1, 1, 1)
            xhat = (o - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
            gw = (grad_out * xhat).sum((0, 2, 3)) if weight is not None and need[4] else None
            gb = grad_out.sum((0, 2, 3)) if need[5] else None
        if grad_o is None:  # only the batch norm's own parameters need gradients
            return None, None, None, None, gw, gb, None
        b, c = o.shape[:2]
        flat_g = grad_o.view(b, c, -1)
        grad_v = grad_o * gate_c if need[0] else None
        grad_sc = grad_o * lam if need[1] else None
        grad_gate = torch.linalg.vecdot(flat_g, v.view(b, c, -1)).view_as(gate_c) if need[2] else None
        grad_lam = torch.linalg.vecdot(flat_g, sc.view(b, c, -1)).sum(0).view_as(lam) if need[3] else None
        return grad_v, grad_sc, grad_gate, grad_lam, gw, gb, None


def light_tail(bn: nn.BatchNorm2d, v: torch.Tensor, sc: torch.Tensor, gate_c: torch.Tensor, lam: torch.Tensor):
    """``bn(gate_c * v + lam * sc)`` (MRLA-L's value path), ``gate_c`` ``[B, C, 1, 1]``, ``lam`` ``[C, 1, 1]``."""
    if (
        _bn_eligible(bn, v)
        and _same_layout(sc, v)
        and gate_c.dtype == v.dtype
        and lam.dtype == v.dtype
    ):
        return _LightTail.apply(v, sc, gate_c, lam, bn.weight, bn.bias, bn)
    return bn(torch.addcmul(lam * sc, v, gate_c))


# ------------------------------------------------------------------------------------------------
# tier 1: C++ kernels (cpu_kernels.cpp), compiled once per machine

KERNEL_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# tried in order; the first that compiles is used (-march=native: the cache key includes the CPU's flags).
# -mprefer-vector-width=256: the compiler's own loops in 256-bit vectors even where the CPU has AVX-512
# (gcc's default for Intel's AVX-512 CPUs, not for AMD's): the MRLA-B tail's backward took 0.68-0.76 of
# the time of its 512-bit code on a Zen 5 here, every other kernel the same within noise; the row path's
# explicit 512-bit code is not affected. A compiler without the flag takes the next set.
_FLAG_SETS = (
    ["-march=native", "-mprefer-vector-width=256", "-fopenmp"],
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    [],
)
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "stats": [_P] * 4 + [_I64] * 3 + [_P, _P, _INT],
    "apply": [_P] * 8 + [_I64] * 3 + [_INT, _INT],
    "bwd_reduce": [_P] * 11 + [_I64] * 3 + [_P, _P, _INT, _INT],
    "bwd_apply": [_P] * 18 + [_I64] * 3 + [_INT, _INT],
    "dw_forward": [_P] * 6 + [_I64] * 4 + [_INT],
    "dw_backward": [_P] * 7 + [_I64] * 4 + [_INT, _INT],
    "light_fwd_moments": [_P] * 5 + [_I64] * 4 + [_INT, _INT],
    "light_fwd_apply": [_P] * 7 + [_I64] * 4 + [_INT],
    "light_bwd_reduce": [_P] * 5 + [_I64] * 4 + [_INT],
    "light_bwd_apply": [_P] * 14 + [_I64] * 4 + [_INT, _INT],
    "slot_wsum": [_P, _I64, _P, _P] + [_I64] * 3 + [_INT],
    "slot_dots": [_P, _I64, _P, _P] + [_I64] * 3 + [_INT],
    "attn_weights_fwd": [_P] * 7 + [_I64] * 5 + [ctypes.c_double],
    "attn_weights_bwd": [_P] * 13 + [_I64] * 5 + [ctypes.c_double],
    "light_gate_fwd": [_P] * 4 + [_I64] * 4 + [ctypes.c_double],
    "light_gate_bwd": [_P] * 8 + [_I64] * 4 + [ctypes.c_double],
}
_kernel_state: dict = {}  # "lib": the loaded library or None once tried
_kernel_lock = threading.Lock()


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$ELA_HF_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ela_hf/kernels``
    (``~/.cache/ela_hf/kernels``)."""
    if os.environ.get("ELA_HF_KERNEL_CACHE"):
        return Path(os.environ["ELA_HF_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ela_hf" / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _compile_kernels(flag_sets=None, cache: Optional[Path] = None) -> Path:
    """Compile ``cpu_kernels.cpp`` with the first of ``flag_sets`` (default ``_FLAG_SETS``) that works, into
    ``cache`` (default :func:`kernel_cache_dir`), unless a build for this source, compiler, CPU and flag
    sets is there."""
    flag_sets = _FLAG_SETS if flag_sets is None else flag_sets
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"C++ compiler {cxx!r} does not run: {e}") from e
    source = KERNEL_SOURCE.read_bytes()
    flags_key = repr([list(f) for f in flag_sets]).encode()
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_signature().encode(), cxx.encode(), flags_key]))
    cache = Path(cache) if cache is not None else kernel_cache_dir()
    target = cache / f"cpu_kernels-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in flag_sets:
        # compile to a private file, then rename: concurrent processes never see a half-written library
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".cpu_kernels-", suffix=".so")
        os.close(fd)
        try:
            logger.info("compiling ela_hf CPU kernels (once per machine): %s %s", cxx, " ".join(flags))
            done = subprocess.run(
                [cxx, *_BASE_FLAGS, *flags, str(KERNEL_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600
            )
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{' '.join(flags) or 'no extra flags'}: {done.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("compiling cpu_kernels.cpp failed; " + " | ".join(errors))


def cpu_kernels() -> Optional[ctypes.CDLL]:
    """The compiled ``cpu_kernels.cpp``, or None where it cannot be had (then the pure-PyTorch paths run).

    Compiled on first use with ``$CXX`` (else ``c++``/``g++``/``clang++``) and cached (see
    :func:`kernel_cache_dir`); ``ELA_HF_CPU_KERNELS=0`` switches the kernels off. A failure is reported
    once as a warning.
    """
    if "lib" in _kernel_state:  # the hot path: every eligible call asks
        return _kernel_state["lib"]
    with _kernel_lock:
        if "lib" not in _kernel_state:
            lib = None
            if os.environ.get("ELA_HF_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off"):
                try:
                    lib = _load_kernels(_compile_kernels())
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    warnings.warn(
                        f"ela_hf: the C++ CPU kernels are unavailable ({e}); the slower pure-PyTorch paths run "
                        "instead. Set ELA_HF_CPU_KERNELS=0 to silence this.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    lib = None
            _kernel_state["lib"] = lib
        return _kernel_state["lib"]


def _load_kernels(path: Path) -> ctypes.CDLL:
    """Load a compiled ``cpu_kernels.cpp`` and declare its entry points' C signatures."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"ela_{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
    lib.ela_features.argtypes, lib.ela_features.restype = [], _INT
    return lib


def kernel_features(lib: Optional[ctypes.CDLL] = None) -> Optional[dict]:
    """What the loaded C++ kernels (or ``lib``) were built with: ``{"row_path": AVX-512 row path of the
    depthwise conv, "fma": fused multiply-add, "openmp": OpenMP threads}``; None without kernels."""
    lib = lib if lib is not None else cpu_kernels()
    if lib is None:
        return None
    bits = lib.ela_features()
    return {"row_path": bool(bits & 1), "fma": bool(bits & 2), "openmp": bool(bits & 4)}


def describe_kernels() -> str:
    """``"on (AVX-512 row path, FMA, OpenMP)"`` (what the build uses), or ``"unavailable"``: for benchmark headers."""
    features = kernel_features()
    if features is None:
        return "unavailable"
    names = {"row_path": "AVX-512 row path", "fma": "FMA", "openmp": "OpenMP"}
    return "on (" + (", ".join(label for key, label in names.items() if features[key]) or "no AVX-512, FMA or OpenMP") + ")"


def _kernel(name: str, dtype: torch.dtype):
    return getattr(cpu_kernels(), f"ela_{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _ptr(t: Optional[torch.Tensor]):
    if t is None:
        return None
    if isinstance(t, FakeTensor):  # (its data_ptr only warns: the kernel would read address 0)
        raise RuntimeError(_NO_STORAGE)
    try:
        return t.data_ptr()
    except RuntimeError as err:  # batched gradients: is_grads_batched, jacobian(vectorize=True)
        raise RuntimeError(f"{_NO_STORAGE} ({err})") from None


_NO_STORAGE = (
    "ela_hf's C++ kernels read tensors' memory, and this one has none (a fake tensor, or a batched gradient of "
    "torch.autograd.grad(..., is_grads_batched=True) / torch.autograd.functional.jacobian(..., vectorize=True)); "
    "run the model's forward inside `with ela_hf.layers.plain_autograd():` (PyTorch's own ops throughout)"
)


class _FusedTail(torch.autograd.Function):
    """``y + act(BN(gate * v + lam * sc))`` on the C++ kernels; every argument but ``v`` may be None."""

    @staticmethod
    def forward(ctx, v, sc, y, gate, lam, weight, bias, bn: nn.BatchNorm2d, relu: bool, grad_into=None):
        n, c, h, w = v.shape
        hw, dt, nt = h * w, v.dtype, torch.get_num_threads()
        a = None if gate is None else gate.reshape(n, c).contiguous()
        l = None if lam is None else lam.reshape(c).contiguous()
        if bn.training:
            mean = torch.empty(c, dtype=torch.float64)
            var = torch.empty(c, dtype=torch.float64)
            _kernel("stats", dt)(_ptr(v), _ptr(sc), _ptr(a), _ptr(l), n, c, hw, _ptr(mean), _ptr(var), nt)
            _update_running_stats(bn, mean, var, n * hw, _count_batch(bn))
        else:
            mean, var = bn.running_mean.double(), bn.running_var.double()
        invstd, scale, shift = _fold_batch_norm(bn, weight, bias, mean, var)
        # the batch norm folded into z = A[n, c] * (v - cv[c]) + B[c] * (sc - cs[c]) + S[n, c] around
        # centres (cpu_kernels.cpp section 1: no cancellation at large means). Training mode takes them from
        # the data; eval mode from nothing but the layer, so an image's output never depends on the other
        # images of its batch: the running mean where z is BN(v) itself (exactly (v - mean) * scale + bias),
        # else 0, PyTorch's own eval-mode fold
        ad = scale.expand(n, c) if a is None else a.double() * scale
        if bn.training:
            centre_v = _plane_centres(v)
        elif a is None and l is None:
            centre_v = bn.running_mean.to(dt).contiguous()
        else:
            centre_v = v.new_zeros(c)
        offset = ad * centre_v.double()
        coef_b = centre_sc = None
        if l is not None:
            centre_sc = _plane_centres(sc) if bn.training else v.new_zeros(c)
            coef_b = (l.double() * scale).to(dt)
            offset = offset + l.double() * scale * centre_sc.double()
        coef_a, coef_s = ad.to(dt).contiguous(), (shift + offset).to(dt).contiguous()
        centres = centre_v if centre_sc is None else torch.cat([centre_v, centre_sc])
        out = torch.empty_like(v)
        _kernel("apply", dt)(
            _ptr(v), _ptr(sc), _ptr(y), _ptr(coef_a), _ptr(coef_b), _ptr(coef_s), _ptr(centres), _ptr(out),
            n, c, hw, int(relu), nt,
        )
        # (gate and lam themselves too: reshaped here they would not require grad, and first_order_only needs
        # every differentiable input among the saved tensors to refuse a second-order pass through them)
        ctx.save_for_backward(
            v, sc, a, l, weight, mean.to(dt), invstd.to(dt), scale.to(dt), coef_a, coef_b, coef_s, centres, gate, lam
        )
        ctx.relu, ctx.training, ctx.grad_into = relu, bn.training, grad_into
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        v, sc, a, l, weight, mean, invstd, scale, coef_a, coef_b, coef_s, centres, _, _ = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad_out.contiguous()
        n, c, h, w = v.shape
        hw, dt, nt = h * w, v.dtype, torch.get_num_threads()
        sum_g = torch.empty(c, dtype=torch.float64)
        sum_gx = torch.empty(c, dtype=torch.float64)
        _kernel("bwd_reduce", dt)(
            _ptr(g), _ptr(v), _ptr(sc), _ptr(a), _ptr(l), _ptr(mean), _ptr(invstd),
            _ptr(coef_a), _ptr(coef_b), _ptr(coef_s), _ptr(centres), n, c, hw, _ptr(sum_g), _ptr(sum_gx),
            int(ctx.relu), nt,
        )
        grad_w = sum_gx.to(dt) if weight is not None and need[5] else None
        grad_b = sum_g.to(dt) if need[6] else None
        grad_v = grad_sc = grad_gate = grad_lam = None
        if need[0] or need[1] or need[3] or need[4]:
            if ctx.training:  # d mean / d x and d var / d x
                mg, mgx = (sum_g / (n * hw)).to(dt), (sum_gx / (n * hw)).to(dt)
            else:  # eval-mode statistics are constants
                mg = mgx = torch.zeros(c, dtype=dt)
            grad_v = ctx.grad_into() if ctx.grad_into is not None and need[0] else None
            if grad_v is None or grad_v.shape != v.shape or grad_v.dtype != v.dtype or not grad_v.is_contiguous():
                grad_v = torch.empty_like(v)
            grad_sc = None if sc is None else torch.empty_like(v)
            dot_v = torch.empty(n, c, dtype=torch.float64) if need[3] else None
            dot_sc = None if sc is None else torch.empty(n, c, dtype=torch.float64)
            _kernel("bwd_apply", dt)(
                _ptr(g), _ptr(v), _ptr(sc), _ptr(a), _ptr(l), _ptr(mean), _ptr(invstd),
                _ptr(coef_a), _ptr(coef_b), _ptr(coef_s), _ptr(centres), _ptr(scale), _ptr(mg), _ptr(mgx),
                _ptr(grad_v), _ptr(grad_sc), _ptr(dot_v), _ptr(dot_sc), n, c, hw, int(ctx.relu), nt,
            )
            grad_gate = dot_v.to(dt).view(n, c, 1, 1) if need[3] else None
            grad_lam = dot_sc.sum(0).to(dt).view(c, 1, 1) if need[4] else None
            grad_v = grad_v if need[0] else None
            grad_sc = grad_sc if need[1] else None
        return grad_v, grad_sc, grad_out if need[2] else None, grad_gate, grad_lam, grad_w, grad_b, None, None, None


def attention_tail(
    bn: nn.BatchNorm2d,
    v: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    sc: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    lam: Optional[torch.Tensor] = None,
    relu: bool = False,
    grad_into: Optional[Callable[[], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """``y + act(bn(gate * v + lam * sc))``: the tail of an attention layer (``act`` is ReLU if ``relu``).

    MRLA-L: ``attention_tail(bn, V, y, sc=sc, gate=gate_c, lam=lam)``; MRLA-B:
    ``attention_tail(bn, O, y, relu=True)``. ``gate`` is ``[B, C, 1, 1]``, ``lam`` ``[C, 1, 1]``; ``sc``
    and ``lam`` come together; ``y`` None leaves out the residual sum. One fused C++ kernel pair for
    contiguous NCHW float32/float64 CPU tensors in eager mode (see :func:`cpu_kernels`), the plain
    modules (through :func:`light_tail` / :func:`batch_norm`) everywhere else.

    ``grad_into`` (kernel path only): called in backward for a contiguous tensor like ``v`` to write
    ``v``'s gradient into (MRLA-B's gradient slot, which saves a copy); a fresh tensor where it returns
    None or something else.
    """
    if (sc is None) != (lam is None):
        raise ValueError("attention_tail: `sc` and `lam` must be given together")
    if gate is not None and gate.shape != (v.shape[0], v.shape[1], 1, 1):
        raise ValueError(f"attention_tail: gate must be [B, C, 1, 1] = {[v.shape[0], v.shape[1], 1, 1]}, got {list(gate.shape)}")
    if lam is not None and lam.numel() != v.shape[1]:
        raise ValueError(f"attention_tail: lam must have one value per channel ({v.shape[1]}), got {list(lam.shape)}")
    if (
        _bn_eligible(bn, v)
        and _same_layout(sc, v)
        and _same_layout(y, v)
        and all(t is None or t.dtype == v.dtype for t in (gate, lam))
        and v.shape[2] * v.shape[3] >= TAIL_MIN_PLANE
        and cpu_kernels() is not None
    ):
        return _FusedTail.apply(v, sc, y, gate, lam, bn.weight, bn.bias, bn, relu, grad_into)
    if sc is not None and gate is not None:
        o = light_tail(bn, v, sc, gate, lam)
    else:
        o = v if gate is None else v * gate
        o = batch_norm(bn, o if sc is None else torch.addcmul(o, sc, lam))
    if relu:
        o = F.relu(o, inplace=True)  # batch norm's backward keeps its input, not its output
    return o if y is None else y + o


class _DepthwiseConv3x3(torch.autograd.Function):
    """The depthwise conv, and (``with_mean``) the per-channel mean of its input from the same read; the
    mean's gradient is added to the input gradient in the same write."""

    @staticmethod
    def forward(ctx, x, weight, with_mean: bool, into: Optional[tuple] = None):
        n, c, h, w = x.shape
        wc = weight.detach().contiguous()
        # into: (a contiguous tensor like x,) to write the result into (_checked_into)
        out = torch.empty_like(x) if into is None else into[0]
        mean = torch.empty(n, c, dtype=torch.float64) if with_mean else None
        _kernel("dw_forward", x.dtype)(
            None, None, _ptr(x), _ptr(wc), _ptr(out), _ptr(mean), n, c, h, w, torch.get_num_threads()
        )
        ctx.save_for_backward(x, wc)
        return (out, mean.to(x.dtype)) if with_mean else out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out, grad_mean=None):
        x, wc = ctx.saved_tensors
        grad_x, grad_w = _dw_backward(x, wc, grad_out, grad_mean, None, *ctx.needs_input_grad[:2], relu=False)
        return grad_x, grad_w, None, None


class _ReluSumDepthwise3x3(torch.autograd.Function):
    """``y = relu(pre + sc)`` (a block's residual sum and final ReLU), the depthwise conv of ``y`` and the
    per-channel mean of ``y``, in one pass; returns ``(y, conv(y), mean)``. Backward takes y's gradient
    from its other uses (MRLA-B's residual) into the conv's input-gradient write and applies the ReLU's
    mask there: one pass, where autograd ran the sum of y's two gradients and the ReLU's backward
    separately. The gradients of ``pre`` and ``sc`` are then the same tensor, as for PyTorch's sum."""

    @staticmethod
    def forward(ctx, pre, sc, weight, into: Optional[tuple] = None):
        n, c, h, w = pre.shape
        wc = weight.detach().contiguous()
        y = torch.empty_like(pre)
        out = torch.empty_like(pre) if into is None else into[0]
        mean = torch.empty(n, c, dtype=torch.float64)
        _kernel("dw_forward", pre.dtype)(
            _ptr(pre), _ptr(sc), _ptr(y), _ptr(wc), _ptr(out), _ptr(mean), n, c, h, w, torch.get_num_threads()
        )
        ctx.save_for_backward(y, wc)
        return y, out, mean.to(pre.dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_y, grad_out, grad_mean):
        y, wc = ctx.saved_tensors
        need_pre, need_sc, need_w = ctx.needs_input_grad[:3]
        grad_in, grad_w = _dw_backward(y, wc, grad_out, grad_mean, grad_y, need_pre or need_sc, need_w, relu=True)
        return grad_in if need_pre else None, grad_in if need_sc else None, grad_w, None


def _dw_backward(x, wc, grad_out, grad_mean, grad_res, need_x: bool, need_w: bool, relu: bool):
    """The depthwise conv's input gradient (plus the mean's and ``grad_res``; with ``relu``, masked by
    ``x > 0``) and its weight gradient, each where needed."""
    n, c, h, w = x.shape
    if not (need_x or need_w):
        return None, None
    g = grad_out.contiguous()  # zeros if only the mean was used (autograd materialises them)
    grad_x = torch.empty_like(x) if need_x else None
    per_plane = torch.empty(n, c, 9, dtype=torch.float64) if need_w else None
    add = None if grad_mean is None or not need_x else (grad_mean * (1.0 / (h * w))).to(x.dtype).contiguous()
    res = grad_res.contiguous() if grad_res is not None and need_x else None
    _kernel("dw_backward", x.dtype)(
        _ptr(g), _ptr(x), _ptr(wc), _ptr(add), _ptr(res), _ptr(grad_x), _ptr(per_plane), n, c, h, w, int(relu),
        torch.get_num_threads(),
    )
    grad_w = None if per_plane is None else per_plane.sum(0).to(wc.dtype).view_as(wc)
    return grad_x, grad_w


def _dw_eligible(conv: nn.Module, x: torch.Tensor) -> bool:
    return (
        type(conv) is nn.Conv2d
        and not _hooked(conv)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.bias is None
        and conv.groups == conv.in_channels == conv.out_channels
        and _cpu_eager(x)
        and conv.weight.device == x.device  # (never a meta tensor: the kernels read through pointers)
        and x.shape[1] == conv.in_channels
        and x.shape[3] >= 2
        and x.shape[2] * x.shape[3] >= DEPTHWISE_MIN_PLANE
        and conv.weight.dtype == x.dtype
        and cpu_kernels() is not None
    )


def depthwise_conv3x3(conv: nn.Conv2d, x: torch.Tensor, *, with_mean: bool = False, out: Optional[torch.Tensor] = None):
    """``conv(x)`` for a depthwise 3x3 convolution (stride 1, padding 1, no bias); with ``with_mean`` also
    the per-channel mean of ``x`` (``[B, C]``), ``(conv(x), x.mean((2, 3)))``. On the C++ kernel for
    contiguous NCHW float32/float64 CPU tensors in eager mode (one read of ``x`` for both), through
    ``conv`` itself everywhere else.

    ``out``: where the kernel writes the result (MRLA-B's stage slot, which saves a copy), a contiguous
    tensor of ``x``'s shape and dtype that nothing else reads during the call; the returned tensor is
    then ``out`` itself. Where the kernel does not run (``_dw_eligible``), ``out`` is left
    alone and a new tensor is returned.
    """
    if _dw_eligible(conv, x):
        return _DepthwiseConv3x3.apply(x, conv.weight, with_mean, _checked_into(out, x, "depthwise_conv3x3"))
    if not with_mean:
        return conv(x)
    # sum * 1/HW rather than mean: mean's backward materialises a full-size gradient before it is
    # accumulated into x's; sum's is an expanded view
    return conv(x), x.sum(dim=(2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))


def _slots_eligible(slots: torch.Tensor, other: torch.Tensor) -> bool:
    """``slots`` ``[S, B, n]`` with contiguous ``[B, n]`` slots (any slot stride), and ``other`` of its
    dtype, on the CPU in eager mode without autograd recording, with the kernels available."""
    return (
        SLOT_KERNELS
        and slots.device.type == "cpu"
        and other.device.type == "cpu"
        and slots.dim() == 3
        and slots.dtype in (torch.float32, torch.float64)
        and other.dtype == slots.dtype
        and slots.shape[0] > 0
        and slots.stride(2) == 1
        and slots.stride(1) == slots.shape[2]
        and not (torch.is_grad_enabled() and (slots.requires_grad or other.requires_grad))
        and _fast_mode()
        and cpu_kernels() is not None
    )


def _slot_kernel(name: str, slots: torch.Tensor, other: torch.Tensor, cols: int) -> Optional[torch.Tensor]:
    """Runs ``ela_<name>`` over ``slots`` ``[S, B, n]`` and ``other`` into a fresh ``[B, cols]`` result;
    None where the kernels do not apply."""
    if not _slots_eligible(slots, other):
        return None
    s, b, n = slots.shape
    other = other.contiguous()  # kept in a name until the call returns: the kernel gets raw pointers
    out = torch.empty(b, cols, dtype=slots.dtype)
    _kernel(name, slots.dtype)(_ptr(slots), slots.stride(0), _ptr(other), _ptr(out), s, b, n, torch.get_num_threads())
    return out


def slot_weighted_sum(weights: torch.Tensor, slots: torch.Tensor) -> Optional[torch.Tensor]:
    """``sum_s weights[:, s] * slots[s]``: weights ``[B, S]``, slots ``[S, B, n]`` -> ``[B, n]``, on the C++
    kernel (MRLA-B's output ``O_t`` and the values' gradient); None where it does not apply (then the
    caller runs ``torch.bmm``). Each output element is summed over the slots in order, by one thread."""
    s, b, n = slots.shape if slots.dim() == 3 else (0, 0, 0)
    if weights.shape != (b, s):
        raise ValueError(f"slot_weighted_sum: weights must be [B, S] = {[b, s]}, got {list(weights.shape)}")
    return _slot_kernel("slot_wsum", slots, weights, n)


def slot_dots(grad: torch.Tensor, slots: torch.Tensor) -> Optional[torch.Tensor]:
    """``<grad[b], slots[s, b]>`` for every row b and slot s: grad ``[B, n]``, slots ``[S, B, n]`` ->
    ``[B, S]``, on the C++ kernel (MRLA-B's attention-weight gradient); None where it does not apply.
    Four slots are read per pass over a gradient row; the vector lanes are added in float64."""
    s, b, n = slots.shape if slots.dim() == 3 else (0, 0, 0)
    if grad.shape != (b, n):
        raise ValueError(f"slot_dots: grad must be [B, n] = {[b, n]}, got {list(grad.shape)}")
    return _slot_kernel("slot_dots", slots, grad, s)


def attention_weights(g: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, keys: Sequence[torch.Tensor], heads: int,
                      scale: float) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """MRLA-B's attention weights on the C++ kernel: ``(attn, k)``, or None where it does not apply (then the
    caller runs the same in PyTorch ops).

    ``g`` is the layer's pooled descriptor ``[B, C]``; ``wq``, ``wk`` the weights of the two Conv1d(1, 1,
    k) that make ``q`` and ``k`` from it along the channel axis; ``keys`` the stage's earlier keys, each
    ``[B, heads, d]``. ``attn`` (``[B, heads, len(keys) + 1]``) is ``softmax(scale * <q_h, K_s,h>)`` over
    ``keys + [k]`` per sample and head; ``k`` (``[B, heads, d]``) is this layer's key, for the next layers.
    Gradients reach ``g``, ``wq``, ``wk`` and every key.
    """
    if not _qk_kernel_applies("attention_weights", g, wq, wk, heads, keys):
        return None
    return _AttentionWeights.apply(g.contiguous(), wq.contiguous(), wk.contiguous(), float(scale), heads, *keys)


def _qk_kernel_applies(caller: str, g: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, heads: int,
                       keys: Sequence[torch.Tensor] = ()) -> bool:
    """Whether the Q/K kernels (attention weights, gate) can take these; a shape that fits no layer is an error."""
    if g.dim() != 2 or g.shape[1] % heads:
        raise ValueError(f"{caller}: g must be [B, C] with C divisible by {heads} heads, got {tuple(g.shape)}")
    b, c = g.shape
    shape = (b, heads, c // heads)
    for i, key in enumerate(keys):
        if tuple(key.shape) != shape:
            raise ValueError(f"{caller}: key {i} must be [B, heads, d] = {list(shape)}, got {list(key.shape)}")
    if wq.numel() % 2 == 0 or wk.numel() != wq.numel():
        raise ValueError(
            f"{caller}: wq and wk must hold the same odd number of taps, got {wq.numel()} and {wk.numel()}"
        )
    return (
        WEIGHT_KERNELS
        and _fast_mode()
        and g.dtype in (torch.float32, torch.float64)
        and all(t.device.type == "cpu" and t.dtype == g.dtype for t in (g, wq, wk, *keys))
        and all(key.is_contiguous() for key in keys)
        and cpu_kernels() is not None
    )


def light_gate(g: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, heads: int, scale: float) -> Optional[torch.Tensor]:
    """MRLA-L's gate ``sigmoid(scale * <q_h, k_h>)`` (``[B, heads]``) on the C++ kernel, ``q`` and ``k`` made
    from the pooled descriptor ``g`` (``[B, C]``) as in :func:`attention_weights`; None where the kernel does
    not apply. Differentiable in ``g``, ``wq`` and ``wk``."""
    if not _qk_kernel_applies("light_gate", g, wq, wk, heads):
        return None
    return _LightGate.apply(g.contiguous(), wq.contiguous(), wk.contiguous(), float(scale), heads)


def light_gate_grad(g: torch.Tensor, gate: torch.Tensor, grad_gate: torch.Tensor, wq: torch.Tensor,
                    wk: torch.Tensor, heads: int, scale: float) -> Optional[Tuple[torch.Tensor, ...]]:
    """The backward of :func:`light_gate` without autograd: ``(dL/dg, dL/dwq, dL/dwk)`` from the gate and its
    gradient (``[B, heads]``); None where the kernel does not apply."""
    if gate.dim() != 2 or gate.shape != (g.shape[0], heads) or grad_gate.shape != gate.shape:
        raise ValueError(f"light_gate_grad: gate and grad_gate must be [B, heads] = {[g.shape[0], heads]}, "
                         f"got {list(gate.shape)} and {list(grad_gate.shape)}")
    if not (_qk_kernel_applies("light_gate_grad", g, wq, wk, heads) and gate.dtype == grad_gate.dtype == g.dtype):
        return None
    return _light_gate_backward(g.contiguous(), wq.contiguous(), wk.contiguous(), gate.contiguous(),
                                grad_gate.contiguous(), heads, float(scale))


def _light_gate_backward(g, wq, wk, gate, grad_gate, heads: int, scale: float):
    grad_g, grad_wq, grad_wk = torch.empty_like(g), torch.empty_like(wq), torch.empty_like(wk)
    _kernel("light_gate_bwd", g.dtype)(
        _ptr(g), _ptr(wq), _ptr(wk), _ptr(gate), _ptr(grad_gate), _ptr(grad_g), _ptr(grad_wq), _ptr(grad_wk),
        g.shape[0], g.shape[1], heads, wq.numel(), scale,
    )
    return grad_g, grad_wq, grad_wk


class _LightGate(torch.autograd.Function):
    """See :func:`light_gate`; backward recomputes q and k (a few microseconds) instead of saving them."""

    @staticmethod
    def forward(ctx, g, wq, wk, scale: float, heads: int):
        gate = g.new_empty(g.shape[0], heads)
        _kernel("light_gate_fwd", g.dtype)(_ptr(g), _ptr(wq), _ptr(wk), _ptr(gate), g.shape[0], g.shape[1], heads,
                                           wq.numel(), scale)
        ctx.save_for_backward(g, wq, wk, gate)
        ctx.scale, ctx.heads = scale, heads
        return gate

    @staticmethod
    @first_order_only
    def backward(ctx, grad_gate):
        g, wq, wk, gate = ctx.saved_tensors
        grads = _light_gate_backward(g, wq, wk, gate, grad_gate.contiguous(), ctx.heads, ctx.scale)
        return (*grads, None, None)


def _pointer_array(tensors: Sequence[torch.Tensor]):
    """A C array of the tensors' data pointers (kept alive by the caller with the tensors)."""
    return (ctypes.c_void_p * max(len(tensors), 1))(*[t.data_ptr() for t in tensors])


class _AttentionWeights(torch.autograd.Function):
    """See :func:`attention_weights`. The earlier keys are inputs, so their gradients (``dL/dK_s`` from this
    layer) are summed by autograd with those from the other layers that read them."""

    @staticmethod
    def forward(ctx, g, wq, wk, scale: float, heads: int, *keys):
        b, c = g.shape
        q = torch.empty_like(g)
        k = g.new_empty(b, heads, c // heads)
        attn = g.new_empty(b, heads, len(keys) + 1)
        _kernel("attn_weights_fwd", g.dtype)(
            _ptr(g), _ptr(wq), _ptr(wk), _pointer_array(keys), _ptr(q), _ptr(k), _ptr(attn), b, c, heads, wq.numel(),
            len(keys), scale,
        )
        ctx.save_for_backward(g, wq, wk, q, k, attn, *keys)
        ctx.scale, ctx.heads = scale, heads
        ctx.set_materialize_grads(False)
        return attn, k

    @staticmethod
    @first_order_only
    def backward(ctx, grad_attn, grad_k):
        g, wq, wk, q, k, attn, *keys = ctx.saved_tensors
        b, c = g.shape
        grad_attn = torch.zeros_like(attn) if grad_attn is None else grad_attn.contiguous()
        grad_k = None if grad_k is None else grad_k.contiguous()
        grad_g = torch.empty_like(g)
        grad_wq, grad_wk = torch.empty_like(wq), torch.empty_like(wk)
        grad_keys = g.new_empty(len(keys), *k.shape)
        _kernel("attn_weights_bwd", g.dtype)(
            _ptr(g), _ptr(wq), _ptr(wk), _pointer_array(keys), _ptr(q), _ptr(k), _ptr(attn), _ptr(grad_attn),
            _ptr(grad_k), _ptr(grad_g), _ptr(grad_wq), _ptr(grad_wk), _ptr(grad_keys), b, c, ctx.heads, wq.numel(),
            len(keys), ctx.scale,
        )
        return (grad_g, grad_wq, grad_wk, None, None, *grad_keys.unbind(0))


def relu_sum_depthwise_conv3x3(conv: nn.Conv2d, pre: torch.Tensor, sc: torch.Tensor, *,
                               out: Optional[torch.Tensor] = None):
    """``(y, conv(y), y.mean((2, 3)))`` for ``y = relu(pre + sc)`` (a block's residual sum and final ReLU)
    in one C++ kernel pass, or None where the kernel does not apply (then the caller forms ``y`` itself and
    calls :func:`depthwise_conv3x3`). ``out`` as for :func:`depthwise_conv3x3`."""
    if not (_dw_eligible(conv, pre) and _same_layout(sc, pre)):
        return None
    return _ReluSumDepthwise3x3.apply(pre, sc, conv.weight, _checked_into(out, pre, "relu_sum_depthwise_conv3x3"))


def _checked_into(out: Optional[torch.Tensor], x: torch.Tensor, caller: str) -> Optional[tuple]:
    """``out`` in a tuple (so that autograd does not take it for an input), after checking that it fits."""
    if out is None:
        return None
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(
            f"{caller}: out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}, "
            f"got {out.dtype} {tuple(out.shape)} (contiguous: {out.is_contiguous()})"
        )
    return (out,)


# ------------------------------------------------------------------------------------------------
# MRLA-L's whole value path in one C++ kernel set: y + BN(gate * wv(y) + lambda * sc)


class _FusedLight(torch.autograd.Function):
    """MRLA-L from its block output ``y`` and shortcut ``sc``: the pooled descriptor, the gate (through
    ``gate_fn``, a few small PyTorch ops), and ``y + BN(gate * wv(y) + lam * sc)``.

    ``V = wv(y)`` is never stored: the kernels recompute it plane by plane from ``y``, and every
    statistic comes from per-(sample, channel) moments (cpu_kernels.cpp, section 3). Forward is two
    passes (moments; output), backward two (moments; gradients of y and sc, the conv's weight gradient),
    where the conv and the tail as separate kernels take three each way, plus autograd's sum of y's two
    gradients, and keep V alive until backward.

    With ``pre_relu`` the first input is the block's conv branch before its residual sum and ReLU:
    the first pass forms ``y = relu(pre + sc)`` itself, and backward returns the gradients of ``pre`` and
    ``sc`` through that sum and ReLU, so neither runs as PyTorch ops (two passes forward, two backward,
    and one gradient sum fewer).

    Returns ``(out, gate)``; ``gate`` (``[B, heads]``) is for the KL recording and carries no gradient.
    """

    @staticmethod
    def forward(ctx, y, sc, wv, lam, weight, bias, bn: nn.BatchNorm2d, gate_fn, gate_grad, heads: int,
                pre_relu: bool, *gate_params):
        n, c, h, w = y.shape
        hw, m, dt, nt = h * w, y.shape[0] * h * w, y.dtype, torch.get_num_threads()
        wc = wv.detach().contiguous()
        training = bn.training
        mom = torch.empty(n, c, 6, dtype=torch.float64)
        pre = None
        if pre_relu:
            pre, y = y, torch.empty_like(y)  # y = relu(pre + sc), written by the first pass
        _kernel("light_fwd_moments", dt)(
            _ptr(pre), _ptr(y), _ptr(sc), _ptr(wc), _ptr(mom), n, c, h, w, int(training), nt
        )
        g = (mom[..., 0] * (1.0 / hw)).to(dt)
        with torch.no_grad():
            gate = gate_fn(g, *(t.detach() for t in gate_params))  # [B, heads]
        a = _heads_to_channels(gate, c).to(dt).contiguous()  # [B, C]
        l = lam.detach().reshape(c).to(dt).contiguous()
        ad, ld = a.double(), l.double()
        if training:
            mean, var = _light_batch_stats(y, sc, wc, a, l, mom, m)
            _update_running_stats(bn, mean, var, m, _count_batch(bn))
        else:
            mean, var = bn.running_mean.double(), bn.running_var.double()
        invstd, scale, shift = _fold_batch_norm(bn, weight, bias, mean, var)
        # the batch norm folded into out = y + A[n, c] * V + B[c] * sc + S[c]
        coef_a = (ad * scale).to(dt).contiguous()
        coef_b = (ld * scale).to(dt)
        coef_s = shift.to(dt)
        out = torch.empty_like(y)
        _kernel("light_fwd_apply", dt)(
            _ptr(y), _ptr(sc), _ptr(wc), _ptr(coef_a), _ptr(coef_b), _ptr(coef_s), _ptr(out), n, c, h, w, nt
        )
        # (wv and lam themselves last: detached above, first_order_only needs them among the saved tensors)
        ctx.save_for_backward(y, sc, wc, g, gate, a, l, mean, invstd, scale, mom, *gate_params, wv, lam)
        ctx.gate_fn, ctx.gate_grad, ctx.heads = gate_fn, gate_grad, heads
        ctx.training, ctx.n_gate = training, len(gate_params)
        ctx.pre_relu = pre_relu
        ctx.mark_non_differentiable(gate)
        return out, gate

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out, _grad_gate):
        y, sc, wc, g, gate, a, l, mean, invstd, scale, mom, *gate_params, _, _ = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, c, h, w = y.shape
        hw, m, dt, nt = h * w, y.shape[0] * h * w, y.dtype, torch.get_num_threads()
        gout = grad_out.contiguous()  # zeros if only the gate was used (autograd materialises them)
        red = torch.empty(n, c, 3, dtype=torch.float64)
        _kernel("light_bwd_reduce", dt)(_ptr(gout), _ptr(y), _ptr(sc), _ptr(wc), _ptr(red), n, c, h, w, nt)
        if not ctx.training:  # eval mode kept only the pooled sums: the V / sc moments now
            mom = torch.empty(n, c, 6, dtype=torch.float64)
            _kernel("light_fwd_moments", dt)(None, _ptr(y), _ptr(sc), _ptr(wc), _ptr(mom), n, c, h, w, 1, nt)
        s_d, s_dv, s_dsc = red.unbind(-1)
        _, s_v, s_vv, s_vsc, s_sc, s_scsc = mom.unbind(-1)
        ad, ld = a.double(), l.double()
        # sum over (n, h, w) of g and of g * xhat, xhat = (a V + l sc - mean) * invstd
        sum_g = s_d.sum(0)
        sum_gx = invstd * (ad * s_dv + ld * s_dsc - mean * s_d).sum(0)
        grad_weight = sum_gx.to(dt) if need[4] else None
        grad_bias = sum_g.to(dt) if need[5] else None
        # the batch norm's input gradient gx = scale * (g - mg - xhat * mgx) as
        # al[c] * g + be[n, c] * V + de[c] * sc + ep[c]
        if ctx.training:
            mg, mgx = sum_g / m, sum_gx / m
        else:
            mg = mgx = torch.zeros_like(sum_g)
        al = scale
        be = -(scale * mgx * invstd) * ad
        de = -(scale * mgx * invstd) * ld
        ep = scale * (mgx * invstd * mean - mg)
        # sum over (h, w) of gx * V and gx * sc, from the moments
        grad_a = al * s_dv + be * s_vv + de * s_vsc + ep * s_v  # [B, C]
        grad_lam = (al * s_dsc + be * s_vsc + de * s_scsc + ep * s_sc).sum(0).to(dt).view(c, 1, 1) if need[3] else None
        # y's gradient is needed for the first input's, and with pre_relu for sc's as well (y = relu(pre + sc))
        need_y = need[0] or (ctx.pre_relu and need[1])
        # the gradients of the pooled mean and of the gate's parameters: from ``gate_grad`` where given
        # (a few plain ops), else by recomputing the gate's small graph with autograd
        need_params = need[11:]
        grad_params = [None] * ctx.n_gate
        gy_add = grad_g = None
        if need_y or any(need_params):
            grad_gate = grad_a.view(n, ctx.heads, c // ctx.heads).sum(-1).to(gate.dtype)
            if ctx.gate_grad is not None:
                grad_g, *grad_params = ctx.gate_grad(g, gate, grad_gate, *gate_params)
                grad_params = [gp if nd else None for gp, nd in zip(grad_params, need_params)]
            else:
                with torch.enable_grad():
                    g_in = g.detach().requires_grad_(need_y)
                    params = [t.detach().requires_grad_(nd) for t, nd in zip(gate_params, need_params)]
                    recomputed = ctx.gate_fn(g_in, *params)
                    wanted = [t for t in (g_in, *params) if t.requires_grad]
                    got = iter(torch.autograd.grad(recomputed, wanted, grad_gate, allow_unused=True))
                grad_g = next(got) if need_y else None
                grad_params = [next(got) if nd else None for nd in need_params]
            if need_y and grad_g is not None:
                gy_add = (grad_g * (1.0 / hw)).to(dt).contiguous()
        grad_y = torch.empty_like(y) if need[0] else None
        grad_sc = torch.empty_like(y) if need[1] else None
        per_plane = torch.empty(n, c, 9, dtype=torch.float64) if need[2] else None
        if grad_y is not None or grad_sc is not None or per_plane is not None:
            # kept in names until the call returns: the kernel gets raw pointers
            coefs = [t.to(dt).contiguous() for t in (al, be, de, ep)]
            _kernel("light_bwd_apply", dt)(
                _ptr(gout), _ptr(y), _ptr(sc), _ptr(wc), *map(_ptr, coefs),
                _ptr(a), _ptr(l), _ptr(gy_add), _ptr(grad_y), _ptr(grad_sc), _ptr(per_plane), n, c, h, w,
                int(ctx.pre_relu), nt,
            )
        grad_wv = None if per_plane is None else per_plane.sum(0).to(wc.dtype).view_as(wc)
        return (grad_y, grad_sc, grad_wv, grad_lam, grad_weight, grad_bias, None, None, None, None, None,
                *grad_params)


def _light_batch_stats(y, sc, wc, a, l, mom, m):
    """Per-channel mean and biased variance of ``a * wv(y) + l * sc`` from the per-plane moments; an exact
    second pass (V written out, then the tail's shifted statistics) where one pass is ill-conditioned."""
    ad, ld = a.double(), l.double()
    _, s_v, s_vv, s_vsc, s_sc, s_scsc = mom.unbind(-1)
    mean = (ad * s_v + ld * s_sc).sum(0) / m
    second = (ad * ad * s_vv + 2 * ad * ld * s_vsc + ld * ld * s_scsc).sum(0) / m
    var = (second - mean * mean).clamp_min(0)
    if not bool((second > VARIANCE_CONDITION_LIMIT * var).any()):
        return mean, var
    n, c, h, w = y.shape
    v = torch.empty_like(y)
    _kernel("dw_forward", y.dtype)(None, None, _ptr(y), _ptr(wc), _ptr(v), None, n, c, h, w, torch.get_num_threads())
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    _kernel("stats", y.dtype)(_ptr(v), _ptr(sc), _ptr(a), _ptr(l), n, c, h * w, _ptr(mean), _ptr(var), torch.get_num_threads())
    return mean, var


def _heads_to_channels(per_head: torch.Tensor, channels: int) -> torch.Tensor:
    """``[B, ..., heads]`` -> ``[B, ..., C]``: head h covers the contiguous channels h*d .. (h+1)*d - 1.

    The expanded tensor is tiny (no spatial dims); the large tensors are then scaled per channel.
    """
    heads = per_head.shape[-1]
    return per_head.unsqueeze(-1).expand(*per_head.shape, channels // heads).reshape(*per_head.shape[:-1], channels)


def light_layer(bn: nn.BatchNorm2d, wv: nn.Conv2d, y: torch.Tensor, sc: torch.Tensor, lam: torch.Tensor,
                gate_fn, heads: int, *gate_params: torch.Tensor, pre_relu: bool = False, gate_grad=None):
    """MRLA-L's ``(y + BN(gate * wv(y) + lam * sc), gate)`` in one fused kernel set, or None where it does
    not apply (then the caller runs :func:`depthwise_conv3x3` and :func:`attention_tail`).

    With ``pre_relu``, ``y`` is the block's conv branch before its residual sum and ReLU, and the layer
    runs on ``relu(y + sc)``, formed inside the kernels (see :class:`_FusedLight`).

    ``gate_fn(g, *gate_params)`` maps the pooled descriptor ``g = y.mean((2, 3))`` (``[B, C]``) to the
    per-head gate ``[B, heads]``; it must be made of differentiable PyTorch ops. ``gate_grad(g, gate,
    grad_gate, *gate_params)``, where given, is its backward: it returns the gradients of ``g`` and of
    every gate parameter (``gate`` is the forward's output, ``grad_gate`` its gradient). Without it the
    backward recomputes ``gate_fn`` with autograd and calls ``torch.autograd.grad`` on it, which took
    0.12 ms more per layer backward at batch 2 and 0.5 ms more at ``[64, 64, 32, 32]`` on one CPU thread
    (MRLA-L passes :meth:`MrlaLight._gate_grad`: the C++ kernel :func:`light_gate_grad`, else a few plain
    ops). Applies to contiguous NCHW float32/float64 CPU tensors in eager mode, with the kernels
    available, planes of at least ``LIGHT_MIN_PLANE`` elements (and the conv's and tails' limits), and
    ``FUSED_LIGHT_LAYER`` on.
    """
    if not (
        FUSED_LIGHT_LAYER
        and _dw_eligible(wv, y)
        and _bn_eligible(bn, y)
        and _same_layout(sc, y)
        and y.shape[2] * y.shape[3] >= max(TAIL_MIN_PLANE, LIGHT_MIN_PLANE)
        and y.shape[1] % heads == 0
        and lam.numel() == y.shape[1]
        and all(t.dtype == y.dtype for t in (lam, *gate_params))
    ):
        return None
    return _FusedLight.apply(y, sc, wv.weight, lam, bn.weight, bn.bias, bn, gate_fn, gate_grad, heads, pre_relu,
                             *gate_params)
