"""recipes/imagenet.py and recipes/cifar.py end to end on tiny data written by the tests.

In-process runs (``main(argv)``) for speed; the main-job command and the 2-process launches run as
subprocesses, exactly as a user would start them.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("circle", "square", "stripes")


def _load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _picture(cls: int, seed: int, size=(24, 20)) -> PILImage.Image:
    """Three visibly different classes, so that a few steps of training are not pure noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    if cls == 0:
        pattern = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2)
    elif cls == 1:
        pattern = (abs(xx - w / 2) < w / 4) & (abs(yy - h / 2) < h / 4)
    else:
        pattern = (xx // 3) % 2 == 0
    arr = pattern[..., None] * np.array([220, 180, 40]) + rng.integers(0, 40, (h, w, 3))
    return PILImage.fromarray(arr.clip(0, 255).astype(np.uint8))


def _image_folder(root: Path, train_per_class=6, eval_per_class=2) -> Path:
    for split, n in (("train", train_per_class), ("validation", eval_per_class)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _picture(c, seed=1000 * (split == "validation") + 10 * c + i).save(root / split / name / f"{i}.png")
    return root


def _parquet_folder(root: Path, train_per_class=6, eval_per_class=2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "label": ClassLabel(names=list(CLASSES))})
    for split, n in (("train", train_per_class), ("validation", eval_per_class)):
        rows = [(c, i) for c in range(len(CLASSES)) for i in range(n)]
        ds = Dataset.from_dict(
            {"image": [_picture(c, 500 * (split == "validation") + 10 * c + i) for c, i in rows],
             "label": [c for c, _ in rows]},
            features=features,
        )
        ds.to_parquet(str(root / f"{split}.parquet"))
    return root


def _common(out: Path, data: Path, cache: Path):
    return [
        "--dataset", str(data), "--output_dir", str(out), "--use_cpu", "--seed", "3",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--dataloader_num_workers", "0", "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
        "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "3",
        "--logging_steps", "1",
    ]  # fmt: skip


def _check_export(out: Path, num_classes: int):
    export = out / "export"
    card = (export / "README.md").read_text()
    config = json.loads((export / "config.json").read_text())
    assert card.startswith("---\n") and "pipeline_tag: image-classification" in card
    assert (export / "model.safetensors").is_file()
    assert len(config["id2label"]) == num_classes
    return config, card


# ------------------------------------------------------------------------------------------------


def test_cifar_recipe_trains_prunes_exports_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cifar = _load_recipe("cifar")
    data = _image_folder(tmp_path / "imgs")
    args = [
        "--model", "ela_resnet20_cifar", "--image_size", "16", "--max_steps", "4",
        "--kl_windows", "1-2", "--window_unit", "step", "--lr_decay_epochs", "1",
    ]  # fmt: skip
    full = tmp_path / "full"
    metrics = cifar.main(_common(full, data, tmp_path / "cache") + args)

    # pruned at the end of step 2, evaluated, exported with its model card
    history = json.loads((full / "pruning_history.json").read_text())
    assert [d["global_step"] for d in history["decisions"]] == [2]
    mask = history["decisions"][0]["skip_mask"]
    assert sum(map(sum, mask)) >= 1
    assert 0.0 <= metrics["eval_top1"] <= 1.0
    assert "eval_top5" not in metrics  # 3 classes: every label is among the five best
    config, card = _check_export(full, len(CLASSES))
    assert config["skip_mask"] == mask
    assert "recipes/cifar.py" in card and "# ela_resnet20_cifar-imgs" in card
    assert str(tmp_path) not in card  # no local paths in a card meant for the Hub
    # the paper's drop path 0.2 on the attention branch (linear over the blocks: the last block has all of it)
    from ela_hf import ElaForImageClassification

    trained = ElaForImageClassification.from_pretrained(str(full))
    assert trained.config.drop_path_rate == 0.2
    assert trained.timm_model.layer3[1].attn.drop_path.drop_prob == pytest.approx(0.2)
    weights = load_file(str(full / "export" / "model.safetensors"))
    skipped = [f"layer{i + 1}.{j}.attn." for i, stage in enumerate(mask) for j, s in enumerate(stage) if s]
    assert not any(k.startswith(tuple(skipped)) for k in weights)  # slim: no weights for skipped layers

    # resume from the step-2 checkpoint in a fresh folder: steps 1-2 come from the checkpoint, steps 3-4
    # are trained, and the decision made at step 2 is carried over, not made again
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    with pytest.raises(ValueError, match=r"checkpoint-2' was trained with --seed 3, this run has --seed 4"):
        cifar.main(_common(resumed, data, tmp_path / "cache") + args + ["--seed", "4", "--resume_from_checkpoint", "last"])
    cifar.main(_common(resumed, data, tmp_path / "cache") + args + ["--resume_from_checkpoint", "last"])
    state_full = json.loads((full / "trainer_state.json").read_text())
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    losses = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert losses[:2] == [(e["step"], e["loss"]) for e in state_full["log_history"] if "loss" in e][:2]
    assert json.loads((resumed / "pruning_history.json").read_text())["decisions"] == history["decisions"]
    start = load_file(str(resumed / "checkpoint-2" / "model.safetensors"))
    end = load_file(str(resumed / "model.safetensors"))
    assert not torch.equal(start["fc.weight"], end["fc.weight"])  # it trained on
    for k in end:
        if k.endswith("attn_skipped"):
            assert bool(end[k]) == bool(load_file(str(full / "model.safetensors"))[k]), k
    # resuming the finished run is refused before training (the Trainer would train a step past the end and
    # replace the run's train metrics); a longer run trains on from it
    assert (resumed / "checkpoint-4").is_dir()
    before = json.loads((resumed / "train_results.json").read_text())
    with pytest.raises(ValueError, match=r"checkpoint-4' has already trained 4 of this run's 4 steps.*"
                                         r"add --export_only to evaluate and export it"):
        cifar.main(_common(resumed, data, tmp_path / "cache") + args + ["--resume_from_checkpoint", "last"])
    assert json.loads((resumed / "train_results.json").read_text()) == before

    # --export_only: that finished checkpoint evaluated and exported again (a run stopped during its export),
    # training nothing; the card's pruning history is the one the checkpoint keeps
    evaluated = json.loads((resumed / "eval_results.json").read_text())
    shutil.rmtree(resumed / "export")
    (resumed / "pruning_history.json").unlink()
    again = cifar.main(_common(resumed, data, tmp_path / "cache") + args
                       + ["--resume_from_checkpoint", "last", "--export_only"])
    assert json.loads((resumed / "train_results.json").read_text()) == before
    assert not (resumed / "checkpoint-5").exists()
    assert again["eval_top1"] == evaluated["eval_top1"] and again["eval_loss"] == pytest.approx(evaluated["eval_loss"])
    config, card = _check_export(resumed, len(CLASSES))
    assert config["skip_mask"] == mask and "Pruning history" in card
    released = json.loads((resumed / "export" / "pruning_history.json").read_text())
    assert released["decisions"] == history["decisions"] and released["windows"] == history["windows"]
    slim = load_file(str(resumed / "export" / "model.safetensors"))
    assert torch.equal(slim["fc.weight"], load_file(str(resumed / "checkpoint-4" / "model.safetensors"))["fc.weight"])
    # every checkpoint keeps the settings its card shows; a command other than the run's is refused by name
    recorded = json.loads((resumed / "checkpoint-4" / "run_settings.json").read_text())
    assert recorded["seed"] == 3 and recorded["kl_windows"] == "1-2 (steps)" and recorded["total_batch_size"] == 4
    assert f"| learning_rate | {recorded['learning_rate']} |" in card
    assert json.loads((full / "checkpoint-2" / "run_settings.json").read_text()) == recorded
    shutil.rmtree(resumed / "export")
    with pytest.raises(ValueError, match=r"trained with other settings than this command's, which its model card "
                                         r"would show: learning_rate [\d.e-]+ there, [\d.e-]+ here; "
                                         r"kl_windows '1-2 \(steps\)' there, '1-3 \(steps\)' here; seed 3 there, 4 here"):
        cifar.main(_common(resumed, data, tmp_path / "cache") + args + ["--learning_rate", "0.2", "--seed", "4",
                   "--kl_windows", "1-3", "--resume_from_checkpoint", "last", "--export_only"])  # fmt: skip
    with pytest.raises(ValueError, match=r"total_batch_size 4 there, 8 here"):
        cifar.main(_common(resumed, data, tmp_path / "cache") + args + ["--per_device_train_batch_size", "8",
                   "--max_steps", "2", "--resume_from_checkpoint", "last", "--export_only"])  # fmt: skip
    # a checkpoint that has not finished this run, or of other classes, is refused before anything is written
    with pytest.raises(ValueError, match=r"--export_only: .*checkpoint-2' has trained 2 of this run's 4 steps"):
        cifar.main(_common(resumed, data, tmp_path / "cache") + args
                   + ["--resume_from_checkpoint", str(resumed / "checkpoint-2"), "--export_only"])
    other = tmp_path / "other" / data.name  # the card names a local dataset by its folder: the same here
    shutil.copytree(data, other)
    for split in ("train", "validation"):
        (other / split / "circle").rename(other / split / "ball")
    with pytest.raises(ValueError, match=r"trained on other classes than --dataset has"):
        cifar.main(_common(resumed, other, tmp_path / "cache") + args
                   + ["--resume_from_checkpoint", "last", "--export_only"])
    assert not (resumed / "export").exists()
    # training on from it is refused too: its classifier rows would answer to other names (it used to train on)
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*checkpoint-4' was trained on other classes "
                                         r"than --dataset has \(3 vs 3; class 0: 'circle' there, 'ball' here\)"):
        cifar.main(_common(resumed, other, tmp_path / "cache") + args
                   + ["--max_steps", "6", "--resume_from_checkpoint", "last"])
    # and training on without pruning: the run's decisions would vanish from its card, its skipped layers not
    with pytest.raises(ValueError, match=r"checkpoint-4' was trained with KL windows 1-2 \(steps\), but --kl_windows "
                                         r"none resumes it without pruning.*Resume with --kl_windows 1-2 --window_unit step"):
        cifar.main(_common(resumed, data, tmp_path / "cache") + args
                   + ["--kl_windows", "none", "--max_steps", "6", "--resume_from_checkpoint", "last"])
    assert not (resumed / "checkpoint-5").exists()

    # a run without pruning in the same output_dir: the earlier run's pruning_history.json is not its history
    cifar.main(_common(full, data, tmp_path / "cache") + args + ["--kl_windows", "none", "--max_steps", "2"])
    config, card = _check_export(full, len(CLASSES))
    assert not any(map(any, config["skip_mask"] or []))
    assert not (full / "export" / "pruning_history.json").exists()
    assert "Pruning history" not in card and "| yes |" not in card


def test_an_mrla_baseline_trains_unpruned_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cifar = _load_recipe("cifar")
    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    argv = _common(out, data, tmp_path / "cache") + [
        "--model", "mrla_b_resnet20_cifar", "--image_size", "16", "--num_train_epochs", "1", "--max_steps", "2",
    ]  # fmt: skip
    cifar.main(argv)  # the paper's windows would not even fit one epoch: none are opened
    config, card = _check_export(out, len(CLASSES))
    assert not any(map(any, config["skip_mask"] or [])) and not (out / "pruning_history.json").exists()
    assert "Pruning history" not in card
    assert "with all 6 attention layers active (no ELA pruning)" in card and "KL/EBQM pruning" not in card


def test_imagenet_recipe_on_parquet_with_lr_scaling_warmup_and_resume(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    imagenet = _load_recipe("imagenet")
    data = _parquet_folder(tmp_path / "pq")
    out = tmp_path / "out"
    common = _common(out, data, tmp_path / "cache") + [
        "--model", "ela_resnet18", "--image_size", "32", "--max_train_samples", "8", "--num_train_epochs", "2",
        "--kl_windows", "1-1", "--warmup_epochs", "1", "--lr_decay_epochs", "1",
    ]  # fmt: skip
    metrics = imagenet.main(common + ["--max_steps", "2"])
    assert "eval_top1" in metrics and "eval_top5" not in metrics  # 3 classes
    _check_export(out, len(CLASSES))
    assert [d["epoch"] for d in json.loads((out / "pruning_history.json").read_text())["decisions"]] == [1.0]

    # resume the newest checkpoint (step 2) and finish the 2 epochs of 2 steps, with another weight decay: the
    # Trainer's optimizer resume brings back the checkpoint's, which is set back to this run's and named
    common += ["--weight_decay", "5e-4"]
    with caplog.at_level("WARNING"):
        imagenet.main(common + ["--resume_from_checkpoint", "last"])
    assert "weight_decay 0.0001 (checkpoint) -> 0.0005 (this run)" in caplog.text
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    logged = {e["step"]: e["learning_rate"] for e in state["log_history"] if "loss" in e}
    assert sorted(logged) == [1, 2, 3, 4]
    # the lr each update used: 0.1 per 256 images at a total batch of 4; 1 warm-up epoch (2 steps), x0.1
    # after epoch 1 (the scheduler state came back from the checkpoint)
    base = 0.1 * 4 / 256
    assert [logged[s] for s in (1, 2, 3, 4)] == pytest.approx([base * 0.5, base, base * 0.1, base * 0.1])
    # the finished run exported again from its last checkpoint (--export_only), with its pruning decisions
    decisions = json.loads((out / "pruning_history.json").read_text())["decisions"]
    (out / "export" / "README.md").unlink()
    imagenet.main(common + ["--resume_from_checkpoint", "last", "--export_only"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    config, card = _check_export(out, len(CLASSES))
    assert json.loads((out / "export" / "pruning_history.json").read_text())["decisions"] == decisions
    assert config["skip_mask"] == decisions[-1]["skip_mask"] and "recipes/imagenet.py" in card


def test_imagenet_recipe_at_a_1x1_last_stage_never_trains_on_a_batch_of_one(tmp_path, monkeypatch, caplog):
    """ela_resnet18 at 32x32 ends in a 1x1 stage: 5 images in batches of 4 would end each epoch with a batch of
    one image, which batch norm refuses in training."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = _parquet_folder(tmp_path / "pq")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "pruning_history.json").write_text('{"decisions": [{"epoch": 1}]}')  # an earlier run's
    with caplog.at_level("INFO"):
        metrics = _load_recipe("imagenet").main(_common(out, data, tmp_path / "cache") + [
            "--model", "ela_resnet18", "--image_size", "32", "--max_train_samples", "5", "--num_train_epochs", "1",
            "--kl_windows", "none",
        ])  # fmt: skip
    assert "eval_top1" in metrics and "one image (drawn at random) is left out" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert not (out / "pruning_history.json").exists(), "an earlier run's decisions are not this run's"


def test_push_to_hub_uploads_the_slim_release_once(tmp_path, monkeypatch, local_hub):
    from transformers import AutoModelForImageClassification

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo_id = f"{local_hub.user}/ela-recipe"
    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    _load_recipe("cifar").main(_common(out, data, tmp_path / "cache") + [
        "--model", "ela_resnet20_cifar", "--image_size", "16", "--max_steps", "2", "--kl_windows", "1-1",
        "--window_unit", "step", "--push_to_hub", "--hub_model_id", repo_id,
    ])  # fmt: skip
    history = local_hub.server.repo(repo_id).history("main")
    assert len(history) == 2, "repository creation, then one commit with the release (no training checkpoints)"
    files = set(history[0].files)
    assert {"README.md", "config.json", "model.safetensors", "pruning_history.json"} <= files
    assert not any(f.startswith("checkpoint-") or f in ("training_args.bin", "optimizer.pt") for f in files)
    local = json.loads((out / "export" / "config.json").read_text())
    pushed = AutoModelForImageClassification.from_pretrained(repo_id)
    assert pushed.skip_mask == local["skip_mask"] and sum(map(sum, local["skip_mask"])) == 1


# ------------------------------------------------------------------------------------------------
# bad arguments: rejected with a clear message, before any training


@pytest.fixture
def no_training(monkeypatch):
    from transformers import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("training started despite bad arguments")

    monkeypatch.setattr(Trainer, "train", refuse)


def _unlabeled_parquet(path: Path) -> Path:
    ds = Dataset.from_dict(
        {"image": [_picture(0, i) for i in range(4)], "caption": ["a picture"] * 4},
        features=Features({"image": Image(), "caption": Value("string")}),
    )
    ds.to_parquet(str(path))
    return path


@pytest.mark.parametrize(
    "recipe, extra, message",
    [
        ("cifar", ["--model", "ela_resnet57_cifar"], r"'ela_resnet57_cifar' is not a model registered by ela_hf"),
        ("imagenet", ["--model", "ela_resnet50", "--image_size", "16"], r"--image_size 16 is too small for ela_resnet50"),
        ("cifar", ["--num_train_epochs", "3", "--kl_windows", "1-1,4-5"], r"ends after the last epoch: the run has 3 epochs"),
        ("cifar", ["--num_train_epochs", "2"], r"the paper's KL windows 1-3, 45-48, 91-93 \(for 180 epochs\) do not fit"),
        ("cifar", ["--num_train_epochs", "1", "--kl_windows", "1-9", "--window_unit", "step"], r"ends after the last step: the run has 5 steps"),
        ("imagenet", ["--resume_from_checkpoint", "last"], r"no checkpoint-\* folder"),
        ("cifar", ["--model", "resnet20_cifar", "--kl_windows", "1-1"], r"has no attention layers to prune"),
        ("cifar", ["--ebqm_alpha", "0"], r"--ebqm_alpha: alpha must be > 0"),
        ("imagenet", ["--ebqm_tau", "1.5"], r"--ebqm_tau: tau must be in \[0, 1\]"),
        ("cifar", ["--ebqm_q", "1"], r"--ebqm_q: q must be in the open interval"),
        ("imagenet", ["--metric_for_best_model", "top5"], r"'top5' is not a metric the evaluation reports \(top5 is not "
                                                             r"reported with 3 classes"),
    ],
)
def test_bad_arguments_are_rejected_before_training(tmp_path, monkeypatch, no_training, recipe, extra, message):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "imgs")  # 18 training images: 5 steps of 4
    argv = _common(tmp_path / "out", data, tmp_path / "cache") + ["--model", "ela_resnet20_cifar"] + extra
    with pytest.raises(ValueError, match=message):
        _load_recipe(recipe).main(argv)
    assert not (tmp_path / "out" / "export").exists()


@pytest.mark.parametrize("recipe", ["cifar", "imagenet"])
def test_argument_errors_come_before_the_data_is_loaded(tmp_path, monkeypatch, no_training, recipe):
    """The data does not exist: each error below must be raised before the recipe looks for it."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the dataset was loaded despite bad arguments")

    module = _load_recipe(recipe)
    monkeypatch.setattr(module, "load_image_dataset", no_loading)
    out = tmp_path / "out"
    argv = _common(out, tmp_path / "missing", tmp_path / "cache") + ["--model", "ela_resnet20_cifar"]
    with pytest.raises(ValueError, match=r"--ebqm_beta: beta must be > 0"):
        module.main(argv + ["--ebqm_beta", "-1"])
    # transformers' example-script stages: asking for less than "train, then evaluate" must not train
    for stages in (["--do_eval"], ["--do-train", "False"], ["--do_train=false", "--do_eval"]):
        with pytest.raises(ValueError, match=r"the recipes always train and then evaluate \(--do_train --do_eval\)"):
            module.main(argv + stages)
    with pytest.raises(ValueError, match=r"--do_predict is not used: the recipes evaluate on --eval_split"):
        module.main(argv + ["--do_train", "--do_eval", "--do_predict"])
    with pytest.raises(ValueError, match=r"--export_only exports a finished run's checkpoint: name it with "
                                         r"--resume_from_checkpoint"):
        module.main(argv + ["--export_only"])
    for stages in (["--do_train", "--do_eval"], ["--do_train"]):  # what the recipes do (and evaluate anyway)
        with pytest.raises(AssertionError, match="the dataset was loaded"):
            module.main(argv + stages)
    # the export replaces its folder: the output_dir itself, or a folder above it, would lose the training
    (out / "checkpoint-2").mkdir(parents=True)
    for export_dir in (out, tmp_path):
        with pytest.raises(ValueError, match=r"--export_dir .* is --output_dir .* or contains it"):
            module.main(argv + ["--export_dir", str(export_dir)])
    assert (out / "checkpoint-2").is_dir()


def test_unreadable_images_stop_the_run_before_training(tmp_path, monkeypatch, no_training):
    """An evaluation image is first read after a training epoch: the recipes decode that split up front."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "imgs")
    broken = data / "validation" / "square" / "1.png"
    broken.write_bytes(broken.read_bytes()[:80])
    argv = _common(tmp_path / "out", data, tmp_path / "cache") + ["--model", "ela_resnet20_cifar", "--num_train_epochs",
                                                                   "1", "--kl_windows", "1-1"]
    for recipe in ("cifar", "imagenet"):
        with pytest.raises(ValueError, match=r"1 of the 6 images of split 'validation' cannot be read:\n  cannot read "
                                             r"image file '[^']*square[/\\]1\.png'"):
            _load_recipe(recipe).main(argv)
    with pytest.raises(AssertionError, match="training started"):  # the user's choice: find it when it is read
        _load_recipe("cifar").main(argv + ["--check_images", "none"])
    # a bad training image: by default found when training reads it; --check_images all finds it first
    broken.unlink()
    bad_train = data / "train" / "circle" / "2.png"
    bad_train.write_bytes(b"")
    with pytest.raises(AssertionError, match="training started"):
        _load_recipe("cifar").main(argv)
    with pytest.raises(ValueError, match=r"1 of the 18 images of split 'train' cannot be read:\n  cannot read image "
                                         r"file '[^']*circle[/\\]2\.png'"):
        _load_recipe("imagenet").main(argv + ["--check_images", "all"])
    with pytest.raises(SystemExit):  # argparse's choices
        _load_recipe("cifar").main(argv + ["--check_images", "train"])
    assert not (tmp_path / "out" / "export").exists()


def test_dataset_without_label_column_is_rejected_before_training(tmp_path, monkeypatch, no_training):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = _unlabeled_parquet(tmp_path / "captions.parquet")
    argv = _common(tmp_path / "out", data, tmp_path / "cache") + ["--model", "ela_resnet20_cifar", "--num_train_epochs", "1", "--kl_windows", "1-1"]
    with pytest.raises(ValueError, match=r"no usable label column.*caption \(string\).*--label_column"):
        _load_recipe("cifar").main(argv)


# ------------------------------------------------------------------------------------------------
# the README's main job, and multi-process launches


def _env():
    # one torch thread per process: test processes share the machine's cores
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# Loaded by the child through PYTHONPATH: every host name lookup and every TCP/UDP connection attempt
# is refused and written down.
_NO_NETWORK = """
import os, socket
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def _log(what):
    with open(os.environ["NETWORK_ATTEMPTS_LOG"], "a") as f:
        f.write(repr(what) + "\\n")
def _refuse(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        _log(address)
        raise OSError("network access attempted: %r" % (address,))
def _lookup(host, *args, **kwargs):
    _log(host)
    raise socket.gaierror("host name lookup attempted: %r" % (host,))
socket.socket.connect = lambda sock, address: _refuse(sock, address) or _connect(sock, address)
socket.socket.connect_ex = lambda sock, address: _refuse(sock, address) or _connect_ex(sock, address)
socket.getaddrinfo = _lookup
open(os.environ["NETWORK_ATTEMPTS_LOG"] + ".armed", "w").close()
"""


@pytest.mark.slow
def test_readme_main_job_runs_offline(tmp_path):
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("pip install -e '.[test]' && "))
    command = first.split("&&", 1)[1].split("#")[0].strip()
    assert command == "python recipes/cifar.py --demo"
    # the same command on a fraction of the digits, so the test stays short
    argv = command.split()[1:] + [
        "--output_dir", str(tmp_path / "demo"), "--max_train_samples", "96", "--max_eval_samples", "64",
        "--num_train_epochs", "2", "--kl_windows", "1-1", "--lr_decay_epochs", "none",
    ]  # fmt: skip
    # a machine without network: no offline switches set, and every connection attempt refused and logged
    env = _env()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_NO_NETWORK)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env["PYTHONPATH"]])
    env["NETWORK_ATTEMPTS_LOG"] = str(tmp_path / "network_attempts.log")
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh machine: empty caches
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert (tmp_path / "network_attempts.log.armed").exists(), "the network guard was not loaded"
    assert not (tmp_path / "network_attempts.log").exists(), (tmp_path / "network_attempts.log").read_text()
    assert re.search(r"\d+%\|", output), "no progress bar"
    assert re.search(r"ela_resnet20_cifar on sklearn:digits: top-1 \d+\.\d+%, top-5 \d+\.\d+% on 64 evaluation images", output)
    assert "total: 1 of 3 skippable attention layers skipped" in output  # one window, one EBQM decision
    assert re.search(r"before pruning: \d+\.\d s per epoch with 6 attention layers \(epoch 1\)", output)
    assert re.search(r"after pruning: +\d+\.\d s per epoch with 5 attention layers \(epoch 2\)", output)
    _check_export(tmp_path / "demo", 10)


def _rank_results(output: str):
    found = re.findall(r"rank (\d+)/(\d+) result: (\{.*\})", output)
    return {int(r): (int(w), json.loads(j)) for r, w, j in found}


@pytest.mark.slow
@pytest.mark.parametrize("recipe, model, size", [("imagenet", "ela_resnet18", "32"), ("cifar", "ela_resnet20_cifar", "16")])
def test_two_process_launch_agrees_on_every_rank(tmp_path, recipe, model, size):
    data = _image_folder(tmp_path / "imgs", train_per_class=8)
    out = tmp_path / "out"
    env = _env()
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "recipes" / f"{recipe}.py"), *_common(out, data, tmp_path / "cache"),
        "--model", model, "--image_size", size, "--max_steps", "3", "--kl_windows", "1-2", "--window_unit", "step",
        "--log_level_replica", "info",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    results = _rank_results(output)
    assert sorted(results) == [0, 1], output[-3000:]
    (w0, r0), (w1, r1) = results[0], results[1]
    assert w0 == w1 == 2
    assert r0["skip_mask"] == r1["skip_mask"] and sum(map(sum, r0["skip_mask"])) >= 1
    assert r0["eval_top1"] == r1["eval_top1"]
    assert r0["weights_sum"] == pytest.approx(r1["weights_sum"], rel=1e-9)
    # each rank closes its process group before exiting (left to interpreter shutdown, a finished rank could abort)
    assert "rank 0/2: process group closed" in output and "rank 1/2: process group closed" in output
    state = json.loads((out / "trainer_state.json").read_text())
    # 24 images, 4 per device on 2 processes: 3 steps per epoch, total batch 8
    assert state["global_step"] == 3 and state["train_batch_size"] == 4
    _check_export(out, len(CLASSES))
    # the card's settings in the checkpoint name the run's world: 2 processes of 4 images
    assert json.loads((out / "checkpoint-3" / "run_settings.json").read_text())["total_batch_size"] == 8
    if recipe != "cifar":
        return
    # --export_only on 2 processes: both evaluate the finished checkpoint, rank 0 exports it again
    (out / "export" / "README.md").unlink()
    proc = subprocess.run(cmd + ["--resume_from_checkpoint", "last", "--export_only"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    again = _rank_results(output)
    assert sorted(again) == [0, 1] and again[0][0] == again[1][0] == 2, output[-3000:]
    assert again[0][1]["skip_mask"] == again[1][1]["skip_mask"] == r0["skip_mask"]
    assert again[0][1]["eval_top1"] == again[1][1]["eval_top1"] == r0["eval_top1"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3  # nothing trained
    config, _ = _check_export(out, len(CLASSES))
    assert config["skip_mask"] == r0["skip_mask"]
    # on one process the same command is another run (total batch 4, not 8): refused, not exported as that one
    single = [sys.executable, *cmd[cmd.index(str(ROOT / "recipes" / f"{recipe}.py")):]]
    proc = subprocess.run(single + ["--resume_from_checkpoint", "last", "--export_only", "--use_cpu"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "total_batch_size 8 there, 4 here" in proc.stderr, proc.stderr[-3000:]


def test_the_demo_schedule_is_rescaled_to_other_epochs(tmp_path):
    from ela_hf.training import resolve_schedule

    cifar = _load_recipe("cifar")
    out = ["--output_dir", str(tmp_path / "out")]
    args, training_args, base = cifar.parse_arguments(["--demo"] + out)
    schedule = resolve_schedule(base, args, training_args.num_train_epochs)
    assert (schedule.num_epochs, schedule.kl_windows, schedule.lr_decay_epochs) == (8, [(2, 2), (4, 4)], [6])
    assert schedule.rescaled_from is None
    # `--demo --num_train_epochs 3` used to fail: the demo's windows were explicit arguments, not rescaled
    args, training_args, base = cifar.parse_arguments(["--demo", "--num_train_epochs", "3"] + out)
    schedule = resolve_schedule(base, args, training_args.num_train_epochs)
    assert (schedule.num_epochs, schedule.kl_windows, schedule.lr_decay_epochs) == (3, [(1, 1), (2, 2)], [2.25])
    assert "(the demo's 8-epoch schedule, rescaled)" in schedule.describe()
    # explicit arguments still win, and without --demo the paper's 180-epoch schedule is the base
    args, training_args, base = cifar.parse_arguments(["--demo", "--num_train_epochs", "3", "--kl_windows", "3-3"] + out)
    assert resolve_schedule(base, args, training_args.num_train_epochs).kl_windows == [(3, 3)]
    args, training_args, base = cifar.parse_arguments(["--num_train_epochs", "18"] + out)
    schedule = resolve_schedule(base, args, training_args.num_train_epochs)
    assert schedule.kl_windows == [(1, 1), (5, 5), (10, 10)] and "the paper's 180-epoch" in schedule.describe()
    # --demo as argparse reads it: an abbreviation gets the demo's defaults too, --demo false does not
    for argv, demo in ((["--dem"], True), (["--demo=yes"], True), (["--demo", "false"], False)):
        args, _, base = cifar.parse_arguments(argv + out)
        assert args.demo is demo and (args.dataset == "sklearn:digits") is demo and (base.epochs == 8) is demo
