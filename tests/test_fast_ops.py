"""The CPU fast paths of ``ela_hf.layers.fast_ops`` compute what the plain modules compute.

Forward outputs, every gradient and the batch-norm running statistics are compared with
``nn.BatchNorm2d`` and the autograd formulation, in float64; the size threshold of the one-pass
statistics is lowered so that the small test tensors take the fast path, and a spy checks which
statistics actually ran.
"""
import copy

import pytest
import torch
import torch.nn as nn

from ela_hf.layers import fast_ops


@pytest.fixture
def fast_stats(monkeypatch):
    """Take the one-pass statistics at every size; records whether they ran or declined."""
    monkeypatch.setattr(fast_ops, "FAST_STATS_MIN_BYTES", 0)
    calls = []
    real = fast_ops._fast_batch_stats

    def spy(x):
        out = real(x)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fast_ops, "_fast_batch_stats", spy)
    return calls


def _bn(channels=6, momentum=0.1, dtype=torch.float64):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _input(shape=(4, 6, 5, 7), offset=0.7, dtype=torch.float64):
    torch.manual_seed(1)
    return (torch.randn(shape, dtype=dtype) * 1.3 + offset).requires_grad_(True)


def _assert_bn_state(got, want):
    torch.testing.assert_close(got.running_mean, want.running_mean)
    torch.testing.assert_close(got.running_var, want.running_var)
    assert int(got.num_batches_tracked) == int(want.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_fast_statistics_match_batchnorm2d(fast_stats, momentum):
    bn = _bn(momentum=momentum)
    ref = copy.deepcopy(bn)
    for step in range(2):  # the cumulative average (momentum None) needs a second step to differ
        x = _input(offset=0.7 + step)
        x_ref = x.detach().clone().requires_grad_(True)
        out = fast_ops.batch_norm(bn, x)
        out_ref = ref(x_ref)
        torch.testing.assert_close(out, out_ref)
        g = torch.randn_like(out)
        out.backward(g)
        out_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad)
    _assert_bn_state(bn, ref)
    assert fast_stats == [True, True]


def test_batch_norm_falls_back_to_native_statistics_when_the_mean_dominates(fast_stats):
    bn = _bn(dtype=torch.float32)
    ref = copy.deepcopy(bn)
    x = _input(offset=3e3, dtype=torch.float32)  # E[x^2] / var ~ 5e6: one pass would lose the variance
    out = fast_ops.batch_norm(bn, x)
    torch.testing.assert_close(out, ref(x.detach()))
    _assert_bn_state(bn, ref)
    assert fast_stats == [False]


def test_batch_norm_keeps_the_plain_module_outside_its_fast_path(fast_stats):
    bn = _bn()
    x = _input()
    bn.eval()
    torch.testing.assert_close(fast_ops.batch_norm(bn, x), _bn().eval()(x))
    bn.train()
    fast_ops.batch_norm(bn, x.to(memory_format=torch.channels_last))
    assert fast_stats == []  # eval mode and channels_last took the module
    sync = nn.SyncBatchNorm(6).double()
    assert not fast_ops._bn_eligible(sync, x)


def _light_reference(bn, v, sc, gate_c, lam):
    return bn(torch.addcmul(lam * sc, v, gate_c))


def _light_inputs(dtype=torch.float64):
    torch.manual_seed(2)
    b, c, h, w = 3, 6, 4, 5
    v = torch.randn(b, c, h, w, dtype=dtype, requires_grad=True)
    sc = (torch.rand(b, c, h, w, dtype=dtype) + 0.2).requires_grad_(True)
    gate_c = torch.rand(b, c, 1, 1, dtype=dtype, requires_grad=True)
    lam = torch.randn(c, 1, 1, dtype=dtype, requires_grad=True)
    return v, sc, gate_c, lam


@pytest.mark.parametrize("mode", ["train-fast-stats", "train-native-stats", "eval"])
def test_light_tail_matches_autograd_formulation(monkeypatch, mode):
    calls = []
    if mode == "train-fast-stats":
        monkeypatch.setattr(fast_ops, "FAST_STATS_MIN_BYTES", 0)
    real = fast_ops._fast_batch_stats
    monkeypatch.setattr(fast_ops, "_fast_batch_stats", lambda x: calls.append(1) or real(x))
    bn = _bn()
    bn.train(mode != "eval")
    ref = copy.deepcopy(bn)
    inputs = _light_inputs()
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fast_ops.light_tail(bn, *inputs)
    out_ref = _light_reference(ref, *ref_inputs)
    assert out.grad_fn is not None and "LightTail" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, out_ref)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    for name, got, want in zip(["v", "sc", "gate", "lam"], inputs, ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad)
    _assert_bn_state(bn, ref)
    assert len(calls) == (1 if mode == "train-fast-stats" else 0)


def test_light_tail_partial_gradients():
    """Only some inputs need gradients (frozen lambda and BN, no gradient to the shortcut)."""
    bn = _bn()
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    ref = copy.deepcopy(bn)
    v, sc, gate_c, lam = _light_inputs()
    sc.requires_grad_(False)
    lam.requires_grad_(False)
    out = fast_ops.light_tail(bn, v, sc, gate_c, lam)
    v2, g2 = v.detach().clone().requires_grad_(True), gate_c.detach().clone().requires_grad_(True)
    out_ref = _light_reference(ref, v2, sc, g2, lam)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(v.grad, v2.grad)
    torch.testing.assert_close(gate_c.grad, g2.grad)
    assert sc.grad is None and lam.grad is None and bn.weight.grad is None


def test_fast_paths_off_switch_runs_plain_modules(monkeypatch):
    monkeypatch.setattr(fast_ops, "FAST_CPU_PATHS", False)
    bn = _bn()
    out = fast_ops.light_tail(bn, *_light_inputs())
    assert "LightTail" not in type(out.grad_fn).__name__
