"""KL recording (SPEC section 3) checked against a by-hand computation in float64."""
import math

import pytest
import timm
import torch

import ela_hf
from ela_hf.layers import kl_with_appended_eps
from ela_hf.models import LayerAttentionResNet, kl_accumulators

EPS = 1e-8


def _tiny(attn_type, skip_mask=None):
    # one stage of 4 bottleneck blocks, 64 channels, 2 heads of 32 channels
    torch.manual_seed(0)
    return LayerAttentionResNet(layers=(4,), channels=(16,), stem_type="cifar", stem_width=16, attn_type=attn_type,
                                dim_per_head=32, num_classes=3, skip_mask=skip_mask)


def _capture_attention_inputs(model):
    """y (and sc) entering each attention layer, per block index. The blocks hand the layers their conv
    branch, shortcut and final activation (``pre_act``) instead of y: y = pre_act(branch + sc)."""
    seen = {}

    def hook(m, inp, kwargs, j):
        tensors = [t.detach().double() for t in inp[:-1]]  # MRLA-L: (branch, sc); MRLA-B: (branch,)
        if kwargs.get("pre_act") is not None:
            sc = kwargs["sc"].detach().double() if "sc" in kwargs else tensors[1]
            tensors[0] = kwargs["pre_act"](tensors[0] + sc)
        seen[j] = tensors

    for j, blk in enumerate(model.layer1):
        if blk.attn is not None:
            blk.attn.register_forward_pre_hook(lambda m, inp, kw, j=j: hook(m, inp, kw, j), with_kwargs=True)
    return seen


def _by_hand_kl(p_prev, a_cur):
    """KL([p_prev..., eps] renormalised || clamp(a_cur, eps)) with plain Python floats."""
    p = list(p_prev) + [EPS]
    z = sum(p)
    p = [v / z for v in p]
    return sum(pi * math.log(pi / max(qi, EPS)) for pi, qi in zip(p, a_cur) if pi > 0)


@torch.no_grad()
def _qk(attn, y):
    w_q = attn.wq.weight.double()
    w_k = attn.wk.weight.double()
    g = y.mean((2, 3)).unsqueeze(1)
    pad = (attn.k_size - 1) // 2
    q = torch.nn.functional.conv1d(g, w_q, padding=pad)[:, 0]
    k = torch.nn.functional.conv1d(g, w_k, padding=pad)[:, 0]
    return q, k


@pytest.mark.parametrize("skip_mask", [None, [[False, False, True, False]]])
def test_mrla_b_recorded_kl_equals_hand_computation(skip_mask):
    model = _tiny("mrla_b", skip_mask).train()
    seen = _capture_attention_inputs(model)
    x = torch.randn(3, 3, 16, 16)
    with model.kl_recording():
        model(x)
    stats = model.kl_statistics()
    active = [j for j, blk in enumerate(model.layer1) if not blk.is_skipped]
    heads, d = 2, 32
    keys, expected, prev = [], {}, None
    for j in active:
        attn = model.layer1[j].attn
        q, k = _qk(attn, seen[j][0])
        keys.append(k)
        per_sample = []
        dist = {}
        for b in range(3):
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                scores = [float((q[b, sl] * kk[b, sl]).sum()) / math.sqrt(d) for kk in keys]
                m = max(scores)
                e = [math.exp(s - m) for s in scores]
                dist[(b, h)] = [v / sum(e) for v in e]
        if prev is not None:
            for b in range(3):
                per_sample.append(sum(_by_hand_kl(prev[(b, h)], dist[(b, h)]) for h in range(heads)) / heads)
            expected[(0, j)] = sum(per_sample) / len(per_sample)
        prev = dist
    assert set(stats) == set(expected) == {(0, j) for j in active[1:]}
    for key in expected:
        assert stats[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("skip_mask", [None, [[False, True, False, False]]])
def test_mrla_l_recorded_kl_equals_hand_computation(skip_mask):
    model = _tiny("mrla_l", skip_mask).train()
    with torch.no_grad():  # lambdas away from 1 so that the unrolled products matter
        for blk in model.layer1:
            if blk.attn is not None:
                blk.attn.lam.uniform_(-1.5, 1.5)
    seen = _capture_attention_inputs(model)
    x = torch.randn(3, 3, 16, 16)
    with model.kl_recording():
        model(x)
    stats = model.kl_statistics()
    active = [j for j, blk in enumerate(model.layer1) if not blk.is_skipped]
    heads, d, C = 2, 32, 64
    gates, lams = [], []
    expected, prev = {}, None
    for j in active:
        attn = model.layer1[j].attn
        q, k = _qk(attn, seen[j][0])
        gates.append([[1 / (1 + math.exp(-float((q[b, h * d:(h + 1) * d] * k[b, h * d:(h + 1) * d]).sum()) / math.sqrt(d)))
                       for h in range(heads)] for b in range(3)])
        lams.append(attn.lam.detach().double().view(-1).tolist())
        t = len(gates)
        alpha = []
        for b in range(3):
            # w_{t,s,c} = a_{s,h(c)} * prod_{s<j<=t} lambda_{j,c} over active layers only
            w = []
            for s in range(t):
                total = 0.0
                for c in range(C):
                    prod = 1.0
                    for jj in range(s + 1, t):
                        prod *= lams[jj][c]
                    total += abs(gates[s][b][c // d] * prod)
                w.append(total / C)
            alpha.append([v / sum(w) for v in w])
        if prev is not None:
            expected[(0, j)] = sum(_by_hand_kl(prev[b], alpha[b]) for b in range(3)) / 3
        prev = alpha
    assert set(stats) == set(expected) == {(0, j) for j in active[1:]}
    for key in expected:
        assert stats[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_mrla_l_distribution_survives_gates_that_underflow():
    """Gate logits below about -100 give float32 gates of exactly 0 (and a float64 model's tiny gates became
    0 in a float32 cast): a lone layer's distribution is still [1], and float64 keeps the ratio of tiny gates."""
    from ela_hf.layers import MrlaLight, StageState

    attn = MrlaLight(64, dim_per_head=32)
    with torch.no_grad():
        attn.lam.fill_(1.0)
    state = StageState()
    attn._record(torch.zeros(2, 2), state)  # every weight of the stage's first layer underflowed
    assert torch.equal(state.prev_alpha, torch.ones(2, 1))
    attn._record(torch.full((2, 2), 0.5), state)
    kl = attn.kl_sum.item() / attn.kl_count.item()
    assert kl == pytest.approx(_by_hand_kl([1.0], [0.0, 1.0]), rel=1e-5)  # ~18.4: not a repeat of layer t-1
    assert kl > 18

    state = StageState()
    attn.double()._record(torch.full((1, 2), 1e-60, dtype=torch.float64), state)
    attn._record(torch.full((1, 2), 1e-50, dtype=torch.float64), state)
    assert state.prev_alpha.dtype == torch.float64
    assert state.prev_alpha[0].tolist() == pytest.approx([1e-10, 1.0], rel=1e-9)


def test_kl_helper_direction_and_limits():
    prev = torch.tensor([[0.3, 0.7]])
    cur = torch.tensor([[0.3, 0.7, 0.0]])
    # the new layer adds nothing new: p ~ cur, d ~ 0 (finite although cur has a zero entry)
    assert float(kl_with_appended_eps(prev, cur)) == pytest.approx(0.0, abs=1e-6)
    cur2 = torch.tensor([[0.1, 0.1, 0.8]])
    expected = _by_hand_kl([0.3, 0.7], [0.1, 0.1, 0.8])
    assert float(kl_with_appended_eps(prev, cur2)) == pytest.approx(expected, rel=1e-5)


def test_recording_is_off_by_default_and_skips_eval_passes():
    model = timm.create_model("ela_resnet20_cifar", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x)
    assert all(float(c) == 0 for *_, c in kl_accumulators(model)), "off by default"
    with model.kl_recording():
        model.eval()
        model(x)
        assert all(float(c) == 0 for *_, c in kl_accumulators(model)), "eval passes are not recorded"
        model.train()
        model(x)
        model(x)
    assert [float(c) for *_, c in kl_accumulators(model)] == [4.0, 4.0, 4.0]
    model(x)
    assert [float(c) for *_, c in kl_accumulators(model)] == [4.0, 4.0, 4.0], "the context manager switched it off"
    stats = model.kl_statistics()
    assert set(stats) == {(0, 1), (1, 1), (2, 1)}
    assert all(math.isfinite(v) and v >= 0 for v in stats.values())
    model.reset_kl_statistics()
    assert all(math.isnan(v) for v in model.kl_statistics().values())


def test_recording_averages_over_steps_and_survives_autocast():
    torch.manual_seed(0)
    model = timm.create_model("ela_resnet20_cifar", num_classes=5).train()
    xs = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    per_step = []
    for x in xs:
        model.reset_kl_statistics()
        with model.kl_recording():
            model(x)
        per_step.append(model.kl_statistics())
    model.reset_kl_statistics()
    with model.kl_recording():
        for x in xs:
            model(x)
    both = model.kl_statistics()
    for key in both:
        assert both[key] == pytest.approx((per_step[0][key] + per_step[1][key]) / 2, rel=1e-5)
    model.reset_kl_statistics()
    with model.kl_recording(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(xs[0])
    for _, _, s, c in kl_accumulators(model):
        assert s.dtype == torch.float32 and float(c) == 2


def test_kl_statistics_skip_skipped_layers_and_work_through_wrappers():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("ela_resnet56_cifar", num_classes=5)

        def forward(self, x):
            return self.backbone(x)

    wrapped = Wrapper().train()
    ela_hf.set_skip_mask(wrapped, [[False, True, False, False, False, False], [False] * 6, [False] * 6])
    with ela_hf.kl_recording(wrapped):
        wrapped(torch.randn(2, 3, 16, 16))
    stats = ela_hf.kl_statistics(wrapped)
    assert (0, 1) not in stats and (0, 2) in stats and len(stats) == 4 + 5 + 5
    assert ela_hf.get_skip_mask(wrapped)[0][1] is True


@pytest.mark.parametrize("name", ["ela_resnet20_cifar", "ela_l_resnet20_cifar"])
def test_activation_checkpointing_records_each_sample_once(name):
    """Backward's recompute of a checkpointed stage repeats the forward: it must not record again."""
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=5, drop_path_rate=0.1)
    checkpointed = timm.create_model(name, num_classes=5, drop_path_rate=0.1)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(3, 3, 16, 16)
    totals = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same drop path draws
        with model.kl_recording():
            model.train()(x).sum().backward()
        totals.append({(i, j): (float(s), float(c)) for i, j, s, c in kl_accumulators(model)})
    assert all(count == 3 for _, count in totals[1].values()), totals[1]
    for key, (s, c) in totals[0].items():
        assert totals[1][key][1] == c and totals[1][key][0] == pytest.approx(s, rel=1e-5, abs=1e-9), key
    for (n, pa), pb in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    # recording is back on for the next step's forward
    with checkpointed.kl_recording():
        checkpointed(x).sum().backward()
    assert all(c == 6 for _, _, _, c in kl_accumulators(checkpointed))


def test_recompute_by_timms_features_only_checkpointing_records_nothing():
    """timm's features_only backbones checkpoint each stage themselves (and users wrap modules in
    torch.utils.checkpoint): a forward re-run inside backward must not record either."""
    torch.manual_seed(0)
    backbone = timm.create_model("ela_resnet20_cifar", features_only=True).train()
    backbone.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 16, 16)
    with ela_hf.kl_recording(backbone):
        sum(f.sum() for f in backbone(x)).backward()
    assert [int(c) for _, _, _, c in kl_accumulators(backbone)] == [2] * 3


@pytest.mark.parametrize("reentrant", [False, True])
def test_recompute_of_a_users_checkpoint_records_nothing(reentrant):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = timm.create_model("ela_l_resnet20_cifar", num_classes=3).train()
    ela_hf.reset_kl_statistics(model)
    with ela_hf.kl_recording(model):
        out = torch.utils.checkpoint.checkpoint(model, x.requires_grad_(reentrant), use_reentrant=reentrant)
        out.sum().backward()
    assert [int(c) for _, _, _, c in kl_accumulators(model)] == [2] * 3


def test_recording_paused_stops_recording_in_this_thread_and_nests():
    from ela_hf.layers import recording_paused

    model = timm.create_model("ela_resnet20_cifar", num_classes=5).train()
    x = torch.randn(2, 3, 16, 16)
    with model.kl_recording():
        with recording_paused():
            with recording_paused():
                model(x)
            model(x)  # still paused: the outer pause holds
        assert all(c == 0 for *_, c in kl_accumulators(model))
        model(x)
    assert all(c == 2 for *_, c in kl_accumulators(model))



def test_accumulators_stay_float32_when_the_model_is_cast():
    """The plain-loop route (kl_recording / kl_statistics) without the callback's own conversion."""
    torch.manual_seed(0)
    model = timm.create_model("ela_resnet20_cifar", num_classes=3).train()
    with ela_hf.kl_recording(model):
        model(torch.randn(3, 3, 16, 16))
    before = {(i, j): (float(s), float(c)) for i, j, s, c in kl_accumulators(model)}
    model.to(torch.bfloat16)
    assert all(s.dtype == c.dtype == torch.float32 for _, _, s, c in kl_accumulators(model))
    assert {(i, j): (float(s), float(c)) for i, j, s, c in kl_accumulators(model)} == before  # kept exactly
    assert next(model.parameters()).dtype == torch.bfloat16
    with ela_hf.kl_recording(model):
        for _ in range(300):  # bf16 counts would stop at 256
            model(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    assert all(float(c) == 303 for _, _, _, c in kl_accumulators(model))
    model.half().float()
    assert all(float(c) == 303 for _, _, _, c in kl_accumulators(model))
