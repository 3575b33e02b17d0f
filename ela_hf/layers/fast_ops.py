"""CPU fast paths for the batch norm of an attention layer and for MRLA-L's value path.

They compute exactly what ``nn.BatchNorm2d`` and the straightforward formulation compute
(``tests/test_fast_ops.py`` and ``tests/test_perf_equivalence.py`` check forward, backward and the
running statistics); they only choose cheaper kernels for NCHW float32/float64 tensors on the CPU in
eager mode. Everywhere else (CUDA, channels_last, autocast, under ``torch.compile``, SyncBatchNorm) the
plain modules run.

Why (one thread on the 2-core benchmark machine, inside a training step of CIFAR ResNet-110):

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

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["batch_norm", "light_tail", "FAST_CPU_PATHS"]

# Set to False to run the plain modules everywhere (for comparisons and debugging).
FAST_CPU_PATHS = True
# Below this size the native batch-norm statistics are as fast as the one-pass ones.
FAST_STATS_MIN_BYTES = 6 << 20
# The one-pass variance E[x^2] - E[x]^2 loses precision when the mean dominates; beyond this ratio of
# E[x^2] to the variance (float32 then keeps ~3 significant digits of the variance) the native
# two-pass kernel runs instead.
VARIANCE_CONDITION_LIMIT = 1e4


def _cpu_eager(x: torch.Tensor) -> bool:
    return (
        FAST_CPU_PATHS
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _bn_eligible(bn: nn.Module, x: torch.Tensor) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.running_mean is not None
        and _cpu_eager(x)
        and (bn.weight is None or bn.weight.dtype == x.dtype)
        and x.shape[0] * x.shape[2] * x.shape[3] > 1
    )


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


def _train_forward(bn: nn.BatchNorm2d, x: torch.Tensor):
    """``bn(x)`` in training mode without autograd, with ``nn.BatchNorm2d``'s running-statistics update.

    Returns ``(out, mean, invstd)``, what ``native_batch_norm_backward`` needs.
    """
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    stats = _fast_batch_stats(x) if x.numel() * x.element_size() >= FAST_STATS_MIN_BYTES else None
    if stats is None:
        return torch.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, momentum, bn.eps)
    mean, var = stats
    n = x.numel() // x.shape[1]
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_((var * (n / (n - 1))).to(bn.running_var.dtype), momentum)
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
        and sc.shape == v.shape
        and sc.is_contiguous()
        and sc.dtype == v.dtype
        and gate_c.dtype == v.dtype
        and lam.dtype == v.dtype
    ):
        return _LightTail.apply(v, sc, gate_c, lam, bn.weight, bn.bias, bn)
    return bn(torch.addcmul(lam * sc, v, gate_c))
