"""ela_hf.skip_redundant_layers: ELA's pruning decision in a training loop of one's own (no Trainer)."""
import json
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import ela_hf
from ela_hf.models import kl_accumulators
from ela_hf.pruning import EbqmSelector, FixedCountSelector, ThresholdSelector, skip_redundant_layers
from two_ranks import launch_two_ranks, one_rank_group


def _train(model, steps, seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, 3, 16, 16, generator=g)
        y = torch.randint(0, 4, (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return timm.create_model("ela_resnet20_cifar", num_classes=4)


def test_decides_from_the_recorded_statistics_skips_and_starts_afresh(model):
    with ela_hf.kl_recording(model):
        _train(model, 2)
    stats = ela_hf.kl_statistics(model)  # mean d_t per candidate layer, (stage, block) -> value
    selector = EbqmSelector(q=0.75, tau=0.5)
    expected = selector.explain(list(stats.values()))
    assert any(expected.skip), "the test needs a decision that skips something"

    record = skip_redundant_layers(model, selector)

    assert [(e["stage"], e["block"]) for e in record["layers"]] == list(stats)
    assert [e["name"] for e in record["layers"]] == [f"layer{i + 1}.{j}" for i, j in stats]
    for e, d in zip(record["layers"], stats.values()):
        assert e["d_t"] == pytest.approx(d, rel=1e-6)
        assert e["samples"] == 8  # 2 steps x 4 images
    assert [e["skip"] for e in record["layers"]] == expected.skip
    assert [e["candidate"] for e in record["layers"]] == expected.candidate
    assert record["quantile"] == pytest.approx(expected.quantile, rel=1e-6)
    skipped = {(i, j) for (i, j), s in zip(stats, expected.skip) if s}
    mask = ela_hf.get_skip_mask(model)
    assert {(i, j) for i, stage in enumerate(mask) for j, s in enumerate(stage) if s} == skipped
    assert record["skip_mask"] == mask
    assert record["skipped_now"] == [e["name"] for e in record["layers"] if e["skip"]]
    assert record["active_layers_per_stage"] == [sum(not s for s in stage) for stage in mask]
    json.dumps(record, allow_nan=False)  # JSON-ready, as pruning_history.json stores it
    # statistics start afresh, recording is the caller's (off after the with block)
    assert all(float(s) == 0 and float(c) == 0 for *_, s, c in kl_accumulators(model))
    for i, j in skipped:
        assert model.get_submodule(f"layer{i + 1}.{j}").is_skipped


def test_decisions_are_cumulative_and_nothing_recorded_skips_nothing(model):
    with ela_hf.kl_recording(model):
        _train(model, 1)
    first = skip_redundant_layers(model, FixedCountSelector(2))
    assert len(first["skipped_now"]) == 2
    candidates = {e["name"] for e in first["layers"]}

    # nothing recorded since: d_t unknown, no layer skipped, earlier skips kept, and a warning says why
    with pytest.warns(UserWarning, match=r"no attention layer recorded any image .* recording was off"):
        idle = skip_redundant_layers(model, FixedCountSelector(2))
    assert {e["name"] for e in idle["layers"]} == candidates - set(first["skipped_now"])
    assert all(e["d_t"] is None and e["samples"] == 0 and not e["skip"] for e in idle["layers"])
    assert idle["skip_mask"] == first["skip_mask"] == ela_hf.get_skip_mask(model)

    with ela_hf.kl_recording(model):
        _train(model, 1, seed=1)
    second = skip_redundant_layers(model, {"name": "fixed_count", "k": 1})  # the to_dict() form
    assert len(second["skipped_now"]) == 1 and not set(second["skipped_now"]) & set(first["skipped_now"])
    assert sum(map(sum, ela_hf.get_skip_mask(model))) == 3


def test_works_through_wrappers_and_matches_the_callbacks_record(model):
    from types import SimpleNamespace

    class Detector(nn.Module):  # a user's module holding the network
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x)

    wrapped = Detector(model)
    with ela_hf.kl_recording(wrapped):
        _train(wrapped, 2)
    sums = [float(s) for *_, s, _ in kl_accumulators(wrapped)]
    counts = [float(c) for *_, c in kl_accumulators(wrapped)]

    # the callback's window-end record from the same sums is this record plus the window's fields
    callback = ela_hf.ElaPruningCallback(windows=[(1, 2)], window_unit="step", selector=ThresholdSelector(tau=0.5))
    callback._model = wrapped
    callback._names = {id(m): n for n, m in wrapped.named_modules()}
    callback._layers = ela_hf.pruning.decision.candidate_layers(wrapped, callback._names)
    from_callback = callback._decision_record(0, SimpleNamespace(global_step=2, epoch=0.5), sums, counts)

    record = skip_redundant_layers(wrapped, ThresholdSelector(tau=0.5))
    assert record["layers"][0]["name"].startswith("body.layer1.")
    window_fields = {"window": 1, "unit": "step", "start": 1, "end": 2, "global_step": 2, "epoch": 0.5}
    assert from_callback == {**window_fields, **record}
    assert any(e["skip"] for e in record["layers"])


def test_bad_input_is_refused_before_anything_changes(model):
    with ela_hf.kl_recording(model):
        _train(model, 1)
    before = [float(s) for *_, s, _ in kl_accumulators(model)]
    with pytest.raises(ValueError, match="selector must be an ela_hf.pruning.LayerSelector"):
        skip_redundant_layers(model, "ebqm")
    with pytest.raises(ValueError, match="unknown selector"):
        skip_redundant_layers(model, {"name": "nope"})
    with pytest.raises(ValueError, match="contains no layer-attention"):
        skip_redundant_layers(timm.create_model("resnet18", num_classes=2))

    with pytest.raises(TypeError, match="needs the model"):
        skip_redundant_layers(None)

    class Broken(ela_hf.pruning.LayerSelector):
        name = "test_own_loop_broken"

        def __init__(self, kind):
            self.kind = kind

        def explain(self, d):
            n = len(d)
            if self.kind == "list":
                return [True] * n  # not a Selection
            if self.kind == "strings":  # bool("false") is True: every layer would be skipped
                return ela_hf.pruning.Selection(["false"] * n, [True] * n, [0.5] * n)
            if self.kind == "short":
                return ela_hf.pruning.Selection([False] * n, [True], [0.5] * n)
            return ela_hf.pruning.Selection([False] * n, [True] * n, ["high"] * n)

    for kind, match in (("list", "must return a Selection with one entry per layer"),
                        ("strings", "'skip' entries must be True or False, got 'false'"),
                        ("short", r"one entry per layer \(3\); its 'candidate' is \[True\]"),
                        ("mapped", "'mapped' entries must be numbers or None, got 'high'")):
        with pytest.raises(ValueError, match=match):
            skip_redundant_layers(model, Broken(kind))
    # nothing skipped, the statistics kept for a corrected call
    assert not any(map(any, ela_hf.get_skip_mask(model)))
    assert [float(s) for *_, s, _ in kl_accumulators(model)] == before
    assert skip_redundant_layers(model, FixedCountSelector(1))["skipped_now"]


@pytest.mark.slow
def test_two_process_own_loop_decides_once_on_pooled_statistics(tmp_path):
    r0, r1 = launch_two_ranks("own_loop_ddp_run.py", tmp_path)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"

    # each rank recorded its own data; the decision pools both and is the same on both
    assert r0["local"] != r1["local"]
    assert r0["first"] == r1["first"]
    first = r0["first"]
    assert first["layers"][0]["name"].startswith("module.")
    pooled = []
    for e in first["layers"]:
        key = f"{e['stage']}.{e['block']}"
        (s0, c0), (s1, c1) = r0["local"][key], r1["local"][key]
        assert c0 == c1 == 6 and e["samples"] == 12
        assert e["d_t"] == pytest.approx((s0 + s1) / (c0 + c1), rel=1e-9)
        pooled.append((s0 + s1) / (c0 + c1))
    assert [e["skip"] for e in first["layers"]] == FixedCountSelector(2).select(pooled)
    assert all(s == 0 and c == 0 for s, c in r0["after_first"].values())

    # training went on under DDP after the skip (unused parameters), identically on both ranks
    assert r0["mask"] == r1["mask"] == first["skip_mask"]
    assert r0["weights_head"] == r1["weights_head"]
    assert not any(math.isnan(v) for v in r0["weights_head"])

    # a selector failing on rank 0 raises there and, naming it, on rank 1 instead of a hang
    assert r0["failure"] == ["ValueError", "this selector always fails"]
    assert r1["failure"][0] == "RuntimeError"
    assert "failed on rank 0: ValueError: this selector always fails" in r1["failure"][1]

    # DDP around a user's wrapper would copy rank 0's sums over rank 1's: refused until the wrapper names them
    for r in (r0, r1):
        assert "built without leaving out 12 KL accumulators" in r["exposed_error"]  # 6 layers
        assert "keep_kl_statistics_out_of_ddp" in r["exposed_error"]
    assert [c for _, c in r0["wrapped_local"]] == [8] * 3 and [c for _, c in r1["wrapped_local"]] == [4] * 3
    assert r0["wrapped_decision"] == r1["wrapped_decision"]
    for n, e in enumerate(r0["wrapped_decision"]["layers"]):
        assert e["name"].startswith("module.body.") and e["samples"] == 12
        pooled = (r0["wrapped_local"][n][0] + r1["wrapped_local"][n][0]) / 12
        assert e["d_t"] == pytest.approx(pooled, rel=1e-9)

    # ranks training different masks (same number of layers) are refused on both ranks
    for r in (r0, r1):
        assert "the processes disagree on the layers still active (rank 0: [(1, 1), (2, 1)], rank 1: [(0, 1), " \
               "(2, 1)])" in r["differ_error"]


def test_decisions_make_the_release_history(model, tmp_path):
    history = []
    for epoch in (3, 6):
        with ela_hf.kl_recording(model):
            _train(model, 1, seed=epoch)
        history.append({"epoch": epoch, **skip_redundant_layers(model, FixedCountSelector(1))})
    out = ela_hf.export_pruned(model, tmp_path / "release", pruning_history=history)

    assert json.loads((out / "pruning_history.json").read_text()) == history
    card = (out / "README.md").read_text()
    assert "### Window 1 (epoch 3)" in card and "### Window 2 (epoch 6)" in card
    assert (out / "d_t_per_window.png").stat().st_size > 0
    slim = timm.create_model(
        "ela_resnet20_cifar", num_classes=4, skip_mask=history[-1]["skip_mask"], pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=4),
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(slim(x), model.eval()(x))


def test_recording_switches_are_booleans_and_the_context_manager_nests(model):
    with pytest.raises(TypeError, match="enabled must be True or False, got 'no'"):
        ela_hf.set_kl_recording(model, "no")
    with pytest.raises(TypeError, match="enabled must be True or False, got 2"):
        with ela_hf.kl_recording(model, enabled=2):
            pass
    counts = lambda: [float(c) for *_, c in kl_accumulators(model)]  # noqa: E731
    ela_hf.set_kl_recording(model, True)  # a window of one's own loop
    _train(model, 1)
    with ela_hf.kl_recording(model, enabled=False):  # e.g. an extra pass that must not count
        _train(model, 1)
    with ela_hf.kl_recording(model):
        _train(model, 1)
    _train(model, 1)  # the window goes on after both blocks
    assert counts() == [12.0] * 3  # 3 of the 4 steps, 4 images each
    ela_hf.set_kl_recording(model, False)
    _train(model, 1)
    assert counts() == [12.0] * 3


def test_an_ema_copy_reports_and_exports_its_models_mask(model, tmp_path):
    from timm.utils import ModelEmaV3

    emas = [ModelEmaV3(model, decay=0.5) for _ in range(3)]
    with ela_hf.kl_recording(model):
        _train(model, 1)
    skip_redundant_layers(model, FixedCountSelector(2))
    for ema in emas:  # copies the skip flags into the EMA's buffers in place; the copies stay in training mode
        ema.update(model)
    mask = ela_hf.get_skip_mask(model)
    assert ela_hf.get_skip_mask(emas[0].module) == mask
    slim = timm.create_model("ela_resnet20_cifar", num_classes=4, skip_mask=mask)
    slim.load_state_dict(ela_hf.models.slim_state_dict(emas[1].module))  # strict: no skipped layer's weights
    out = ela_hf.export_pruned(emas[2].module, tmp_path / "ema")
    config = json.loads((out / "config.json").read_text())
    assert config["skip_mask"] == mask
    reloaded = ela_hf.ElaForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(reloaded(pixel_values=x).logits, emas[2].module.eval()(x))


def test_the_transformers_models_config_follows_an_ema_copys_flags():
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    hf = ela_hf.ElaForImageClassification(ela_hf.ElaConfig(architecture="ela_resnet20_cifar", num_labels=3))
    ema = ModelEmaV3(hf, decay=0.5)
    ela_hf.set_skip_mask(hf, [[False, True], [False, False], [False, True]])
    ema.update(hf)
    assert ema.module.config.skip_mask != hf.config.skip_mask  # not yet: the flags sit in the buffers
    assert ela_hf.get_skip_mask(ema.module) == hf.config.skip_mask
    assert ema.module.config.skip_mask == hf.config.skip_mask


@pytest.mark.parametrize("ddp_kwargs, match", [
    (dict(find_unused_parameters=False), "must be built with find_unused_parameters=True"),
    (dict(find_unused_parameters=True, static_graph=True), "without static_graph"),
])
def test_ddp_that_would_fail_after_a_skip_is_refused_before_deciding(model, tmp_path, ddp_kwargs, match):
    with one_rank_group(tmp_path):
        ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        with ela_hf.kl_recording(ddp):
            _train(ddp, 1)
        with pytest.raises(ValueError, match=match):
            skip_redundant_layers(ddp, FixedCountSelector(1))
        assert not any(map(any, ela_hf.get_skip_mask(model)))
        assert all(float(c) == 4 for *_, c in kl_accumulators(model))  # kept for a corrected call


def test_ddp_around_a_wrapper_is_refused_unless_it_leaves_the_statistics_alone(tmp_path):
    with one_rank_group(tmp_path):
        torch.manual_seed(0)
        exposed = torch.nn.parallel.DistributedDataParallel(nn.Sequential(timm.create_model("ela_resnet20_cifar")))
        with pytest.raises(ValueError, match=r"without leaving out 12 KL accumulators of the attention layers \(e\.g\. "
                                             r"'0\.layer1\.0\.attn\.kl_sum'\)"):
            ela_hf.set_kl_recording(exposed, True)
        with pytest.raises(ValueError, match="keep_kl_statistics_out_of_ddp"):
            skip_redundant_layers(exposed)
        ela_hf.set_kl_recording(exposed, False)  # switching off is always fine
        # the model itself names its accumulators; a wrapper named by the helper, or no buffer broadcast, is fine
        for ddp in (
            torch.nn.parallel.DistributedDataParallel(timm.create_model("ela_resnet20_cifar")),
            torch.nn.parallel.DistributedDataParallel(nn.Sequential(timm.create_model("ela_resnet20_cifar")),
                                                      broadcast_buffers=False),
        ):
            ela_hf.set_kl_recording(ddp, True)
        wrapper = nn.Sequential(timm.create_model("ela_resnet20_cifar"))
        ela_hf.models.keep_kl_statistics_out_of_ddp(wrapper)
        ela_hf.set_kl_recording(torch.nn.parallel.DistributedDataParallel(wrapper), True)
