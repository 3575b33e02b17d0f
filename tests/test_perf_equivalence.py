"""The optimised layer-attention paths compute exactly the straightforward formulation of SPEC section 1.

The reference below is written from the SPEC with plain tensor ops (Conv1d for Q/K, a Python sum over
the cached values, ``repeat_interleave`` per head, functional batch norm) and shares only the parameters
with the library. Forward outputs and the gradients of every parameter and of the input are compared,
in float64 (tight) and float32, with skipped layers, channels_last, partial and repeated backward passes,
activation checkpointing, bf16 autocast and ``torch.compile``.
"""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import ela_hf  # noqa: F401
from ela_hf.layers import MrlaBase, MrlaLight, StageState, fast_ops
from ela_hf.layers.mrla import _StageValueBuffer
from ela_hf.models import LayerAttentionResNet


# ------------------------------------------------------------------------------------------------
# reference: SPEC section 1, written out


def _ref_qk(attn, y):
    g = y.mean(dim=(2, 3)).unsqueeze(1)  # [B, 1, C]
    pad = (attn.k_size - 1) // 2
    b = y.shape[0]
    q = F.conv1d(g, attn.wq.weight, padding=pad).view(b, attn.heads, attn.dim_per_head)
    k = F.conv1d(g, attn.wk.weight, padding=pad).view(b, attn.heads, attn.dim_per_head)
    return q, k


def _ref_bn(bn, x):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)


def _ref_block(blk, x, cache):
    """One block: the timm bottleneck conv path, then MRLA-B / MRLA-L as SPEC section 1 states it."""
    sc = x if blk.downsample is None else blk.downsample(x)
    h = blk.act1(blk.bn1(blk.conv1(x)))
    h = blk.act2(blk.bn2(blk.conv2(h)))
    y = blk.act3(blk.bn3(blk.conv3(h)) + sc)
    if blk.is_skipped:
        return y
    a = blk.attn
    q, k = _ref_qk(a, y)
    v = F.conv2d(y, a.wv.weight, padding=a.wv.padding, dilation=a.wv.dilation, groups=a.channels)
    if blk.attn_type == "mrla_l":
        gate = torch.sigmoid((q * k).sum(-1) / math.sqrt(a.dim_per_head))  # [B, heads]
        o = v * gate.repeat_interleave(a.dim_per_head, dim=1)[:, :, None, None] + a.lam * sc
        return y + _ref_bn(a.bn, o)
    cache.append((k, v))
    scores = torch.stack([(q * k_s).sum(-1) for k_s, _ in cache], dim=-1) / math.sqrt(a.dim_per_head)
    attn = torch.softmax(scores, dim=-1)  # [B, heads, t]
    o = sum(attn[:, :, s].repeat_interleave(a.dim_per_head, dim=1)[:, :, None, None] * v_s
            for s, (_, v_s) in enumerate(cache))
    return y + F.relu(_ref_bn(a.bn, o))


def _ref_forward(model, x):
    x = model.forward_stem(x)
    for stage in model.stages:
        cache = []  # the MRLA-B cache resets at every stage
        for blk in stage:
            x = _ref_block(blk, x, cache)
    return model.forward_head(x)


# ------------------------------------------------------------------------------------------------
# helpers


def _tiny(attn_type, layers=(4, 3), skip_mask=None, **kw):
    torch.manual_seed(0)
    model = LayerAttentionResNet(layers=layers, channels=(16, 32)[: len(layers)], stem_type="cifar", stem_width=16,
                                 attn_type=attn_type, dim_per_head=16, num_classes=5, skip_mask=skip_mask, **kw)
    with torch.no_grad():  # away from the zero-init of bn3 and BN's identity so every path carries signal
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _loss(out):
    """A loss that weighs every output differently (so no gradient is uniform by construction)."""
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()


def _kernels_everywhere(monkeypatch):
    """The C++ kernels on every plane size: the tiny nets' planes are 12x12 .. 3x3."""
    for name in ("DEPTHWISE_MIN_PLANE", "TAIL_MIN_PLANE", "LIGHT_MIN_PLANE"):
        monkeypatch.setattr(fast_ops, name, 0)


def _run(model, x, fn=None):
    """Loss, output and gradients (params and input) of one forward/backward."""
    x = x.detach().clone().requires_grad_(True)
    out = (fn if fn is not None else model)(x)
    loss = _loss(out)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_same(got, want, rtol, atol):
    out_g, grads_g = got
    out_w, grads_w = want
    torch.testing.assert_close(out_g, out_w, rtol=rtol, atol=atol)
    assert grads_g.keys() == grads_w.keys()
    for name in grads_w:
        torch.testing.assert_close(grads_g[name], grads_w[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _compare(model, x, rtol=1e-9, atol=1e-10, prepare=None):
    """Library vs reference on deep copies of ``model`` (BN running stats stay independent)."""
    lib, ref = copy.deepcopy(model), copy.deepcopy(model)
    if prepare is not None:
        lib, x_lib = prepare(lib, x)
    else:
        x_lib = x
    _assert_same(_run(lib, x_lib), _run(ref, x, fn=lambda inp: _ref_forward(ref, inp)), rtol, atol)


SKIPS = [None, [[False, True, False, True], [False, False, True]], [[False, True, True, True], [False, True, True]]]


# ------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
@pytest.mark.parametrize("skip_mask", SKIPS)
def test_training_forward_and_gradients_match_reference_float64(attn_type, skip_mask):
    model = _tiny(attn_type, skip_mask=skip_mask).double().train()
    _compare(model, torch.randn(3, 3, 12, 12, dtype=torch.float64))


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_fast_batch_statistics_match_reference(attn_type, dtype, monkeypatch):
    """Without the C++ kernels: fast_ops' one-pass batch-norm statistics (normally only for tensors of
    several MiB) in a whole network: outputs, gradients and every running statistic match the reference."""
    monkeypatch.setitem(fast_ops._kernel_state, "lib", None)  # as on a machine without a C++ compiler
    monkeypatch.setattr(fast_ops, "FAST_STATS_MIN_BYTES", 0)
    used = []
    real = fast_ops._fast_batch_stats
    monkeypatch.setattr(fast_ops, "_fast_batch_stats", lambda x: used.append(1) or real(x))
    model = _tiny(attn_type, skip_mask=SKIPS[1]).to(dtype).train()
    lib, ref = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(3, 3, 12, 12, dtype=dtype)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    _assert_same(_run(lib, x), _run(ref, x, fn=lambda inp: _ref_forward(ref, inp)), **tol)
    assert len(used) == 4  # one per active attention layer (7 blocks, 3 skipped)
    for (name, got), (_, want) in zip(lib.named_buffers(), ref.named_buffers()):
        if not name.endswith("num_batches_tracked"):  # the reference's functional BN does not count
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


def _count_kernel_calls(monkeypatch):
    calls = {"tail": 0, "dw": 0, "dw_relu": 0, "light": 0, "light_relu": 0}
    for key, fn in (
        ("tail", fast_ops._FusedTail),
        ("dw", fast_ops._DepthwiseConv3x3),
        ("dw_relu", fast_ops._ReluSumDepthwise3x3),  # MRLA-B's conv with the block's sum and ReLU folded in
        ("light", fast_ops._FusedLight),
    ):
        real = fn.apply

        def spy(*a, real=real, key=key):
            calls[key] += 1
            if key == "light" and a[9]:  # pre_relu: the block's residual sum and ReLU folded in
                calls["light_relu"] += 1
            return real(*a)

        monkeypatch.setattr(fn, "apply", spy)
    return calls


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l", "mrla_l_separate"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_cpu_kernels_match_reference_in_whole_network(attn_type, dtype, training, monkeypatch):
    """The C++ kernels (MRLA-L's fused layer; the fused tail and depthwise conv, which MRLA-B and MRLA-L
    with ``FUSED_LIGHT_LAYER`` off use) in a whole network, training and eval: outputs, gradients of
    every parameter and of the input, and every running statistic match the reference."""
    if fast_ops.cpu_kernels() is None:
        pytest.skip("no C++ compiler: the C++ kernels are unavailable here")
    _kernels_everywhere(monkeypatch)
    if attn_type == "mrla_l_separate":
        attn_type = "mrla_l"
        monkeypatch.setattr(fast_ops, "FUSED_LIGHT_LAYER", False)
    calls = _count_kernel_calls(monkeypatch)
    model = _tiny(attn_type, skip_mask=SKIPS[1]).to(dtype).train(training)
    x = torch.randn(3, 3, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(0))
    if dtype == torch.float64:
        tol = dict(rtol=1e-9, atol=1e-10)
        lib, ref = copy.deepcopy(model), copy.deepcopy(model)
        _assert_same(_run(lib, x), _run(ref, x, fn=lambda inp: _ref_forward(ref, inp)), **tol)
    else:  # against float64, see _assert_float32_accurate
        tol = dict(rtol=1e-4, atol=1e-4)
        lib, ref = _assert_float32_accurate(model, x, **tol)
    # one per active attention layer (7 blocks, 3 skipped)
    fused = attn_type == "mrla_l" and fast_ops.FUSED_LIGHT_LAYER
    if fused:
        assert calls == {"tail": 0, "dw": 0, "dw_relu": 0, "light": 4, "light_relu": 4}
    else:  # MRLA-B, and MRLA-L with FUSED_LIGHT_LAYER off: the conv with the block's sum and ReLU folded in
        assert calls == {"tail": 4, "dw": 0, "dw_relu": 4, "light": 0, "light_relu": 0}
    for (name, got), (_, want) in zip(lib.named_buffers(), ref.named_buffers()):
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(got, want.to(got.dtype), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cls", [MrlaBase, MrlaLight])
def test_an_active_drop_path_acts_on_the_attention_branch_only(cls):
    """With DropPath (any module but nn.Identity) the residual sum leaves the fused tail:
    out = y + drop_path(tail), where without it out = y + tail."""

    class Half(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x

    torch.manual_seed(0)
    layer = cls(32).double().eval()
    y, sc = torch.randn(2, 32, 16, 16, dtype=torch.float64), torch.randn(2, 32, 16, 16, dtype=torch.float64)

    def run():
        state = StageState(capacity=1)
        out = layer(y, sc, state) if cls is MrlaLight else layer(y, state)
        state.close()
        return out

    plain = run()
    layer.drop_path = Half()
    torch.testing.assert_close(run() - y, 0.5 * (plain - y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_skipping_in_place_equals_building_without_the_layer(attn_type):
    mask = SKIPS[1]
    built = _tiny(attn_type, skip_mask=mask).double().train()
    inplace = _tiny(attn_type).double().train()
    inplace.set_skip_mask(mask)
    inplace.load_state_dict(built.state_dict(), strict=False)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    _assert_same(_run(inplace, x), _run(built, x), rtol=1e-12, atol=1e-12)
    _compare(inplace, x)


def _assert_float32_accurate(model, x, rtol=1e-4, atol=1e-4):
    """The library in float32 against the reference in float64 (the truth), on an input where the
    reference in float32 agrees with it too. Comparing two float32 runs instead breaks on inputs where a
    pre-activation sits within rounding of a ReLU's kink: there any two float32 summation orders may
    take different sides (for the tiny MRLA-B net, 3 of 8 random inputs), and it is luck which.
    Returns the library's model and the float64 reference's, after their step."""
    lib, ref32, ref64 = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model).double()
    out64, grads64 = _run(ref64, x.double(), fn=lambda inp: _ref_forward(ref64, inp))
    want = (out64.float(), {name: g.float() for name, g in grads64.items()})
    # precondition (about the input, not the library): no ReLU kink within float32 rounding
    _assert_same(_run(ref32, x, fn=lambda inp: _ref_forward(ref32, inp)), want, rtol, atol)
    _assert_same(_run(lib, x), want, rtol, atol)
    return lib, ref64


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_float32_matches_reference(attn_type):
    model = _tiny(attn_type, skip_mask=SKIPS[1]).train()
    _assert_float32_accurate(model, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_channels_last_matches_reference(attn_type):
    model = _tiny(attn_type, skip_mask=SKIPS[1]).double().train()

    def to_channels_last(m, x):
        return m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    _compare(model, torch.randn(3, 3, 12, 12, dtype=torch.float64), prepare=to_channels_last)


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
@pytest.mark.parametrize("kernels_everywhere", [False, True])
def test_dilated_stages_match_reference(attn_type, kernels_everywhere, monkeypatch):
    """output_stride=8: the last stage keeps its resolution with dilated convs; the layers attend as usual."""
    if kernels_everywhere:
        _kernels_everywhere(monkeypatch)
    torch.manual_seed(0)
    model = LayerAttentionResNet(layers=(2, 3, 3), channels=(8, 8, 16), stem_width=16, attn_type=attn_type,
                                 dim_per_head=16, num_classes=5, output_stride=8,
                                 skip_mask=[[False, False], [False, True, False], [False, False, True]])
    assert model.layer3[1].conv2.dilation == (2, 2)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    assert model.double().forward_features(x).shape[-1] == 48 // 8
    _compare(model.train(), x)


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_eval_and_no_grad_match_reference(attn_type):
    model = _tiny(attn_type, skip_mask=SKIPS[1]).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        want = _ref_forward(model, x)
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)


def test_mrla_b_eager_path_uses_one_value_buffer_per_stage():
    """The test above exercises the fused path: values sit in one buffer, sized by the active layers."""
    model = _tiny("mrla_b", skip_mask=SKIPS[1]).train()
    seen = []
    model.layer1[2].attn.register_forward_hook(lambda m, inp, out: seen.append((inp[-1], len(inp[-1].values), out)))
    model(torch.randn(2, 3, 8, 8))
    state, n_values, out = seen[0]
    # blocks 0 and 2 are active (1 and 3 skipped): two values cached when block 2 attends
    assert state.value_buffer is not None and state.value_buffer.count == 2 == n_values
    assert state.capacity == 2
    assert state.values == [], "slot views are dropped at the end of the stage's forward"
    assert state.value_buffer.buffer is None, "the stage drops its reference; the autograd nodes keep theirs"
    names, fn = set(), out.grad_fn
    stack = [fn]
    while stack:  # the block output depends on the fused node
        fn = stack.pop()
        if fn is None or type(fn).__name__ in names:
            continue
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert any("AttendOverStageValues" in n for n in names)


def test_mrla_b_repeated_backward_with_retain_graph_accumulates_exactly():
    model = _tiny("mrla_b", skip_mask=SKIPS[1]).double().train()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    _, once = _run(copy.deepcopy(model), x)
    loss = _loss(model(x))
    loss.backward(retain_graph=True)
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, 2 * once[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernels_everywhere", [False, True])
def test_mrla_b_gradient_when_later_layers_reach_no_loss(kernels_everywhere, monkeypatch):
    """Loss from block 1 of a 4-block stage: blocks 2 and 3 run but their backward never does."""
    if kernels_everywhere:
        monkeypatch.setattr(fast_ops, "DEPTHWISE_MIN_PLANE", 0)
        monkeypatch.setattr(fast_ops, "TAIL_MIN_PLANE", 0)
    model = _tiny("mrla_b", layers=(4,)).double().train()
    stage = model.layer1
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    lib, ref = copy.deepcopy(stage), copy.deepcopy(stage)

    def run(blocks, call):
        inp = x.clone().requires_grad_(True)
        outs, h = [], inp
        state = StageState(capacity=len(blocks))
        cache = []
        for blk in blocks:
            h = call(blk, h, state, cache)
            outs.append(h)
        outs[1].pow(2).sum().backward()
        return [inp.grad] + [p.grad for p in blocks.parameters() if p.grad is not None]

    got = run(lib, lambda b, h, s, c: b(h, s))
    want = run(ref, lambda b, h, s, c: _ref_block(b, h, c))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_mrla_b_value_buffer_grows_when_capacity_is_underestimated():
    model = _tiny("mrla_b", layers=(4,)).double().train()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    lib, ref = copy.deepcopy(model.layer1), copy.deepcopy(model.layer1)
    inp_l, inp_r = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    state, cache, h_l, h_r = StageState(capacity=1), [], inp_l, inp_r
    for bl, br in zip(lib, ref):
        h_l, h_r = bl(h_l, state), _ref_block(br, h_r, cache)
    assert state.value_buffer.buffer.shape[0] >= 4
    torch.testing.assert_close(h_l, h_r, rtol=1e-10, atol=1e-10)
    h_l.sum().backward(), h_r.sum().backward()
    torch.testing.assert_close(inp_l.grad, inp_r.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("capacity", [4, 1])
@pytest.mark.parametrize("kernel", [True, False])
def test_mrla_b_kernels_write_values_and_gradients_straight_into_the_stage_buffers(capacity, kernel, monkeypatch):
    """On the C++ kernels, V is written into its stage slot by the conv, and dL/dO into its gradient slot
    by the tail's backward: no copies, also when the buffer has to grow; without the kernels each is
    copied in. Outputs and gradients match the reference either way."""
    if kernel and fast_ops.cpu_kernels() is None:
        pytest.skip("no C++ compiler: the C++ kernels are unavailable here")
    monkeypatch.setattr(fast_ops, "DEPTHWISE_MIN_PLANE", 0)
    monkeypatch.setattr(fast_ops, "TAIL_MIN_PLANE", 0)
    monkeypatch.setattr(fast_ops, "FAST_CPU_PATHS", kernel)
    copies = []
    real = _StageValueBuffer.to_slot
    monkeypatch.setattr(_StageValueBuffer, "to_slot", lambda self, slot, x: copies.append(1) or real(self, slot, x))
    model = _tiny("mrla_b", layers=(4,)).double().train()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    lib, ref = copy.deepcopy(model.layer1), copy.deepcopy(model.layer1)
    inp_l, inp_r = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    state, cache, h_l, h_r = StageState(capacity=capacity), [], inp_l, inp_r
    for bl, br in zip(lib, ref):
        h_l, h_r = bl(h_l, state), _ref_block(br, h_r, cache)
    assert len(copies) == (0 if kernel else 4)
    assert state.value_buffer.buffer.shape[0] >= 4
    torch.testing.assert_close(h_l, h_r, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(h_l)
    copies.clear()
    (h_l * w).sum().backward(), (h_r * w).sum().backward()
    # backward: the fused tail writes each layer's output gradient into its gradient slot
    assert len(copies) == (0 if kernel else 4)
    torch.testing.assert_close(inp_l.grad, inp_r.grad, rtol=1e-10, atol=1e-10)
    for (name, p_l), p_r in zip(lib.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p_l.grad, p_r.grad, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
@pytest.mark.parametrize("kernels_everywhere", [False, True])
def test_activation_checkpointing_matches_reference(attn_type, kernels_everywhere, monkeypatch):
    """Checkpointed blocks recompute their forward in backward; with ``kernels_everywhere`` the tiny
    net's small planes take the C++ kernels (MRLA-L's fused layer included) as large ones would."""
    if kernels_everywhere:
        if fast_ops.cpu_kernels() is None:
            pytest.skip("no C++ compiler: the C++ kernels are unavailable here")
        for name in ("DEPTHWISE_MIN_PLANE", "TAIL_MIN_PLANE", "LIGHT_MIN_PLANE"):
            monkeypatch.setattr(fast_ops, name, 0)
    model = _tiny(attn_type, skip_mask=SKIPS[1]).double().train()

    def checkpointed(m, x):
        m.set_grad_checkpointing(True)
        return m, x

    _compare(model, torch.randn(2, 3, 12, 12, dtype=torch.float64), prepare=checkpointed)


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_bf16_autocast_is_as_close_to_float32_as_the_reference_under_autocast(attn_type):
    """bf16 rounding differs op by op, so the bar is the reference's own bf16 error against float32."""
    model = _tiny(attn_type, skip_mask=SKIPS[1]).train()
    x = torch.randn(4, 3, 16, 16)
    results = {}
    for name, autocast in [("lib16", True), ("ref16", True), ("ref32", False)]:
        m = copy.deepcopy(model)
        fn = m if name.startswith("lib") else (lambda inp, m=m: _ref_forward(m, inp))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(x)
        if name == "lib16":
            assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        results[name] = out.detach().float(), grads
    err_lib = (results["lib16"][0] - results["ref32"][0]).abs().max()
    err_ref = (results["ref16"][0] - results["ref32"][0]).abs().max()
    assert err_lib <= 2 * err_ref + 1e-3, (err_lib, err_ref)
    cos_lib = F.cosine_similarity(results["lib16"][1], results["ref32"][1], dim=0)
    cos_ref = F.cosine_similarity(results["ref16"][1], results["ref32"][1], dim=0)
    assert torch.isfinite(results["lib16"][1]).all()
    assert cos_lib > 0.99 and cos_lib >= cos_ref - 0.005, (cos_lib, cos_ref)


def test_torch_compile_matches_reference():
    """Under torch.compile MRLA-B takes the plain formulation (a fused sum); values and gradients agree."""
    torch._dynamo.reset()
    model = _tiny("mrla_b", layers=(3,), skip_mask=[[False, True, False]]).train()
    lib, ref = copy.deepcopy(model), copy.deepcopy(model)
    compiled = torch.compile(lib, backend="aot_eager")  # the tracing path without the C++ compiler's time
    x = torch.randn(2, 3, 8, 8)
    got = _run(lib, x, fn=compiled)
    want = _run(ref, x, fn=lambda inp: _ref_forward(ref, inp))
    _assert_same(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
@pytest.mark.parametrize("capture", ["jit_trace", "export"])
def test_traced_and_exported_models_match_eager(attn_type, capture):
    """A trace records tensor ops only: the C++ kernels and MRLA-B's in-place stage buffer step aside,
    so the captured graph computes what eager mode computes on an input it has not seen."""
    import warnings

    model = _tiny(attn_type, skip_mask=SKIPS[1]).eval()
    x, x_new = torch.randn(2, 3, 12, 12), torch.randn(2, 3, 12, 12)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, still used
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # input-shape checks become constants
        if capture == "jit_trace":
            captured = torch.jit.trace(model, x, check_trace=False)
        else:
            captured = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(captured(x_new), model(x_new), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels_everywhere", [False, True])
def test_mrla_b_cpu_buffers_are_reused_between_steps(kernels_everywhere, monkeypatch):
    """Large CPU stage buffers (values and their gradients) go back to a pool: a steady loop allocates none.

    Fresh blocks above 32 MiB page-fault on every step, which costs more than the attention itself.
    The loop keeps each step's loss (and so its graph's nodes) alive into the next forward, as training
    loops do: no node may hold a view of a buffer after its backward (with the kernels everywhere, the
    conv writes into the value slots and the tails into the gradient slots).
    """
    from ela_hf.layers import mrla

    if kernels_everywhere:
        monkeypatch.setattr(fast_ops, "DEPTHWISE_MIN_PLANE", 0)
        monkeypatch.setattr(fast_ops, "TAIL_MIN_PLANE", 0)
    mrla.clear_value_buffer_pool()
    model = _tiny("mrla_b", layers=(4, 3)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 8, 8)
    start, counts = mrla._SLOT_POOL.allocations, []
    for _ in range(4):
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        opt.step()
        counts.append(mrla._SLOT_POOL.allocations - start)
    assert counts[0] == 4, "first step: a value and a gradient buffer per stage"
    # the pool keeps a shape's buffers once a second forward pass asks for it (serving's one-off sizes are
    # not kept): the second step allocates afresh, later ones reuse
    assert counts == [4, 8, 8, 8], "later steps reuse them, while the previous step's graph is still referenced"
    with torch.no_grad():
        model.eval()(x)
    assert mrla._SLOT_POOL.allocations - start == counts[-1]


def test_buffer_pool_keeps_a_bounded_number_of_bytes_and_reuses_what_fits(monkeypatch):
    """Detection feeds ever new input sizes: the pool must not keep a buffer for every size it saw; a
    fixed set of sizes that fits the bound, and models trained in turn, keep reusing theirs."""
    from ela_hf.layers import mrla

    pool = mrla._SLOT_POOL
    model = _tiny("mrla_b", layers=(4, 3)).train()
    sizes = range(40, 8, -1)  # 32 sizes, 4 shapes each (a value and a gradient buffer per stage)

    def held():  # the pool keeps a running total: it must equal what it holds
        kept = sum(b.untyped_storage().nbytes() for bufs in pool._free.values() for b in bufs)
        assert pool.free_bytes() == kept and all(pool._free.values())
        return kept

    def one_pass():  # the shapes that the pass's first size added to the kept ones
        first, before = None, set(pool._free)
        for size in sizes:
            model(torch.randn(1, 3, size, size)).sum().backward()
            first = first if first is not None else set(pool._free) - before
        return first

    # (a shape's buffers are kept once a second forward pass asks for it: two passes after every clear)
    mrla.clear_value_buffer_pool()
    one_pass()
    one_pass()
    everything = held()
    with monkeypatch.context() as m:
        m.setattr(pool, "max_free_bytes", everything // 4)
        mrla.clear_value_buffer_pool()
        one_pass()
        first = one_pass()
        assert first and 0 < held() <= everything // 4
        assert not first & set(pool._free), "the least recently used (first, largest) sizes are let go"

    # under the default bound a fixed set of sizes is reused round after round (multi-scale training)
    mrla.clear_value_buffer_pool()
    one_pass()
    one_pass()
    start = pool.allocations
    one_pass()
    assert pool.allocations == start

    # two forwards before one backward (two augmented views): their buffers are reused too
    x1, x2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    (model(x1).sum() + model(x2).sum()).backward()
    start = pool.allocations
    for _ in range(2):
        (model(x1).sum() + model(x2).sum()).backward()
    assert pool.allocations == start

    other = _tiny("mrla_b", layers=(3, 3)).train()
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 12, 12)
    counts = []
    for _ in range(4):
        model(x).sum().backward()
        other(y).sum().backward()
        counts.append(pool.allocations)
    assert counts[2:] == [counts[1]] * 2, "interleaved models keep reusing their buffers (from their second step)"
    held()


def test_buffers_given_back_by_a_finished_backward_count_against_the_bound_at_once(monkeypatch):
    """After a run's last step (a sweep deleting its model) the buffers handed back during backward waited in
    the pool's pending list, uncounted by free_bytes() and past max_free_bytes, until some later forward."""
    import gc

    from ela_hf.layers import mrla

    pool = mrla._SLOT_POOL
    mrla.clear_value_buffer_pool()
    model = _tiny("mrla_b", layers=(4, 3)).train()
    for _ in range(2):  # a shape's buffers are kept once a second forward pass asks for it
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    kept = sum(b.untyped_storage().nbytes() for bufs in pool._free.values() for b in bufs)
    assert not pool._pending and kept > 0 and pool._held == kept  # nothing waits once backward is over
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    loss.backward(retain_graph=True)  # a kept graph keeps its buffers: they wait, and are not reused
    assert pool._pending
    del loss
    gc.collect()
    assert pool.free_bytes() == kept and not pool._pending
    with monkeypatch.context() as m:
        m.setattr(pool, "max_free_bytes", 1)
        mrla.clear_value_buffer_pool()
        for _ in range(2):
            model(torch.randn(2, 3, 8, 8)).sum().backward()
        assert pool._held == 0 and not pool._pending and not pool._free
    del model
    mrla.clear_value_buffer_pool()


def test_buffers_of_a_graph_dropped_without_backward_are_reused_and_never_while_read():
    """An eval loop without no_grad, an exception mid-forward or mid-backward: the stage's graph dies without
    a complete backward. Its buffers must come back to the pool (they were fresh, page-faulting allocations
    on every pass), but not while a live graph still reads them."""
    import threading

    from ela_hf.layers import mrla

    pool = mrla._SLOT_POOL
    mrla.clear_value_buffer_pool()
    model = _tiny("mrla_b", layers=(4, 3)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    start, counts = pool.allocations, []
    for _ in range(5):
        out = model(x)  # autograd on: each pass keeps a graph until `out` is replaced
        counts.append(pool.allocations - start)
    assert counts == [2, 4, 4, 4, 4], "two passes' value buffers in turn, then no fresh ones"
    del out

    class Boom(Exception):
        pass

    def raise_in_forward(*_):
        raise Boom

    model.train()
    model(x).sum().backward()  # value and gradient buffers of both stages in the pool
    start = pool.allocations
    handle = model.stages[1][2].register_forward_hook(raise_in_forward)  # the last stage's last block
    for _ in range(3):
        with pytest.raises(Boom):
            model(x)
    handle.remove()
    def fail_in_backward(module, inputs, output):
        output.register_hook(raise_in_forward)

    # a hook that fails in backward once the last stage's later layers have run (its gradient buffer taken)
    handle = model.stages[1][0].register_forward_hook(fail_in_backward)
    for _ in range(3):
        with pytest.raises(Boom):
            model(x).sum().backward()
    handle.remove()
    assert pool.allocations == start, "failed passes hand their buffers back"

    # a kept graph keeps its values while other graphs are dropped and their buffers reused
    ref = copy.deepcopy(model)
    x1, x2, x3 = (torch.randn(2, 3, 8, 8, dtype=torch.float64) for _ in range(3))
    kept = model(x1).pow(2).sum()
    model(x2)  # dropped at once
    model(x3).sum().backward()  # may reuse x2's buffers, never x1's
    for p in model.parameters():
        p.grad = None
    kept.backward()
    _ref_forward(ref, x1).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")

    # the garbage collector may drop a graph while this very thread holds the pool's lock: handing the
    # buffers back must not wait for that lock (a threading.Lock would deadlock)
    waited = []

    class WatchedLock:
        def __init__(self):
            self.lock, self.owner = threading.Lock(), None

        def __enter__(self):
            if self.owner == threading.get_ident():
                waited.append(True)
                raise RuntimeError("the pool's lock taken again by the thread that holds it")
            self.lock.acquire()
            self.owner = threading.get_ident()

        def __exit__(self, *exc):
            self.owner = None
            self.lock.release()

    with monkeypatch_lock(pool, WatchedLock()) as lock:
        out = model.eval()(x)
        with lock:
            del out  # the graph and its stage buffers die here
        assert not waited
        start = pool.allocations
        model(x)
        assert pool.allocations == start, "handed back without the lock, reused by the next pass"


class monkeypatch_lock:
    def __init__(self, pool, lock):
        self.pool, self.lock = pool, lock

    def __enter__(self):
        self.saved, self.pool._lock = self.pool._lock, self.lock
        return self.lock

    def __exit__(self, *exc):
        self.pool._lock = self.saved


def test_mrla_b_graph_retained_across_a_later_forward_keeps_its_values():
    """retain_graph=True, then another step, then backward through the first graph again: exact."""
    model = _tiny("mrla_b", skip_mask=SKIPS[1]).double().train()
    x1, x2 = torch.randn(2, 3, 12, 12, dtype=torch.float64), torch.randn(2, 3, 12, 12, dtype=torch.float64)
    ref = copy.deepcopy(model)
    for m, fn in [(model, model), (ref, lambda inp: _ref_forward(ref, inp))]:
        loss1 = fn(x1).pow(2).sum()
        loss1.backward(retain_graph=True)
        fn(x2).pow(2).sum().backward()
        loss1.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_compiling_single_blocks_of_a_stage_is_a_clear_error_in_training_and_inference():
    """Regional compilation of MRLA-B blocks would mix the eager stage buffer's per-head values with the
    compiled blocks' plain formulation: refused with the same message with and without autograd."""
    torch._dynamo.reset()
    model = _tiny("mrla_b", layers=(3,))
    for j, blk in enumerate(model.layer1):
        if j > 0:
            blk.compile(backend="eager")
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):
        model.train(training)
        with torch.set_grad_enabled(training), pytest.raises(RuntimeError, match="ran partly eagerly and partly"):
            model(x)


def test_regional_compilation_of_every_block_matches_eager():
    """Every MRLA-B block compiled on its own (the usual regional compilation) shares the stage's cache in
    the compiled formulation throughout: outputs and gradients as eager, with a skipped block too."""
    torch._dynamo.reset()
    x = torch.randn(2, 3, 8, 8)
    for mask in ([[False, False, False]], [[False, True, False]]):
        model = _tiny("mrla_b", layers=(3,), skip_mask=mask).train()
        lib, ref = copy.deepcopy(model), copy.deepcopy(model)
        for blk in lib.layer1:
            blk.compile(backend="eager")
        _assert_same(_run(lib, x), _run(ref, x, fn=lambda inp: _ref_forward(ref, inp)), rtol=1e-4, atol=1e-5)
        lib.eval()
        with torch.no_grad():
            torch.testing.assert_close(lib(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_torch_fx_tracing_is_refused_with_the_ways_that_work():
    for name in ("ela_resnet20_cifar", "resnet20_cifar"):
        with pytest.raises(TypeError, match="torch.fx symbolic tracing cannot trace the ela_hf models.*torch.export"):
            torch.fx.symbolic_trace(timm.create_model(name))


def test_torch_compile_inductor_training_step_matches_reference():
    """The default backend (C++ code generation on CPU) on MRLA-B, whose compiled path differs from eager."""
    torch._dynamo.reset()
    x = torch.randn(2, 3, 8, 8)
    model = _tiny("mrla_b", layers=(3,), skip_mask=[[False, True, False]]).train()
    lib, ref = copy.deepcopy(model), copy.deepcopy(model)
    got = _run(lib, x, fn=torch.compile(lib))
    want = _run(ref, x, fn=lambda inp: _ref_forward(ref, inp))
    _assert_same(got, want, rtol=1e-4, atol=1e-5)


def _load_bench(name: str, monkeypatch):
    """bench/<name>.py as a module, registered under its name for the test (its dataclasses look it up)."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, bench)
    spec.loader.exec_module(bench)
    return bench


def test_kernel_bench_prints_ratios_and_restores_the_size_limits(capsys, monkeypatch):
    """bench/bench_kernels.py times every op at every size against PyTorch and puts the limits back."""
    if fast_ops.cpu_kernels() is None:
        pytest.skip("no C++ compiler: the C++ kernels are unavailable here")
    bench = _load_bench("bench_kernels", monkeypatch)
    monkeypatch.setattr(fast_ops, "LIGHT_MIN_PLANE", 100)  # 16x16 fused, 4x4 not
    limits = (fast_ops.DEPTHWISE_MIN_PLANE, fast_ops.TAIL_MIN_PLANE, fast_ops.LIGHT_MIN_PLANE)
    bench.SHAPES["cifar"] = [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]
    bench.main(["--cases", "cifar", "--repeats", "1", "--threads", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| cifar")]
    assert len(rows) == 12 and all(float(r[6]) > 0 for r in rows)
    used = {(r[2].strip(), r[3].strip()): r[7].strip() for r in rows}
    # 16x16: MRLA-L runs its fused layer there, not the separate conv or tail kernels
    assert used[("[2, 64, 16, 16]", "depthwise conv + pooling")] == "kernel (MRLA-B); fused layer (MRLA-L)"
    assert used[("[2, 64, 16, 16]", "MRLA-L tail")] == "fused layer"
    assert used[("[2, 64, 16, 16]", "MRLA-B tail")] == "kernel"
    assert used[("[2, 64, 8, 8]", "depthwise conv + pooling")] == "kernel"
    assert used[("[2, 64, 8, 8]", "MRLA-L tail")] == "kernel"
    assert used[("[2, 64, 4, 4]", "MRLA-B tail")] == "PyTorch"
    fused_row = "MRLA-L layer, fused (baseline: conv + tail kernels)"
    assert used[("[2, 64, 16, 16]", fused_row)] == "fused" and used[("[2, 64, 4, 4]", fused_row)] == "not fused"
    assert (fast_ops.DEPTHWISE_MIN_PLANE, fast_ops.TAIL_MIN_PLANE, fast_ops.LIGHT_MIN_PLANE) == limits
    # the fused row times the fused layer against the same layer with FUSED_LIGHT_LAYER off
    fused = []
    monkeypatch.setattr(fast_ops._FusedLight, "apply", lambda *a, real=fast_ops._FusedLight.apply: fused.append(1) or real(*a))
    baseline, fast = bench._ops((2, 64, 16, 16))[fused_row]
    baseline()
    assert not fused and fast_ops.FUSED_LIGHT_LAYER
    fast()
    assert fused == [1]
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])


def test_bench_scripts_refuse_bad_arguments_before_any_work(monkeypatch, capsys):
    models = _load_bench("bench_models", monkeypatch)
    recording = _load_bench("bench_recording", monkeypatch)
    kernels = _load_bench("bench_kernels", monkeypatch)
    cases = [
        (models.parse_args, ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (models.parse_args, ["--image-size", "-3"], "--image-size must be at least 1, got -3"),
        (models.parse_args, ["--threads", "0"], "--threads must be at least 1, got 0"),
        (models.parse_args, ["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (recording.main, ["--steps", "0"], "--steps must be at least 1, got 0"),
        (recording.main, ["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (recording.main, ["--warmup", "-1"], "--warmup must be at least 0, got -1"),
        (recording.main, ["--device", "mps"], "--device must be cpu, cuda or cuda:<index>, got 'mps'"),
        (kernels.parse_args, ["--threads", "-1"], "--threads must be at least 0, got -1"),
        # the before/after kinds would time the same network twice where no C++ kernel runs
        (models.parse_args, ["--models", "mrla_b", "mrla_b_plain", "--amp", "bf16"], "no kernel runs"),
        (models.parse_args, ["--models", "mrla_l", "mrla_l_unfused", "--channels-last"], "never runs with --channels-last"),
        # batch norm in training needs more than one value per channel in the last stage
        (models.parse_args, ["--cases", "imagenet", "--batch-size", "1", "--image-size", "32"],
         "[imagenet] batch 1 at 32x32 leaves one value per channel"),
    ]
    if not torch.cuda.is_available():
        cases += [(models.parse_args, ["--device", "cuda"], "torch.cuda.is_available() is False"),
                  (recording.main, ["--device", "cuda"], "torch.cuda.is_available() is False")]
    for fn, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            fn(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_model_bench_options_data_quartiles_and_memory_baseline(monkeypatch, capsys):
    bench = _load_bench("bench_models", monkeypatch)
    args = bench.parse_args(["--quick", "--warmup", "3"])
    assert (args.warmup, args.repeats, args.compile) == (3, 3, False), "explicit flags win over --quick"
    assert bench.parse_args(["--quick"]).warmup == 1 and bench.parse_args([]).warmup == 2
    bench.parse_args(["--cases", "imagenet", "--batch-size", "2", "--image-size", "32"])  # 2 values per channel
    bench.parse_args(["--models", "mrla_b", "mrla_b_bmm", "--channels-last"])  # the slot kernels run there
    # every model trains on the same batch
    args = bench.parse_args(["--cases", "cifar", "--models", "resnet", "mrla_b", "--batch-size", "2"])
    case = bench.make_cases("cpu")["cifar"]
    case.batch_size = 2
    a, b = bench.build_runner(case, "resnet", args), bench.build_runner(case, "mrla_b", args)
    assert all(torch.equal(u, v) for u, v in zip(a.batch, b.batch))
    # quartiles of two rounds stay within the two observed ratios
    base = bench.Runner("resnet", a.model, a.step, times=[1.0, 1.0])
    runner = bench.Runner("mrla_b", b.model, b.step, times=[2.513, 2.751])
    assert bench.round_quartiles(runner, base) == "2.57-2.69"
    # peak memory is measured from a state without gradients (as CUDA's counters see it too)
    b.step()
    seen = []
    real_step = b.step
    b.step = lambda: seen.append(all(p.grad is None for p in b.model.parameters())) or real_step()
    assert bench.peak_step_bytes(b, "cpu") > sum(p.numel() * 4 for p in b.model.parameters())
    assert seen == [True]


def test_model_bench_prints_each_case_when_it_is_done(monkeypatch, capsys):
    """A failure (or Ctrl-C) in a later case keeps the tables of the cases before it."""
    bench = _load_bench("bench_models", monkeypatch)
    real = bench.run_training_case

    def run(case, args):
        if case.name == "imagenet":
            raise KeyboardInterrupt
        return real(case, args)

    monkeypatch.setattr(bench, "run_training_case", run)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--threads", "1", "--cases", "cifar", "imagenet", "--models", "resnet", "--batch-size", "2",
                    "--repeats", "1", "--warmup", "0", "--no-inference", "--no-memory"])
    assert "| ResNet | 1.00 |" in capsys.readouterr().out


def test_recording_bench_runs_without_warmup_and_leaves_no_folder(monkeypatch, capsys, tmp_path):
    import tempfile

    recording = _load_bench("bench_recording", monkeypatch)
    monkeypatch.setattr(recording, "CASES", {"ela_resnet20_cifar": (16, 2, 10)})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    recording.main(["--repeats", "1", "--warmup", "0", "--threads", "1"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ela_resnet20_cifar")]
    assert len(row) == 1 and float(row[0].split("|")[6]) > 0
    assert list(tmp_path.iterdir()) == [], "the callback's temporary output_dir is removed"


def test_module_check_refuses_bad_arguments(capsys):
    from ela_hf.__main__ import main

    for argv, message in [(["--model", "nope"], "'nope' is not an ela_hf model; choose one of: ela_l_resnet101"),
                          (["--batch-size", "0"], "--batch-size must be at least 1, got 0")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    main(["--model", "resnet20_cifar", "--batch-size", "2"])
    assert "plain ResNet (no attention layers)" in capsys.readouterr().out


def test_kernel_bench_times_the_shapes_the_networks_use(monkeypatch):
    """The kernel bench reads its shapes off the CIFAR network: the bottleneck blocks' 4x-expanded
    channels at batch 64, one shape per stage, not the stage widths."""
    bench = _load_bench("bench_kernels", monkeypatch)
    model = timm.create_model("mrla_l_resnet110_cifar", num_classes=100)
    layers = [m for m in model.modules() if isinstance(m, MrlaLight)]
    channels = sorted({m.channels for m in layers})
    shapes = bench.attention_shapes("cifar")
    assert [s[1] for s in shapes] == channels and len(shapes) == len(model.stage_sizes)
    assert all(s[0] == 64 for s in shapes) and [s[2] for s in shapes] == [32, 16, 8]


def test_bench_script_prints_ratio_table(capsys, monkeypatch):
    """bench/bench_models.py runs end to end (tiny batch) and prints ratios to the plain ResNet."""
    bench = _load_bench("bench_models", monkeypatch)
    fast_calls = []
    for fn in (fast_ops._LightTail, fast_ops._FusedTail, fast_ops._DepthwiseConv3x3):
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply: fast_calls.append(1) or real(*a))
    bench.main(["--quick", "--threads", "1", "--cases", "cifar", "--models", "resnet", "mrla_l_plain",
                "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--no-inference"])
    # the *_plain kinds train with the fast paths off, and switch them back on afterwards
    assert "| MRLA-L, CPU fast paths off |" in capsys.readouterr().out and not fast_calls
    bench.main(["--quick", "--threads", "1", "--cases", "cifar", "--models", "resnet", "mrla_l", "mrla_b",
                "ela", "--batch-size", "2", "--repeats", "2", "--warmup", "0"])
    out = capsys.readouterr().out
    assert fast_calls  # ... and the other kinds use them
    assert ("C++ kernels on" in out) == (fast_ops.cpu_kernels() is not None)  # the header says which path ran
    assert f"C++ kernels {fast_ops.describe_kernels()}," in out  # ... and what the build uses
    assert fast_ops.FAST_CPU_PATHS
    if fast_ops.cpu_kernels() is not None:  # mrla_l_unfused: MRLA-L on the separate conv and tail kernels
        def train_only(kind):  # the ResNet and one kind, one tiny step each, training only
            bench.main(["--quick", "--threads", "1", "--cases", "cifar", "--models", "resnet", kind,
                        "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--no-inference", "--no-memory"])

        fused = []
        monkeypatch.setattr(fast_ops._FusedLight, "apply", lambda *a, real=fast_ops._FusedLight.apply: fused.append(1) or real(*a))
        fast_calls.clear()
        train_only("mrla_l_unfused")
        assert "| MRLA-L, conv and tail kernels separate |" in capsys.readouterr().out
        assert fast_calls and not fused and fast_ops.FUSED_LIGHT_LAYER
        train_only("mrla_l")
        assert fused
        # mrla_b_bmm: MRLA-B with its slot contractions on torch.bmm, the slot kernels back on afterwards
        kernel_calls, bmm_calls = [], []
        real_kernel = fast_ops._kernel
        monkeypatch.setattr(fast_ops, "_kernel", lambda name, dt: kernel_calls.append(name) or real_kernel(name, dt))
        monkeypatch.setattr(torch, "bmm", lambda *a, real=torch.bmm: bmm_calls.append(1) or real(*a))
        train_only("mrla_b_bmm")
        assert "| MRLA-B, slot contractions on torch.bmm |" in capsys.readouterr().out
        assert bmm_calls and not [n for n in kernel_calls if n.startswith("slot_")] and fast_ops.SLOT_KERNELS
        train_only("mrla_b")
        assert "slot_wsum" in kernel_calls and "slot_dots" in kernel_calls
        # *_qk_ops: MRLA-L's gate and MRLA-B's attention weights in PyTorch ops, the kernels back on afterwards
        for kind, row, kernel in [("mrla_l_qk_ops", "MRLA-L, gate in PyTorch ops", "light_gate_fwd"),
                                  ("mrla_b_qk_ops", "MRLA-B, attention weights in PyTorch ops", "attn_weights_fwd")]:
            kernel_calls.clear()
            train_only(kind)
            assert f"| {row} |" in capsys.readouterr().out
            assert kernel not in kernel_calls and fast_ops.WEIGHT_KERNELS
            train_only(kind.removesuffix("_qk_ops"))
            assert kernel in kernel_calls
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["ResNet"].split("|")[2].strip() == "1.00"  # its own ratio
    assert rows["ResNet"].split("|")[7].strip() == "1.00-1.00"  # ... in every round
    q1, q3 = (float(q) for q in rows["MRLA-B"].split("|")[7].split("-"))
    assert 0 < q1 <= q3
    assert float(rows["ELA (half skipped)"].split("|")[3]) > 0  # ratio to MRLA-B
    assert float(rows["MRLA-B"].split("|")[4]) > 1.0, "MRLA-B keeps more activations than the plain net"
    assert "ELA slim (half skipped), eager" in out


# ------------------------------------------------------------------------------------------------
# what needs autograd all the way through: double backward, hooks on the inner modules, torch.func


def _input_grad(model, x, forward):
    """dL/dx, with its graph (create_graph=True)."""
    xi = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(_loss(forward(model, xi)), xi, create_graph=True)
    return gx


def _penalty_grads(model, x, forward):
    """A gradient penalty's gradients: d(||dL/dx||^2)/d(params), with dL/dx itself."""
    gx = _input_grad(model, x, forward)
    return gx.detach(), torch.autograd.grad(gx.square().sum(), list(model.parameters()), allow_unused=True)


def _plain(model, x):
    with ela_hf.layers.plain_autograd():
        return model(x)


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_double_backward_is_refused_on_the_fast_paths_and_exact_under_plain_autograd(attn_type, monkeypatch):
    # the fast paths' gradients are not differentiable: second-order terms were silently dropped (a gradient
    # penalty came out 0.44x its finite-difference value on MRLA-L), now differentiating them is an error
    _kernels_everywhere(monkeypatch)
    model = _tiny(attn_type, skip_mask=SKIPS[1]).double().train()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    gx_want, want = _penalty_grads(copy.deepcopy(model), x, _ref_forward)
    if attn_type == "mrla_b" or fast_ops.cpu_kernels() is not None:  # (MRLA-B's stage buffer needs no compiler)
        with pytest.raises(RuntimeError, match=r"first-order gradients only, so this double backward .* "
                                               r"`with ela_hf.layers.plain_autograd\(\):`"):
            _penalty_grads(copy.deepcopy(model), x, lambda m, xi: m(xi))
        # a first-order gradient taken with create_graph=True is still the right one
        gx = _input_grad(copy.deepcopy(model), x, lambda m, xi: m(xi))
        torch.testing.assert_close(gx, gx_want, rtol=1e-9, atol=1e-10)
    gx_got, got = _penalty_grads(copy.deepcopy(model), x, _plain)
    torch.testing.assert_close(gx_got, gx_want, rtol=1e-9, atol=1e-10)
    assert [g is None for g in got] == [g is None for g in want]
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert not ela_hf.layers.fast_ops.plain_autograd_enabled()  # the context closed


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_a_nan_in_the_batch_reaches_the_running_statistics_as_in_pytorch(attn_type, monkeypatch):
    # the tail's variance kernel clamped with `v > 0 ? v : 0`, which turned a NaN variance into 0: the attention
    # BatchNorms' running_var stayed finite while running_mean and every nn.BatchNorm2d went NaN
    _kernels_everywhere(monkeypatch)
    x = torch.randn(2, 3, 12, 12)
    x[1, 0, 3, 3] = float("nan")
    fast, plain = _tiny(attn_type).train(), _tiny(attn_type).train()
    fast(x)
    with ela_hf.layers.plain_autograd():
        plain(x)
    for (name, a), b in zip(fast.named_buffers(), plain.buffers()):
        if "running" in name:
            assert torch.equal(a.isnan(), b.isnan()), name
    assert fast.layer1[1].attn.bn.running_var.isnan().all()


@pytest.mark.skipif(fast_ops.cpu_kernels() is None, reason="the fused tails are C++ kernels")
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("parameter", ["lam", "wv"])
def test_a_second_derivative_in_a_layers_own_parameters_is_refused_not_zero(parameter, fused, monkeypatch):
    # lam and wv were saved reshaped / detached by the fused tails: with a loss linear in the logits the second
    # derivative in them came out 0 (plain: non-zero), and with only lam trainable the gradient carried no graph
    _kernels_everywhere(monkeypatch)
    monkeypatch.setattr(fast_ops, "FUSED_LIGHT_LAYER", fused)
    model = _tiny("mrla_l").double().train()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    last = model.layer2[2].attn  # (the last block: nothing after it but the head, linear in its output)
    p = last.lam if parameter == "lam" else last.wv.weight

    def second(m):
        g, = torch.autograd.grad(m(x)[0, 3], p, create_graph=True)
        return torch.autograd.grad(g.sum(), p, materialize_grads=True)[0]

    with ela_hf.layers.plain_autograd():
        assert second(model).abs().max() > 0  # the true second derivative is not zero
    with pytest.raises(RuntimeError, match=r"first-order gradients only"):
        second(model)
    for q in model.parameters():  # only this parameter trainable: a penalty on its gradient still refuses
        q.requires_grad_(q is p)
    g, = torch.autograd.grad(_loss(model(x)), p, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match=r"first-order gradients only"):
        (_loss(model(x)) + g.square().sum()).backward()


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_hooks_on_the_attention_layers_inner_modules_see_them_run(attn_type, monkeypatch):
    # the kernels read wv's and bn's weights directly: hooks on them never fired, and torch.nn.utils.prune
    # (a pre-hook) failed in the second training step
    _kernels_everywhere(monkeypatch)
    model = _tiny(attn_type).double().train()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    attn = model.layer1[1].attn
    seen = []
    hooks = [attn.wv.register_forward_hook(lambda m, i, o: seen.append("wv")),
             attn.bn.register_forward_hook(lambda m, i, o: seen.append("bn"))]
    model(x)
    assert seen == ["wv", "bn"]
    for h in hooks:
        h.remove()
    # a hook that changes the output takes effect: the same as the layer without value weights
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.layer1[1].attn.wv.weight.zero_()
    hooked = copy.deepcopy(model)
    hooked.layer1[1].attn.wv.register_forward_hook(lambda m, i, o: o * 0)
    (out_h, grads_h), (out_z, grads_z) = _run(hooked, x), _run(zeroed, x)
    assert grads_h.pop("layer1.1.attn.wv.weight").abs().max() == 0  # nothing of the weight reaches the loss
    grads_z.pop("layer1.1.attn.wv.weight")
    _assert_same((out_h, grads_h), (out_z, grads_z), rtol=1e-9, atol=1e-10)
    # pruning (a pre-hook recomputing the weight): trains, with the gradients of the plain modules
    import torch.nn.utils.prune as prune

    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    for m in (pruned, reference):
        prune.l1_unstructured(m.layer1[1].attn.wv, "weight", amount=0.5)
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        _run(pruned, x)  # (backward inside)
    got = _run(pruned, x)
    with ela_hf.layers.plain_autograd():
        opt_ref = torch.optim.SGD(reference.parameters(), lr=0.01)
        for _ in range(2):
            opt_ref.zero_grad()
            _run(reference, x)
        want = _run(reference, x)
    _assert_same(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("trainable", [("layer1.2.", "layer2.1."), ("layer1.3.",), ("layer1.1.", "layer1.3.", "fc")])
def test_a_stage_whose_first_blocks_are_frozen_gets_exact_gradients(trainable, monkeypatch):
    # fine-tuning a stage's last blocks only: the frozen blocks took the no-grad branch, which kept no attention
    # weights for the later layers' backward (IndexError, or another layer's weights)
    _kernels_everywhere(monkeypatch)
    model = _tiny("mrla_b").double().train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable))
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    reference = copy.deepcopy(model)
    for _ in range(2):  # (the second step reuses the pooled buffers the first gave back)
        model.zero_grad()
        reference.zero_grad()
        _loss(model(x)).backward()
        with ela_hf.layers.plain_autograd():
            _loss(reference(x)).backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys() and got
        assert all(n.startswith(trainable) for n in got)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-10, msg=lambda m: f"{n}: {m}")
        assert all(g.abs().max() > 0 for n, g in got.items() if ".attn.w" in n)  # attention weights learn


_FAKE_RUN = """
import sys, torch, ela_hf
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from ela_hf.layers import fast_ops
from ela_hf.models import LayerAttentionResNet
for name in ("DEPTHWISE_MIN_PLANE", "TAIL_MIN_PLANE", "LIGHT_MIN_PLANE"):
    setattr(fast_ops, name, 0)
with FakeTensorMode():
    model = LayerAttentionResNet(layers=(3, 2), channels=(16, 32), stem_type="cifar", stem_width=16,
                                 attn_type=sys.argv[1], dim_per_head=16, num_classes=5).train()
    out = model(torch.randn(2, 3, 12, 12))
    out.sum().backward()
    assert isinstance(out, FakeTensor) and out.shape == (2, 5), (type(out), out.shape)
    assert model.layer1[1].attn.wv.weight.grad.shape == model.layer1[1].attn.wv.weight.shape
print("fake ok")
"""


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_fake_meta_subclass_and_batched_gradient_inputs_take_the_plain_ops(attn_type, monkeypatch):
    # the kernels read memory: under FakeTensorMode the process crashed (a fake tensor's pointer), a meta-device
    # MRLA-B failed ("unsupported scalarType"), a tensor subclass came out as a plain tensor, and batched
    # gradients failed with "Cannot access data pointer" (nothing pointing at plain_autograd)
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _FAKE_RUN, attn_type], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "fake ok" in run.stdout, (run.returncode, run.stderr[-2000:])
    _kernels_everywhere(monkeypatch)
    meta = _tiny(attn_type).to_empty(device="meta").train()
    assert meta(torch.empty(2, 3, 12, 12, device="meta")).shape == (2, 5)

    class Tagged(torch.Tensor):
        pass

    model = _tiny(attn_type).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    out = model(x.as_subclass(Tagged))
    assert type(out) is Tagged
    torch.testing.assert_close(out.as_subclass(torch.Tensor), model(x), rtol=1e-9, atol=1e-10)
    # per-class input gradients in one batched call: a clear error on the kernels, right under plain_autograd
    rows = torch.eye(5, dtype=torch.float64)[:, None].expand(5, 2, 5)
    xg = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"has none .*is_grads_batched=True.*plain_autograd"):
        torch.autograd.grad(model(xg), xg, rows, is_grads_batched=True)
    with ela_hf.layers.plain_autograd():
        batched, = torch.autograd.grad(model(xg), xg, rows, is_grads_batched=True)
    for k in range(5):
        want, = torch.autograd.grad(model(xg)[:, k].sum(), xg)
        torch.testing.assert_close(batched[k], want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_mode_ad_takes_the_plain_ops(attn_type, mode, monkeypatch):
    # dual tensors (torch.autograd.forward_ad) failed in the custom autograd functions ("implement the jvp")
    import torch.autograd.forward_ad as fwAD

    _kernels_everywhere(monkeypatch)
    torch.manual_seed(0)
    model = _tiny(attn_type).double()
    getattr(model, mode)()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    v = torch.randn_like(x)
    state = copy.deepcopy(model.state_dict())
    with fwAD.dual_level():
        out = fwAD.unpack_dual(model(fwAD.make_dual(x, v)))
    model.load_state_dict(state)  # (the training-mode pass moved the running statistics)
    # the same directional derivative from reverse mode, one output at a time (batch norm in training mode couples
    # the images of the batch)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    torch.testing.assert_close(out.primal, y.detach(), rtol=1e-9, atol=1e-10)
    want = torch.tensor([[float((torch.autograd.grad(y[i, k], xg, retain_graph=True)[0] * v).sum())
                          for k in range(y.shape[1])] for i in range(y.shape[0])], dtype=torch.float64)
    torch.testing.assert_close(out.tangent, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_hooked_or_wrapped_query_key_convs_run_as_modules(attn_type, monkeypatch):
    # Q and K were read from wq.weight / wk.weight on every path: hooks on them never fired, a hook or a
    # parametrization changing them was ignored silently, and torch.nn.utils.prune trained a stale weight
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    _kernels_everywhere(monkeypatch)
    model = _tiny(attn_type).double().train()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    attn = model.layer1[1].attn
    want = _run(copy.deepcopy(model), x)
    seen = []
    hooked = copy.deepcopy(model)
    for name in ("wq", "wk"):
        getattr(hooked.layer1[1].attn, name).register_forward_hook(
            lambda m, i, o, name=name: seen.append((name, tuple(i[0].shape))))
    _assert_same(_run(hooked, x), want, rtol=1e-9, atol=1e-10)  # observing changes nothing
    assert seen == [("wq", (3, 1, attn.channels)), ("wk", (3, 1, attn.channels))]
    # a hook that changes Q takes effect: the same as the layer with Q's weights zeroed
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.layer1[1].attn.wq.weight.zero_()
    hooked = copy.deepcopy(model)
    hooked.layer1[1].attn.wq.register_forward_hook(lambda m, i, o: o * 0)
    (out_h, grads_h), (out_z, grads_z) = _run(hooked, x), _run(zeroed, x)
    assert grads_h.pop("layer1.1.attn.wq.weight").abs().max() == 0
    grads_z.pop("layer1.1.attn.wq.weight")
    _assert_same((out_h, grads_h), (out_z, grads_z), rtol=1e-9, atol=1e-10)
    assert (out_h - want[0]).abs().max() > 1e-6  # (and Q matters)

    # a parametrization (the module's class changes; weight is computed on access): K's weight doubled
    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    doubled, reference = copy.deepcopy(model), copy.deepcopy(model)
    parametrize.register_parametrization(doubled.layer1[1].attn.wk, "weight", Doubled())
    with torch.no_grad():
        reference.layer1[1].attn.wk.weight.mul_(2)
    torch.testing.assert_close(doubled(x), reference(x), rtol=1e-9, atol=1e-10)
    # pruning (a pre-hook recomputing the weight): trains, with the gradients of the plain modules
    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    for m in (pruned, reference):
        prune.l1_unstructured(m.layer1[1].attn.wq, "weight", amount=0.5)

    def train_steps(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            _loss(m(x)).backward()
            opt.step()
        return _run(m, x)

    got = train_steps(pruned)
    with ela_hf.layers.plain_autograd():
        want = train_steps(reference)
    _assert_same(got, want, rtol=1e-8, atol=1e-10)
    assert not torch.equal(pruned.layer1[1].attn.wq.weight_orig, model.layer1[1].attn.wq.weight)  # it trained
    permanent = copy.deepcopy(model)  # the trained weights, Q's times the mask, as plain parameters
    state = {k: v for k, v in pruned.state_dict().items() if not k.startswith("layer1.1.attn.wq.")}
    wq = pruned.layer1[1].attn.wq
    state["layer1.1.attn.wq.weight"] = wq.weight_orig * wq.weight_mask
    permanent.load_state_dict(state)
    torch.testing.assert_close(pruned(x), permanent(x), rtol=1e-9, atol=1e-10)
    # a replacement that does not keep the descriptor's shape is named
    broken = copy.deepcopy(model)
    broken.layer1[1].attn.wk = nn.Conv1d(1, 1, attn.k_size, bias=False).double()  # no padding: fewer outputs
    with pytest.raises(ValueError, match=r"wk must map the pooled descriptor"):
        broken(x)


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching")
@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_torch_func_transforms_take_the_plain_path(attn_type, monkeypatch):
    # torch.func.grad failed: "Cannot access storage of TensorWrapper" (MRLA-B's kernels), "must override the
    # setup_context staticmethod" (the custom autograd functions)
    from torch.func import functional_call, grad, vmap

    _kernels_everywhere(monkeypatch)
    model = _tiny(attn_type, skip_mask=SKIPS[1]).double().eval()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi):
        return functional_call(model, (p, buffers), (xi,)).square().sum()

    got = grad(loss)(params, x)
    want = torch.autograd.grad(loss(dict(model.named_parameters()), x), list(model.parameters()))
    for (name, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # per-sample gradients (vmap over grad) add up to the batch's
    per_sample = vmap(grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0))(params, x)
    for name, w in zip(params, want):
        torch.testing.assert_close(per_sample[name].sum(0), w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("everywhere", [False, True], ids=["shipped-limits", "kernels-everywhere"])
@pytest.mark.parametrize("name", ["ela_resnet20_cifar", "ela_l_resnet20_cifar"])
def test_eval_logits_of_an_image_do_not_depend_on_the_rest_of_its_batch(name, everywhere, monkeypatch):
    """Eval batch size, order and DDP sharding must not move an image's logits, not even in the last bits
    (the fused tails centred their batch norm on the batch's first pixel)."""
    if everywhere:
        _kernels_everywhere(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    with torch.no_grad():  # running statistics of its own
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(7, 3, 32, 32)
    other = x.clone()
    other[0] = torch.randn(3, 32, 32) * 3
    order = torch.tensor([3, 1, 6, 0, 5, 2, 4])
    with torch.no_grad():
        out, changed, shuffled = model(x), model(other), model(x[order])
    assert torch.equal(out[1:], changed[1:])
    assert torch.equal(shuffled, out[order])  # (another batch size may take another PyTorch conv algorithm)


@pytest.mark.parametrize("moment", ["enter", "leave"])
def test_plain_autograd_opened_or_closed_mid_stage_by_another_thread_leaves_the_stage_alone(moment):
    """plain_autograd() is process-wide (DataParallel's replica threads see it), so another thread can open or
    close it between two blocks of a stage: the MRLA-B stage keeps the formulation it began with (it switched,
    and failed with "ran partly eagerly and partly under torch.compile")."""
    torch.manual_seed(0)
    model = timm.create_model("mrla_b_resnet20_cifar", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    context = fast_ops.plain_autograd()
    if moment == "leave":
        context.__enter__()
    # between the stage's first and second block, as another thread's `with plain_autograd():` would
    def switch(*_):
        if moment == "enter":
            context.__enter__()
        else:
            context.__exit__(None, None, None)

    handle = model.layer2[1].register_forward_pre_hook(switch)
    try:
        with torch.no_grad():
            got = model(x)
    finally:
        handle.remove()
        if moment == "enter":
            context.__exit__(None, None, None)
    assert not fast_ops.plain_autograd_enabled()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(fast_ops.cpu_kernels() is None, reason="the fused tails are C++ kernels")
@pytest.mark.parametrize("attn_type", ["mrla_b", "mrla_l"])
def test_two_forwards_of_different_sizes_then_one_backward(attn_type):
    """Multi-crop / multi-scale training (DINO's global and local crops, FixMatch's two batches): a small pass
    takes PyTorch's batch norm, which saves the running statistics for backward, and a large pass takes the
    fused tails, which update them after it; that update used to bump their version and fail the backward."""
    g = torch.Generator().manual_seed(0)
    # planes under and over the kernels' size limits; float64, so that the comparison can be tight
    small = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    large = torch.randn(3, 3, 20, 20, generator=g, dtype=torch.float64)
    fast, plain = _tiny(attn_type).double().train(), _tiny(attn_type).double().train()
    _loss(fast(small) + fast(large)[:2]).backward()
    with ela_hf.layers.plain_autograd():
        _loss(plain(small) + plain(large)[:2]).backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-11), name
    for (name, a), b in zip(fast.named_buffers(), plain.buffers()):
        if "running" in name:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name


def test_buffer_pool_keeps_no_buffers_for_sizes_asked_for_once():
    """A server fed ever new image sizes: each size's buffers are used once, so the pool must not keep them
    (it used to keep them up to its bound, 1/8 of the machine's memory, reusing none); a size that comes back
    is kept from its second pass on and then reused."""
    from ela_hf.layers import mrla

    pool = mrla._SLOT_POOL
    mrla.clear_value_buffer_pool()
    model = _tiny("mrla_b", layers=(4, 3)).eval()
    with torch.no_grad():
        for size in range(9, 41):
            model(torch.randn(1, 3, size, size + 1))
        assert pool.free_bytes() == 0
        x = torch.randn(2, 3, 12, 12)
        counts = []
        for _ in range(4):
            model(x)
            counts.append(pool.allocations)
    assert counts[1] - counts[0] == 2 and counts[3] == counts[2] == counts[1], "kept from the second pass on"
    assert pool.free_bytes() > 0
    mrla.clear_value_buffer_pool()
