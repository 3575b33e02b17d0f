"""ElaPruningCallback in real (tiny) Trainer runs on CPU: windows, decisions, logs, history, resume."""
import json
import os
import shutil
import warnings

import pytest
import timm
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import ela_hf
from ela_hf.models import attention_layers
from ela_hf.pruning import EbqmSelector, ElaPruningCallback, FixedCountSelector, ThresholdSelector

from pruning_toy import RandomImages, TinyElaClassifier, training_args
from two_ranks import one_rank_group


def tap_recorded_kl(model):
    """Independent record of what each attention layer accumulates: {block name: [sum, count]}."""
    tally = {}
    names = {id(m): n for n, m in model.named_modules()}
    for _, j, blk in attention_layers(model):
        if blk.attn is None:
            continue
        name = names[id(blk)]
        original = blk.attn._accumulate

        def tapped(d, _name=name, _original=original):
            entry = tally.setdefault(_name, [0.0, 0])
            entry[0] += float(d.double().sum())
            entry[1] += int(d.shape[0])
            _original(d)

        blk.attn._accumulate = tapped
    return tally


class LogCatcher(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def pruning_keys(entry):
    return {k for k in entry if k.startswith("ela_pruning/")}


# ------------------------------------------------------------------------------------------------
# a real Trainer run with step windows
def test_trainer_run_with_step_windows_prunes_logs_and_writes_history(tmp_path):
    model = TinyElaClassifier()
    tally = tap_recorded_kl(model)
    windows_seen = []

    class WindowSpy(TrainerCallback):
        # after ElaPruningCallback in the list: sees each window's tally just after the decision
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (3, 6):
                windows_seen.append({k: list(v) for k, v in tally.items()})
                tally.clear()

    callback = ElaPruningCallback(windows=[(2, 3), (5, 6)], window_unit="step")
    catcher = LogCatcher()
    args = training_args(
        tmp_path,
        max_steps=6,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=2,  # evaluates inside window 1 (step 2): those batches must not count
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(n=32),
        eval_dataset=RandomImages(n=8, seed=1),
        callbacks=[callback, WindowSpy(), catcher],
    )
    trainer.train()

    history = callback.history
    assert [h["window"] for h in history] == [1, 2]
    assert [h["global_step"] for h in history] == [3, 6]
    names_1 = [e["name"] for e in history[0]["layers"]]
    assert names_1 == ["backbone.layer1.1", "backbone.layer2.1", "backbone.layer3.1"]
    for h, seen in zip(history, windows_seen):
        for e in h["layers"]:
            # 2 optimizer steps x 2 micro-batches x 4 images; evaluation batches are not counted
            assert e["samples"] == 16
            s, c = seen[e["name"]]
            assert c == 16 and e["d_t"] == pytest.approx(s / c, rel=1e-6)
        d = [e["d_t"] for e in h["layers"]]
        assert EbqmSelector().select(d) == [e["skip"] for e in h["layers"]]
        assert sum(e["skip"] for e in h["layers"]) == 1  # one candidate per window here (see selectors docs)
    # window 2 only measures the layers still active after window 1
    skipped_1 = history[0]["skipped_now"]
    assert [e["name"] for e in history[1]["layers"]] == [n for n in names_1 if n not in skipped_1]

    mask = ela_hf.get_skip_mask(model)
    assert mask == history[-1]["skip_mask"]
    assert sum(map(sum, mask)) == 2
    assert history[-1]["active_layers_per_stage"] == [sum(not s for s in st) for st in mask]
    for _, _, blk in attention_layers(model):  # recording is off after the last window
        assert blk.attn is None or blk.attn.recording is False

    with open(tmp_path / "pruning_history.json") as f:
        on_disk = json.load(f)
    assert on_disk["decisions"] == history
    assert on_disk["windows"] == [[2, 3], [5, 6]] and on_disk["window_unit"] == "step"
    assert on_disk["selector"] == EbqmSelector().to_dict()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    # Trainer logs: one entry per decision at its step, merged with that step's training log
    entries = [e for e in trainer.state.log_history if "ela_pruning/window" in e]
    assert [(e["step"], e["ela_pruning/window"]) for e in entries] == [(3, 1.0), (6, 2.0)]
    for e, h in zip(entries, history):
        assert "loss" in e
        for layer in h["layers"]:
            assert e[f"ela_pruning/d_t/{layer['name']}"] == layer["d_t"]
            assert e[f"ela_pruning/skip/{layer['name']}"] == float(layer["skip"])
        for i, n in enumerate(h["active_layers_per_stage"]):
            assert e[f"ela_pruning/active_layers/stage{i}"] == n
        assert h["quantile"] is not None and e["ela_pruning/quantile"] == h["quantile"]
        assert e["ela_pruning/samples"] == 16
    # and callbacks after this one (progress printers, loggers placed after it) receive them
    assert [pruning_keys(e) for e in catcher.logs if pruning_keys(e)] == [pruning_keys(e) for e in entries]


def test_trainer_run_with_epoch_windows_in_bf16(tmp_path):
    model = TinyElaClassifier()
    callback = ElaPruningCallback(windows=[(1, 1), (2, 2)], selector=FixedCountSelector(1), window_unit="epoch")
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=2, bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=16), callbacks=[callback])
    trainer.train()
    # 4 steps per epoch: decisions at the last step of epochs 1 and 2, over the whole epoch
    assert [(h["global_step"], h["epoch"]) for h in callback.history] == [(4, 1.0), (8, 2.0)]
    for h in callback.history:
        for e in h["layers"]:
            assert e["samples"] == 16
            assert e["d_t"] is not None and e["d_t"] >= 0.0  # finite: KL accumulated in float32 under autocast
    assert sum(map(sum, ela_hf.get_skip_mask(model))) == 2
    for _, j, blk in attention_layers(model):
        if blk.attn is not None:
            assert blk.attn.kl_sum.dtype == torch.float32


def test_transformers_model_is_pruned_and_exported_with_its_history(tmp_path):
    from ela_hf import ElaConfig, ElaForImageClassification

    class Images(RandomImages):
        def __getitem__(self, i):  # the transformers model takes pixel_values and labels only
            item = super().__getitem__(i)
            return {"pixel_values": item["pixel_values"], "labels": item["labels"]}

    torch.manual_seed(0)
    model = ElaForImageClassification(ElaConfig(architecture="ela_resnet20_cifar", num_labels=4))
    callback = ElaPruningCallback(windows=[(1, 2)], window_unit="step")
    args = training_args(tmp_path / "run", max_steps=3, save_strategy="steps", save_steps=3)
    Trainer(model=model, args=args, train_dataset=Images(n=16), callbacks=[callback]).train()

    (decision,) = callback.history
    assert [e["name"] for e in decision["layers"]] == ["timm_model.layer1.1", "timm_model.layer2.1", "timm_model.layer3.1"]
    mask = ela_hf.get_skip_mask(model)
    assert mask == decision["skip_mask"] and sum(map(sum, mask)) == 1
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "config.json").read_text())
    assert saved["skip_mask"] == mask

    # the hub side reads the file this callback wrote
    history = ela_hf.load_pruning_history(tmp_path / "run" / "pruning_history.json")
    (window,) = history["windows"]
    assert [(e["stage"], e["block"], e["skip"]) for e in window["layers"]] == [
        (e["stage"], e["block"], e["skip"]) for e in decision["layers"]
    ]
    assert [e["d"] for e in window["layers"]] == pytest.approx([e["d_t"] for e in decision["layers"]])


def test_a_fresh_run_replaces_an_earlier_runs_history_at_once(tmp_path):
    stale = {"windows": [[1, 1]], "decisions": [{"window": 1, "skip_mask": [[False, True]] * 3, "layers": []}]}
    (tmp_path / "pruning_history.json").write_text(json.dumps(stale))
    seen_at_begin = []

    class Peek(TrainerCallback):  # after ElaPruningCallback: sees the file as its on_train_begin left it
        def on_train_begin(self, args, state, control, **kwargs):
            seen_at_begin.append(json.loads((tmp_path / "pruning_history.json").read_text()))

    callback = ElaPruningCallback(windows=[(5, 6)], window_unit="step")
    trainer = Trainer(model=TinyElaClassifier(), args=training_args(tmp_path, max_steps=6),
                      train_dataset=RandomImages(n=32), callbacks=[callback, Peek()])
    trainer.train()
    assert seen_at_begin[0]["decisions"] == [] and seen_at_begin[0]["windows"] == [[5, 6]]
    (decision,) = json.loads((tmp_path / "pruning_history.json").read_text())["decisions"]
    assert decision["global_step"] == 6


def test_layers_skipped_before_a_fresh_run_are_named_and_kept_in_its_record(tmp_path):
    """A fresh run on a model that already skips layers (a pruned checkpoint, a second train(), a retry of
    auto_find_batch_size) keeps them skipped: they are named, kept out of the candidates and recorded, so the
    history file, a resume and the model card account for every skipped layer."""
    model = TinyElaClassifier()
    ela_hf.set_skip_mask(model, [[False, False], [False, True], [False, False]])
    callback = ElaPruningCallback(windows=[(2, 3)], window_unit="step", selector=FixedCountSelector(1))
    args = training_args(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=32), callbacks=[callback])
    before = [{"name": "backbone.layer2.1", "stage": 1, "block": 1}]
    with pytest.warns(UserWarning, match=r"already skips 1 attention layer as this run begins \(backbone\.layer2\.1\): "
                                         r"a pruned checkpoint, an earlier train\(\) call, or a retry of auto_find"):
        trainer.train()
    (decision,) = callback.history
    assert [e["name"] for e in decision["layers"]] == ["backbone.layer1.1", "backbone.layer3.1"]
    assert sum(map(sum, decision["skip_mask"])) == 2 and decision["skip_mask"][1] == [False, True]
    on_disk = json.loads((tmp_path / "a" / "pruning_history.json").read_text())
    assert on_disk["skipped_before_run"] == before and on_disk["decisions"] == callback.history
    # what a checkpoint keeps gives the same file back (the recipes' --export_only cards are made from it)
    saved = json.loads((tmp_path / "a" / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert ElaPruningCallback._saved_history(saved) == on_disk
    # the card says when each skipped layer went: this run's window, or before it
    ela_hf.export_pruned(model.backbone, tmp_path / "release", pruning_history=tmp_path / "a" / "pruning_history.json")
    card = (tmp_path / "release" / "README.md").read_text()
    (skipped_now,) = decision["skipped_now"]
    stage = {"backbone.layer1.1": 0, "backbone.layer3.1": 2}[skipped_now]
    assert "| 1 | 2 | 1 | before this run |" in card and f"| {stage} | 2 | 1 | Window 1 (steps 2-3) |" in card
    assert "not recorded" not in card

    # a resume from inside the window (checkpoint-2) into a model loaded some other way, without the earlier skip
    args = training_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=1)
    callback_b = ElaPruningCallback(windows=[(2, 3)], window_unit="step", selector=FixedCountSelector(1))
    resumed = Trainer(model=TinyElaClassifier(), args=args, train_dataset=RandomImages(n=32), callbacks=[callback_b])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ElaPruningCallback")  # not a fresh run: no word of earlier skips
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert _current_callback(resumed).skipped_before == before
    assert ela_hf.get_skip_mask(resumed.model) == decision["skip_mask"]
    assert json.loads((tmp_path / "b" / "pruning_history.json").read_text())["skipped_before_run"] == before

    # a second train() on the same Trainer starts afresh from the model as the first left it
    with pytest.warns(UserWarning, match=r"already skips 2 attention layers as this run begins \(backbone\.layer"):
        trainer.train()
    assert [e["name"] for e in callback.skipped_before] == sorted(["backbone.layer2.1", skipped_now])
    assert json.loads((tmp_path / "a" / "pruning_history.json").read_text())["skipped_before_run"] == callback.skipped_before


def test_a_resume_puts_back_the_layers_skipped_before_the_run_into_a_model_loaded_another_way():
    """The checkpoint's weights carry the mask; a model loaded some other way (without the skip flags) gets the
    layers the run began with skipped back from the stored state, as it gets the windows' decisions."""
    callback = ElaPruningCallback(windows=[(2, 3)], window_unit="step")
    callback._model = TinyElaClassifier()
    callback.skipped_before = [{"name": "backbone.layer2.1", "stage": 1, "block": 1}]
    callback._reapply_history()
    assert ela_hf.get_skip_mask(callback._model) == [[False, False], [False, True], [False, False]]
    callback.history = [{"skip_mask": [[False, True], [False, False], [False, False]]}]  # and a decision after it
    callback._reapply_history()
    assert ela_hf.get_skip_mask(callback._model) == [[False, True], [False, True], [False, False]]


def test_best_model_from_before_a_decision_is_reported(tmp_path, caplog):
    evaluations = []

    def first_is_best(prediction):  # each evaluation scores worse than the one before
        evaluations.append(1)
        return {"rank": float(len(evaluations))}

    model = TinyElaClassifier()
    callback = ElaPruningCallback(windows=[(3, 3)], window_unit="step", selector=FixedCountSelector(1))
    args = training_args(
        tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="rank", greater_is_better=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=32), eval_dataset=RandomImages(n=8),
                      compute_metrics=first_is_best, callbacks=[callback])
    with caplog.at_level("WARNING", logger="ela_hf.pruning.callback"):
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    (decision,) = callback.history
    (skipped,) = decision["skipped_now"]
    assert sum(map(sum, decision["skip_mask"])) == 1
    assert ela_hf.get_skip_mask(model) == [[False, False]] * 3, "checkpoint-2 predates the decision"
    assert "load_best_model_at_end=True" in caplog.text  # said up front
    assert "runs attention layers" in caplog.text and "that pruning skipped" in caplog.text  # and at the end
    assert f"runs attention layers {skipped} that pruning skipped" in caplog.text  # named as in the logs


def test_window_past_the_end_of_training_raises_at_train_begin(tmp_path):
    model = TinyElaClassifier()
    step_cb = ElaPruningCallback(windows=[(2, 3), (5, 9)], window_unit="step")
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6), train_dataset=RandomImages(), callbacks=[step_cb])
    with pytest.raises(ValueError, match=r"\(5, 9\) ends after the end of training \(max_steps = 6.*to train in "
                                         r"pieces .*, give every piece the whole run's length and resume"):
        trainer.train()

    # step windows in a run given in epochs: the step count is named as what it is, not as a max_steps set by hand
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=2)
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=8),
                      callbacks=[ElaPruningCallback(windows=[(5, 9)], window_unit="step")])
    with pytest.raises(ValueError, match=r"\(5, 9\) ends after the end of training \(the run has 4 optimizer steps, "
                                         r"from num_train_epochs = 2; step windows count optimizer steps"):
        trainer.train()

    epoch_cb = ElaPruningCallback(windows=[(1, 1), (3, 3)], window_unit="epoch")
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=2)
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=8), callbacks=[epoch_cb])
    with pytest.raises(ValueError, match=r"\(3, 3\) ends after the end of training \(num_train_epochs = 2"):
        trainer.train()
    # epoch windows in a run given by max_steps: its epoch count is named as coming from max_steps, not as the
    # num_train_epochs the user wrote
    args = training_args(tmp_path, max_steps=3, num_train_epochs=10)
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=8), callbacks=[epoch_cb])
    with pytest.raises(ValueError, match=r"\(3, 3\) ends after the end of training \(the run has 2 epochs: max_steps "
                                         r"= 3 ends in epoch 2, and overrides num_train_epochs"):
        trainer.train()
    # no training at all: said up front, not blamed on early stopping at the end
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=0)
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=8),
                      callbacks=[ElaPruningCallback(windows=[(1, 1)], window_unit="epoch")])
    with pytest.raises(ValueError, match=r"\(1, 1\) ends after the end of training \(num_train_epochs = 0"):
        trainer.train()


def test_a_window_in_a_cut_short_last_epoch_is_decided_before_the_final_save(tmp_path):
    # 28 images / batch 4 = 7 steps per epoch; max_steps=10 stops 3 steps into epoch 2, whose window then
    # ends at step 10: decided before the Trainer's final save, so checkpoint-10 carries the decision
    callback = ElaPruningCallback(windows=[(1, 1), (2, 2)], window_unit="epoch", selector=FixedCountSelector(1))
    args = training_args(tmp_path, max_steps=10, save_strategy="steps", save_steps=5)
    trainer = Trainer(model=TinyElaClassifier(), args=args, train_dataset=RandomImages(n=28), callbacks=[callback])
    with pytest.warns(UserWarning, match=r"window 2 \(2-2 epochs\) is decided at epoch 1\.43, before its end"):
        trainer.train()
    assert [d["global_step"] for d in callback.history] == [7, 10]
    state = json.load(open(tmp_path / "checkpoint-10" / "trainer_state.json"))
    saved = state["stateful_callbacks"]["ElaPruningCallback"]["attributes"]
    assert saved["windows_done"] == 2 and saved["partial_window"] is None
    assert saved["history"] == callback.history
    (entry,) = [e for e in state["log_history"] if e.get("ela_pruning/window") == 2.0]
    assert entry["step"] == 10 and "train_runtime" not in entry


def test_windows_never_reached_are_reported(tmp_path, caplog):
    class StopAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3
            return control

    callback = ElaPruningCallback(windows=[(2, 2), (5, 5), (7, 7)], window_unit="step", selector=FixedCountSelector(1))
    trainer = Trainer(model=TinyElaClassifier(), args=training_args(tmp_path, max_steps=8),
                      train_dataset=RandomImages(n=32), callbacks=[StopAtStep3(), callback])
    with caplog.at_level("WARNING", logger="ela_hf.pruning.callback"):
        trainer.train()
    assert len(callback.history) == 1
    assert "training ended (epoch 0.38, step 3) before pruning window(s) 2 (5-5 steps), 3 (7-7 steps)" in caplog.text


def test_an_early_stop_in_a_windows_last_epoch_decides_nothing(tmp_path, caplog):
    """A stop asked for after an evaluation, before training's length (what EarlyStoppingCallback does), leaves
    the window undecided in its last epoch as in its others; the last checkpoint and the final model agree."""
    class StopLikeEarlyStopping(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 10
            return control

    # 28 images / batch 4 = 7 steps per epoch: step 10 lies in epoch 2, the window's last epoch
    callback = ElaPruningCallback(windows=[(1, 2)], window_unit="epoch", selector=FixedCountSelector(1))
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=3, eval_strategy="steps", eval_steps=2,
                         save_strategy="steps", save_steps=2)
    trainer = Trainer(model=TinyElaClassifier(), args=args, train_dataset=RandomImages(n=28),
                      eval_dataset=RandomImages(n=4, seed=1), callbacks=[callback, StopLikeEarlyStopping()])
    with caplog.at_level("WARNING", logger="ela_hf.pruning.callback"):
        trainer.train()
    assert trainer.state.global_step == 10
    assert callback.history == []
    assert ela_hf.get_skip_mask(trainer.model) == [[False, False]] * 3
    assert "training ended inside pruning window 1 (1-2 epochs); no decision was made" in caplog.text
    state = json.load(open(tmp_path / "checkpoint-10" / "trainer_state.json"))
    assert state["stateful_callbacks"]["ElaPruningCallback"]["attributes"]["history"] == []


def test_an_epoch_cut_short_by_should_epoch_stop_does_not_shift_the_epoch_windows(tmp_path):
    class CutEpochOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_epoch_stop = state.global_step == 2  # epoch 1 stops after 2 of its 7 steps
            return control

    model = TinyElaClassifier()
    tally = tap_recorded_kl(model)
    callback = ElaPruningCallback(windows=[(2, 2)], window_unit="epoch", selector=FixedCountSelector(1))
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=3)
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=28), callbacks=[CutEpochOne(), callback])
    trainer.train()
    (decision,) = callback.history
    assert decision["global_step"] == 9 and decision["epoch"] == 2.0  # the end of epoch 2 (2 + 7 steps)
    assert [e["samples"] for e in decision["layers"]] == [28, 28, 28]  # all of epoch 2, nothing of epoch 1
    assert all(v[1] == 28 for v in tally.values() if v[1])


def test_a_callback_reused_after_a_crash_stops_recording_in_the_first_model(tmp_path):
    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("crash inside the window")

    callback = ElaPruningCallback(windows=[(1, 4)], window_unit="step")
    first = TinyElaClassifier()
    trainer = Trainer(model=first, args=training_args(tmp_path), train_dataset=RandomImages(), callbacks=[callback, Crash()])
    with pytest.raises(RuntimeError, match="crash inside the window"):
        trainer.train()
    assert any(blk.attn.recording for _, _, blk in attention_layers(first) if blk.attn is not None)
    second = TinyElaClassifier(seed=1)
    Trainer(model=second, args=training_args(tmp_path / "b"), train_dataset=RandomImages(),
            callbacks=[callback]).train()
    assert not any(blk.attn.recording for _, _, blk in attention_layers(first) if blk.attn is not None)
    first.train()(**{k: v[None] for k, v in RandomImages()[0].items()})
    assert all(float(count) == 0 for _, _, _, count in ela_hf.models.kl_accumulators(first))


def test_epoch_windows_need_a_dataset_with_a_length(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            images = RandomImages(n=12)
            return (images[i] for i in range(len(images)))

    callback = ElaPruningCallback(windows=[(1, 1), (2, 2)], window_unit="epoch")
    trainer = Trainer(model=TinyElaClassifier(), args=training_args(tmp_path, max_steps=6), train_dataset=Stream(),
                      callbacks=[callback])
    with pytest.raises(ValueError, match="window_unit='epoch' needs a training dataset with a length"):
        trainer.train()


def test_a_window_with_nothing_left_to_prune_says_so(tmp_path, caplog):
    model = TinyElaClassifier()
    ela_hf.set_skip_mask(model.backbone, [[False, True]] * 3)  # every skippable layer already skipped
    callback = ElaPruningCallback(windows=[(1, 1)], window_unit="step")
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=RandomImages(n=8),
                      callbacks=[callback])
    with caplog.at_level("WARNING", logger="ela_hf.pruning.callback"), \
            pytest.warns(UserWarning, match=r"already skips 3 attention layers as this run begins"):
        trainer.train()
    assert "every skippable attention layer already skipped" in caplog.text
    assert callback.history[0]["layers"] == []


@pytest.fixture
def callback_logger():
    """The callback's logger, put back as it was (a run with log_level= sets its level)."""
    import logging

    log = logging.getLogger("ela_hf.pruning.callback")
    saved = log.level, list(log.handlers), log.propagate
    yield log
    log.setLevel(saved[0])
    log.handlers[:] = saved[1]
    log.propagate = saved[2]


def test_log_level_info_says_when_windows_open_and_what_each_decision_skipped(tmp_path, caplog, callback_logger):
    # the callback only ever warned: a window's opening and a decision showed up as ~3 log keys per layer in the
    # printed dicts, or not at all where a restored callback ran after the printer
    model = TinyElaClassifier()
    callback = ElaPruningCallback(windows=[(1, 2), (3, 4)], window_unit="step",
                                  selector=FixedCountSelector(1))
    args = training_args(tmp_path, max_steps=4, log_level="info")
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=16), callbacks=[callback])
    with caplog.at_level("INFO"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "ela_hf.pruning.callback"]
    opened = [m for m in lines if "opens: recording KL over" in m]
    decided = [m for m in lines if " decided at step " in m]
    assert len(opened) == 2 and "pruning window 1 (steps 1-2) opens: recording KL over 3 skippable" in opened[0]
    assert "over 2 skippable" in opened[1]  # one skipped after the first window
    assert len(decided) == 2 and "window 1 decided at step 2: skips backbone.layer" in decided[0]
    first = callback.history[0]["skipped_now"][0]
    assert f"skips {first};" in decided[0] and "1 attention layer skipped in all" in decided[0]
    assert "2 attention layers skipped in all" in decided[1]
    # a later Trainer without log_level: the level is the user's logging configuration's again (here WARNING), not
    # the earlier Trainer's
    caplog.clear()
    trainer = Trainer(model=TinyElaClassifier(), args=training_args(tmp_path / "quiet", max_steps=2),
                      train_dataset=RandomImages(n=16),
                      callbacks=[ElaPruningCallback(windows=[(1, 2)], window_unit="step")])
    with caplog.at_level("WARNING"):
        trainer.train()
    assert not [r for r in caplog.records if r.name == "ela_hf.pruning.callback"]


def test_the_stderr_handler_follows_each_trainers_log_level(tmp_path, callback_logger, monkeypatch):
    import logging

    from ela_hf.pruning.callback import _follow_trainer_log_level

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # nothing configured: the lines would go nowhere
    _follow_trainer_log_level(training_args(tmp_path, log_level="info"))
    assert callback_logger.level == logging.INFO and len(callback_logger.handlers) == 1
    assert callback_logger.propagate is False
    _follow_trainer_log_level(training_args(tmp_path, log_level="info"))
    assert len(callback_logger.handlers) == 1  # (not one per Trainer)
    # a later passive Trainer: the logger's defaults back (it kept INFO and its handler before)
    _follow_trainer_log_level(training_args(tmp_path))
    assert callback_logger.level == logging.NOTSET and callback_logger.handlers == [] and callback_logger.propagate
    # logging configured since: the lines go to its handlers, not to one of ours
    _follow_trainer_log_level(training_args(tmp_path, log_level="info"))
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    _follow_trainer_log_level(training_args(tmp_path, log_level="info"))
    assert callback_logger.handlers == [] and callback_logger.propagate and callback_logger.level == logging.INFO


def test_report_to_integrations_that_would_miss_the_pruning_values_are_named(tmp_path, caplog):
    args = training_args(tmp_path, max_steps=1)
    args.report_to = ["tensorboard"]  # (not installed here: the Trainer would refuse the argument)
    callback = ElaPruningCallback(windows=[(1, 1)], window_unit="step")
    trainer = Trainer(model=TinyElaClassifier(), args=training_args(tmp_path, max_steps=1),
                      train_dataset=RandomImages(n=8), callbacks=[callback])
    trainer.args = args
    with caplog.at_level("WARNING", logger="ela_hf.pruning.callback"):
        trainer.train()
    assert "not the report_to integrations ['tensorboard'], which the Trainer calls first" in caplog.text
    caplog.clear()
    trainer = Trainer(model=TinyElaClassifier(), args=training_args(tmp_path / "none", max_steps=1),
                      train_dataset=RandomImages(n=8), callbacks=[ElaPruningCallback(windows=[(1, 1)],
                                                                                     window_unit="step")])
    with caplog.at_level("WARNING", logger="ela_hf.pruning.callback"):
        trainer.train()
    assert "report_to" not in caplog.text


def test_model_without_layer_attention_raises_at_train_begin(tmp_path):
    class Plain(TinyElaClassifier):
        def __init__(self):
            super().__init__(model_name="resnet20_cifar")

    trainer = Trainer(
        model=Plain(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=RandomImages(n=8),
        callbacks=[ElaPruningCallback(windows=[(1, 1)], window_unit="step")],
    )
    with pytest.raises(ValueError, match="no layer-attention"):
        trainer.train()


# ------------------------------------------------------------------------------------------------
# resume_from_checkpoint, also inside a window
def _resume_setup(tmp_path, name, **overrides):
    callback = ElaPruningCallback(windows=[(2, 4), (6, 7)], window_unit="step")
    model = TinyElaClassifier()
    args = training_args(tmp_path / name, max_steps=8, save_strategy="steps", save_steps=3, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=32), callbacks=[callback])
    return trainer, model, callback


def _assert_same_decisions(history_a, history_b):
    assert len(history_a) == len(history_b)
    for a, b in zip(history_a, history_b):
        assert {k: v for k, v in a.items() if k != "layers"} == {k: v for k, v in b.items() if k != "layers"}
        for la, lb in zip(a["layers"], b["layers"]):
            assert {k: v for k, v in la.items() if k != "d_t"} == {k: v for k, v in lb.items() if k != "d_t"}
            assert la["d_t"] == pytest.approx(lb["d_t"], rel=1e-5)


def _current_callback(trainer):
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ElaPruningCallback))


def test_resume_inside_windows_ends_with_the_same_mask_and_decisions(tmp_path):
    trainer_a, model_a, callback_a = _resume_setup(tmp_path, "a")
    trainer_a.train()
    mask_a = ela_hf.get_skip_mask(model_a)
    assert len(callback_a.history) == 2 and sum(map(sum, mask_a)) == 2

    # checkpoint-3 lies inside window 1 (steps 2-4): its partial sums over steps 2-3 were saved
    state_3 = json.load(open(tmp_path / "a" / "checkpoint-3" / "trainer_state.json"))
    saved = state_3["stateful_callbacks"]["ElaPruningCallback"]["attributes"]
    assert saved["partial_window"] == 0 and saved["windows_done"] == 0
    assert [e["count"] for e in saved["partial_kl"]] == [8.0, 8.0, 8.0]  # 2 steps x 4 images

    trainer_b, model_b, callback_b = _resume_setup(tmp_path, "b")
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert ela_hf.get_skip_mask(model_b) == mask_a
    _assert_same_decisions(callback_a.history, _current_callback(trainer_b).history)
    assert [e["samples"] for e in _current_callback(trainer_b).history[0]["layers"]] == [12, 12, 12]
    assert json.load(open(tmp_path / "b" / "pruning_history.json"))["decisions"] == _current_callback(trainer_b).history

    # checkpoint-6: window 1 decided (its mask is in the weights), window 2 (steps 6-7) half recorded.
    # With restore_callback_states_from_checkpoint the Trainer rebuilds the callback from the checkpoint.
    trainer_c, model_c, callback_c = _resume_setup(tmp_path, "c", restore_callback_states_from_checkpoint=True)
    trainer_c.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    restored = _current_callback(trainer_c)
    assert restored is not callback_c  # the Trainer's restore path rebuilt it from the JSON args
    assert ela_hf.get_skip_mask(model_c) == mask_a
    assert [h["window"] for h in restored.history] == [1, 2]  # window 1 not decided again
    _assert_same_decisions(callback_a.history, restored.history)

    # the decision taken over from trainer_state.json (written with sorted keys) is written back in the order
    # of the uninterrupted run's file, so the two files compare byte for byte where the values agree
    from ela_hf.pruning.decision import DECISION_FIELDS, LAYER_FIELDS, WINDOW_FIELDS

    files = {r: (tmp_path / r / "pruning_history.json").read_text() for r in "ac"}
    history_a, history_c = (json.loads(files[r])["decisions"] for r in "ac")
    for ra, rc in zip(history_a, history_c):
        assert tuple(ra) == tuple(rc) == WINDOW_FIELDS + DECISION_FIELDS
        assert {tuple(e) for e in ra["layers"] + rc["layers"]} == {LAYER_FIELDS}
    assert files["c"].split('"window": 2')[0] == files["a"].split('"window": 2')[0]


@pytest.mark.parametrize("edit, problem", [
    (dict(windows_done="1"), r"windows_done must be a whole number in 0..2, got '1'"),
    (dict(windows_done=7), r"windows_done must be a whole number in 0..2, got 7"),
    (dict(partial_window=5), r"partial_window must be null or a window index in 0..1, got 5"),
    (dict(partial_kl=[{"stage": 0, "block": 1}]), r"partial_kl must be null or a list of \{stage, block, sum, count\}"),
    (dict(history=[{"window": 1}]), r"history must be a list of at most windows_done=0 window records"),
    (dict(steps_per_epoch=0), r"steps_per_epoch must be null or a positive whole number, got 0"),
    # well-typed but impossible values resumed silently (every d_t null, or layers skipped on a negative sum)
    (lambda a: a["partial_kl"][0].update(count=-16), r"partial_kl count -16 of stage 0 block 1 is not a whole number"),
    (lambda a: a["partial_kl"][0].update(count=0.5), r"partial_kl count 0.5 of stage 0 block 1 is not a whole number"),
    (lambda a: a["partial_kl"][0].update(sum=float("nan")), r"partial_kl sum nan of stage 0 block 1 cannot be a sum"),
    (lambda a: a["partial_kl"][0].update(sum=-100.0), r"partial_kl sum -100.0 of stage 0 block 1 cannot be a sum of 8"),
    (lambda a: a.update(windows_done=1, history=[]), r"partial_window 0 is not the window after the 1 decided ones"),
])
def test_a_damaged_callback_state_in_a_checkpoint_is_named(tmp_path, edit, problem):
    """A hand-edited or damaged trainer_state.json failed with raw TypeErrors / KeyErrors inside the callback,
    or resumed with windows_done past the schedule (nothing decided again, silently)."""
    import shutil

    trainer_a, _, _ = _resume_setup(tmp_path, "a")
    trainer_a.train()
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "a" / "checkpoint-3", damaged)
    state = json.loads((damaged / "trainer_state.json").read_text())
    attributes = state["stateful_callbacks"]["ElaPruningCallback"]["attributes"]
    edit(attributes) if callable(edit) else attributes.update(edit)
    (damaged / "trainer_state.json").write_text(json.dumps(state))
    trainer_b, _, _ = _resume_setup(tmp_path, "b")
    with pytest.raises(ValueError, match=r"ElaPruningCallback state .* is damaged: " + problem):
        trainer_b.train(resume_from_checkpoint=str(damaged))


def test_resume_mid_epoch_inside_an_epoch_window(tmp_path):
    def setup(name):
        callback = ElaPruningCallback(windows=[(1, 2)], window_unit="epoch")
        model = TinyElaClassifier()
        args = training_args(tmp_path / name, max_steps=-1, num_train_epochs=3, save_strategy="steps", save_steps=6)
        trainer = Trainer(model=model, args=args, train_dataset=RandomImages(n=16), callbacks=[callback])
        return trainer, model, callback

    trainer_a, model_a, callback_a = setup("a")
    trainer_a.train()
    trainer_b, model_b, callback_b = setup("b")  # checkpoint-6: half way through epoch 2 of window 1-2
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert [(h["global_step"], h["epoch"]) for h in callback_b.history] == [(8, 2.0)]
    assert [e["samples"] for e in callback_b.history[0]["layers"]] == [32, 32, 32]  # both epochs, 16 images each
    _assert_same_decisions(callback_a.history, callback_b.history)
    assert ela_hf.get_skip_mask(model_b) == ela_hf.get_skip_mask(model_a)


def test_resume_with_other_steps_per_epoch_is_refused_while_epoch_windows_remain(tmp_path):
    """The Trainer re-counts a resumed run's epochs as global_step // (the new run's steps per epoch): with
    another process count, batch size or accumulation the epoch windows would move (an open one decided at once)."""
    def setup(name, windows=((1, 2),), restore=False, **overrides):
        callback = ElaPruningCallback(windows=list(windows), window_unit="epoch", selector=FixedCountSelector(1))
        args = training_args(tmp_path / name, max_steps=-1, num_train_epochs=4, save_strategy="steps", save_steps=6,
                             restore_callback_states_from_checkpoint=restore, **overrides)
        return Trainer(model=TinyElaClassifier(), args=args, train_dataset=RandomImages(n=16), callbacks=[callback])

    setup("a").train()  # 4 steps per epoch; checkpoint-6 is half way through epoch 2 of the window
    saved = json.load(open(tmp_path / "a" / "checkpoint-6" / "trainer_state.json"))
    assert saved["stateful_callbacks"]["ElaPruningCallback"]["attributes"]["steps_per_epoch"] == 4
    for name, overrides in [("batch", dict(per_device_train_batch_size=8)), ("accum", dict(gradient_accumulation_steps=2)),
                            ("rebuilt", dict(per_device_train_batch_size=8, restore=True))]:
        trainer = setup(name, **overrides)
        with pytest.raises(ValueError, match=r"took 4 optimizer steps per epoch, this one takes 2 .* window\(s\) 1-2 "):
            trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
        assert not (tmp_path / name / "checkpoint-7").exists()
    # every window decided (checkpoint-12, epoch 3): nothing moves, the resume goes on
    resumed = setup("done", per_device_train_batch_size=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-12"))
    assert [h["window"] for h in _current_callback(resumed).history] == [1]
    # the same steps per epoch: resumed as before
    setup("same").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))


def test_resume_with_a_different_configuration_raises(tmp_path):
    model = timm.create_model("ela_resnet20_cifar", num_classes=4)
    original = ElaPruningCallback(windows=[(2, 4)], window_unit="step")
    state = TrainerState(global_step=3, max_steps=8, stateful_callbacks=[original])
    changed = ElaPruningCallback(windows=[(2, 5)], window_unit="step")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="resume with the same windows"):
        changed.on_train_begin(args, state, TrainerControl(), model=model)


def test_a_resume_without_the_optimizer_and_schedule_warns_that_later_windows_may_differ(tmp_path):
    """save_only_model=True checkpoints hold no optimizer or schedule state: the Trainer resumes them with a fresh
    optimizer and a schedule from step 0, and a window after the resume can then skip other layers than the
    uninterrupted run (seen in a review). What counts is the checkpoint, not the resuming run's setting."""
    def run(name, model_only, resume=None):
        callback = ElaPruningCallback(windows=[(2, 3), (5, 6)], window_unit="step", selector=FixedCountSelector(1))
        args = training_args(tmp_path / name, max_steps=6, save_strategy="steps", save_steps=1,
                             save_only_model=model_only)
        trainer = Trainer(model=TinyElaClassifier(), args=args, train_dataset=RandomImages(n=32), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    message = r"resumed at step 4 without the checkpoint's optimizer and learning-rate schedule state \(its " \
              r"schedule restarts at step 0; save_only_model=True writes such checkpoints\): the pruning windows still"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ElaPruningCallback")  # quiet where the state comes back
        run("model_only", model_only=True)
        run("full", model_only=False)
        run("a", model_only=True, resume=str(tmp_path / "model_only" / "checkpoint-6"))  # every window decided
        run("b", model_only=True, resume=str(tmp_path / "full" / "checkpoint-4"))  # the optimizer is there
        run("c", model_only=False, resume=str(tmp_path / "full" / "checkpoint-4"))
    for name, model_only in (("d", True), ("e", False)):  # a model-only checkpoint, whatever this run saves
        with pytest.warns(UserWarning, match=message):
            resumed = run(name, model_only, resume=str(tmp_path / "model_only" / "checkpoint-4"))
        assert [h["window"] for h in _current_callback(resumed).history] == [1, 2]


def test_restore_callback_states_keeps_the_given_configuration_and_history(tmp_path, caplog):
    """restore_callback_states_from_checkpoint=True makes the Trainer replace the given callback by one built
    from the checkpoint: different windows are still refused, and the given object gets the decisions."""
    def run(name, windows, resume=None):
        callback = ElaPruningCallback(windows=windows, window_unit="step", selector=FixedCountSelector(1))
        args = training_args(tmp_path / name, max_steps=8, save_strategy="steps", save_steps=3,
                             restore_callback_states_from_checkpoint=True)
        trainer = Trainer(model=TinyElaClassifier(), args=args, train_dataset=RandomImages(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return callback

    first = run("a", [(2, 4), (6, 7)])
    with pytest.raises(ValueError, match=r"resume with the same windows.*restore_callback_states_from_checkpoint"):
        run("b", [(2, 5)], resume=str(tmp_path / "a" / "checkpoint-3"))
    # a callback written inline (the Trainer drops it when it rebuilds one: nothing else refers to it)
    args = training_args(tmp_path / "inline", max_steps=8, restore_callback_states_from_checkpoint=True)
    inline = Trainer(model=TinyElaClassifier(), args=args, train_dataset=RandomImages(),
                     callbacks=[ElaPruningCallback(windows=[(2, 5)], window_unit="step")])
    with pytest.raises(ValueError, match=r"resume with the same windows"):
        inline.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    # a checkpoint written before the state carried the rebuilt marker
    older = tmp_path / "older"
    shutil.copytree(tmp_path / "a" / "checkpoint-3", older)
    state = json.loads((older / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["ElaPruningCallback"]["attributes"]["restored_by_trainer"]
    (older / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"resume with the same windows"):
        run("c", [(2, 5)], resume=str(older))
    # an earlier Trainer on the same model does not stand in for a later one's callback (added with add_callback:
    # not comparable, a warning)
    model = TinyElaClassifier()
    Trainer(model=model, args=training_args(tmp_path / "e"), train_dataset=RandomImages(),
            callbacks=[ElaPruningCallback(windows=[(1, 1)], window_unit="step")])
    later = Trainer(model=model, train_dataset=RandomImages(), args=training_args(
        tmp_path / "f", max_steps=8, save_strategy="no", restore_callback_states_from_checkpoint=True))
    added = ElaPruningCallback(windows=[(2, 4), (6, 7)], window_unit="step", selector=FixedCountSelector(1))
    later.add_callback(added)
    with caplog.at_level("WARNING", logger="ela_hf.pruning.callback"):
        later.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    # that object gets no decisions: the warning says so, and where they are
    assert added.history == [] and len(_current_callback(later).history) == 2
    assert "could not be compared (one added with add_callback, or a model_init run), and that object gets none of " \
           "this run's decisions: read them from trainer.callback_handler.callbacks or <output_dir>/pruning_history" \
           ".json" in caplog.text
    # one TrainingArguments for two Trainers on one model, resuming a checkpoint that has no pruning state:
    # nothing was rebuilt, nothing to compare
    model, shared = TinyElaClassifier(), training_args(tmp_path / "g", max_steps=4, save_strategy="steps", save_steps=2,
                                                       restore_callback_states_from_checkpoint=True)
    Trainer(model=model, args=shared, train_dataset=RandomImages()).train()  # no callback: no pruning state
    Trainer(model=model, args=shared, train_dataset=RandomImages(),
            callbacks=[ElaPruningCallback(windows=[(1, 1)], window_unit="step")])
    again = Trainer(model=model, args=shared, train_dataset=RandomImages())
    added = ElaPruningCallback(windows=[(3, 4)], window_unit="step", selector=FixedCountSelector(1))
    again.add_callback(added)  # (not in the Trainer's state until train begins: saving must still work)
    again.train(resume_from_checkpoint=str(tmp_path / "g" / "checkpoint-2"))
    assert len(added.history) == 1
    saved = json.loads((tmp_path / "g" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["ElaPruningCallback"]["attributes"]["history"] == added.history
    resumed = run("d", [(2, 4), (6, 7)], resume=str(tmp_path / "a" / "checkpoint-3"))
    assert [h["window"] for h in resumed.history] == [1, 2]
    _assert_same_decisions(first.history, resumed.history)


def test_several_trainers_on_one_model_and_freed_models(tmp_path):
    """Only a callback the Trainer rebuilt from a checkpoint is compared with the one it was given: a second
    Trainer on the same model with other windows trains, and nothing keeps trained models alive."""
    import gc
    import weakref

    model = TinyElaClassifier()
    first = ElaPruningCallback(windows=[(1, 2)], window_unit="step", selector=FixedCountSelector(1))
    Trainer(model=model, args=training_args(tmp_path / "a"), train_dataset=RandomImages(), callbacks=[first]).train()
    later = Trainer(model=model, args=training_args(tmp_path / "b"), train_dataset=RandomImages())
    second = ElaPruningCallback(windows=[(3, 4)], window_unit="step", selector=FixedCountSelector(1))
    later.add_callback(second)
    with pytest.warns(UserWarning, match=r"already skips 1 attention layer as this run begins"):  # the first's skip
        later.train()
    assert sum(map(sum, ela_hf.get_skip_mask(model))) == 2 and len(first.history) == 1
    (skipped,) = [e for e in first.history[0]["layers"] if e["skip"]]
    assert second.skipped_before == [{k: skipped[k] for k in ("name", "stage", "block")}]
    del second
    alive = weakref.ref(model)
    del model, first, later
    gc.collect()
    assert alive() is None


def test_kl_accumulators_are_kept_out_of_ddps_buffer_broadcast(tmp_path):
    """DDP copies rank 0's buffers over the others' at each synchronising forward; the accumulators are each
    rank's own sums (the 2-process test checks the sums themselves with two forward passes per step)."""
    from torch.nn.parallel import DistributedDataParallel

    from ela_hf import ElaConfig, ElaForImageClassification

    timm_model = timm.create_model("ela_resnet20_cifar", num_classes=4)
    hf_model = ElaForImageClassification(ElaConfig(architecture="ela_resnet20_cifar", num_labels=4))
    wrapper = TinyElaClassifier()  # a user's module: the callback names them when the Trainer is built
    Trainer(model=wrapper, args=training_args(tmp_path), train_dataset=RandomImages(),
            callbacks=[ElaPruningCallback(windows=[(1, 1)], window_unit="step")])
    # timm features_only backbones (every feature_cls that works) list theirs under the wrapper's names
    backbones = [timm.create_model("ela_resnet20_cifar", features_only=True, feature_cls=c) for c in ("hook", "getter")]
    backbones.append(timm.create_model("ela_resnet20_cifar", features_only=True))
    # by hand, for a module the models and the callback do not see (a detector around a backbone); names
    # the module already listed stay listed
    detector = torch.nn.Sequential(timm.create_model("ela_resnet20_cifar", features_only=True))
    detector._ddp_params_and_buffers_to_ignore = ["0.layer1.0.bn1.running_mean"]
    ela_hf.models.keep_kl_statistics_out_of_ddp(detector)
    assert "0.layer1.0.bn1.running_mean" in detector._ddp_params_and_buffers_to_ignore
    with one_rank_group(tmp_path):
        for model in (timm_model, hf_model, wrapper, *backbones, detector):
            kl = {id(t) for n, t in model.named_buffers() if n.endswith(("kl_sum", "kl_count"))}
            assert len(kl) == 12
            ddp = DistributedDataParallel(model, find_unused_parameters=True)
            broadcast = {id(t) for t in ddp.modules_buffers}
            assert broadcast and not broadcast & kl  # BatchNorm statistics still are broadcast


# ------------------------------------------------------------------------------------------------
# driving the events by hand: torch.compile and half-precision models
def _manual_steps(callback, model, forward, steps, tmp_path, on_step=None):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state, control = TrainerState(max_steps=steps, num_train_epochs=1), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        callback.on_step_begin(args, state, control)
        forward(x).float().sum().backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, control)
        if on_step is not None:
            on_step(state.global_step)


def test_torch_compile_recompiles_at_window_changes_only(tmp_path):
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    # one stage of three blocks keeps dynamo's tracing short
    model = timm.create_model("ela_resnet20_cifar", num_classes=4, layers=(3,), channels=(16,))
    compiled = torch.compile(model, backend=counting_backend)
    callback = ElaPruningCallback(windows=[(1, 2)], selector=FixedCountSelector(1), window_unit="step")
    per_step = []
    _manual_steps(callback, model, compiled, 4, tmp_path, on_step=lambda s: per_step.append(len(compiles)))
    assert sum(map(sum, ela_hf.get_skip_mask(model))) == 1
    assert [e["samples"] for e in callback.history[0]["layers"]] == [4, 4]
    # step 1 compiles (recording on), step 2 reuses it, step 3 compiles once for the new mask, step 4 reuses
    assert per_step[1] == per_step[0] and per_step[3] == per_step[2]
    assert per_step[2] == per_step[1] + 1


def test_statistics_stay_float32_for_a_bfloat16_model(tmp_path):
    model = timm.create_model("ela_resnet20_cifar", num_classes=4).to(torch.bfloat16)
    callback = ElaPruningCallback(windows=[(1, 2)], selector=ThresholdSelector(tau=0.5), window_unit="step")
    dtypes = []

    def forward(x):
        # the non-first layers are the ones that accumulate (a stage's first layer has no predecessor)
        dtypes.append({blk.attn.kl_sum.dtype for _, j, blk in attention_layers(model) if j > 0 and not blk.is_skipped})
        return model(x.to(torch.bfloat16))

    _manual_steps(callback, model, forward, 2, tmp_path)
    assert dtypes == [{torch.float32}, {torch.float32}]
    d = [e["d_t"] for e in callback.history[0]["layers"]]
    assert all(v is not None and v >= 0.0 for v in d)


# ------------------------------------------------------------------------------------------------
# construction
def test_presets_carry_the_paper_settings():
    cifar, imagenet, detection = ElaPruningCallback.cifar(), ElaPruningCallback.imagenet(), ElaPruningCallback.detection()
    assert cifar.windows == [(1, 3), (45, 48), (91, 93)]
    assert cifar.selector == EbqmSelector(q=0.5, alpha=5, beta=1, tau=0.3)
    assert imagenet.windows == [(1, 3), (51, 53)]
    assert imagenet.selector == EbqmSelector(q=0.5, alpha=2, beta=5, tau=0.25)
    assert detection.windows == [(1, 1), (7, 7)]
    assert detection.selector == EbqmSelector(q=0.5, alpha=2, beta=5, tau=0.2)
    assert {cb.window_unit for cb in (cifar, imagenet, detection)} == {"epoch"}
    assert ElaPruningCallback.cifar(q=0.3).selector.q == 0.3
    assert ela_hf.ElaPruningCallback is ElaPruningCallback
    # DESIGN.md's spelling gives the same presets
    assert ElaPruningCallback.for_imagenet().windows == imagenet.windows
    assert ElaPruningCallback.for_imagenet(q=0.4).selector == EbqmSelector(q=0.4, alpha=2, beta=5, tau=0.25)
    assert ElaPruningCallback.for_cifar().selector == cifar.selector
    assert ElaPruningCallback.for_detection().windows == detection.windows


def test_callback_rebuilds_from_its_exported_state():
    cb = ElaPruningCallback(windows=[(1, 2), (5, 5)], selector=ThresholdSelector(tau=0.4), window_unit="step")
    exported = json.loads(json.dumps(cb.state()))  # what trainer_state.json holds
    rebuilt = ElaPruningCallback(**exported["args"])
    assert rebuilt.windows == cb.windows and rebuilt.selector == cb.selector and rebuilt.window_unit == "step"


def test_windows_may_be_numpy_arrays():
    np = pytest.importorskip("numpy")
    assert ElaPruningCallback(windows=np.array([[1, 2], [4, 5]])).windows == [(1, 2), (4, 5)]
    assert ElaPruningCallback(windows=[np.array([1, 3])]).windows == [(1, 3)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(windows=[]), "windows is empty"),
        (dict(windows=[(3, 2)]), "reversed"),
        (dict(windows=[(1, 3), (3, 5)]), "overlap"),
        (dict(windows=[(1, 5), (2, 3)]), "overlap"),
        (dict(windows=[(5, 6), (1, 2)]), "increasing order"),
        (dict(windows=[(0, 2)]), "1-indexed"),
        (dict(windows=[(1.0, 2)]), "integers"),
        (dict(windows=[(True, 2)]), "integers"),
        (dict(windows=[(1, 2, 3)]), r"\(start, end\) pair"),
        (dict(windows=[1, 2]), r"\(start, end\) pair"),
        (dict(windows="1-3"), "list of"),
        (dict(windows=[(1, 2)], window_unit="batch"), "window_unit"),
        (dict(windows=[(1, 2)], selector="ebqm"), "selector"),
        (dict(windows=[(1, 2)], selector={"name": "nope"}), "unknown selector"),
    ],
)
def test_invalid_callback_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElaPruningCallback(**kwargs)


def test_ddp_checkpointing_check_applies_to_ddp_only(monkeypatch):
    from types import SimpleNamespace

    from ela_hf import ElaConfig, ElaForImageClassification

    monkeypatch.setattr("ela_hf.pruning.callback._world", lambda: (0, 2))  # as under a 2-process launch
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    model = ElaForImageClassification(ElaConfig(architecture="ela_resnet20_cifar", num_labels=2))
    callback = ElaPruningCallback(windows=[(1, 1)])

    def args(**kw):
        base = dict(ddp_find_unused_parameters=None, gradient_checkpointing=True, fsdp="", deepspeed=None,
                    ddp_static_graph=None)
        return SimpleNamespace(**{**base, **kw})

    with pytest.raises(ValueError, match="under DDP with activation checkpointing"):
        callback._check_ddp(args(), model)
    callback._check_ddp(args(ddp_find_unused_parameters=True), model)
    callback._check_ddp(args(gradient_checkpointing=False), model)
    callback._check_ddp(args(fsdp="full_shard"), model)  # FSDP and DeepSpeed do not use DDP
    callback._check_ddp(args(deepspeed="ds.json"), model)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    callback._check_ddp(args(), model)


# ------------------------------------------------------------------------------------------------
# a custom selector is tried once at train begin
class _CountingSelector(ela_hf.pruning.LayerSelector):
    """Skips the first layer it is shown, and counts its calls (a selector with state of its own)."""

    name = "test_counting"

    def __init__(self, broken: str = ""):
        self.broken = broken
        self.calls = 0

    def explain(self, d):
        self.calls += 1
        n = len(d)
        if self.broken == "raise":
            raise KeyError("layer2")
        if self.broken == "length":
            return ela_hf.pruning.Selection([True], [True], [None])
        skip = [k == 0 for k in range(n)]
        return ela_hf.pruning.Selection(skip, [True] * n, [None] * n)


@pytest.mark.parametrize("broken, message", [("raise", "KeyError: 'layer2'"), ("length", "one entry per layer")])
def test_a_custom_selector_that_would_fail_its_first_decision_fails_at_train_begin(tmp_path, broken, message):
    model = TinyElaClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = ElaPruningCallback(windows=[(2, 3)], window_unit="step", selector=_CountingSelector(broken))
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=RandomImages(n=32), callbacks=[callback])
    with pytest.raises(ValueError, match=f"failed a dry run at train begin.*3 candidate layers.*{message}"):
        trainer.train()
    assert trainer.state.global_step == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step was trained before the error
    assert callback.selector.calls == 0  # the dry run used a copy


def test_the_dry_run_leaves_a_selectors_own_state_alone(tmp_path):
    import threading

    selector = _CountingSelector()
    callback = ElaPruningCallback(windows=[(2, 3), (5, 6)], window_unit="step", selector=selector)
    Trainer(model=TinyElaClassifier(), args=training_args(tmp_path), train_dataset=RandomImages(n=32),
            callbacks=[callback]).train()
    assert selector.calls == 2 and [h["skipped_now"] for h in callback.history] == [
        ["backbone.layer1.1"], ["backbone.layer2.1"]]

    # one that cannot be copied is not tried, and trains as before
    locked = _CountingSelector()
    locked.lock = threading.Lock()
    callback = ElaPruningCallback(windows=[(2, 3)], window_unit="step", selector=locked)
    Trainer(model=TinyElaClassifier(), args=training_args(tmp_path / "locked"), train_dataset=RandomImages(n=32),
            callbacks=[callback]).train()
    assert locked.calls == 1 and callback.history[0]["skipped_now"] == ["backbone.layer1.1"]
