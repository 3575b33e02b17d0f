"""The C++ CPU kernels (``ela_hf/layers/cpu_kernels.cpp``) compute what the plain modules compute, and
are built and loaded safely.

``attention_tail`` (``y + act(BN(gate * V + lambda * sc))``) and ``depthwise_conv3x3`` are compared with
``nn.BatchNorm2d`` / ``F.conv2d`` and autograd: outputs, every gradient and the running statistics, in
float64 (tight) and float32, for every combination of their optional parts. The loader is checked for
its cache, its fallback without a compiler, its off switch, and two processes compiling at once.
"""
import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ela_hf.layers import MrlaBase, MrlaLight, StageState, fast_ops

needs_kernels = pytest.mark.skipif(
    fast_ops.cpu_kernels() is None, reason="no C++ compiler: the C++ kernels are unavailable here"
)


SHIPPED_LIMITS = (fast_ops.DEPTHWISE_MIN_PLANE, fast_ops.TAIL_MIN_PLANE, fast_ops.LIGHT_MIN_PLANE)  # before any test patches them


@pytest.fixture(autouse=True)
def kernels_at_every_size(monkeypatch):
    """The layers leave small planes to PyTorch; these tests use small tensors, so lift the limits
    (``test_small_planes_take_the_pytorch_paths`` checks them)."""
    monkeypatch.setattr(fast_ops, "DEPTHWISE_MIN_PLANE", 0)
    monkeypatch.setattr(fast_ops, "TAIL_MIN_PLANE", 0)
    monkeypatch.setattr(fast_ops, "LIGHT_MIN_PLANE", 0)


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def _bn(c, dtype, affine=True, momentum=0.1):
    bn = nn.BatchNorm2d(c, affine=affine, momentum=momentum).to(dtype)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return bn


def _reference_tail(bn, v, y, sc, gate, lam, relu):
    x = v if gate is None else v * gate
    if sc is not None:
        x = x + lam * sc
    o = bn(x)
    if relu:
        o = F.relu(o)
    return o if y is None else y + o


def _spy_tail(monkeypatch):
    calls = []
    real = fast_ops._FusedTail.apply
    monkeypatch.setattr(fast_ops._FusedTail, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["mrla_l", "mrla_b", "gate_only", "lam_only"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_attention_tail_matches_batch_norm_and_autograd(dtype, form, relu, residual, training, monkeypatch):
    calls = _spy_tail(monkeypatch)
    torch.manual_seed(0)
    n, c, h, w = 3, 5, 4, 6
    v = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True)
    y = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True) if residual else None
    with_sc = form in ("mrla_l", "lam_only")
    # an offset shortcut: the statistics must not lose precision to a large mean
    sc = (torch.randn(n, c, h, w, dtype=dtype) + 30).requires_grad_() if with_sc else None
    lam = torch.randn(c, 1, 1, dtype=dtype, requires_grad=True) if with_sc else None
    gate = torch.rand(n, c, 1, 1, dtype=dtype, requires_grad=True) if form in ("mrla_l", "gate_only") else None
    bn = _bn(c, dtype).train(training)
    ref_bn = copy.deepcopy(bn)
    named = [(k, t) for k, t in (("v", v), ("y", y), ("sc", sc), ("gate", gate), ("lam", lam)) if t is not None]
    inputs = [t for _, t in named]

    out = fast_ops.attention_tail(bn, v, y, sc=sc, gate=gate, lam=lam, relu=relu)
    want = _reference_tail(ref_bn, v, y, sc, gate, lam, relu)
    assert calls == [1]
    tol = _tol(dtype)
    torch.testing.assert_close(out, want, **tol)
    grad = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, inputs + [bn.weight, bn.bias], grad)
    want_grads = torch.autograd.grad(want, inputs + [ref_bn.weight, ref_bn.bias], grad)
    for name, g, r in zip([k for k, _ in named] + ["weight", "bias"], got_grads, want_grads):
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"gradient {name}: {m}")
    for got, ref in zip(bn.buffers(), ref_bn.buffers()):
        torch.testing.assert_close(got, ref, **tol)


@needs_kernels
def test_attention_tail_without_affine_and_cumulative_momentum(monkeypatch):
    calls = _spy_tail(monkeypatch)
    v = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    bn = _bn(3, torch.float64, affine=False, momentum=None).train()
    ref = copy.deepcopy(bn)
    for _ in range(3):  # momentum None: running averages over all batches so far
        out = fast_ops.attention_tail(bn, v, relu=True)
        want = F.relu(ref(v))
    torch.testing.assert_close(out, want, **_tol(torch.float64))
    (g,) = torch.autograd.grad(out, v, torch.ones_like(out))
    (r,) = torch.autograd.grad(want, v, torch.ones_like(want))
    torch.testing.assert_close(g, r, **_tol(torch.float64))
    torch.testing.assert_close(bn.running_var, ref.running_var, **_tol(torch.float64))
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 3 and len(calls) == 3


@needs_kernels
def test_attention_tail_partial_gradients(monkeypatch):
    """Only some inputs need gradients (frozen BN, a shortcut from a frozen stem)."""
    calls = _spy_tail(monkeypatch)
    v = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    sc = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    gate = torch.rand(2, 4, 1, 1, dtype=torch.float64)
    lam = torch.randn(4, 1, 1, dtype=torch.float64, requires_grad=True)
    bn = _bn(4, torch.float64).train()
    bn.requires_grad_(False)
    ref = copy.deepcopy(bn)
    out = fast_ops.attention_tail(bn, v, sc=sc, gate=gate, lam=lam)
    want = ref(v * gate + lam * sc)
    got = torch.autograd.grad(out.square().sum(), (v, lam))
    exp = torch.autograd.grad(want.square().sum(), (v, lam))
    for g, r in zip(got, exp):
        torch.testing.assert_close(g, r, **_tol(torch.float64))
    assert calls == [1]


@needs_kernels
@pytest.mark.parametrize("form", ["mrla_b", "mrla_l"])
@pytest.mark.parametrize("seed", [3, 4, 7])
def test_attention_tail_float32_sums_stay_accurate_on_large_planes(form, seed, monkeypatch):
    """The kernels sum float32 planes in float32 vector lanes (up to 64 terms a lane on 32x32 planes)
    before adding them in double: the statistics and gradients must stay at float32 accuracy against a
    float64 reference, also for inputs with a large mean. The output to within about one rounding of
    itself: the folded batch norm subtracts a centre before its product (cpu_kernels.cpp section 1).
    Folded without it, as PyTorch's float32 batch norm is, these inputs come out 6e-6 to 5e-5 off."""
    calls = _spy_tail(monkeypatch)
    torch.manual_seed(seed)
    n, c, h, w = 16, 3, 32, 32
    v = (torch.randn(n, c, h, w) * 0.05 + 30).requires_grad_()  # mean^2 / variance ~ 4e5
    y = torch.randn(n, c, h, w)
    sc = (torch.randn(n, c, h, w) + 30).requires_grad_() if form == "mrla_l" else None
    gate = torch.rand(n, c, 1, 1, requires_grad=True) if form == "mrla_l" else None
    lam = torch.randn(c, 1, 1, requires_grad=True) if form == "mrla_l" else None
    relu = form == "mrla_b"
    bn = _bn(c, torch.float32).train()
    ref_bn = copy.deepcopy(bn).double()
    out = fast_ops.attention_tail(bn, v, y, sc=sc, gate=gate, lam=lam, relu=relu)
    d = lambda t: None if t is None else t.detach().double().requires_grad_()
    v64, sc64, gate64, lam64 = d(v), d(sc), d(gate), d(lam)
    want = _reference_tail(ref_bn, v64, y.double(), sc64, gate64, lam64, relu)
    assert calls == [1]
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), ref_bn.running_var, rtol=1e-5, atol=1e-6)
    grad = torch.randn(n, c, h, w)
    inputs = [t for t in (v, sc, gate, lam) if t is not None]
    inputs64 = [t for t in (v64, sc64, gate64, lam64) if t is not None]
    got = torch.autograd.grad(out, inputs, grad)
    exp = torch.autograd.grad(want, inputs64, grad.double())
    for g, r in zip(got, exp):
        # the gate's and lambda's gradients are sums over whole planes and channels
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("form", ["mrla_b", "mrla_l"])
def test_eval_mode_tail_gives_each_image_an_output_of_its_own(form, monkeypatch):
    """In eval mode an image's output must not depend on the other images of its batch (eval batch size,
    order, DDP sharding): the folded batch norm's centres came from the batch's first pixel, which moved the
    other images' outputs in the last bits. The MRLA-B form is centred on the running mean, exactly
    (v - mean) * scale + bias, so it keeps float32 accuracy at large means."""
    calls = _spy_tail(monkeypatch)
    torch.manual_seed(11)
    n, c, h, w = 7, 3, 32, 32
    v = torch.randn(n, c, h, w) * 0.05 + 30
    y = torch.randn(n, c, h, w)
    sc = torch.randn(n, c, h, w) if form == "mrla_l" else None
    gate = torch.rand(n, c, 1, 1) if form == "mrla_l" else None
    lam = torch.randn(c, 1, 1) if form == "mrla_l" else None
    bn = _bn(c, torch.float32).eval()
    with torch.no_grad():
        bn.running_mean.fill_(30.0 if form == "mrla_b" else 0.0)
        bn.running_var.fill_(0.0025)

    def run(order):
        pick = lambda t: None if t is None or t.dim() < 4 else t[order]  # noqa: E731
        return fast_ops.attention_tail(bn, pick(v), pick(y), sc=pick(sc), gate=pick(gate), lam=lam,
                                       relu=form == "mrla_b")

    with torch.no_grad():
        out = run(torch.arange(n))
        v[0] = torch.randn(c, h, w) * 0.05 + 29.9  # another first image
        changed = run(torch.arange(n))
        shuffled = run(torch.tensor([3, 1, 6, 0, 5, 2, 4]))
        alone = run(torch.tensor([4]))
    assert len(calls) == 4
    assert torch.equal(changed[1:], out[1:])
    assert torch.equal(shuffled[[3, 1, 5, 0, 6, 4, 2]], changed)
    assert torch.equal(alone[0], changed[4])
    if form == "mrla_b":
        d = lambda t: None if t is None else t.double()  # noqa: E731
        ref_bn = copy.deepcopy(bn).double()
        want = _reference_tail(ref_bn, d(v), d(y), d(sc), d(gate), d(lam), True)
        torch.testing.assert_close(changed.double(), want, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(4, 6), (8, 8), (32, 32)])  # a remainder after the vector lanes, and none
def test_relu_tail_gives_no_gradient_through_a_closed_relu_even_a_non_finite_one(dtype, hw, monkeypatch):
    """MRLA-B's tail (ReLU after the batch norm): where the ReLU was closed, the output gradient is
    dropped whatever it is, NaN and inf included, as PyTorch's ReLU backward does; the gradients and the
    batch norm's sums stay finite and equal PyTorch's."""
    calls = _spy_tail(monkeypatch)
    torch.manual_seed(5)
    v = torch.randn(2, 3, *hw, dtype=dtype, requires_grad=True)
    y = torch.randn(2, 3, *hw, dtype=dtype)
    bn, ref_bn = _bn(3, dtype).train(), _bn(3, dtype).train()
    ref_bn.load_state_dict(bn.state_dict())
    out = fast_ops.attention_tail(bn, v, y, relu=True)
    want = _reference_tail(ref_bn, v, y, None, None, None, True)
    assert calls == [1]
    closed = (want - y) == 0
    assert 0 < int(closed.sum()) < closed.numel()
    grad = torch.randn_like(out)
    grad[closed] = float("nan")
    grad.view(-1)[closed.view(-1).nonzero()[0]] = float("inf")
    got = torch.autograd.grad(out, (v, bn.weight, bn.bias), grad)
    ref = torch.autograd.grad(want, (v, ref_bn.weight, ref_bn.bias), grad)
    for name, g, r in zip(("v", "weight", "bias"), got, ref):
        assert torch.isfinite(r).all(), name  # PyTorch drops the closed positions' gradient
        torch.testing.assert_close(g, r, **_tol(dtype), msg=lambda m: f"gradient {name}: {m}")


@needs_kernels
def test_attention_tail_does_not_depend_on_the_number_of_threads():
    torch.manual_seed(1)
    v = torch.randn(4, 8, 16, 16, requires_grad=True)
    sc = torch.randn(4, 8, 16, 16, requires_grad=True)
    gate = torch.rand(4, 8, 1, 1, requires_grad=True)
    lam = torch.randn(8, 1, 1, requires_grad=True)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            torch.manual_seed(2)
            bn = _bn(8, torch.float32).train()
            conv.weight.data.normal_()
            out = fast_ops.attention_tail(bn, fast_ops.depthwise_conv3x3(conv, v), v, sc=sc, gate=gate, lam=lam)
            grads = torch.autograd.grad(out.square().sum(), (v, sc, gate, lam, conv.weight))
            results.append((out, *grads, bn.running_mean, bn.running_var))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)  # bitwise: no reduction is split across threads


def test_attention_tail_rejects_inconsistent_arguments():
    bn = _bn(3, torch.float32)
    v = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="`sc` and `lam`"):
        fast_ops.attention_tail(bn, v, sc=v)
    with pytest.raises(ValueError, match=r"gate must be \[B, C, 1, 1\]"):
        fast_ops.attention_tail(bn, v, gate=torch.rand(2, 3))
    with pytest.raises(ValueError, match="one value per channel"):
        fast_ops.attention_tail(bn, v, sc=v, lam=torch.ones(4, 1, 1))


def test_attention_tail_falls_back_outside_its_domain(monkeypatch):
    """channels_last, autocast and the off switch take the plain modules, with the same result."""
    calls = _spy_tail(monkeypatch)
    bn = _bn(3, torch.float32).eval()
    v = torch.randn(2, 3, 4, 4)
    sc, gate, lam = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 1, 1), torch.randn(3, 1, 1)
    want = _reference_tail(bn, v, v, sc, gate, lam, False)
    got = fast_ops.attention_tail(bn, v.to(memory_format=torch.channels_last), v, sc=sc, gate=gate, lam=lam)
    torch.testing.assert_close(got, want)
    monkeypatch.setattr(fast_ops, "FAST_CPU_PATHS", False)
    torch.testing.assert_close(fast_ops.attention_tail(bn, v, v, sc=sc, gate=gate, lam=lam), want)
    assert not calls


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape",  # widths 8, 16 and 32 run on kernels compiled for them (float32 on the row path where the
    # CPU has AVX-512: rows of one or two vectors, one and two rows among them), the others on the generic one
    [(2, 3, 5, 7), (3, 4, 32, 32), (2, 3, 8, 8), (2, 3, 3, 16), (2, 2, 7, 2), (1, 2, 1, 3), (2, 5, 4, 4),
     (2, 3, 1, 16), (2, 2, 2, 32), (1, 2, 1, 8)],
)
def test_depthwise_conv3x3_matches_conv2d(dtype, shape, monkeypatch):
    calls = []
    real = fast_ops._DepthwiseConv3x3.apply
    monkeypatch.setattr(fast_ops._DepthwiseConv3x3, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], shape[1], 3, padding=1, groups=shape[1], bias=False).to(dtype)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    out = fast_ops.depthwise_conv3x3(conv, x)
    want = F.conv2d(x, conv.weight, padding=1, groups=shape[1])
    assert calls == [1]
    tol = _tol(dtype)
    torch.testing.assert_close(out, want, **tol)
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (x, conv.weight), grad), torch.autograd.grad(want, (x, conv.weight), grad, retain_graph=True)):
        torch.testing.assert_close(g, r, **tol)
    # weight only (a frozen input)
    (gw,) = torch.autograd.grad(fast_ops.depthwise_conv3x3(conv, x.detach()), conv.weight, grad)
    torch.testing.assert_close(gw, torch.autograd.grad(want, conv.weight, grad)[0], **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use", ["both", "values", "mean"])
@pytest.mark.parametrize("hw", [(6, 5), (8, 8), (4, 16), (32, 32)])  # generic, and the row path's widths
def test_depthwise_conv3x3_with_mean_matches_conv2d_and_mean(dtype, use, hw, monkeypatch):
    """The pooled descriptor comes from the conv's read of x; its gradient joins x's in the same write."""
    calls = []
    real = fast_ops._DepthwiseConv3x3.apply
    monkeypatch.setattr(fast_ops._DepthwiseConv3x3, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False).to(dtype)
    x = (torch.randn(3, 4, *hw, dtype=dtype) + 2).requires_grad_()
    out, mean = fast_ops.depthwise_conv3x3(conv, x, with_mean=True)
    # the reference in float64: the weight gradient sums N * H * W products of x ~ 2 (up to ~240 at 32 x 32),
    # past float32 conv2d's own accuracy for a 2e-5 tolerance
    x64, w64 = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    want_out, want_mean = F.conv2d(x64, w64, padding=1, groups=4), x64.mean((2, 3))
    assert calls == [1] and mean.shape == (3, 4) and mean.dtype == dtype
    tol = _tol(dtype)
    torch.testing.assert_close(out.double(), want_out, **tol)
    torch.testing.assert_close(mean.double(), want_mean, **tol)
    go, gm = torch.randn_like(out), torch.randn_like(mean)

    def loss(o, m):
        o, m = o.double(), m.double()
        return {"both": (o * go).sum() + (m * gm).sum(), "values": (o * go).sum(), "mean": (m * gm).sum()}[use]

    wrt, wrt64 = ((x, conv.weight), (x64, w64)) if use != "mean" else ((x,), (x64,))
    for g, r in zip(torch.autograd.grad(loss(out, mean), wrt), torch.autograd.grad(loss(want_out, want_mean), wrt64)):
        torch.testing.assert_close(g.double(), r, **tol)


@needs_kernels
def test_depthwise_conv3x3_writes_into_out_and_rejects_a_wrong_one():
    """``out=`` (MRLA-B's stage slot): the kernel writes the result there and returns it; an ``out`` of the
    wrong shape, dtype or layout is a clear error, never a silent partial write."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    buf = torch.zeros(3, 2, 4, 8, 8)
    out = fast_ops.depthwise_conv3x3(conv, x, out=buf.data[1])
    assert out.data_ptr() == buf[1].data_ptr()
    want = F.conv2d(x, conv.weight, padding=1, groups=4)
    torch.testing.assert_close(buf[1], want.detach(), **_tol(torch.float32))
    assert not buf[0].any() and not buf[2].any()
    grad = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad(out, (x, conv.weight), grad), torch.autograd.grad(want, (x, conv.weight), grad)):
        torch.testing.assert_close(g, r, **_tol(torch.float32))
    for bad in (
        torch.empty(2, 4, 8, 7),  # shape
        torch.empty(2, 4, 8, 8, dtype=torch.float64),  # dtype
        torch.empty(2, 8, 8, 4).permute(0, 3, 1, 2),  # layout
    ):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            fast_ops.depthwise_conv3x3(conv, x, out=bad)
    # where the kernel does not run, out is left alone and a new tensor comes back
    slot = torch.zeros(2, 4, 8, 8)
    plain = fast_ops.depthwise_conv3x3(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True), x, out=slot)
    assert plain.data_ptr() != slot.data_ptr() and not slot.any()


def _pre_and_shortcut(shape, dtype, seed=0):
    """A block's conv branch and shortcut; every 7th position sums to exactly 0 (the ReLU's edge)."""
    torch.manual_seed(seed)
    pre, sc = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    pre.view(-1)[::7] = -sc.view(-1)[::7]
    return pre, sc


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 4, 8, 8), (2, 3, 16, 16), (2, 3, 32, 32)])
def test_relu_sum_depthwise_conv3x3_matches_autograd(dtype, shape):
    """``y = relu(pre + sc)``, ``conv(y)`` and ``y``'s mean in one kernel pass: the three outputs, and the
    gradients of pre, sc and the weight for a loss that uses all three (y as MRLA-B's residual), the
    ReLU's mask included (zero gradient where pre + sc is exactly 0, as PyTorch's)."""
    c = shape[1]
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).to(dtype)
    pre, sc = _pre_and_shortcut(shape, dtype)
    assert int(((pre + sc) == 0).sum()) > 0
    weights = [torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), torch.randn(shape[:2], dtype=dtype)]

    def run(fn):
        p, s = pre.clone().requires_grad_(), sc.clone().requires_grad_()
        outs = fn(p, s)
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, (p, s, conv.weight)))

    def reference(p, s):
        y = torch.relu(p + s)
        return y, F.conv2d(y, conv.weight, padding=1, groups=c), y.mean((2, 3))

    got = run(lambda p, s: fast_ops.relu_sum_depthwise_conv3x3(conv, p, s))
    want = run(reference)
    for name, g, w in zip(["y", "v", "mean", "grad pre", "grad sc", "grad weight"], got, want):
        torch.testing.assert_close(g, w, **_tol(dtype), msg=lambda m: f"{name}: {m}")
    assert torch.all(got[3][(pre + sc) <= 0] == 0)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (32, 32)])  # flat loops, and the row path where compiled
def test_a_nan_goes_through_the_folded_relus_as_through_pytorchs(dtype, hw, monkeypatch):
    """A NaN is not hidden by the ReLUs the kernels fold in: relu(NaN) = NaN forward, and backward the
    gradient passes where the ReLU's output is NaN (PyTorch's threshold_backward drops it only where the
    output is <= 0). Both the MRLA-B tail's ReLU and the block's ReLU before the conv."""
    calls = _spy_tail(monkeypatch)
    torch.manual_seed(6)
    shape = (2, 3, *hw)
    # the block's ReLU, before the conv: a NaN in the conv branch
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False).to(dtype)
    pre, sc = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    pre[0, 1, 2, 3] = float("nan")
    grads = [torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), torch.randn(shape[:2], dtype=dtype)]

    def run(fn):
        p = pre.clone().requires_grad_()
        outs = fn(p)
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, (p,), grads))

    got = run(lambda p: fast_ops.relu_sum_depthwise_conv3x3(conv, p, sc))
    y_ref = lambda p: torch.relu(p + sc)  # noqa: E731
    want = run(lambda p: (y_ref(p), F.conv2d(y_ref(p), conv.weight, padding=1, groups=3), y_ref(p).mean((2, 3))))
    assert torch.isnan(want[0][0, 1, 2, 3]) and want[3][0, 1, 2, 3] != 0  # PyTorch passes the gradient there
    for name, g, w in zip(["y", "v", "mean", "grad pre"], got, want):
        torch.testing.assert_close(g, w, **_tol(dtype), equal_nan=True, msg=lambda m: f"{name}: {m}")
    # the tail's ReLU (MRLA-B): a NaN in O
    v = torch.randn(shape, dtype=dtype)
    v[1, 2, 0, 1] = float("nan")
    y = torch.randn(shape, dtype=dtype)
    bn, ref_bn = _bn(3, dtype).train(), _bn(3, dtype).train()
    ref_bn.load_state_dict(bn.state_dict())
    vg, rg = v.clone().requires_grad_(), v.clone().requires_grad_()
    out = fast_ops.attention_tail(bn, vg, y, relu=True)
    want_out = _reference_tail(ref_bn, rg, y, None, None, None, True)
    assert calls == [1] and torch.isnan(want_out).any()
    torch.testing.assert_close(out, want_out, **_tol(dtype), equal_nan=True)
    g = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(torch.autograd.grad(out, vg, g)[0], torch.autograd.grad(want_out, rg, g)[0],
                               **_tol(dtype), equal_nan=True)


@needs_kernels
def test_relu_sum_depthwise_conv3x3_partial_gradients_slot_and_domain():
    """Only what needs a gradient gets one; ``out=`` takes the values as for depthwise_conv3x3 and is
    checked the same way; outside the kernel's domain the function declines (None)."""
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False).double()
    pre, sc = _pre_and_shortcut((2, 4, 8, 8), torch.float64, seed=2)
    ref_y = torch.relu(pre + sc)
    for wanted in ("pre", "sc"):
        p, s = pre.clone().requires_grad_(wanted == "pre"), sc.clone().requires_grad_(wanted == "sc")
        y, v, g = fast_ops.relu_sum_depthwise_conv3x3(conv, p, s)
        (got,) = torch.autograd.grad((y.square().sum() + v.sum() + g.sum()), p if wanted == "pre" else s)
        p2, s2 = pre.clone().requires_grad_(), sc.clone().requires_grad_()
        y2 = torch.relu(p2 + s2)
        loss = y2.square().sum() + F.conv2d(y2, conv.weight, padding=1, groups=4).sum() + y2.mean((2, 3)).sum()
        (exp,) = torch.autograd.grad(loss, p2 if wanted == "pre" else s2)
        torch.testing.assert_close(got, exp, **_tol(torch.float64), msg=lambda m: f"{wanted}: {m}")
    buf = torch.zeros(3, 2, 4, 8, 8, dtype=torch.float64)
    y, v, _ = fast_ops.relu_sum_depthwise_conv3x3(conv, pre, sc, out=buf[1])
    assert v.data_ptr() == buf[1].data_ptr() and not buf[0].any() and not buf[2].any()
    torch.testing.assert_close(v, F.conv2d(ref_y, conv.weight, padding=1, groups=4), **_tol(torch.float64))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        fast_ops.relu_sum_depthwise_conv3x3(conv, pre, sc, out=torch.empty(2, 4, 8, 8))
    assert fast_ops.relu_sum_depthwise_conv3x3(conv, pre, sc.to(memory_format=torch.channels_last)) is None
    assert fast_ops.relu_sum_depthwise_conv3x3(conv, pre, sc.float()) is None


@needs_kernels
@pytest.mark.parametrize("act", ["relu", "gelu", "hooked_relu"])
def test_mrla_b_folds_a_plain_relu_of_the_block_and_nothing_else(act, monkeypatch):
    """MRLA-B given the block's conv branch, shortcut and final activation: an exact ``nn.ReLU`` goes into
    the conv's kernel (no PyTorch ReLU runs), another activation or a hooked ReLU runs as a module; a
    whole stage of three layers gives the output and gradients of the layers run on ``act(pre + sc)``."""
    folded = []
    real = fast_ops._ReluSumDepthwise3x3.apply
    monkeypatch.setattr(fast_ops._ReluSumDepthwise3x3, "apply", lambda *a: folded.append(1) or real(*a))
    module = {"relu": nn.ReLU(), "gelu": nn.GELU(), "hooked_relu": nn.ReLU()}[act]
    seen = []
    if act == "hooked_relu":
        module.register_forward_hook(lambda m, i, o: seen.append(1))
    ran = _relu_spy(monkeypatch)
    torch.manual_seed(0)
    layers = [MrlaBase(8, dim_per_head=4).double().train() for _ in range(3)]
    refs = copy.deepcopy(layers)
    inputs = [_pre_and_shortcut((2, 8, 8, 8), torch.float64, seed=j) for j in range(3)]

    def stage(mods, fold):
        state = StageState(capacity=3)
        ps = [p.clone().requires_grad_() for p, _ in inputs]
        ss = [s.clone().requires_grad_() for _, s in inputs]
        outs = [
            m(p, state, sc=s, pre_act=module) if fold else m(module(p + s), state)
            for m, p, s in zip(mods, ps, ss)
        ]
        state.close()
        loss = sum((o * (j + 1)).square().sum() for j, o in enumerate(outs))
        params = [q for m in mods for q in m.parameters()]
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, ps + ss + params))

    got = stage(layers, fold=True)
    n_ran = len(ran)
    want = stage(refs, fold=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **_tol(torch.float64))
    assert folded == ([1, 1, 1] if act == "relu" else [])
    assert n_ran == (0 if act == "relu" else 3 if act == "hooked_relu" else 0)
    assert len(seen) == (6 if act == "hooked_relu" else 0)  # its hook saw every call, both runs
    with pytest.raises(ValueError, match="pre_act and sc go together"):
        layers[0](inputs[0][0], StageState(capacity=1), pre_act=module)
    with pytest.raises(ValueError, match="pre_act and sc go together"):
        layers[0](inputs[0][0], StageState(capacity=1), sc=inputs[0][1])


def test_depthwise_conv3x3_leaves_other_convolutions_to_pytorch(monkeypatch):
    calls = []
    real = fast_ops._DepthwiseConv3x3.apply
    monkeypatch.setattr(fast_ops._DepthwiseConv3x3, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 4, 6, 6)
    for conv in (
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True),  # bias
        nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=4, bias=False),  # stride
        nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),  # not depthwise
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False, padding_mode="reflect"),
    ):
        torch.testing.assert_close(fast_ops.depthwise_conv3x3(conv, x), conv(x))
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    torch.testing.assert_close(fast_ops.depthwise_conv3x3(conv, x[..., :1]), conv(x[..., :1]))  # width 1
    torch.testing.assert_close(fast_ops.depthwise_conv3x3(conv, x.transpose(2, 3)), conv(x.transpose(2, 3)))
    assert not calls


@needs_kernels
def test_small_planes_take_the_pytorch_paths(monkeypatch):
    """Below DEPTHWISE_MIN_PLANE / TAIL_MIN_PLANE elements per plane the kernels' fixed costs win
    (bench/bench_kernels.py): those planes go to PyTorch, larger ones to the kernels, same results."""
    conv_limit, tail_limit, _ = SHIPPED_LIMITS
    assert 16 < conv_limit <= 64 and 16 < tail_limit <= 64  # 4x4 planes to PyTorch, 8x8 to the kernels
    monkeypatch.setattr(fast_ops, "DEPTHWISE_MIN_PLANE", conv_limit)
    monkeypatch.setattr(fast_ops, "TAIL_MIN_PLANE", tail_limit)
    tails, convs = _spy_tail(monkeypatch), []
    real = fast_ops._DepthwiseConv3x3.apply
    monkeypatch.setattr(fast_ops._DepthwiseConv3x3, "apply", lambda *a: convs.append(1) or real(*a))
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    bn = _bn(4, torch.float32).eval()
    for side, kernel_conv, kernel_tail in ((4, False, False), (8, True, True), (16, True, True)):
        tails.clear(), convs.clear()
        x = torch.randn(2, 4, side, side)
        v, mean = fast_ops.depthwise_conv3x3(conv, x, with_mean=True)
        torch.testing.assert_close(v, conv(x))
        torch.testing.assert_close(mean, x.mean((2, 3)))
        out = fast_ops.attention_tail(bn, v, x, relu=True)
        torch.testing.assert_close(out, x + F.relu(bn(v)))
        assert (convs == [1], tails == [1]) == (kernel_conv, kernel_tail), side


@needs_kernels
def test_mrla_l_fuses_planes_from_light_min_plane(monkeypatch):
    """MRLA-L takes its fused kernels from LIGHT_MIN_PLANE elements per plane (16x16 with the shipped
    limit, where bench/bench_kernels.py shows them faster), the separate conv and tail below."""
    _, _, light_limit = SHIPPED_LIMITS
    assert 64 < light_limit <= 256  # 8x8 planes separate, 16x16 fused
    for name, limit in zip(("DEPTHWISE_MIN_PLANE", "TAIL_MIN_PLANE", "LIGHT_MIN_PLANE"), SHIPPED_LIMITS):
        monkeypatch.setattr(fast_ops, name, limit)
    calls, tails = _spy_light(monkeypatch), _spy_tail(monkeypatch)
    m = _light_module(8, torch.float64).train()
    ref = copy.deepcopy(m)
    for side, fused in ((8, False), (16, True)):
        calls.clear(), tails.clear()
        y, sc = torch.randn(2, 8, side, side, dtype=torch.float64), torch.randn(2, 8, side, side, dtype=torch.float64)
        grad = torch.randn(2, 8, side, side, dtype=torch.float64)
        got, want = _light_run(m, y, sc, grad), _light_run(ref, y, sc, grad, fn=_reference_light)
        torch.testing.assert_close(got[0], want[0], **_tol(torch.float64))
        torch.testing.assert_close(got[1]["y"], want[1]["y"], **_tol(torch.float64))
        assert (calls == [1], tails == [1]) == (fused, not fused), side
        m.zero_grad(), ref.zero_grad()


# ------------------------------------------------------------------------------------------------
# MRLA-L's fused layer (light_layer): the conv, the pooling, the gate and the tail together


def _light_module(c, dtype, dim_per_head=4, drop_path=0.0):
    torch.manual_seed(0)
    m = MrlaLight(c, dim_per_head=dim_per_head, drop_path=drop_path).to(dtype)
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2)
        m.wq.weight.normal_()
        m.wk.weight.normal_()
    return m


def _reference_light(m, y, sc):
    """SPEC section 1, MRLA-L, with plain ops: y + BN(sigmoid(<Q, K> / sqrt d) * wv(y) + lambda * sc)."""
    b, c = y.shape[:2]
    g = y.mean((2, 3)).unsqueeze(1)  # [B, 1, C]
    pad = (m.k_size - 1) // 2
    q = F.conv1d(g, m.wq.weight, padding=pad).view(b, m.heads, m.dim_per_head)
    k = F.conv1d(g, m.wk.weight, padding=pad).view(b, m.heads, m.dim_per_head)
    gate = torch.sigmoid((q * k).sum(-1) / m.dim_per_head ** 0.5).repeat_interleave(m.dim_per_head, dim=1)
    v = F.conv2d(y, m.wv.weight, padding=1, groups=c)
    x = v * gate[:, :, None, None] + m.lam * sc
    return y + F.batch_norm(x, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, m.bn.training,
                            m.bn.momentum, m.bn.eps)


def _spy_light(monkeypatch):
    calls = []
    real = fast_ops._FusedLight.apply
    monkeypatch.setattr(fast_ops._FusedLight, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _light_run(m, y, sc, grad, fn=None):
    """Output, gradients of y, sc and every parameter, and the buffers after one forward/backward."""
    y = y.detach().clone().requires_grad_()
    sc = sc.detach().clone().requires_grad_()
    out = m(y, sc, StageState()) if fn is None else fn(m, y, sc)
    out.backward(grad)
    grads = {"y": y.grad, "sc": sc.grad, **{n: p.grad for n, p in m.named_parameters()}}
    return out.detach(), grads, {n: b.clone() for n, b in m.named_buffers()}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (3, 16), (32, 32)])  # generic width, 8, 16, 32
def test_light_layer_matches_the_spec(dtype, training, hw, monkeypatch):
    """MRLA-L on the fused kernels (V never stored, statistics from per-plane moments): output, the
    gradients of y, sc and every parameter (wv, wq, wk, lambda, BN), and the running statistics."""
    calls = _spy_light(monkeypatch)
    m = _light_module(8, dtype).train(training)
    ref = copy.deepcopy(m)
    y = torch.randn(3, 8, *hw, dtype=dtype)
    sc = torch.randn(3, 8, *hw, dtype=dtype)
    grad = torch.randn(3, 8, *hw, dtype=dtype)
    got = _light_run(m, y, sc, grad)
    want = _light_run(ref, y, sc, grad, fn=_reference_light)
    assert calls == [1]
    tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **tol, msg=lambda msg: f"gradient {name}: {msg}")
    for name in want[2]:
        if not name.endswith("num_batches_tracked"):  # the functional reference does not count
            torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=lambda msg: f"{name}: {msg}")
    assert int(m.bn.num_batches_tracked) == int(training)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_light_layer_statistics_survive_a_dominant_mean(dtype, monkeypatch):
    """One-pass moments lose the variance when the mean dominates it; there the layer computes the
    statistics again exactly (from V written out) and matches a float64 reference."""
    calls = _spy_light(monkeypatch)
    exact = []
    real = fast_ops._kernel
    monkeypatch.setattr(fast_ops, "_kernel", lambda name, dt: (exact.append(name) if name == "stats" else None) or real(name, dt))
    m = _light_module(4, dtype).train()
    ref = copy.deepcopy(m).double()
    with torch.no_grad():
        m.lam.fill_(1.0), ref.lam.fill_(1.0)
    y = torch.randn(2, 4, 8, 8, dtype=dtype)
    sc = torch.randn(2, 4, 8, 8, dtype=dtype) * 1e-2 + 1e3  # E[x^2] / var ~ 1e10
    grad = torch.randn(2, 4, 8, 8, dtype=dtype)
    got = _light_run(m, y, sc, grad)
    want = _light_run(ref, y.double(), sc.double(), grad.double(), fn=_reference_light)
    assert calls == [1] and exact == ["stats"]
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[0].double(), want[0], **tol)
    torch.testing.assert_close(got[2]["bn.running_var"].double(), want[2]["bn.running_var"], **tol)
    torch.testing.assert_close(got[1]["y"].double(), want[1]["y"], **tol)


@needs_kernels
def test_light_layer_partial_gradients(monkeypatch):
    """Frozen parts: only what needs a gradient gets one, and it is the right one."""
    calls = _spy_light(monkeypatch)
    m = _light_module(8, torch.float64).train()
    ref = copy.deepcopy(m)
    for mod in (m, ref):
        mod.bn.requires_grad_(False)
        mod.wq.requires_grad_(False)
    y = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    sc = torch.randn(2, 8, 6, 6, dtype=torch.float64)  # from a frozen stem: no gradient
    out = m(y, sc, StageState())
    want = _reference_light(ref, y, sc)
    got = torch.autograd.grad(out.square().sum(), (y, m.wv.weight, m.wk.weight, m.lam))
    exp = torch.autograd.grad(want.square().sum(), (y, ref.wv.weight, ref.wk.weight, ref.lam))
    for g, r in zip(got, exp):
        torch.testing.assert_close(g, r, **_tol(torch.float64))
    assert calls == [1]
    # the shortcut alone needs a gradient (y from a frozen part)
    out = m(y.detach(), sc.requires_grad_(), StageState())
    (g_sc,) = torch.autograd.grad(out.sum(), sc)
    (r_sc,) = torch.autograd.grad(_reference_light(ref, y.detach(), sc).sum(), sc)
    torch.testing.assert_close(g_sc, r_sc, **_tol(torch.float64))


@pytest.mark.parametrize("k_size", [1, 3, 5, 7])
@pytest.mark.parametrize("heads_dim", [(4, 8), (2, 3)])
def test_light_gate_backward_matches_autograd(k_size, heads_dim):
    """MRLA-L's analytic gate backward (what the fused layer runs instead of autograd) gives autograd's
    gradients of the pooled descriptor and both Conv1d weights, at every ECA kernel size, including
    windows that reach past both ends of the channel axis."""
    heads, d = heads_dim
    torch.manual_seed(k_size)
    m = MrlaLight(heads * d, dim_per_head=d, k_size=k_size).double()
    with torch.no_grad():
        m.wq.weight.normal_()
        m.wk.weight.normal_()
    g = torch.randn(3, heads * d, dtype=torch.float64, requires_grad=True)
    gate = m._gate(g, m.wq.weight, m.wk.weight)
    grad_gate = torch.randn_like(gate)
    want = torch.autograd.grad(gate, (g, m.wq.weight, m.wk.weight), grad_gate)
    got = m._gate_grad(g.detach(), gate.detach(), grad_gate, m.wq.weight, m.wk.weight)
    for name, a, b in zip(("g", "wq", "wk"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda msg: f"{name}: {msg}")


@needs_kernels
def test_light_layer_without_gate_grad_recomputes_the_gate_with_autograd(monkeypatch):
    """``light_layer``'s generic path (a gate function without ``gate_grad``) backpropagates through the
    gate with autograd, and agrees with the analytic path MRLA-L uses; MRLA-L does use the analytic one."""
    analytic = []
    real_grad = MrlaLight._gate_grad
    monkeypatch.setattr(MrlaLight, "_gate_grad", lambda *a: analytic.append(1) or real_grad(*a))
    m = _light_module(8, torch.float64).train()
    y = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    sc = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    grad = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    results = []
    for gate_grad in (m._gate_grad, None):
        mod = copy.deepcopy(m)
        fn = lambda mod, y, sc, gg=gate_grad: fast_ops.light_layer(  # noqa: E731
            mod.bn, mod.wv, y, sc, mod.lam, mod._gate, mod.heads, mod.wq.weight, mod.wk.weight,
            gate_grad=None if gg is None else mod._gate_grad)[0]
        results.append(_light_run(mod, y, sc, grad, fn=fn))
    assert len(analytic) == 1  # the first run only
    m.train()
    _light_run(m, y, sc, grad)
    assert len(analytic) == 2  # MrlaLight's forward passes it
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], **_tol(torch.float64),
                                   msg=lambda msg: f"gradient {name}: {msg}")
    assert results[0][1]["wq.weight"].abs().sum() > 0


def _relu_spy(monkeypatch):
    """Counts the PyTorch ReLU modules that actually run."""
    ran = []
    real = nn.ReLU.forward
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: ran.append(1) or real(self, x))
    return ran


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (3, 16), (32, 32)])
def test_light_layer_folds_the_blocks_residual_sum_and_relu(dtype, training, hw, monkeypatch):
    """Given the block's conv branch and ``pre_act=nn.ReLU()``, the fused kernels form
    ``y = relu(pre + sc)`` themselves (no PyTorch ReLU runs) and return the gradients of the conv branch
    and the shortcut through that sum and ReLU: the same output, gradients and running statistics as
    the spec's layer on ``relu(pre + sc)``."""
    calls = _spy_light(monkeypatch)
    ran = _relu_spy(monkeypatch)
    m = _light_module(8, dtype).train(training)
    ref = copy.deepcopy(m)
    pre, sc = _pre_and_shortcut((3, 8, *hw), dtype)
    assert int(((pre + sc) == 0).sum()) > 0
    grad = torch.randn(3, 8, *hw, dtype=dtype)
    got = _light_run(m, pre, sc, grad, fn=lambda mod, p, s: mod(p, s, StageState(), pre_act=nn.ReLU()))
    assert calls == [1] and ran == []
    want = _light_run(ref, pre, sc, grad, fn=lambda mod, p, s: _reference_light(mod, torch.relu(p + s), s))
    tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **tol, msg=lambda msg: f"gradient {name}: {msg}")
    for name in want[2]:
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=lambda msg: f"{name}: {msg}")
    # where the ReLU is closed, the conv branch gets no gradient, exactly
    assert torch.all(got[1]["y"][(pre + sc) <= 0] == 0)


@needs_kernels
def test_light_layer_with_the_relu_folded_in_gives_partial_gradients(monkeypatch):
    """Folded ReLU, frozen parts: the shortcut alone (its gradient then comes through the ReLU too, with
    the conv branch's gradient formed in scratch), or the conv branch alone."""
    calls = _spy_light(monkeypatch)
    m = _light_module(8, torch.float64).train()
    ref = copy.deepcopy(m)
    pre, sc = _pre_and_shortcut((2, 8, 6, 6), torch.float64, seed=1)
    for wanted in ("sc", "pre"):
        p, s = pre.clone().requires_grad_(wanted == "pre"), sc.clone().requires_grad_(wanted == "sc")
        out = m(p, s, StageState(), pre_act=nn.ReLU())
        want = _reference_light(ref, torch.relu(p + s), s)
        x = p if wanted == "pre" else s
        (got,) = torch.autograd.grad(out.square().sum(), x)
        (exp,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(got, exp, **_tol(torch.float64), msg=lambda msg: f"{wanted}: {msg}")
    assert calls == [1, 1]


@needs_kernels
@pytest.mark.parametrize("why", ["switched_off", "small_planes"])
def test_mrla_l_without_its_fused_layer_still_folds_the_relu_into_the_conv(why, monkeypatch):
    """Where MRLA-L's fused layer does not run, the block's sum and ReLU still go into the separate conv
    kernel (``relu_sum_depthwise_conv3x3``) and the result is the spec's on ``relu(pre + sc)``."""
    light = _spy_light(monkeypatch)
    folded = []
    real = fast_ops._ReluSumDepthwise3x3.apply
    monkeypatch.setattr(fast_ops._ReluSumDepthwise3x3, "apply", lambda *a: folded.append(1) or real(*a))
    ran = _relu_spy(monkeypatch)
    if why == "switched_off":
        monkeypatch.setattr(fast_ops, "FUSED_LIGHT_LAYER", False)
    else:
        monkeypatch.setattr(fast_ops, "LIGHT_MIN_PLANE", 65)
    m = _light_module(8, torch.float64).train()
    ref = copy.deepcopy(m)
    pre, sc = _pre_and_shortcut((2, 8, 8, 8), torch.float64, seed=4)
    grad = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    got = _light_run(m, pre, sc, grad, fn=lambda mod, p, s: mod(p, s, StageState(), pre_act=nn.ReLU()))
    want = _light_run(ref, pre, sc, grad, fn=lambda mod, p, s: _reference_light(mod, torch.relu(p + s), s))
    assert light == [] and folded == [1] and ran == []
    torch.testing.assert_close(got[0], want[0], **_tol(torch.float64))
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **_tol(torch.float64), msg=lambda msg: f"{name}: {msg}")


@needs_kernels
def test_light_layer_leaves_other_activations_to_pytorch(monkeypatch):
    """Only a plain ``nn.ReLU`` without hooks is folded: another activation, or a ReLU with a forward
    hook (which must see its call), runs as a module and the fused layer takes its output."""
    calls = _spy_light(monkeypatch)
    m = _light_module(8, torch.float64).train()
    ref = copy.deepcopy(m)
    pre, sc = _pre_and_shortcut((2, 8, 6, 6), torch.float64)
    seen = []
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    for act, fn in ((nn.GELU(), F.gelu), (hooked, torch.relu)):
        out = m(pre, sc, StageState(), pre_act=act)
        torch.testing.assert_close(out, _reference_light(ref, fn(pre + sc), sc), **_tol(torch.float64))
    assert seen == [pre.shape]
    assert calls == [1, 1]  # both still fused, on the activation's output


@needs_kernels
def test_light_layer_does_not_depend_on_the_number_of_threads(monkeypatch):
    results = []
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    y, sc = torch.randn(4, 8, 16, 16), torch.randn(4, 8, 16, 16)
    grad = torch.randn(4, 8, 16, 16)
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            m = _light_module(8, torch.float32).train()
            out, grads, buffers = _light_run(m, y, sc, grad)
            results.append([out, *grads.values(), *buffers.values()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)  # bitwise: no reduction is split across threads


@needs_kernels
def test_light_layer_records_the_same_kl_as_the_separate_kernels(monkeypatch):
    """The gate the fused layer hands back drives the KL recording exactly as the unfused path's."""
    calls = _spy_light(monkeypatch)
    sums = []
    for fused in (True, False):
        monkeypatch.setattr(fast_ops, "FUSED_LIGHT_LAYER", fused)
        first, second = _light_module(8, torch.float64).train(), _light_module(8, torch.float64).train()
        with torch.no_grad():
            second.wq.weight.normal_()
        first.recording = second.recording = True
        torch.manual_seed(3)
        x, sc = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(2, 8, 6, 6, dtype=torch.float64)
        state = StageState()
        second(first(x, sc, state), x, state)
        sums.append((second.kl_sum.clone(), second.kl_count.clone()))
    assert calls == [1, 1]
    assert float(sums[0][1]) == 2.0 and float(sums[0][0]) > 0
    torch.testing.assert_close(sums[0], sums[1], rtol=1e-12, atol=1e-14)


@needs_kernels
def test_light_layer_leaves_what_it_cannot_do_to_the_separate_paths(monkeypatch):
    """An active DropPath (training), planes below LIGHT_MIN_PLANE, channels_last and the switch take
    the conv + tail paths; the results are the same."""
    calls = _spy_light(monkeypatch)
    y, sc = torch.randn(2, 8, 8, 8, dtype=torch.float64), torch.randn(2, 8, 8, 8, dtype=torch.float64)
    grad = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    m = _light_module(8, torch.float64, drop_path=0.5).eval()  # eval: DropPath is the identity
    torch.testing.assert_close(_light_run(m, y, sc, grad)[0], _light_run(m, y, sc, grad, fn=_reference_light)[0])
    assert calls == [1]
    calls.clear()
    m.train()
    torch.manual_seed(0)
    _light_run(m, y, sc, grad)
    assert not calls  # DropPath acts on the attention branch only, outside the fused kernels
    m = _light_module(8, torch.float64).train()
    ref = copy.deepcopy(m)
    for setup in (
        lambda: monkeypatch.setattr(fast_ops, "LIGHT_MIN_PLANE", 65),
        lambda: monkeypatch.setattr(fast_ops, "FUSED_LIGHT_LAYER", False),
    ):
        setup()
        got, want = _light_run(m, y, sc, grad), _light_run(ref, y, sc, grad, fn=_reference_light)
        torch.testing.assert_close(got[0], want[0], **_tol(torch.float64))
        torch.testing.assert_close(got[1]["wv.weight"], want[1]["wv.weight"], **_tol(torch.float64))
        m.zero_grad(), ref.zero_grad()
    got = _light_run(m, y.to(memory_format=torch.channels_last), sc, grad)
    want = _light_run(ref, y, sc, grad, fn=_reference_light)
    torch.testing.assert_close(got[0], want[0], **_tol(torch.float64))
    assert not calls


# ------------------------------------------------------------------------------------------------
# building and loading


def _fresh_loader(monkeypatch, tmp_path, **env):
    monkeypatch.setenv("ELA_HF_KERNEL_CACHE", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(fast_ops, "_kernel_state", {})


@needs_kernels
def test_kernels_are_compiled_once_into_the_cache(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path)
    assert fast_ops.cpu_kernels() is not None
    built = list(tmp_path.glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".cpu_kernels-*"))  # no temporary file left
    stamp = built[0].stat().st_mtime_ns
    compiled = []
    real_run = subprocess.run
    monkeypatch.setattr(fast_ops.subprocess, "run", lambda cmd, **kw: compiled.append(cmd) or real_run(cmd, **kw))
    monkeypatch.setattr(fast_ops, "_kernel_state", {})
    assert fast_ops.cpu_kernels() is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert all("-o" not in cmd for cmd in compiled)  # at most `--version`, no compilation


def test_without_a_compiler_the_pure_pytorch_paths_run(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels are unavailable"):
        assert fast_ops.cpu_kernels() is None
    assert not list(tmp_path.glob("*.so"))
    bn = _bn(3, torch.float64).train()
    ref = copy.deepcopy(bn)
    v = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sc, gate, lam = torch.randn_like(v), torch.rand(2, 3, 1, 1, dtype=torch.float64), torch.randn(3, 1, 1, dtype=torch.float64)
    out = fast_ops.attention_tail(bn, v, v, sc=sc, gate=gate, lam=lam)
    torch.testing.assert_close(out, _reference_tail(ref, v, v, sc, gate, lam, False), **_tol(torch.float64))


def test_a_compile_error_is_reported_and_falls_back(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setattr(fast_ops, "KERNEL_SOURCE", broken)
    with pytest.warns(RuntimeWarning, match="compiling cpu_kernels.cpp failed"):
        assert fast_ops.cpu_kernels() is None
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".cpu_kernels-*"))


def test_kernel_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ELA_HF_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert fast_ops.kernel_cache_dir() == tmp_path / "home" / ".cache" / "ela_hf" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fast_ops.kernel_cache_dir() == tmp_path / "xdg" / "ela_hf" / "kernels"
    monkeypatch.setenv("ELA_HF_KERNEL_CACHE", str(tmp_path / "explicit"))
    assert fast_ops.kernel_cache_dir() == tmp_path / "explicit"


def test_kernels_can_be_switched_off(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path, ELA_HF_CPU_KERNELS="0")
    assert fast_ops.cpu_kernels() is None
    assert not list(tmp_path.iterdir())  # nothing compiled


@needs_kernels
@pytest.mark.slow
def test_two_processes_compiling_at_once_both_load_the_kernels(tmp_path):
    """Two processes start on an empty cache together (as the ranks of `accelerate launch` do): each
    compiles into a private file and renames it, so both load a complete library."""
    script = textwrap.dedent(
        """
        import sys
        from ela_hf.layers import fast_ops
        lib = fast_ops.cpu_kernels()
        assert lib is not None, "kernels unavailable"
        print("loaded", lib._name)
        """
    )
    env = dict(os.environ, ELA_HF_KERNEL_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "loaded" in out
    assert len(list(tmp_path.glob("cpu_kernels-*.so"))) == 1
    assert not list(tmp_path.glob(".cpu_kernels-*"))


@needs_kernels
def test_kernel_features_say_what_the_native_build_uses():
    """``-march=native`` turns on the AVX-512 row path exactly where the CPU has AVX-512 F and VL."""
    features = fast_ops.kernel_features()
    assert set(features) == {"row_path", "fma", "openmp"} and all(type(v) is bool for v in features.values())
    cpu_flags = set(fast_ops._cpu_signature().split())
    if "avx512f" in cpu_flags or "fma" in cpu_flags:  # x86 Linux: /proc/cpuinfo lists the flags
        assert features["row_path"] == ({"avx512f", "avx512vl"} <= cpu_flags)
        assert features["fma"] == ("fma" in cpu_flags)


# MRLA-B's slot contractions (fast_ops.slot_weighted_sum, fast_ops.slot_dots)


def _slot_case(dtype, s, b, n, spare_rows=0, seed=0):
    """Slots [s, b, n] cut from a larger buffer (spare slots, and spare rows: a slot stride above b * n)."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(s + 2, b + spare_rows, n, dtype=dtype, generator=gen)
    slots = buf[:s, :b]
    w = torch.rand(b, s, dtype=dtype, generator=gen)
    g = torch.randn(b, n, dtype=dtype, generator=gen)
    return slots, w, g


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("s", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n", [1, 7, 64, 131, 1024])  # below, between and at the vector and chunk sizes
@pytest.mark.parametrize("spare_rows", [0, 3])
def test_slot_contractions_match_einsum(dtype, s, n, spare_rows):
    slots, w, g = _slot_case(dtype, s, 5, n, spare_rows)
    want_sum = torch.einsum("bs,sbn->bn", w.double(), slots.double())
    want_dots = torch.einsum("bn,sbn->bs", g.double(), slots.double())
    got_sum = fast_ops.slot_weighted_sum(w, slots)
    got_dots = fast_ops.slot_dots(g, slots)
    assert got_sum.shape == (5, n) and got_dots.shape == (5, s)
    assert got_sum.dtype == got_dots.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5 * math.sqrt(n))
    torch.testing.assert_close(got_sum.double(), want_sum, **tol)
    torch.testing.assert_close(got_dots.double(), want_dots, **tol)


@needs_kernels
def test_slot_dots_are_at_least_as_accurate_as_bmm_on_long_rows():
    """float32 dot products over 32768 elements (CIFAR's first stage): the kernel's lanes are added in
    float64, and its error against float64 stays within that of torch.bmm."""
    slots, _, g = _slot_case(torch.float32, 6, 16, 32768, seed=1)
    want = torch.einsum("bn,sbn->bs", g.double(), slots.double())
    err_kernel = (fast_ops.slot_dots(g, slots).double() - want).abs().max()
    err_bmm = (torch.bmm(g.unsqueeze(1), slots.permute(1, 2, 0)).squeeze(1).double() - want).abs().max()
    assert err_kernel <= 1.5 * err_bmm + 1e-6


@needs_kernels
def test_slot_contractions_do_not_depend_on_the_number_of_threads():
    slots, w, g = _slot_case(torch.float32, 7, 9, 1000, seed=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            results.append((fast_ops.slot_weighted_sum(w, slots), fast_ops.slot_dots(g, slots)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_kernels
def test_slot_contractions_decline_what_they_cannot_do(monkeypatch):
    """None (the caller then runs torch.bmm) for autograd-recorded inputs, mixed dtypes, rows that are
    not contiguous, autocast and the fast paths switched off; a wrong shape is an error."""
    slots, w, g = _slot_case(torch.float32, 3, 4, 10)
    assert fast_ops.slot_weighted_sum(w, slots) is not None
    assert fast_ops.slot_weighted_sum(w.clone().requires_grad_(), slots) is None
    with torch.no_grad():
        assert fast_ops.slot_weighted_sum(w.clone().requires_grad_(), slots) is not None
    assert fast_ops.slot_weighted_sum(w.double(), slots) is None
    assert fast_ops.slot_dots(g, slots.transpose(1, 2).contiguous().transpose(1, 2)) is None  # strided rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_ops.slot_dots(g, slots) is None
    monkeypatch.setattr(fast_ops, "FAST_CPU_PATHS", False)
    assert fast_ops.slot_dots(g, slots) is None
    with pytest.raises(ValueError, match=r"weights must be \[B, S\] = \[4, 3\]"):
        fast_ops.slot_weighted_sum(w[:, :2], slots)
    with pytest.raises(ValueError, match=r"grad must be \[B, n\] = \[4, 10\]"):
        fast_ops.slot_dots(g[:, :9], slots)


def _count_kernel_calls(monkeypatch, *names):
    """Counts the calls of the named C++ kernels (``ela_<name>_<dtype>``) from here on: name -> count."""
    calls = dict.fromkeys(names, 0)
    real = fast_ops._kernel

    def spy(name, dtype):
        if name in calls:
            calls[name] += 1
        return real(name, dtype)

    monkeypatch.setattr(fast_ops, "_kernel", spy)
    return calls


@needs_kernels
def test_mrla_b_contracts_its_slots_on_the_kernels(monkeypatch):
    """A training step of an MRLA-B stage runs its weighted sums (forward, and the values' gradient) and
    the attention weights' dot products on the slot kernels, and matches the plain path with them off."""
    calls = _count_kernel_calls(monkeypatch, "slot_wsum", "slot_dots")
    torch.manual_seed(0)
    layers = [MrlaBase(8, dim_per_head=4).double().train() for _ in range(3)]
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)

    def run():
        state = StageState()
        state.capacity = 3
        h = x
        for m in layers:
            h = m(h, state)
        state.close()
        return torch.autograd.grad(h.square().sum(), [x, *[p for m in layers for p in m.parameters()]])

    got = run()
    assert calls == {"slot_wsum": 6, "slot_dots": 3}  # 3 forward + 3 value gradients; 3 weight gradients
    monkeypatch.setattr(fast_ops, "_slots_eligible", lambda *a: False)
    want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# MRLA-B's attention weights (fast_ops.attention_weights)


def _weights_in_pytorch_ops(g, wq, wk, keys, heads, scale):
    """Q and K by F.conv1d over the channel axis, the logits as products summed per head, softmax."""
    b, c = g.shape
    pad = (wq.numel() - 1) // 2
    q = F.conv1d(g.unsqueeze(1), wq.view(1, 1, -1), padding=pad).view(b, heads, c // heads)
    k = F.conv1d(g.unsqueeze(1), wk.view(1, 1, -1), padding=pad).view(b, heads, c // heads)
    logits = torch.stack([(q * key).sum(-1) for key in [*keys, k]], dim=-1) * scale
    return torch.softmax(logits, dim=-1), k


def _weights_case(dtype, b, c, heads, ks, n_keys, seed=0):
    gen = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_()  # noqa: E731
    return leaf(b, c), leaf(1, 1, ks), leaf(1, 1, ks), [leaf(b, heads, c // heads) for _ in range(n_keys)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b, c, heads, ks, n_keys", [
    (3, 32, 2, 3, 0),  # a stage's first layer: attends to itself only
    (4, 64, 4, 5, 3),
    (2, 48, 3, 7, 11),  # taps wider than a head, many keys
    (5, 16, 1, 1, 2),  # one tap, one head
    (1, 8, 8, 3, 4),  # one channel per head
])
@pytest.mark.parametrize("key_grad", [True, False])  # whether later layers sent k a gradient
def test_attention_weights_match_pytorch_ops(dtype, b, c, heads, ks, n_keys, key_grad):
    """Outputs and the gradients of g, both weights and every earlier key, against F.conv1d, products
    and softmax under autograd."""
    g, wq, wk, keys = _weights_case(dtype, b, c, heads, ks, n_keys)
    gen = torch.Generator().manual_seed(1)
    grad_attn = torch.randn(b, heads, n_keys + 1, dtype=dtype, generator=gen)
    grad_k = torch.randn(b, heads, c // heads, dtype=dtype, generator=gen)
    leaves = [g, wq, wk, *keys]
    results = []
    for fn in (fast_ops.attention_weights, _weights_in_pytorch_ops):
        attn, k = fn(g, wq, wk, keys, heads, 0.37)
        loss = (attn * grad_attn).sum() + ((k * grad_k).sum() if key_grad else 0)
        results.append([attn, k, *torch.autograd.grad(loss, leaves)])
    got, want = results
    assert got[0].shape == (b, heads, n_keys + 1) and got[1].shape == (b, heads, c // heads)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for name, x, y in zip(["attn", "k", "dg", "dwq", "dwk"] + [f"dkey{i}" for i in range(n_keys)], got, want):
        assert x.dtype == dtype, name
        torch.testing.assert_close(x, y, **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
def test_attention_weights_pass_gradcheck():
    g, wq, wk, keys = _weights_case(torch.float64, 2, 12, 3, 3, 2, seed=3)
    assert torch.autograd.gradcheck(lambda *t: fast_ops.attention_weights(t[0], t[1], t[2], t[3:], 3, 0.5),
                                    (g, wq, wk, *keys))


@needs_kernels
def test_attention_weights_decline_what_they_cannot_do_and_reject_bad_shapes(monkeypatch):
    g, wq, wk, keys = _weights_case(torch.float32, 2, 16, 2, 3, 2)
    assert fast_ops.attention_weights(g, wq, wk, keys, 2, 0.5) is not None
    assert fast_ops.attention_weights(g, wq, wk, [keys[0].double(), keys[1]], 2, 0.5) is None  # mixed dtypes
    strided = torch.randn(2, 8, 2).transpose(1, 2)  # [2, 2, 8], not contiguous
    assert fast_ops.attention_weights(g, wq, wk, [strided], 2, 0.5) is None
    assert fast_ops.attention_weights(g.half(), wq.half(), wk.half(), [], 2, 0.5) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_ops.attention_weights(g, wq, wk, keys, 2, 0.5) is None
    with pytest.raises(ValueError, match=r"key 1 must be \[B, heads, d\] = \[2, 2, 8\], got \[2, 4, 4\]"):
        fast_ops.attention_weights(g, wq, wk, [keys[0], torch.randn(2, 4, 4)], 2, 0.5)
    with pytest.raises(ValueError, match="C divisible by 3 heads"):
        fast_ops.attention_weights(g, wq, wk, [], 3, 0.5)
    with pytest.raises(ValueError, match="same odd number of taps, got 4 and 4"):
        fast_ops.attention_weights(g, torch.randn(1, 1, 4), torch.randn(1, 1, 4), [], 2, 0.5)
    monkeypatch.setattr(fast_ops, "WEIGHT_KERNELS", False)
    assert fast_ops.attention_weights(g, wq, wk, keys, 2, 0.5) is None


@needs_kernels
def test_mrla_b_computes_its_attention_weights_on_the_kernel(monkeypatch):
    """A training step of an MRLA-B stage (the loss reaching only its first two of four layers, so the
    last layers' keys get no gradient) runs every layer's weights on the kernel, forward and backward,
    and matches the PyTorch-ops path with the kernel off."""
    calls = _count_kernel_calls(monkeypatch, "attn_weights_fwd", "attn_weights_bwd")
    torch.manual_seed(0)
    layers = [MrlaBase(16, dim_per_head=4).double().train() for _ in range(4)]
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64, requires_grad=True)

    def run():
        state = StageState(capacity=4)
        outs, h = [], x
        for m in layers:
            h = m(h, state)
            outs.append(h)
        state.close()
        loss = outs[1].square().sum() + outs[0].sum()
        return torch.autograd.grad(loss, [x, *[p for m in layers[:2] for p in m.parameters()]])

    got = run()
    assert calls == {"attn_weights_fwd": 4, "attn_weights_bwd": 2}
    monkeypatch.setattr(fast_ops, "WEIGHT_KERNELS", False)
    want = run()
    assert calls == {"attn_weights_fwd": 4, "attn_weights_bwd": 2}  # the kernel is off: no more calls
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# MRLA-L's gate (fast_ops.light_gate, fast_ops.light_gate_grad)


def _gate_in_pytorch_ops(g, wq, wk, heads, scale):
    b, c = g.shape
    pad = (wq.numel() - 1) // 2
    q = F.conv1d(g.unsqueeze(1), wq.view(1, 1, -1), padding=pad).view(b, heads, c // heads)
    k = F.conv1d(g.unsqueeze(1), wk.view(1, 1, -1), padding=pad).view(b, heads, c // heads)
    return torch.sigmoid((q * k).sum(-1) * scale)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b, c, heads, ks", [(3, 64, 2, 3), (2, 96, 3, 5), (4, 32, 1, 7), (1, 8, 8, 1)])
def test_light_gate_and_its_gradient_match_pytorch_ops(dtype, b, c, heads, ks):
    """The gate, its gradients through autograd (light_gate's backward) and without (light_gate_grad)
    against F.conv1d, products and sigmoid under autograd."""
    g, wq, wk, _ = _weights_case(dtype, b, c, heads, ks, 0, seed=4)
    grad_gate = torch.randn(b, heads, dtype=dtype, generator=torch.Generator().manual_seed(5))
    gate = fast_ops.light_gate(g, wq, wk, heads, 0.29)
    want_gate = _gate_in_pytorch_ops(g, wq, wk, heads, 0.29)
    got = torch.autograd.grad((gate * grad_gate).sum(), [g, wq, wk])
    want = torch.autograd.grad((want_gate * grad_gate).sum(), [g, wq, wk])
    direct = fast_ops.light_gate_grad(g.detach(), gate.detach(), grad_gate, wq.detach(), wk.detach(), heads, 0.29)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert gate.shape == (b, heads) and gate.dtype == dtype
    torch.testing.assert_close(gate, want_gate, **tol)
    for x, y, z in zip(got, want, direct):
        assert x.shape == y.shape == z.shape
        torch.testing.assert_close(x, y, **tol)
        assert torch.equal(x, z)  # the same kernel either way


@needs_kernels
def test_light_gate_declines_what_it_cannot_do_and_rejects_bad_shapes(monkeypatch):
    g, wq, wk, _ = _weights_case(torch.float32, 2, 16, 2, 3, 0)
    gate = torch.rand(2, 2)
    assert fast_ops.light_gate(g, wq, wk, 2, 0.5) is not None
    assert fast_ops.light_gate_grad(g, gate, gate, wq, wk, 2, 0.5) is not None
    assert fast_ops.light_gate(g, wq.double(), wk, 2, 0.5) is None
    assert fast_ops.light_gate_grad(g, gate.double(), gate, wq, wk, 2, 0.5) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_ops.light_gate(g, wq, wk, 2, 0.5) is None
    with pytest.raises(ValueError, match=r"gate and grad_gate must be \[B, heads\] = \[2, 2\], got \[2, 4\]"):
        fast_ops.light_gate_grad(g, torch.rand(2, 4), torch.rand(2, 4), wq, wk, 2, 0.5)
    with pytest.raises(ValueError, match="light_gate: g must be"):
        fast_ops.light_gate(g[0], wq, wk, 2, 0.5)
    monkeypatch.setattr(fast_ops, "WEIGHT_KERNELS", False)
    assert fast_ops.light_gate(g, wq, wk, 2, 0.5) is None
    assert fast_ops.light_gate_grad(g, gate, gate, wq, wk, 2, 0.5) is None
    with pytest.raises(ValueError, match="gate and grad_gate must be"):  # an error with the kernels off too
        fast_ops.light_gate_grad(g, torch.rand(2, 4), torch.rand(2, 4), wq, wk, 2, 0.5)


@needs_kernels
@pytest.mark.parametrize("fused", [True, False])
def test_mrla_l_computes_its_gate_on_the_kernel(fused, monkeypatch):
    """A training step of MRLA-L layers, on the fused layer (the gate's backward without autograd) and on
    the separate kernels (the gate under autograd), runs the gate kernels and matches the PyTorch-ops path."""
    calls = _count_kernel_calls(monkeypatch, "light_gate_fwd", "light_gate_bwd")
    monkeypatch.setattr(fast_ops, "FUSED_LIGHT_LAYER", fused)
    torch.manual_seed(0)
    layers = [MrlaLight(64, dim_per_head=16).double().train() for _ in range(3)]
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64, requires_grad=True)

    def run():
        state, h = StageState(), x
        for m in layers:
            h = m(h, x, state)
        return torch.autograd.grad(h.square().sum(), [x, *[p for m in layers for p in m.parameters()]])

    got = run()
    assert calls == {"light_gate_fwd": 3, "light_gate_bwd": 3}
    monkeypatch.setattr(fast_ops, "WEIGHT_KERNELS", False)
    want = run()
    assert calls == {"light_gate_fwd": 3, "light_gate_bwd": 3}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
