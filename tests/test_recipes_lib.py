"""The recipes' shared pieces (ela_hf.training): data, transforms, schedule, metrics, argument checks."""
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from transformers.trainer_utils import EvalPrediction

from ela_hf.training import (
    DIGITS_DATASET,
    ImageClassificationTransform,
    PaperSchedule,
    RecipeArguments,
    StepScheduleWithWarmup,
    build_transforms,
    check_images,
    check_labels,
    check_metric_for_best_model,
    check_split_images,
    class_names,
    collate_image_batch,
    compute_accuracy,
    format_skip_mask,
    keep_resumed_windows,
    load_image_dataset,
    parse_windows,
    rescale_windows,
    resolve_checkpoint,
    prepare_splits,
    pruned_by_default,
    resolve_columns,
    resolve_schedule,
    scale_learning_rate,
    split_train_eval,
    take_samples,
    top_k_predictions,
    update_steps_per_epoch,
    validate_recipe_arguments,
)
from ela_hf.training.reporting import EpochRecord, format_epoch_times, format_summary, release_name

CIFAR_PAPER = PaperSchedule(epochs=180, lr_decay_epochs=(100, 150), warmup_epochs=0, kl_windows=((1, 3), (45, 48), (91, 93)))
IMAGENET_PAPER = PaperSchedule(epochs=100, lr_decay_epochs=(30, 60, 90), warmup_epochs=3, kl_windows=((1, 3), (51, 53)))


def _image(size=(12, 10), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    return PILImage.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode)


def _write_image_folder(root, splits=("train", "validation"), classes=("cat", "dog"), per_class=2):
    for split in splits:
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                _image(seed=i).save(root / split / c / f"{i}.png")


# ------------------------------------------------------------------------------------------------
# data


def test_image_folder_and_parquet_load_with_detected_columns(tmp_path):
    _write_image_folder(tmp_path / "imgs")
    data = load_image_dataset(str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    assert set(data) == {"train", "validation"} and data["train"].num_rows == 4
    assert resolve_columns(data["train"]) == ("image", "label")
    assert class_names(data["train"], "label") == ["cat", "dog"]

    data["train"].to_parquet(str(tmp_path / "one.parquet"))
    single = load_image_dataset(str(tmp_path / "one.parquet"), cache_dir=str(tmp_path / "cache"))
    assert list(single) == ["train"] and single["train"].num_rows == 4
    assert resolve_columns(single["train"]) == ("image", "label")


def test_missing_local_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        load_image_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no such file or folder"):
        load_image_dataset("missing.parquet")


def test_a_mistyped_relative_path_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    """data/bse for data/base: the folder data/ is here, so it is a missing local folder (it used to be tried as
    the Hub dataset 'data/bse', half a minute of retries and then "Couldn't reach")."""
    (tmp_path / "data" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"--dataset 'data/bse': no such file or folder \(the folder data/ is here, so "
                                         r"it is read as a local path\)"):
        load_image_dataset("data/bse")
    # were an IndexError inside datasets, and "Couldn't find any data file at <cwd>/sklearn:iris"
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="--dataset is empty: give a Hub dataset id"):
            load_image_dataset(empty)
    with pytest.raises(ValueError, match="'sklearn:iris': the one scikit-learn dataset of images is sklearn:digits"):
        load_image_dataset("sklearn:iris")


def test_embedded_digits_are_rgb_at_the_requested_size():
    data = load_image_dataset(DIGITS_DATASET, image_size=16)
    assert data["train"].num_rows + data["validation"].num_rows == 1797
    img = data["train"][0]["image"]
    assert img.mode == "RGB" and img.size == (16, 16)
    assert class_names(data["train"], "label") == [str(i) for i in range(10)]
    # stratified: every class in both splits
    assert set(data["validation"]["label"]) == set(range(10))


def test_column_detection_prefers_typed_features_and_known_names():
    img = _image()
    cifar100_like = Dataset.from_dict(
        {"img": [img], "fine_label": [3], "coarse_label": [1]},
        features=Features({"img": Image(), "fine_label": ClassLabel(num_classes=100), "coarse_label": ClassLabel(num_classes=20)}),
    )
    assert resolve_columns(cifar100_like) == ("img", "fine_label")
    assert resolve_columns(cifar100_like, label_column="coarse_label") == ("img", "coarse_label")

    int_labels = Dataset.from_dict({"image": [img, img], "target": [0, 2]}, features=Features({"image": Image(), "target": Value("int64")}))
    assert resolve_columns(int_labels) == ("image", "target")
    assert class_names(int_labels, "target") == ["0", "1", "2"]


def test_dataset_without_usable_label_column_is_rejected():
    img = _image()
    no_label = Dataset.from_dict({"image": [img], "caption": ["a cat"]}, features=Features({"image": Image(), "caption": Value("string")}))
    with pytest.raises(ValueError, match="no usable label column.*caption"):
        resolve_columns(no_label)
    assert resolve_columns(no_label, label_column="caption") == ("image", "caption")  # class names, if you say so
    floats = Dataset.from_dict({"image": [img], "score": [0.5]}, features=Features({"image": Image(), "score": Value("float64")}))
    with pytest.raises(ValueError, match="'score' holds float64, not class ids"):
        resolve_columns(floats, label_column="score")
    with pytest.raises(ValueError, match="'nope' is not a column"):
        resolve_columns(no_label, label_column="nope")
    no_image = Dataset.from_dict({"text": ["x"], "label": [0]})
    with pytest.raises(ValueError, match="no image column"):
        resolve_columns(no_image)
    two_labels = Dataset.from_dict(
        {"image": [img], "a": [0], "b": [1]}, features=Features({"image": Image(), "a": ClassLabel(num_classes=2), "b": ClassLabel(num_classes=2)})
    )
    with pytest.raises(ValueError, match="several label columns"):
        resolve_columns(two_labels)


def test_unlabeled_split_is_rejected():
    ds = Dataset.from_dict({"label": [0, 1, -1]})
    with pytest.raises(ValueError, match=r"split 'test'.*negative values \(min -1\): an unlabeled split"):
        check_labels(ds, "label", 2, "test")
    with pytest.raises(ValueError, match=r"classes \[2, 5\] that the training split does not have \(it has the 2"):
        check_labels(Dataset.from_dict({"label": [0, 5, 2, 1, 5]}), "label", 2, "validation")
    check_labels(Dataset.from_dict({"label": [0, 1]}), "label", 2, "validation")


def test_eval_split_is_found_or_held_out():
    train = Dataset.from_dict({"x": list(range(20))})
    _, ev, name = split_train_eval(DatasetDict(train=train, test=train.select(range(3))))
    assert name == "test" and ev.num_rows == 3
    tr, ev, name = split_train_eval(DatasetDict(train=train), eval_fraction=0.25, seed=1)
    assert (tr.num_rows, ev.num_rows) == (15, 5) and "held out" in name
    assert set(tr["x"]).isdisjoint(ev["x"])
    with pytest.raises(ValueError, match="no split 'dev'"):
        split_train_eval(DatasetDict(train=train), eval_split="dev")


def test_cifar_transforms_pad_crop_flip_and_normalise():
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear", "crop_pct": 1.0}
    train, evaluate = build_transforms(cfg, "cifar", hflip=0.5)
    names = [type(t).__name__ for t in train.transforms]
    assert "RandomCrop" in names and "RandomHorizontalFlip" in names
    crop = next(t for t in train.transforms if type(t).__name__ == "RandomCrop")
    assert crop.padding == 4 and tuple(crop.size) == (32, 32)
    grey = PILImage.new("L", (8, 8), color=255)  # white, smaller than the model input
    x = evaluate(grey.convert("RGB"))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, (1.0 - 0.5) / 0.25))
    assert train(grey.convert("RGB")).shape == (3, 32, 32)


def test_imagenet_transforms_follow_the_paper():
    cfg = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear", "crop_pct": 0.875}
    train, evaluate = build_transforms(cfg, "imagenet")
    names = [type(t).__name__ for t in train.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandomHorizontalFlip" in names
    assert "ColorJitter" not in names
    resize = evaluate.transforms[0]
    assert type(resize).__name__ == "Resize" and resize.size == 256
    assert evaluate(_image((300, 260))).shape == (3, 224, 224)


def test_set_transform_makes_rgb_pixel_values_and_labels():
    ds = Dataset.from_dict(
        {"image": [_image(mode="L"), _image(mode="RGBA")], "label": [1, 0]},
        features=Features({"image": Image(), "label": ClassLabel(num_classes=2)}),
    )
    cfg = {"input_size": (3, 16, 16), "mean": (0, 0, 0), "std": (1, 1, 1), "interpolation": "bilinear", "crop_pct": 1.0}
    _, evaluate = build_transforms(cfg, "cifar")
    ds.set_transform(ImageClassificationTransform(evaluate, "image", "label"))
    batch = collate_image_batch([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["labels"].tolist() == [1, 0]


# ------------------------------------------------------------------------------------------------
# schedule


def test_step_schedule_with_warmup():
    sched = StepScheduleWithWarmup(steps_per_epoch=10, warmup_epochs=2, decay_epochs=(3, 5), decay_rate=0.1)
    factors = [sched(s) for s in range(60)]
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == pytest.approx(1.0)
    assert factors[20:30] == [1.0] * 10  # epoch 3
    assert factors[30:50] == pytest.approx([0.1] * 20)  # epochs 4-5
    assert factors[50] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="increasing"):
        StepScheduleWithWarmup(10, decay_epochs=(5, 3))


def test_steps_per_epoch_matches_the_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(1, 1)

        def forward(self, x, labels=None):
            return {"loss": self.w(x).sum()}

    for n, bs, accum, drop_last in [(37, 4, 1, False), (37, 4, 3, False), (37, 4, 1, True), (8, 4, 1, False)]:
        ds = Dataset.from_dict({"x": [[1.0]] * n})
        args = TrainingArguments(
            str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=accum,
            dataloader_drop_last=drop_last, use_cpu=True, report_to="none",
        )
        trainer = Trainer(model=Tiny(), args=args, train_dataset=ds)
        batches = len(trainer.get_train_dataloader())
        expected = max(batches // accum + int(batches % accum > 0), 1)
        assert update_steps_per_epoch(n, bs, 1, accum, drop_last) == expected
    # accelerate shards whole batches over processes and pads the tail: 10 batches on 4 processes -> 3 each
    assert update_steps_per_epoch(40, 4, world_size=4) == 3
    assert update_steps_per_epoch(40, 4, world_size=4, drop_last=True) == 2


def test_linear_lr_scaling():
    assert scale_learning_rate(0.1, 256, 1024) == pytest.approx(0.4)
    assert scale_learning_rate(0.1, None, 1024) == 0.1


# ------------------------------------------------------------------------------------------------
# metrics


def test_top1_top5_accuracy():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0.0, 9, 8, 7, 6, 5, 4], [0.0, 1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([0, 6, 0])
    preds = top_k_predictions(logits, labels)
    assert preds.shape == (3, 5)
    metrics = compute_accuracy(EvalPrediction(predictions=preds.numpy(), label_ids=labels.numpy()))
    # sample 0: top-1 hit; sample 1: label 6 is 7th -> miss; sample 2: label 0 is last -> miss
    assert metrics == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(1 / 3)}
    labels = torch.tensor([0, 5, 2])  # sample 1: 5th best; sample 2: 5th best
    metrics = compute_accuracy(EvalPrediction(predictions=preds.numpy(), label_ids=labels.numpy()))
    assert metrics == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(1.0)}
    # five classes or fewer: every label is among the five best, so only top-1 is reported
    for classes in (2, 5):
        few = top_k_predictions(torch.arange(float(classes)).repeat(2, 1), None)
        assert few.tolist() == [[classes - 1]] * 2
        metrics = compute_accuracy(EvalPrediction(predictions=few.numpy(), label_ids=np.array([0, classes - 1])))
        assert metrics == {"top1": 0.5}
    six = top_k_predictions(torch.arange(6.0)[None], None)
    assert six.shape == (1, 5) and compute_accuracy(EvalPrediction(six.numpy(), np.array([0]))) == {"top1": 0.0, "top5": 0.0}


# ------------------------------------------------------------------------------------------------
# arguments


def _args(**kw):
    kw.setdefault("model", "ela_resnet20_cifar")
    kw.setdefault("dataset", DIGITS_DATASET)
    return RecipeArguments(**kw)


def test_parse_and_rescale_windows():
    assert parse_windows("1-3, 45-48,91") == [(1, 3), (45, 48), (91, 91)]
    assert parse_windows("none") == [] and parse_windows(None) is None
    for bad, msg in [("3-1", "start <= end"), ("0-2", "start <= end"), ("1-3,2-4", "overlap"), ("a-b", "not a range")]:
        with pytest.raises(ValueError, match=msg):
            parse_windows(bad)
    assert rescale_windows([(1, 3), (45, 48), (91, 93)], 180, 18) == [(1, 1), (5, 5), (10, 10)]
    assert rescale_windows([(1, 3), (51, 53)], 100, 100) == [(1, 3), (51, 53)]


def test_paper_schedule_is_kept_or_rescaled():
    full = resolve_schedule(CIFAR_PAPER, _args(), 180)
    assert full.kl_windows == [(1, 3), (45, 48), (91, 93)] and full.lr_decay_epochs == [100, 150] and full.rescaled_from is None
    short = resolve_schedule(IMAGENET_PAPER, _args(), 10)
    assert short.kl_windows == [(1, 1), (6, 6)]
    assert short.lr_decay_epochs == pytest.approx([3, 6, 9]) and short.warmup_epochs == pytest.approx(0.3)
    assert short.rescaled_from == 100 and "rescaled" in short.describe()
    explicit = resolve_schedule(CIFAR_PAPER, _args(kl_windows="2-2", lr_decay_epochs="3", warmup_epochs=1), 4)
    assert (explicit.kl_windows, explicit.lr_decay_epochs, explicit.warmup_epochs) == ([(2, 2)], [3.0], 1)
    plain = resolve_schedule(CIFAR_PAPER, _args(model="resnet20_cifar"), 180, has_attention=False)
    assert plain.kl_windows == []


def test_a_resumed_run_keeps_its_checkpoints_windows(tmp_path, caplog):
    # the default windows are rescaled to the run's length: resuming a 4-epoch demo with 5 epochs got 2-2,3-3
    # instead of the checkpoint's 1-1,3-3, and the pruning callback refused the resume after the data had loaded
    demo = PaperSchedule(epochs=8, lr_decay_epochs=(6,), warmup_epochs=0, kl_windows=((2, 2), (4, 4)))
    checkpoint = tmp_path / "checkpoint-6"
    checkpoint.mkdir()

    def state(windows, unit="epoch"):
        entry = {"args": {"windows": windows, "selector": {"name": "ebqm"}, "window_unit": unit},
                 "attributes": {"history": []}}
        (checkpoint / "trainer_state.json").write_text(
            json.dumps({"global_step": 6, "stateful_callbacks": {"ElaPruningCallback": entry}}))

    state([[1, 1], [3, 3]])
    longer = resolve_schedule(demo, _args(), 5, steps_per_epoch=3)
    assert longer.kl_windows == [(2, 2), (3, 3)]
    with caplog.at_level("WARNING"):
        kept = keep_resumed_windows(longer, _args(), str(checkpoint))
    assert kept.kl_windows == [(1, 1), (3, 3)] and kept.lr_decay_epochs == longer.lr_decay_epochs
    assert "keeping the KL windows it was trained with, 1-1, 3-3 (the defaults for this run's 5 epochs would be " \
           "2-2, 3-3" in caplog.text and "--kl_windows" in caplog.text
    # explicit windows win; nothing to keep without a checkpoint, for a run without windows, or another unit
    explicit = resolve_schedule(demo, _args(kl_windows="2-2"), 5, steps_per_epoch=3)
    assert keep_resumed_windows(explicit, _args(kl_windows="2-2"), str(checkpoint)).kl_windows == [(2, 2)]
    assert keep_resumed_windows(longer, _args(), None).kl_windows == [(2, 2), (3, 3)]
    plain = resolve_schedule(demo, _args(model="mrla_b_resnet20_cifar"), 5, steps_per_epoch=3, pruned_by_default=False)
    assert plain.kl_windows == []
    # a run without windows cannot resume a pruning checkpoint: its decisions would vanish from history and card
    with pytest.raises(ValueError, match=r"was trained with KL windows 1-1, 3-3 \(epochs\), but --model "
                                         r"mrla_b_resnet20_cifar \(no KL windows by default\) resumes it without pruning"
                                         r".*Resume with --kl_windows 1-1,3-3 --window_unit epoch"):
        keep_resumed_windows(plain, _args(model="mrla_b_resnet20_cifar"), str(checkpoint))
    none = resolve_schedule(demo, _args(kl_windows="none"), 5, steps_per_epoch=3)
    with pytest.raises(ValueError, match=r"but --kl_windows none resumes it without pruning"):
        keep_resumed_windows(none, _args(kl_windows="none"), str(checkpoint))
    assert keep_resumed_windows(none, _args(kl_windows="none"), None).kl_windows == []
    state([[1, 1], [3, 3]], unit="step")
    assert keep_resumed_windows(longer, _args(), str(checkpoint)).kl_windows == [(2, 2), (3, 3)]
    # windows past a shorter run are left for the checks that name them
    state([[1, 1], [7, 7]])
    assert keep_resumed_windows(longer, _args(), str(checkpoint)).kl_windows == [(2, 2), (3, 3)]


def test_lr_decay_past_the_last_epoch_is_reported(caplog):
    with caplog.at_level("WARNING"):
        resolve_schedule(CIFAR_PAPER, _args(kl_windows="1-1", lr_decay_epochs="2,6"), 5)  # data not loaded yet
        assert caplog.text == ""
        schedule = resolve_schedule(CIFAR_PAPER, _args(kl_windows="1-1", lr_decay_epochs="2,6"), 5, steps_per_epoch=3)
    assert schedule.lr_decay_epochs == [2.0, 6.0]
    assert "--lr_decay_epochs 2,6: a decay at epoch 6 never happens, the run has 5 epochs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        resolve_schedule(CIFAR_PAPER, _args(kl_windows="1-1", lr_decay_epochs="2,4"), 5, steps_per_epoch=3)
        resolve_schedule(CIFAR_PAPER, _args(kl_windows="1-1"), 5, steps_per_epoch=3)  # paper's, rescaled
    assert caplog.text == ""


def test_mrla_baselines_train_unpruned_unless_windows_are_given():
    assert pruned_by_default("ela_resnet56_cifar") and pruned_by_default("ela_l_resnet50")
    assert not pruned_by_default("mrla_b_resnet56_cifar") and not pruned_by_default("resnet56_cifar")
    baseline = resolve_schedule(CIFAR_PAPER, _args(model="mrla_b_resnet20_cifar"), 180, pruned_by_default=False)
    assert baseline.kl_windows == [] and baseline.lr_decay_epochs == [100, 150]
    asked = resolve_schedule(CIFAR_PAPER, _args(model="mrla_b_resnet20_cifar", kl_windows="1-1"), 4,
                             pruned_by_default=False)
    assert asked.kl_windows == [(1, 1)]


def test_windows_past_the_end_are_rejected():
    with pytest.raises(ValueError, match="ends after the last epoch: the run has 4 epochs"):
        resolve_schedule(CIFAR_PAPER, _args(kl_windows="1-1,5-6"), 4)
    with pytest.raises(ValueError, match="do not fit into 2 epochs"):
        resolve_schedule(CIFAR_PAPER, _args(), 2)
    with pytest.raises(ValueError, match="needs --kl_windows"):
        resolve_schedule(CIFAR_PAPER, _args(window_unit="step"), 2)
    # steps: unknown before the data is loaded, checked once it is
    resolve_schedule(CIFAR_PAPER, _args(kl_windows="1-2,9-12", window_unit="step"), 2)
    with pytest.raises(ValueError, match="ends after the last step: the run has 10 steps"):
        resolve_schedule(CIFAR_PAPER, _args(kl_windows="1-2,9-12", window_unit="step"), 2, steps_per_epoch=5)
    with pytest.raises(ValueError, match="the run has 3 steps"):
        resolve_schedule(CIFAR_PAPER, _args(kl_windows="1-2,4-4", window_unit="step"), 2, max_steps=3, steps_per_epoch=5)
    # max_steps decides the epochs, as in the Trainer
    with pytest.raises(ValueError, match="the run has 2 epochs"):
        resolve_schedule(CIFAR_PAPER, _args(kl_windows="3-3"), 100, max_steps=7, steps_per_epoch=5)
    with pytest.raises(ValueError, match="no attention layers to prune"):
        resolve_schedule(CIFAR_PAPER, _args(model="resnet20_cifar", kl_windows="1-1"), 4, has_attention=False)


def test_unknown_model_and_bad_image_size_are_rejected():
    with pytest.raises(ValueError, match="'ela_resnet57_cifar' is not a model registered by ela_hf; did you mean"):
        validate_recipe_arguments(_args(model="ela_resnet57_cifar"))
    with pytest.raises(ValueError, match="too small for ela_resnet50: its total stride is 32"):
        validate_recipe_arguments(_args(model="ela_resnet50", image_size=16))
    with pytest.raises(ValueError, match="too small for ela_resnet20_cifar: its total stride is 4"):
        validate_recipe_arguments(_args(image_size=2))
    validate_recipe_arguments(_args(image_size=16))
    with pytest.raises(ValueError, match="--dataset is required"):
        validate_recipe_arguments(_args(dataset=None))
    with pytest.raises(ValueError, match="--max_train_samples must be positive"):
        validate_recipe_arguments(_args(max_train_samples=0))


# ------------------------------------------------------------------------------------------------
# reporting


def test_summary_pieces():
    text = format_skip_mask([[False, True, False], [False, True, True]])
    assert "layer1: 1 of 2 skippable skipped (blocks 1)" in text and "total: 3 of 4" in text
    records = [EpochRecord(1, 10.0, 6), EpochRecord(2, 12.0, 6), EpochRecord(3, 8.0, 4), EpochRecord(4, 6.0, 3), EpochRecord(5, 6.0, 3)]
    times = format_epoch_times(records, num_layers=6, final_active=3)
    assert "before pruning: 11.0 s per epoch with 6 attention layers (epochs 1-2)" in times
    assert "after pruning:  6.0 s per epoch with 3 attention layers (epochs 4-5): 0.55x" in times
    assert "nothing was pruned" in format_epoch_times(records[:2], num_layers=6, final_active=6)
    resumed = format_epoch_times(records[3:], num_layers=6, final_active=3)
    assert "before pruning: no whole epoch of this run had all 6" in resumed and "6.0 s per epoch with 3" in resumed
    assert "no whole epoch ran with the final 3" in format_epoch_times(records[:3], num_layers=6, final_active=3)
    assert "no attention layers" in format_epoch_times(records, num_layers=None, final_active=None)
    # an epoch cut short (max_steps: 2 of 5 steps) is left out, said so, not compared with whole ones
    cut = [EpochRecord(1, 10.0, 6, 5), EpochRecord(2, 9.0, 3, 5), EpochRecord(3, 2.0, 3, 2)]
    text = format_epoch_times(cut, num_layers=6, final_active=3, steps_per_epoch=5)
    assert "after pruning:  9.0 s per epoch with 3 attention layers (epoch 2): 0.90x" in text
    assert "(epoch 3 ran only part of 5 steps: left out)" in text
    assert "no whole epoch ran with the final 3" in format_epoch_times(cut[:1] + cut[2:], 6, 3, steps_per_epoch=5)
    assert "no whole epoch ran in this process" in format_epoch_times(cut[2:], 6, 3, steps_per_epoch=5)
    # the headline: top-5 where it was measured (more than five classes), top-1 alone otherwise
    assert "m on d: top-1 50.00%, top-5 75.00% on 8 evaluation images" in format_summary(
        "m", "d", {"eval_top1": 0.5, "eval_top5": 0.75}, 8, None, records)
    assert "m on d: top-1 50.00% on 8 evaluation images" in format_summary("m", "d", {"eval_top1": 0.5}, 8, None, records)


def test_epoch_timer_names_and_counts_an_epoch_cut_short():
    from types import SimpleNamespace

    from ela_hf.training import EpochTimerCallback

    timer = EpochTimerCallback()
    for begin, end, epoch in ((0, 5, 1.0), (5, 7, 1.4)):
        timer.on_epoch_begin(None, SimpleNamespace(global_step=begin, epoch=epoch - 1), None, model=None)
        timer.on_epoch_end(None, SimpleNamespace(global_step=end, epoch=epoch), None)
    assert [(r.epoch, r.steps) for r in timer.records] == [(1, 5), (2, 2)]


def test_release_names_are_folder_names():
    assert release_name("ela_resnet56_cifar", "uoft-cs/cifar100") == "ela_resnet56_cifar-cifar100"
    assert release_name("ela_resnet20_cifar", DIGITS_DATASET) == "ela_resnet20_cifar-sklearn-digits"
    assert release_name("ela_resnet18", "/data/shards/train.parquet") == "ela_resnet18-train"


def test_resume_last_passes_over_a_checkpoint_cut_short(tmp_path, caplog):
    from types import SimpleNamespace

    for step, state in ((4, '{"global_step": 4}'), (6, '{"global_step": 6}'), (8, None), (10, None), (12, ""),
                        (14, '{"global_st')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        if state is not None:  # 12 and 14: a state file cut short
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint
    args = SimpleNamespace(resume_from_checkpoint="last", output_dir=str(tmp_path))
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(args) == str(tmp_path / "checkpoint-6")
    assert all(f"checkpoint-{n}" in caplog.text for n in (8, 10, 12, 14))
    assert "no readable trainer_state.json" in caplog.text
    with pytest.raises(ValueError, match=r"checkpoint-14'?: its trainer_state.json is not a readable Trainer state"):
        resolve_checkpoint(SimpleNamespace(resume_from_checkpoint=str(tmp_path / "checkpoint-14"), output_dir=""))
    for n in (12, 14):
        shutil.rmtree(tmp_path / f"checkpoint-{n}")
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*checkpoint-10, .*checkpoint-8, .*checkpoint-6"):
        resolve_checkpoint(args)
    with pytest.raises(ValueError, match="is not a Trainer checkpoint folder"):
        resolve_checkpoint(SimpleNamespace(resume_from_checkpoint=str(tmp_path / "checkpoint-8"), output_dir=""))


def _png_bytes(img):
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_max_samples_draw_from_every_class_of_a_class_sorted_dataset():
    ds = Dataset.from_dict({"label": [c for c in range(4) for _ in range(25)]})  # sorted, as image folders are
    picked = take_samples(ds, 20, seed=0)
    assert len(picked) == 20 and len(set(picked["label"])) == 4
    assert picked["label"] == take_samples(ds, 20, seed=0)["label"]  # fixed by the seed
    assert take_samples(ds, None) is ds and take_samples(ds, 1000) is ds


def test_sixteen_bit_grey_images_keep_their_contrast():
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    img = PILImage.fromarray(ramp)
    assert img.mode.startswith("I")
    transform = ImageClassificationTransform(lambda im: np.asarray(im), "image", "label")
    (pixels,) = transform({"image": [img], "label": [0]})["pixel_values"]
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_array_equal(pixels[..., 0], np.rint(ramp / 257.0).astype(np.uint8))


@pytest.mark.parametrize("pixels, want", [
    (np.linspace(0, 1, 64, dtype=np.float32), np.linspace(0, 255, 64)),  # float in [0, 1]: not black
    (np.linspace(0, 255, 64, dtype=np.float32), np.linspace(0, 255, 64)),  # float in [0, 255]
    (np.linspace(0, 65535, 64).astype(np.int32), np.linspace(0, 255, 64)),  # 16-bit data in a 32-bit image
    (np.linspace(0, 2**31 - 1, 64).astype(np.int32), np.linspace(0, 255, 64)),  # full 32-bit range: not clipped
    (np.linspace(0, 100_000, 64).astype(np.int32), np.linspace(0, 100_000 * 255 / (2**17 - 1), 64)),  # 17 bits
    (np.linspace(0, 1_000_000, 64).astype(np.int32), np.linspace(0, 1_000_000 * 255 / (2**20 - 1), 64)),
    (np.arange(64, dtype=np.int32), np.arange(64)),  # 8-bit values stay
])
def test_float_and_32_bit_grey_images_are_scaled_to_8_bits(pixels, want):
    img = PILImage.fromarray(pixels.reshape(8, 8))
    assert img.mode in ("F", "I")
    transform = ImageClassificationTransform(lambda im: np.asarray(im), "image", "label")
    (out,) = transform({"image": [img], "label": [0]})["pixel_values"]
    np.testing.assert_allclose(out[..., 0].reshape(-1).astype(float), want, atol=1.0)
    from ela_hf.hf.image_processing_ela import _ConvertMode

    assert repr(_ConvertMode("L")) == "_ConvertMode(mode='L')"


def test_parquet_style_image_columns_become_images_and_classes_come_from_the_whole_train_split():
    images = [_image(seed=i) for i in range(6)]
    raw = Dataset.from_dict({"image": [_png_bytes(im) for im in images], "label": [0, 0, 1, 1, 2, 2]})
    structs = Dataset.from_dict(
        {"image": [{"bytes": _png_bytes(im), "path": None} for im in images[:2]], "label": [0, 2]}
    )
    assert not isinstance(raw.features["image"], Image)
    train, evaluation, image_column, label_column, labels = prepare_splits(
        raw.select([0, 1, 2, 3]), structs, "validation", class_source=raw
    )
    assert (image_column, label_column) == ("image", "label")
    assert isinstance(train.features["image"], Image) and isinstance(evaluation.features["image"], Image)
    assert train[0]["image"].size == images[0].size
    assert labels == ["0", "1", "2"], "class 2 is only in the held-out part: the classes come from the whole split"
    with pytest.raises(ValueError, match="classes \\[2\\] that the training split does not have"):
        prepare_splits(raw.select([0, 1, 2, 3]), structs, "validation")
    numbers = Dataset.from_dict({"image": [1.0, 2.0], "label": [0, 1]})
    with pytest.raises(ValueError, match="image column 'image' holds float64; it must be an Image feature"):
        prepare_splits(numbers, numbers, "validation")


def test_an_image_folder_without_labels_says_why():
    unlabeled = Dataset.from_dict({"image": [_image()]}, features=Features({"image": Image()}))
    with pytest.raises(ValueError, match="classes are the sub-folder names: every image must sit exactly one level"):
        resolve_columns(unlabeled)


def test_parquet_splits_must_agree_on_class_ids(tmp_path):
    def write(folder, split, names, labels):
        features = Features({"image": Image(), "label": ClassLabel(names=names)})
        ds = Dataset.from_dict({"image": [_image(seed=i) for i in range(len(labels))], "label": labels}, features=features)
        folder.mkdir(exist_ok=True)
        ds.to_parquet(str(folder / f"{split}.parquet"))

    clash = tmp_path / "clash"
    write(clash, "train", ["10", "2", "3"], [0, 1, 2])
    write(clash, "validation", ["2", "3"], [0, 1])  # "2" is id 0 here, id 1 in train
    with pytest.raises(ValueError, match=r"disagree on the classes of column 'label': train.parquet has \['10', '2', '3'\]"):
        load_image_dataset(str(clash))
    prefix = tmp_path / "prefix"
    write(prefix, "train", ["10", "2", "3"], [0, 1, 2])
    write(prefix, "validation", ["10", "2"], [0, 1])  # fewer classes, same ids: fine
    data = load_image_dataset(str(prefix))
    assert data["validation"].features["label"].names == ["10", "2", "3"]



def test_an_unreadable_image_file_is_named_when_decoded_by_the_transform(tmp_path):
    _write_image_folder(tmp_path / "imgs")
    broken = tmp_path / "imgs" / "train" / "dog" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated PNG
    data = load_image_dataset(str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    train, _, image_column, label_column, _ = prepare_splits(
        data["train"], data["validation"], "validation", decode_images=False
    )
    assert train.features[image_column].decode is False
    rows = {"/".join(r["path"].replace(os.sep, "/").split("/")[-2:]): i for i, r in enumerate(train[image_column])}
    train.set_transform(ImageClassificationTransform(lambda im: np.asarray(im), image_column, label_column))
    # decoding in the transform gives the same pixels as datasets' own decoding
    np.testing.assert_array_equal(train[rows["cat/0.png"]]["pixel_values"], np.asarray(_image(seed=0)))
    with pytest.raises(ValueError, match=r"cannot read image file '.*dog[/\\]1\.png'"):
        train[rows["dog/1.png"]]


def _jpeg_bytes(img):
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_check_images_names_every_unreadable_file_before_training(tmp_path):
    _write_image_folder(tmp_path / "imgs", per_class=4)
    val = tmp_path / "imgs" / "validation"
    (val / "dog" / "1.png").write_bytes((val / "dog" / "1.png").read_bytes()[:60])  # truncated PNG
    (val / "cat" / "page.jpg").write_text("<html>404 not found</html>")  # a web page saved as an image
    whole = _jpeg_bytes(_image(size=(64, 48), seed=3))
    (val / "cat" / "cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # a JPEG whose header reads fine
    data = load_image_dataset(str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    train, evaluation, image_column, label_column, _ = prepare_splits(
        data["train"], data["validation"], "validation", decode_images=False
    )
    check_images(train, image_column, "train")  # all readable: nothing raised
    # as the recipes call it: after set_transform (the check reads the stored rows, not pixel tensors)
    evaluation.set_transform(ImageClassificationTransform(lambda im: np.asarray(im), image_column, label_column))
    with pytest.raises(ValueError) as error:
        check_images(evaluation, image_column, "validation", num_threads=2)
    message = str(error.value)
    assert message.startswith("3 of the 10 images of split 'validation' cannot be read")
    for name in (r"dog[/\\]1\.png", r"cat[/\\]page\.jpg", r"cat[/\\]cut\.jpg"):
        assert re.search(rf"cannot read image file '[^']*{name}'", message), (name, message)
    assert "truncated" in message and "--check_images none" in message
    # many bad files: the first few are listed, and how many there are in all
    with pytest.raises(ValueError, match=r"(?s)3 of the 10 images.*cannot be read:\n  [^\n]*\n  \.\.\.\nRemove"):
        check_images(evaluation, image_column, "validation", max_listed=1)


def test_check_images_reads_embedded_bytes_and_decodes_like_training():
    rows = [_png_bytes(_image(seed=i)) for i in range(5)] + [b"not an image"]
    ds = Dataset.from_dict({"img": rows, "label": [0, 1, 0, 1, 0, 1]})
    train, _, image_column, _, _ = prepare_splits(ds, ds, "train", decode_images=False)
    with pytest.raises(ValueError, match=r"1 of the 6 images of split 'train' cannot be read:\n  row 5: cannot read an image "
                                         r"\(embedded bytes without a file name\): UnidentifiedImageError"):
        check_images(train, image_column, "train")
    check_images(train.select(range(5)), image_column, "train")
    # decoded (Image(decode=True)) datasets are read undecoded by the check, so the error still names the problem
    with pytest.raises(ValueError, match=r"1 of the 6 images"):
        check_images(ds.cast_column("img", Image()), "img", "train")
    # rows without a file name are named by their row; an empty value is said to be one
    gaps = Dataset.from_dict({"img": [{"bytes": rows[0], "path": None}, {"bytes": None, "path": None},
                                      {"bytes": b"junk", "path": None}], "label": [0, 1, 0]})
    with pytest.raises(ValueError, match=r"2 of the 3 images.*:\n  row 1: no image \(an empty value\)\n  row 2: cannot "
                                         r"read an image \(embedded bytes"):
        check_images(gaps.cast_column("img", Image(decode=False)), "img", "train")


def test_check_split_images_reports_both_splits_in_one_error():
    good = [_png_bytes(_image(seed=i)) for i in range(3)]
    train = Dataset.from_dict({"img": good + [b"bad"]}).cast_column("img", Image(decode=False))
    evaluation = Dataset.from_dict({"img": [b"bad"] + good}).cast_column("img", Image(decode=False))
    with pytest.raises(ValueError) as error:
        check_split_images("all", train, evaluation, "img", "train", "validation")
    message = str(error.value)
    assert "1 of the 4 images of split 'train' cannot be read:\n  row 3:" in message
    assert "1 of the 4 images of split 'validation' cannot be read:\n  row 0:" in message
    with pytest.raises(ValueError, match=r"split 'validation'") as error:
        check_split_images("eval", train, evaluation, "img", "train", "validation")
    assert "'train'" not in str(error.value)
    check_split_images("none", train, evaluation, "img", "train", "validation")  # nothing read
    with pytest.raises(ValueError, match=r"--check_images must be eval, all or none, got 'train'"):
        check_split_images("train", train, evaluation, "img", "train", "validation")


def test_metric_for_best_model_must_be_one_the_evaluation_reports():
    for metric in (None, "loss", "eval_loss", "top1", "eval_top1"):
        check_metric_for_best_model(metric, 3)
    check_metric_for_best_model("top5", 6)
    with pytest.raises(ValueError, match=r"'eval_top5' is not a metric the evaluation reports \(top5 is not reported "
                                         r"with 5 classes: every label is among the five best\); choose one of loss, top1$"):
        check_metric_for_best_model("eval_top5", 5)
    with pytest.raises(ValueError, match=r"'accuracy' is not a metric the evaluation reports; choose one of loss, top1, top5"):
        check_metric_for_best_model("accuracy", 100)


@pytest.mark.slow
def test_check_images_raises_on_every_process_when_one_finds_a_bad_image(tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from two_ranks import launch_two_ranks

    r0, r1 = launch_two_ranks("check_images_run.py", tmp_path)
    assert r0["world_size"] == r1["world_size"] == 2 and {r0["rank"], r1["rank"]} == {0, 1}
    # the bad rows (3 and 5) are rank 1's share; rank 0 raises the same, complete error
    assert r0["error"] is not None and r0["error"] == r1["error"]
    assert r0["error"].startswith("2 of the 8 images of split 'validation' cannot be read")
    assert "'img3.png'" in r0["error"] and "'img5.png'" in r0["error"]


def test_classes_without_training_images_are_warned_about(caplog):
    ds = Dataset.from_dict(
        {"image": [_image(seed=i) for i in range(6)], "label": [0, 0, 1, 1, 2, 2]},
        features=Features({"image": Image(), "label": ClassLabel(names=["ant", "bee", "cow"])}),
    )
    with caplog.at_level("WARNING", logger="ela_hf.training.data"):
        prepare_splits(ds, ds, "validation")
    assert "no training images" not in caplog.text
    with caplog.at_level("WARNING", logger="ela_hf.training.data"):
        prepare_splits(ds.select([0, 1, 2, 3]), ds.select([0]), "validation", class_source=ds)
    assert "1 of the 3 classes have no training images: 'cow'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ela_hf.training.data"):
        prepare_splits(ds, ds, "validation", max_train_samples=1)
    assert "2 of the 3 classes have no training images (--max_train_samples drew a subset" in caplog.text


def test_a_pruning_run_turns_on_ddps_unused_parameter_search(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from ela_hf.training import ddp_for_pruning

    def schedule(windows):
        return resolve_schedule(PaperSchedule(epochs=4, lr_decay_epochs=(), warmup_epochs=0, kl_windows=windows),
                                _args(), 4)

    left_unset = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    ddp_for_pruning(left_unset, schedule(((1, 1),)))
    assert left_unset.ddp_find_unused_parameters is True
    unpruned = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    ddp_for_pruning(unpruned, schedule(()))
    assert unpruned.ddp_find_unused_parameters is None  # no search overhead for a run that skips nothing
    chosen = TrainingArguments(output_dir=str(tmp_path), report_to="none", ddp_find_unused_parameters=False)
    ddp_for_pruning(chosen, schedule(((1, 1),)))
    assert chosen.ddp_find_unused_parameters is False  # the callback then refuses it with a clear error
    # a resume without windows of a checkpoint whose layers are skipped: the search too
    from ela_hf import ElaConfig, ElaForImageClassification

    model = ElaForImageClassification(ElaConfig(architecture="ela_resnet20_cifar", num_labels=2))
    model.save_pretrained(tmp_path / "unpruned")
    model.set_skip_mask([[False, False], [False, True], [False, False]])
    model.save_pretrained(tmp_path / "pruned")
    resumed = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    ddp_for_pruning(resumed, schedule(()), str(tmp_path / "pruned"))
    assert resumed.ddp_find_unused_parameters is True
    unpruned = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    ddp_for_pruning(unpruned, schedule(()), str(tmp_path / "unpruned"))
    assert unpruned.ddp_find_unused_parameters is None
    off = TrainingArguments(output_dir=str(tmp_path), report_to="none", ddp_find_unused_parameters=False)
    ddp_for_pruning(off, schedule(()), str(tmp_path / "pruned"))  # one process: no DDP, nothing to refuse
    monkeypatch.setattr(type(off), "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"has skipped attention layers.*--ddp_find_unused_parameters True"):
        ddp_for_pruning(off, schedule(()), str(tmp_path / "pruned"))


def test_a_class_with_evaluation_images_only_is_an_error(tmp_path):
    """datasets takes an image folder's classes from every split: validation/owl/ (or Cat/ beside train/cat/)
    would become a class that is never trained."""
    _write_image_folder(tmp_path / "imgs")
    _write_image_folder(tmp_path / "imgs", splits=("validation",), classes=("owl",), per_class=1)
    data = load_image_dataset(str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    assert class_names(data["train"], "label") == ["cat", "dog", "owl"]
    with pytest.raises(ValueError, match=r"split 'validation' has images of 1 class\(es\) the training split has "
                                         r"no image of: 'owl'"):
        prepare_splits(data["train"], data["validation"], "validation", class_source=data["train"])
    # a class the training split has but the evaluation split lacks is fine
    _write_image_folder(tmp_path / "ok")
    _write_image_folder(tmp_path / "ok", splits=("train",), classes=("owl",), per_class=1)
    data = load_image_dataset(str(tmp_path / "ok"), cache_dir=str(tmp_path / "cache"))
    assert prepare_splits(data["train"], data["validation"], "validation")[4] == ["cat", "dog", "owl"]


def test_split_folders_datasets_would_misread_are_named(tmp_path, caplog):
    # capitalised split folders: datasets reads everything as training data (validation would leak into it)
    _write_image_folder(tmp_path / "caps", splits=("Train", "Validation"))
    with pytest.raises(ValueError, match=r"the folders Train/, Validation/ look like splits.*lower case"):
        load_image_dataset(str(tmp_path / "caps"), cache_dir=str(tmp_path / "cache"))
    # a folder beside the split folders is not read at all
    _write_image_folder(tmp_path / "extra", splits=("train", "val", "holdout"))
    with caplog.at_level("WARNING"):
        data = load_image_dataset(str(tmp_path / "extra"), cache_dir=str(tmp_path / "cache"))
    assert set(data) == {"train", "validation"}
    assert "the folders holdout/ are not read" in caplog.text
    caplog.clear()
    # a class folder named like a split: datasets reads its images into that split as well
    _write_image_folder(tmp_path / "birds", classes=("cat", "val_birds"))
    with pytest.raises(ValueError, match=r"the class folders train/val_birds/, validation/val_birds/ are named like a split"):
        load_image_dataset(str(tmp_path / "birds"), cache_dir=str(tmp_path / "cache"))
    # the usual layouts say nothing: split folders, a flat folder of classes (also ones named "Train" or
    # "Test_Tube": folders of images are classes), split folders one level down
    _write_image_folder(tmp_path / "plain")
    _write_image_folder(tmp_path / "flat", splits=(".",))
    _write_image_folder(tmp_path / "flat_caps", splits=(".",), classes=("Train", "Test_Tube", "beaker"))
    _write_image_folder(tmp_path / "nested", splits=("imagenet/train", "imagenet/validation"))
    with caplog.at_level("WARNING"):
        for name in ("plain", "flat", "flat_caps", "nested"):
            load_image_dataset(str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
    assert "not read" not in caplog.text and "look like splits" not in caplog.text
    assert "hold no image" not in caplog.text


def test_class_folders_without_readable_images_are_named_not_dropped(tmp_path, caplog):
    """datasets names the classes after the folders of the images it reads: a class folder of .heic photos, or an
    empty one, would silently be no class at all."""
    _write_image_folder(tmp_path / "phone")
    for split in ("train", "validation"):
        (tmp_path / "phone" / split / "owl").mkdir()
        for i in range(2):
            (tmp_path / "phone" / split / "owl" / f"IMG_{i}.HEIC").write_bytes(b"ftypheic")
    (tmp_path / "phone" / "train" / "owl" / "notes.txt").write_text("shot on a phone")
    with pytest.raises(ValueError, match=r"no image that datasets reads in the class folder\(s\) train/owl/: 2 \.heic, "
                                         r"1 \.txt; validation/owl/: 2 \.heic: their images would be left out"):
        load_image_dataset(str(tmp_path / "phone"), cache_dir=str(tmp_path / "cache"))
    # flat, converted images beside the originals (IMG_9.jpg from IMG_9.HEIC): the class is read, nothing said
    _write_image_folder(tmp_path / "flat", splits=(".",), classes=("cat", "owl"))
    (tmp_path / "flat" / "owl" / "IMG_9.HEIC").write_bytes(b"ftypheic")
    _image().save(tmp_path / "flat" / "owl" / "IMG_9.jpg")
    (tmp_path / "flat" / "empty").mkdir()
    (tmp_path / "flat" / "empty" / ".DS_Store").write_bytes(b"")
    def load_flat():  # the flat folder as it is now, and the warnings that load gave
        caplog.clear()
        with caplog.at_level("WARNING"):
            return load_image_dataset(str(tmp_path / "flat"), cache_dir=str(tmp_path / "cache"))

    data = load_flat()
    assert data["train"].features["label"].names == ["cat", "owl"]
    assert "the folders empty/ hold no image that datasets reads: no class (or no image of that class in that " \
           "split) comes from them; the 2 classes are the folders with images" in caplog.text
    assert "left out" not in caplog.text
    # ... but phone photos not converted, beside ones that are read: the class stays, with fewer images than the
    # folder holds; each folder's count is named (a twin in another folder does not count)
    (tmp_path / "flat" / "owl" / "IMG_7.heic").write_bytes(b"ftypheic")
    (tmp_path / "flat" / "owl" / "IMG_7.dng").write_bytes(b"II*")
    (tmp_path / "flat" / "cat" / "IMG_9.avif").write_bytes(b"ftypavif")
    data = load_flat()
    assert data["train"].num_rows == 5
    assert "3 image(s) of a format datasets does not read are left out, in the class folder(s) cat/: 1 .avif " \
           "beside 2 read; owl/: 1 .dng, 1 .heic beside 3 read. Convert them to JPEG or PNG" in caplog.text
    # a twin named after the whole original (IMG_7.heic.jpg) counts too; a linked folder inside a class folder,
    # which datasets does not follow, is not walked (this one loops)
    _image().save(tmp_path / "flat" / "owl" / "IMG_7.heic.jpg")
    os.symlink("..", tmp_path / "flat" / "owl" / "up")
    data = load_flat()
    assert data["train"].num_rows == 6
    assert "2 image(s) of a format datasets does not read are left out, in the class folder(s) cat/: 1 .avif " \
           "beside 2 read; owl/: 1 .dng beside 4 read." in caplog.text
    # a class trained from .png but evaluated from .heic: its evaluation images would vanish
    _write_image_folder(tmp_path / "mixed", classes=("cat", "owl"))
    for i in range(2):
        (tmp_path / "mixed" / "validation" / "owl" / f"{i}.png").unlink()
        (tmp_path / "mixed" / "validation" / "owl" / f"IMG_{i}.HEIC").write_bytes(b"ftypheic")
    with pytest.raises(ValueError, match=r"class folder\(s\) validation/owl/: 2 \.heic: their images would be left out"):
        load_image_dataset(str(tmp_path / "mixed"), cache_dir=str(tmp_path / "cache"))
    # a Hub-style repository: split folders under data/, and an assets/ folder that datasets does not read
    _write_image_folder(tmp_path / "hub" / "data")
    os.makedirs(tmp_path / "hub" / "assets")
    (tmp_path / "hub" / "assets" / "banner.svg").write_text("<svg/>")
    caplog.clear()
    with caplog.at_level("WARNING"):
        data = load_image_dataset(str(tmp_path / "hub"), cache_dir=str(tmp_path / "cache"))
    assert data["train"].features["label"].names == ["cat", "dog"] and "hold no image" not in caplog.text


def test_folder_layouts_datasets_misreads_are_named_by_their_cause(tmp_path):
    # one image beside the class folders: datasets turns the labels off for every image; the image is named
    _write_image_folder(tmp_path / "stray")
    _image().save(tmp_path / "stray" / "train" / "stray.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) sit at another folder depth than the other 8 \(like "
                                         r"train/cat/0\.png\): train/stray\.png\. datasets then turns the class labels off"):
        load_image_dataset(str(tmp_path / "stray"), cache_dir=str(tmp_path / "cache"))
    # a metadata file beside the class folders: datasets takes its columns instead of the folders' classes
    _write_image_folder(tmp_path / "meta")
    for split in ("train", "validation"):
        rows = [f"{c}/{i}.png,ann" for c in ("cat", "dog") for i in range(2)]
        (tmp_path / "meta" / split / "metadata.csv").write_text("file_name,photographer\n" + "\n".join(rows) + "\n")
    data = load_image_dataset(str(tmp_path / "meta"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"columns: image \(Image\), photographer \(.*string\)\. Name it with "
                                         r"--label_column \(a folder of images with a metadata\.csv.*remove it to use"):
        prepare_splits(data["train"], data["validation"], "validation")
    # a flat folder of classes, two named with split keywords: datasets reads those as splits
    _write_image_folder(tmp_path / "lab", splits=(".",), classes=("beaker", "test tube", "evaluation_set"))
    with pytest.raises(ValueError, match=r"the folders evaluation_set/, test tube/ hold images directly, as the class "
                                         r"folders beside them do \(beaker/\), but datasets reads a folder named like a"):
        load_image_dataset(str(tmp_path / "lab"), cache_dir=str(tmp_path / "cache"))
    # split folders of images without class folders are not that: a labelled train/ beside an unlabelled test/
    # (Kaggle) is named by its stray depth; datasets' metadata layout (train/metadata.csv) loads
    _write_image_folder(tmp_path / "kaggle", splits=("train",))
    os.makedirs(tmp_path / "kaggle" / "test")
    _image().save(tmp_path / "kaggle" / "test" / "0.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) sit at another folder depth than the other 4 \(like "
                                         r"train/cat/0\.png\): test/0\.png"):
        load_image_dataset(str(tmp_path / "kaggle"), cache_dir=str(tmp_path / "cache"))
    for split in ("train", "test"):
        os.makedirs(tmp_path / "metadata" / split)
        for i in range(4):
            _image(seed=i).save(tmp_path / "metadata" / split / f"{i}.png")
        (tmp_path / "metadata" / split / "metadata.csv").write_text(
            "file_name,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(4)))
    (tmp_path / "metadata" / "test" / "._0.png").write_bytes(b"")  # macOS AppleDouble file: not an image
    data = load_image_dataset(str(tmp_path / "metadata"), cache_dir=str(tmp_path / "cache"))
    assert sorted(data) == ["test", "train"] and data["train"]["label"] == [0, 1, 0, 1]


@pytest.mark.parametrize("train_name, eval_name, why", [
    ("caf\u00e9", "cafe\u0301", "Unicode normalisation"), ("red", "red ", "spaces at the ends"), ("Owl", "owl", "case"),
    ("red", " Red", "spaces at the ends and case"),
])
def test_an_evaluation_class_that_only_looks_like_a_training_class_says_how_it_differs(tmp_path, train_name, eval_name,
                                                                                       why):
    for split, names in (("train", ("cat", train_name)), ("validation", ("cat", eval_name))):
        for name in names:
            os.makedirs(tmp_path / "imgs" / split / name)
            _image().save(tmp_path / "imgs" / split / name / "0.png")
            _image(seed=1).save(tmp_path / "imgs" / split / name / "1.png")
    data = load_image_dataset(str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=re.escape(f"{eval_name!r} (training has {train_name!r}: the names differ in {why}")):
        prepare_splits(data["train"], data["validation"], "validation")


def test_folders_linked_in_are_refused_not_left_out(tmp_path):
    """datasets does not follow symbolic links to folders: a linked class folder used to vanish from the model
    (2 classes instead of 3), a linked split folder from the data, without a word. Linked images are read."""
    import os

    _write_image_folder(tmp_path / "elsewhere", splits=("train", "validation"), classes=("owl",))
    _write_image_folder(tmp_path / "classes")
    for split in ("train", "validation"):
        os.symlink(tmp_path / "elsewhere" / split / "owl", tmp_path / "classes" / split / "owl")
    with pytest.raises(ValueError, match=r"train/owl/, validation/owl/ are symbolic links to a folder, which "
                                         r"datasets does not follow"):
        load_image_dataset(str(tmp_path / "classes"), cache_dir=str(tmp_path / "cache"))
    _write_image_folder(tmp_path / "split", splits=("validation",))
    os.symlink(tmp_path / "elsewhere" / "train", tmp_path / "split" / "train")
    with pytest.raises(ValueError, match=r"'.*split': train/ is a symbolic link to a folder"):
        load_image_dataset(str(tmp_path / "split"), cache_dir=str(tmp_path / "cache"))
    _write_image_folder(tmp_path / "flat", splits=(".",))
    os.symlink(tmp_path / "elsewhere" / "train" / "owl", tmp_path / "flat" / "owl")
    with pytest.raises(ValueError, match=r"owl/ is a symbolic link to a folder"):
        load_image_dataset(str(tmp_path / "flat"), cache_dir=str(tmp_path / "cache"))
    # linked images are fine
    _write_image_folder(tmp_path / "files")
    image = next((tmp_path / "elsewhere" / "train" / "owl").iterdir())
    os.symlink(image, tmp_path / "files" / "train" / "cat" / ("linked" + image.suffix))
    data = load_image_dataset(str(tmp_path / "files"), cache_dir=str(tmp_path / "cache"))
    assert len(data["train"]) == len(list((tmp_path / "files" / "train").rglob("*.*")))


def test_a_folder_with_one_class_is_told_it_needs_two(tmp_path):
    _write_image_folder(tmp_path / "one", classes=("cat",))
    data = load_image_dataset(str(tmp_path / "one"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="a folder with a single class"):
        prepare_splits(data["train"], data["validation"], "validation")


# ------------------------------------------------------------------------------------------------
# TrainingArguments against the recipes, resume, output folder


def _training_args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kw)


def test_training_arguments_the_recipes_would_ignore_are_refused(tmp_path, monkeypatch):
    from ela_hf.training import check_training_arguments

    targs = _training_args(tmp_path)
    for argv, name in [(["--optim", "adamw_torch"], "optim"), (["--lr_scheduler_type=cosine"], "lr_scheduler_type"),
                       (["--warmup-steps", "3"], "warmup_steps"), (["--warmup_st", "3"], "warmup_steps"),
                       (["--lr_scheduler_ty", "cosine"], "lr_scheduler_type"), (["--optim_ar", "x=1"], "optim_args")]:
        with pytest.raises(ValueError, match=f"--{name} is not used: the recipes"):
            check_training_arguments(_args(), targs, 32, argv)
    check_training_arguments(_args(), targs, 32, ["--learning_rate", "0.1", "--bf16", "--warmup_epochs", "1", "--lr", "1"])
    # NaN would train NaN weights for the whole run and fail only at the export
    for name, value in [("learning_rate", float("nan")), ("weight_decay", float("inf")), ("learning_rate", -0.1)]:
        with pytest.raises(ValueError, match=f"--{name} must be a finite number >= 0"):
            check_training_arguments(_args(), _training_args(tmp_path, **{name: value}), 32, [])
    from ela_hf.training.arguments import parse_epochs

    assert parse_epochs("30,60.5") == [30.0, 60.5]
    for text in ("1,1", "nan", "2,inf", "3,2", "0"):
        with pytest.raises(ValueError, match="must be finite, positive and strictly increasing"):
            parse_epochs(text)
    paper = PaperSchedule(epochs=4, lr_decay_epochs=(), warmup_epochs=0, kl_windows=())
    for warmup in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="--warmup_epochs must be finite and >= 0"):
            resolve_schedule(paper, _args(warmup_epochs=warmup), 4)
    # a batch of one image cannot be batch-normalised where the last stage is 1x1
    one = _training_args(tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="--per_device_train_batch_size 1 with ela_resnet18 at 32x32: its last stage is 1x1"):
        check_training_arguments(_args(model="ela_resnet18", image_size=32), one, 224, [])
    check_training_arguments(_args(model="ela_resnet18", image_size=64), one, 224, [])  # 2x2
    # --push_to_hub without a token fails now, not after training
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ValueError, match="--push_to_hub needs a Hugging Face token"):
        check_training_arguments(_args(), _training_args(tmp_path, push_to_hub=True), 32, [])
    check_training_arguments(_args(), _training_args(tmp_path, push_to_hub=True, hub_token="hf_x"), 32, [])


def test_an_epochs_last_batch_never_holds_a_single_image_where_the_last_stage_is_1x1():
    import torch.nn.functional as F
    from ela_hf.training import avoid_single_image_batch, final_feature_size, min_image_size

    assert min_image_size("ela_resnet50d") == 32 and min_image_size("ela_resnet20_cifar") == 4
    assert final_feature_size("ela_resnet18", 32) == 1 and final_feature_size("ela_resnet18", 64) == 2
    assert final_feature_size("ela_resnet20_cifar", 32) == 8
    ds = Dataset.from_dict({"label": list(range(9))})
    assert len(avoid_single_image_batch(ds, "ela_resnet18", 32, 4)) == 8  # 4 + 4 + 1 -> 4 + 4
    assert len(avoid_single_image_batch(ds, "ela_resnet18", 64, 4)) == 9  # 2x2: a batch of one is fine
    assert len(avoid_single_image_batch(ds, "ela_resnet18", 32, 4, world_size=2)) == 9  # padded by Accelerate
    assert len(avoid_single_image_batch(ds, "ela_resnet18", 32, 3)) == 9  # 3 + 3 + 3
    # why: batch norm refuses one value per channel in training
    import timm

    model = timm.create_model("ela_resnet18", num_classes=3).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.cross_entropy(model(torch.randn(1, 3, 32, 32)), torch.tensor([0]))


def test_a_resume_keeps_this_runs_lr_schedule_and_says_the_checkpoint_had_another(caplog):
    from ela_hf.training import create_step_scheduler

    def scheduler(steps_per_epoch, decay, lr=0.1):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return opt, create_step_scheduler(opt, steps_per_epoch, 0.0, decay)

    opt, old = scheduler(2, [1])
    for _ in range(3):
        opt.step()
        old.step()
    state = old.state_dict()
    opt, same = scheduler(2, [1])
    with caplog.at_level("WARNING"):
        same.load_state_dict(state)
    assert caplog.text == "" and same.last_epoch == 3
    opt, new = scheduler(5, [2], lr=0.2)  # the run was resumed with other epochs and batch size
    # as the Trainer resumes: the optimizer's state (with the checkpoint's lr, 0.1 * 0.1) first, then the schedule
    saved_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    saved_opt.load_state_dict(opt.state_dict())
    saved_opt.param_groups[0]["lr"] = 0.01
    opt.load_state_dict(saved_opt.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    with caplog.at_level("WARNING"):
        new.load_state_dict(state)
    assert new.last_epoch == 3, "the step count comes from the checkpoint"
    assert new.lr_lambdas[0].decay_steps == [10] and new.base_lrs == [0.2], "the schedule and lr from this run"
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2) and new.get_last_lr() == pytest.approx([0.2]), \
        "the first step after the resume already runs at this run's lr"
    opt.step()
    new.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # step 4 < 10: no decay yet (the old schedule: 0.01)
    assert "the checkpoint's learning-rate schedule differs" in caplog.text
    assert "the checkpoint's learning rate differs" in caplog.text


def test_a_resume_keeps_this_runs_momentum_and_weight_decay_and_says_the_checkpoint_had_others(caplog):
    from ela_hf.training import create_sgd, create_step_scheduler

    model = torch.nn.Linear(2, 2)

    def run(momentum, weight_decay):
        opt = create_sgd(model, 0.1, momentum, weight_decay)
        return opt, create_step_scheduler(opt, 2, 0.0, [1])

    opt, sched = run(0.9, 1e-4)
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    assert "_run_groups" not in saved_sched, "a checkpoint keeps no run's settings to bring back"
    # as the Trainer resumes: the optimizer's state first (it brings the checkpoint's settings), then the schedule
    opt, sched = run(0.8, 5e-4)
    opt.load_state_dict(saved_opt)
    assert opt.param_groups[0]["weight_decay"] == 1e-4  # torch: the checkpoint's, which the card would not show
    with caplog.at_level("WARNING"):
        sched.load_state_dict(saved_sched)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 5e-4 and group["momentum"] == 0.8, "this run's settings, as its card says"
    assert "momentum_buffer" in next(iter(opt.state.values())), "the checkpoint's momentum buffers stay"
    assert "weight_decay 0.0001 (checkpoint) -> 0.0005 (this run)" in caplog.text
    assert "momentum 0.9 (checkpoint) -> 0.8 (this run)" in caplog.text
    caplog.clear()
    opt, sched = run(0.9, 1e-4)
    opt.load_state_dict(saved_opt)
    with caplog.at_level("WARNING"):
        sched.load_state_dict(saved_sched)
    assert caplog.text == "" and opt.param_groups[0]["weight_decay"] == 1e-4


def test_max_steps_and_fractional_epochs_rescale_the_lr_to_the_real_length(tmp_path, caplog):
    from ela_hf.training import card_settings

    schedule = resolve_schedule(IMAGENET_PAPER, _args(kl_windows="1-1"), 100, max_steps=7, steps_per_epoch=5)
    assert schedule.num_epochs == 2 and schedule.run_epochs == pytest.approx(1.4)
    assert schedule.lr_decay_epochs == pytest.approx([0.42, 0.84, 1.26])
    card = card_settings("imagenet", _args(kl_windows="1-1"), _training_args(tmp_path, max_steps=7), schedule, 0.1, 4)
    assert card["epochs"] == 1.4 and card["max_steps"] == 7 and schedule.describe().startswith("1.4 epochs;")
    whole = resolve_schedule(IMAGENET_PAPER, _args(), 10, steps_per_epoch=5)
    assert card_settings("imagenet", _args(), _training_args(tmp_path), whole, 0.1, 4)["epochs"] == 10
    # drop path acts on the attention branch: a plain baseline's card does not claim one
    assert card_settings("imagenet", _args(), _training_args(tmp_path), whole, 0.1, 4)["drop_path_rate"] == 0.2
    plain = card_settings("imagenet", _args(model="resnet20_cifar"), _training_args(tmp_path), whole, 0.1, 4)
    assert plain["drop_path_rate"] is None
    half = resolve_schedule(IMAGENET_PAPER, _args(kl_windows="1-1"), 1.5, steps_per_epoch=5)
    assert half.lr_decay_epochs == pytest.approx([0.45, 0.9, 1.35]) and half.num_epochs == 2
    with caplog.at_level("WARNING"):
        resolve_schedule(IMAGENET_PAPER, _args(kl_windows="1-1", warmup_epochs=5), 2, steps_per_epoch=5)
    assert "--warmup_epochs 5 is longer than the run (2 epochs)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # 0.5 epochs = 2.5 -> 2 steps of a 2-step run: the full lr is reached
        resolve_schedule(IMAGENET_PAPER, _args(kl_windows="1-1", warmup_epochs=0.5), 100, 2, steps_per_epoch=5)
    assert "never reaches" not in caplog.text and "none happens" not in caplog.text
    with caplog.at_level("WARNING"):  # the paper's 3 of 100 epochs rescaled to 1.4: 0.042 epochs, 0.21 steps
        resolve_schedule(IMAGENET_PAPER, _args(kl_windows="1-1"), 100, 7, steps_per_epoch=5)
    assert "a warm-up of 0.042 epochs is less than half an optimizer step (5 per epoch): none happens" in caplog.text


def test_output_folder_checks_before_training(tmp_path):
    from ela_hf.training import check_export_dir, remove_stale_pruning_history

    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    (out / "export" / "config.json").write_text("{}")
    check_export_dir(None, str(out))  # an earlier export is replaced at the end
    (tmp_path / "other_run" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"--export_dir '.*other_run': .* is not an earlier export: it holds checkpoint-5/"):
        check_export_dir(str(tmp_path / "other_run"), str(out))
    # an earlier run's pruning history does not describe a run without windows
    (out / "pruning_history.json").write_text("{}")
    targs = _training_args(tmp_path)
    remove_stale_pruning_history(targs, resuming=True, pruning=False)
    remove_stale_pruning_history(targs, resuming=False, pruning=True)  # the callback replaces it
    assert (out / "pruning_history.json").exists()
    remove_stale_pruning_history(targs, resuming=False, pruning=False)
    assert not (out / "pruning_history.json").exists()


def test_lr_batch_size_zero_means_no_scaling_and_dot_names_the_folder(tmp_path, monkeypatch):
    assert scale_learning_rate(0.1, 0, 512) == 0.1 and scale_learning_rate(0.1, 256, 512) == 0.2
    validate_recipe_arguments(_args(lr_batch_size=0))
    with pytest.raises(ValueError, match="--lr_batch_size must be positive"):
        validate_recipe_arguments(_args(lr_batch_size=-1))
    (tmp_path / "flowers").mkdir()
    monkeypatch.chdir(tmp_path / "flowers")
    assert release_name("ela_resnet18", ".") == "ela_resnet18-flowers"
    assert release_name("ela_resnet18", "./") == "ela_resnet18-flowers"
    (tmp_path / "roses").symlink_to(tmp_path / "flowers")
    assert release_name("ela_resnet18", str(tmp_path / "roses")) == "ela_resnet18-roses", "a link keeps its name"


def test_recipe_help_describes_what_the_recipes_do(capsys):
    from transformers import HfArgumentParser, TrainingArguments
    from ela_hf.training import recipe_help

    parser = HfArgumentParser((RecipeArguments, TrainingArguments))
    recipe_help(parser)
    text = parser.format_help()
    assert "'last' for the newest complete checkpoint-*" in " ".join(text.split())
    assert "Not used by the recipes (refused)" in text


def test_the_cifar_releases_preprocessing_is_the_recipes_evaluation_on_any_image_shape():
    """The export's pretrained_cfg drives timm's transforms and the image processor: for the CIFAR recipe they
    must squash every image to the input size as its evaluation did, not resize and centre-crop."""
    import timm

    from ela_hf import ElaImageProcessor
    from ela_hf.training import recipe_pretrained_cfg

    for model, size in (("ela_resnet20_cifar", None), ("ela_resnet20_cifar", 40), ("ela_resnet18", 64)):
        cfg = recipe_pretrained_cfg(model, "cifar", size)
        _, evaluate = build_transforms(timm.data.resolve_data_config(pretrained_cfg=cfg), "cifar")
        processor = ElaImageProcessor(pretrained_cfg=cfg)
        timm_eval = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg))
        for shape in ((48, 24, 3), (20, 33, 3), (32, 32, 3)):
            image = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
            expected = evaluate(image)
            torch.testing.assert_close(processor(image)["pixel_values"][0], expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(timm_eval(image), expected, rtol=0, atol=1e-6)
    imagenet = recipe_pretrained_cfg("ela_resnet18", "imagenet", 96)
    assert imagenet["input_size"] == (3, 96, 96) and imagenet["crop_mode"] == "center"


def test_argument_checks_added_after_a_users_review(tmp_path, caplog):
    """Batch sizes of 0, a resume from another model's checkpoint, an export into a Trainer-managed folder,
    and a rescaled lr step that rounds past the run's last step."""

    from ela_hf.training import check_export_dir, check_training_arguments, create_sgd, create_step_scheduler

    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        with pytest.raises(ValueError, match=f"--{name} must be at least 1, got 0"):
            check_training_arguments(_args(), _training_args(tmp_path, **{name: 0}), 32, [])

    checkpoint = tmp_path / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (checkpoint / "config.json").write_text(json.dumps({"architecture": "ela_resnet20_cifar"}))
    targs = _training_args(tmp_path, resume_from_checkpoint=str(checkpoint))
    assert resolve_checkpoint(targs, "ela_resnet20_cifar") == str(checkpoint)
    with pytest.raises(ValueError, match=r"holds a ela_resnet20_cifar \(its config.json\), not the --model ela_l_res"):
        resolve_checkpoint(targs, "ela_l_resnet20_cifar")

    # a checkpoint that already ran every step of this run (the Trainer would train one step past the end)
    from ela_hf.training import check_checkpoint_unfinished

    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    with pytest.raises(ValueError, match=r"has already trained 4 of this run's 4 steps.*that checkpoint is the "
                                         r"trained model; add --export_only to evaluate and export it"):
        check_checkpoint_unfinished(str(checkpoint), 4)
    check_checkpoint_unfinished(str(checkpoint), 5)
    check_checkpoint_unfinished(None, 4)
    # half the images removed since: the same epochs are fewer steps now, which the refusal says
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 15, "epoch": 3.0}))
    with pytest.raises(ValueError, match=r"has already trained 15 of this run's 12 steps \(it ran 15 steps in 3 "
                                         r"epochs, 5 an epoch; the training set, batch size"):
        check_checkpoint_unfinished(str(checkpoint), 12)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    # --export_only wants the reverse: a checkpoint that ran every step of this run
    from ela_hf.training import check_checkpoint_finished

    check_checkpoint_finished(str(checkpoint), 4)
    with pytest.raises(ValueError, match=r"has trained 4 of this run's 5 steps; drop --export_only to train on"):
        check_checkpoint_finished(str(checkpoint), 5)
    with pytest.raises(ValueError, match=r"--export_only exports a finished run's checkpoint: name it with"):
        check_checkpoint_finished(None, 4)
    (checkpoint / "trainer_state.json").write_text("{")  # cut short
    with pytest.raises(ValueError, match=r"no readable trainer_state.json, so nothing says it finished"):
        check_checkpoint_finished(str(checkpoint), 4)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    # with this run's card settings: the ones the checkpoint records (RunSettingsCallback) must match
    from types import SimpleNamespace

    from ela_hf.training import RUN_SETTINGS_FILE, RunSettingsCallback

    settings = {"learning_rate": 0.1, "seed": 3, "kl_windows": "1-3 (epochs)", "lr_schedule": "x0.1 after epochs 2"}
    with caplog.at_level("WARNING"):
        check_checkpoint_finished(str(checkpoint), 4, settings)
    assert f"has no readable {RUN_SETTINGS_FILE} (a checkpoint of an older ela_hf?)" in caplog.text
    caplog.clear()
    saver = RunSettingsCallback(settings)
    settings["seed"] = 4  # the callback keeps its own copy
    state = SimpleNamespace(global_step=4)
    saver.on_save(SimpleNamespace(output_dir=str(checkpoint.parent), should_save=False), state, None)
    assert not (checkpoint / RUN_SETTINGS_FILE).exists(), "only the processes that save write it"
    saver.on_save(SimpleNamespace(output_dir=str(checkpoint.parent), should_save=True), state, None)
    recorded = json.loads((checkpoint / RUN_SETTINGS_FILE).read_text())
    assert recorded["seed"] == 3 and [p.name for p in checkpoint.iterdir() if ".tmp" in p.name] == []
    with pytest.raises(ValueError, match=r"checkpoint-4' was trained with other settings than this command's, which "
                                         r"its model card would show: seed 3 there, 4 here \(its run_settings.json\)"):
        check_checkpoint_finished(str(checkpoint), 4, settings)
    settings.update(seed=3, card_key_of_a_newer_version="x")
    recorded["card_key_of_an_older_version"] = "y"
    (checkpoint / RUN_SETTINGS_FILE).write_text(json.dumps(recorded))
    with caplog.at_level("WARNING"):
        check_checkpoint_finished(str(checkpoint), 4, settings)  # the keys both know agree
    assert caplog.text == ""
    settings["lr_schedule"] = "x0.1 after epochs 3"
    with pytest.raises(ValueError, match=r"lr_schedule 'x0.1 after epochs 2' there, 'x0.1 after epochs 3' here"):
        check_checkpoint_finished(str(checkpoint), 4, settings)
    # a resume may change the schedule (longer runs), but not the seed the batch order follows
    check_checkpoint_unfinished(str(checkpoint), 8, settings)
    with pytest.raises(ValueError, match=r"checkpoint-4' was trained with --seed 3, this run has --seed 5: the batch "
                                         r"order .* resume with the run's own --seed"):
        check_checkpoint_unfinished(str(checkpoint), 8, dict(settings, seed=5))
    recorded["dataset"] = "local: imgs"
    (checkpoint / RUN_SETTINGS_FILE).write_text(json.dumps(recorded))
    with caplog.at_level("WARNING"):
        check_checkpoint_unfinished(str(checkpoint), 8, dict(settings, dataset="uoft-cs/cifar100"))
    assert "was trained on 'local: imgs', this run reads 'uoft-cs/cifar100'" in caplog.text
    assert "other settings" not in caplog.text
    # settings nothing else compares on a resume are named in one warning; the learning rate is StepLR's to name
    recorded.update(drop_path_rate=0.2, total_batch_size=64, learning_rate=0.1)
    (checkpoint / RUN_SETTINGS_FILE).write_text(json.dumps(recorded))
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_checkpoint_unfinished(str(checkpoint), 8, dict(settings, dataset="local: imgs", drop_path_rate=0.1,
                                                             total_batch_size=64, learning_rate=0.2))
    assert len(caplog.records) == 1
    assert ("checkpoint-4' was trained with other settings than this run's: drop_path_rate 0.2 there, 0.1 here "
            "(its run_settings.json); the resumed run trains on with this run's") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_checkpoint_unfinished(str(checkpoint), 8, dict(settings, dataset="local: imgs", drop_path_rate=0.2,
                                                             total_batch_size=64))
    assert caplog.text == ""
    (checkpoint / RUN_SETTINGS_FILE).unlink()
    check_checkpoint_unfinished(str(checkpoint), 8, dict(settings, seed=5))  # an older checkpoint: nothing to compare
    saver.on_save(SimpleNamespace(output_dir=str(tmp_path / "gone"), should_save=True), state, None)
    assert not (tmp_path / "gone").exists(), "no folder is made for a checkpoint that is not there"

    out = tmp_path / "out"
    for inside in ("checkpoint-8", "runs"):
        with pytest.raises(ValueError, match=f"lies in '{inside}' of --output_dir"):
            check_export_dir(str(out / inside / "export"), str(out))
    check_export_dir(str(out / "release"), str(out))

    # the run's steps as the Trainer counts them (0.28 x 50 is 14.000000000000002 in floating point: 15 steps)
    assert resolve_schedule(IMAGENET_PAPER, _args(kl_windows="none"), 0.28, steps_per_epoch=50).run_steps == 15
    assert resolve_schedule(IMAGENET_PAPER, _args(kl_windows="none"), 100, 7, steps_per_epoch=3).run_steps == 7
    assert resolve_schedule(IMAGENET_PAPER, _args(kl_windows="none"), 2, steps_per_epoch=3).run_steps == 6

    optimizer = create_sgd(torch.nn.Linear(2, 2), 0.1, 0.9, 0.0)
    with caplog.at_level("WARNING"):
        create_step_scheduler(optimizer, 1, 0.0, [1.5], 0.1, total_steps=2)
    assert "the lr step after epoch 1.5 falls on optimizer step 3, past the last of this run's 2 steps" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        create_step_scheduler(optimizer, 4, 0.0, [1.5], 0.1, total_steps=8)
        create_step_scheduler(optimizer, 4, 0.0, [2], 0.1, total_steps=8)  # at the end: resolve_schedule's warning
    assert "never happens" not in caplog.text


@pytest.mark.parametrize("replica_level, says_warnings", [("warning", False), ("info", True)])
def test_replicas_leave_ela_hf_warnings_to_rank_0(replica_level, says_warnings):
    """Every process parses the same arguments and data: their warnings were printed once per GPU."""
    import logging
    from types import SimpleNamespace

    from ela_hf.training import setup_logging

    levels = {"warning": logging.WARNING, "info": logging.INFO}
    package = logging.getLogger("ela_hf")
    recipe = logging.getLogger("recipe-under-test")
    try:
        replica = SimpleNamespace(should_log=False, get_process_log_level=lambda: levels[replica_level])
        setup_logging(recipe, replica)
        data_logger = logging.getLogger("ela_hf.training.data")
        assert data_logger.isEnabledFor(logging.WARNING) is says_warnings
        assert data_logger.isEnabledFor(logging.ERROR)
        package.setLevel(logging.NOTSET)
        main = SimpleNamespace(should_log=True, get_process_log_level=lambda: logging.WARNING)
        setup_logging(recipe, main)
        assert package.level == logging.NOTSET, "the main process's ela_hf loggers are left as they are"
    finally:
        package.setLevel(logging.NOTSET)
        recipe.setLevel(logging.NOTSET)


def test_load_finished_run_reads_the_model_and_the_pruning_history_its_checkpoint_keeps(tmp_path):
    from ela_hf import ElaConfig, ElaForImageClassification
    from ela_hf.training import load_finished_run

    labels = {0: "cat", 1: "dog"}
    config = ElaConfig(architecture="ela_resnet20_cifar", id2label=labels, label2id={v: k for k, v in labels.items()})
    trained = ElaForImageClassification(config)
    trained.set_skip_mask([[False, True], [False, False], [False, True]])
    checkpoint = tmp_path / "checkpoint-4"
    trained.save_pretrained(checkpoint)
    history = [{"window": 1, "skip_mask": trained.skip_mask}]
    saved = {"args": {"windows": [[1, 2]], "selector": {"kind": "ebqm"}, "window_unit": "step"},
             "attributes": {"history": history, "windows_done": 1}}

    def state(callbacks):
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "stateful_callbacks": callbacks}))

    state({"ElaPruningCallback": saved})
    model, got = load_finished_run(str(checkpoint), config)
    assert model.skip_mask == trained.skip_mask
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    assert got == {"windows": [[1, 2]], "selector": {"kind": "ebqm"}, "window_unit": "step", "decisions": history}
    state({"ElaPruningCallback": [saved]})  # transformers' list form
    assert load_finished_run(str(checkpoint), config)[1] == got
    state({"TrainerControl": {"args": {}, "attributes": {}}})  # a run without pruning
    assert load_finished_run(str(checkpoint), config)[1] is None
    state({"ElaPruningCallback": {"args": saved["args"]}})
    with pytest.raises(ValueError, match=r"the pruning state in .*checkpoint-4'.s trainer_state.json is damaged"):
        load_finished_run(str(checkpoint), config)
    other = ElaConfig(architecture="ela_resnet20_cifar", id2label={0: "cat", 1: "cow"}, label2id={"cat": 0, "cow": 1})
    with pytest.raises(ValueError, match=r"trained on other classes than --dataset has \(2 vs 2; class 1: 'dog' there, "
                                         r"'cow' here\)"):
        load_finished_run(str(checkpoint), other)


def test_a_resumed_checkpoint_must_have_this_runs_classes(tmp_path):
    from ela_hf.training import check_checkpoint_classes

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    check_checkpoint_classes(str(checkpoint), ["cat", "dog"])  # no config.json: nothing to compare
    (checkpoint / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "1": "dog"}}))
    check_checkpoint_classes(str(checkpoint), ["cat", "dog"])
    check_checkpoint_classes(None, ["cat"])
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*checkpoint-4' was trained on other classes than "
                                         r"--dataset has \(2 vs 3; class 2: None there, 'eel' here\)"):
        check_checkpoint_classes(str(checkpoint), ["cat", "dog", "eel"])  # a class folder added
    with pytest.raises(ValueError, match=r"class 0: 'cat' there, 'dog' here"):
        check_checkpoint_classes(str(checkpoint), ["dog", "zcat"])  # a class folder renamed: the order moved


def test_class_names_in_a_string_label_column_become_class_ids(tmp_path):
    """pandas writes labels as strings: they used to be refused even when named with --label_column."""
    import pandas as pd

    def frame(names):
        rows = []
        for i, name in enumerate(names):
            buf = io.BytesIO()
            _image(seed=i).save(buf, format="PNG")
            rows.append({"image": {"bytes": buf.getvalue(), "path": None}, "label": name})
        return pd.DataFrame(rows)

    folder = tmp_path / "pq"
    folder.mkdir()
    frame(["red", "green", "blue", "green", "red", "red"]).to_parquet(folder / "train-00000.parquet")
    frame(["green", "red"]).to_parquet(folder / "validation-00000.parquet")
    data = load_image_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert data["train"].features["label"].dtype in ("string", "large_string")
    train, evaluation, _, label, labels = prepare_splits(data["train"], data["validation"], "validation",
                                                         class_source=data["train"])
    assert labels == ["blue", "green", "red"]  # sorted, as an image folder's classes
    assert train[label] == [2, 1, 0, 1, 2, 2] and evaluation[label] == [1, 2]
    odd = Dataset.from_dict({"image": [_image()], "label": ["purple"]}, features=Features({"image": Image(), "label": Value("string")}))
    with pytest.raises(ValueError, match=r"split 'validation' has images of 1 class\(es\) the training split has no "
                                         r"image of: 'purple'"):
        prepare_splits(data["train"], odd, "validation")
    blank = Dataset.from_dict({"image": [_image()] * 2, "label": ["red", ""]}, features=Features({"image": Image(), "label": Value("string")}))
    with pytest.raises(ValueError, match=r"training split's label column 'label' has rows without a class name"):
        prepare_splits(blank, data["validation"], "validation")
