"""The model card rendered into every export: content, Hub metadata, the d_t plot, defensive history reading."""
import json

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image

import ela_hf

MASK = [[False, True], [False, False], [False, True]]
HISTORY = {
    "selector": {"name": "ebqm", "q": 0.5, "alpha": 5, "beta": 1, "tau": 0.3},
    "windows": [
        {
            "epochs": [1, 3],
            "layers": [
                {"stage": 0, "block": 1, "d": 0.00123, "mapped": 0.01, "skip": True},
                {"stage": 1, "block": 1, "d": 0.0456, "mapped": 0.97, "skip": False},
                {"stage": 2, "block": 1, "d": 0.0321, "mapped": 0.55, "skip": False},
            ],
        },
        {
            "epochs": [45, 48],
            "layers": [
                {"stage": 1, "block": 1, "d": 0.0512, "mapped": 0.99, "skip": False},
                {"stage": 2, "block": 1, "d": 0.0021, "mapped": 0.02, "skip": True},
                {"stage": 7},  # malformed entries are ignored, not fatal
                "not a layer",
            ],
        },
    ],
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("ela_resnet20_cifar", num_classes=10).eval()
    model.set_skip_mask(MASK)
    history_file = tmp_path_factory.mktemp("hist") / "pruning_history.json"
    history_file.write_text(json.dumps(HISTORY))
    out = tmp_path_factory.mktemp("rel") / "ela-r20-cifar10"
    ela_hf.export_pruned(
        model,
        out,
        pruning_history=history_file,
        training_args={"num_train_epochs": 180, "learning_rate": 0.1, "per_device_train_batch_size": 128},
        metrics={"eval_accuracy": 0.9312, "eval_loss": 0.25},
        dataset="uoft-cs/cifar10",
        repo_id="ela-hf/ela-r20-cifar10",
        verify=False,
    )
    return out


def test_card_metadata_is_valid_hub_metadata(release):
    card = ModelCard.load(release / "README.md")  # huggingface_hub parses and validates the YAML block
    data = card.data.to_dict()
    assert data["library_name"] == "timm"
    assert data["pipeline_tag"] == "image-classification"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["uoft-cs/cifar10"]
    assert "accuracy" in data["metrics"]
    assert {"timm", "transformers", "pruned", "mrla_b"} <= set(data["tags"])
    results = card.data.eval_results
    accuracy = next(r for r in results if r.metric_type == "accuracy")
    assert accuracy.metric_value == 0.9312 and accuracy.dataset_type == "uoft-cs/cifar10"
    assert accuracy.task_type == "image-classification"


def test_card_describes_architecture_skips_history_training_and_usage(release):
    text = (release / "README.md").read_text()
    assert "`ela_resnet20_cifar` (MRLA-B layer attention)" in text
    assert "| Attention layers skipped | 2 of 6 |" in text
    # released parameter count: the reduced model timm builds from the folder
    reduced = timm.create_model(f"local-dir:{release}", pretrained=True)
    assert f"| Parameters | {sum(p.numel() for p in reduced.parameters()):,} " in text
    # skipped layers per stage, with the window that skipped them
    assert "| 0 | 2 | 1 | Window 1 (epochs 1-3) |" in text
    assert "| 1 | 2 | none |  |" in text
    assert "| 2 | 2 | 1 | Window 2 (epochs 45-48) |" in text
    # the KL / EBQM table of every window
    assert "### Window 2 (epochs 45-48)" in text
    assert "| 0.1 | 0.00123 | 0.01 | yes |" in text
    assert "| 2.1 | 0.0021 | 0.02 | yes |" in text
    assert "name=ebqm, q=0.5, alpha=5, beta=1, tau=0.3" in text
    assert "| num_train_epochs | 180 |" in text and "| eval_accuracy | 0.9312 |" in text
    # usage snippets for both front doors, pointing at the repository
    assert 'timm.create_model("hf-hub:ela-hf/ela-r20-cifar10", pretrained=True)' in text
    assert 'AutoModelForImageClassification.from_pretrained("ela-hf/ela-r20-cifar10")' in text
    assert "\n\n\n" not in text


def test_plot_and_history_ship_with_the_release(release):
    assert "![d_t per layer and window](d_t_per_window.png)" in (release / "README.md").read_text()
    with Image.open(release / "d_t_per_window.png") as plot:
        assert plot.format == "PNG" and plot.width >= 400
    assert json.loads((release / "pruning_history.json").read_text()) == HISTORY


def test_history_is_read_defensively():
    history = ela_hf.load_pruning_history(HISTORY)
    assert [w["label"] for w in history["windows"]] == ["Window 1 (epochs 1-3)", "Window 2 (epochs 45-48)"]
    assert [(l["stage"], l["block"]) for l in history["windows"][1]["layers"]] == [(1, 1), (2, 1)]
    bare = ela_hf.load_pruning_history([{"layers": [{"stage": 0, "block": 1, "d": "nan"}]}])
    assert bare["windows"][0]["layers"][0]["d"] is None and bare["selector"] is None
    assert ela_hf.load_pruning_history(None) is None


# what ElaPruningCallback writes: the schedule under "windows", one record per finished window under "decisions"
CALLBACK_HISTORY = {
    "windows": [[1, 3], [45, 48], [91, 93]],
    "selector": {"name": "ebqm", "q": 0.5, "alpha": 5.0, "beta": 1.0, "tau": 0.3},
    "window_unit": "epoch",
    "decisions": [
        {
            "window": 1, "unit": "epoch", "start": 1, "end": 3, "global_step": 1173, "epoch": 3.0, "quantile": 0.0214,
            "layers": [
                {"name": "layer1.1", "stage": 0, "block": 1, "d_t": 0.0012, "samples": 150000, "candidate": True,
                 "mapped": 0.08, "skip": True},
                {"name": "layer2.1", "stage": 1, "block": 1, "d_t": 0.0391, "samples": 150000, "candidate": False,
                 "mapped": None, "skip": False},
            ],
            "skipped_now": ["layer1.1"], "active_layers_per_stage": [1, 2, 2],
            "skip_mask": [[False, True], [False, False], [False, False]],
        }
    ],
}


def test_history_written_by_the_pruning_callback_is_understood(tmp_path):
    history = ela_hf.load_pruning_history(CALLBACK_HISTORY)
    assert len(history["windows"]) == 1, "the schedule pairs are not mistaken for decisions"
    window = history["windows"][0]
    assert window["label"] == "Window 1 (epochs 1-3)" and window["quantile"] == 0.0214
    assert [(l["stage"], l["block"], l["d"], l["mapped"], l["skip"]) for l in window["layers"]] == [
        (0, 1, 0.0012, 0.08, True),
        (1, 1, 0.0391, None, False),
    ]
    model = timm.create_model("ela_resnet20_cifar", num_classes=10).eval()
    model.set_skip_mask([[False, True], [False, False], [False, False]])
    out = ela_hf.export_pruned(model, tmp_path / "release", pruning_history=CALLBACK_HISTORY, verify=False)
    text = (out / "README.md").read_text()
    assert "| 0 | 2 | 1 | Window 1 (epochs 1-3) |" in text
    assert "| 0.1 | 0.0012 | 0.08 | yes |" in text and "| 1.1 | 0.0391 |  |  |" in text
    assert "Quantile of the window's d_t values: 0.0214" in text
    # a run that has not finished a window yet: schedule only, nothing to tabulate
    assert ela_hf.load_pruning_history(dict(CALLBACK_HISTORY, decisions=[]))["windows"] == []
    assert ela_hf.load_pruning_history({"windows": [[1, 3]], "selector": {}})["windows"] == []


def test_card_notes_layers_a_window_skipped_that_the_model_runs(tmp_path):
    # e.g. load_best_model_at_end restored a checkpoint from before the decision: mask all False
    model = timm.create_model("ela_resnet20_cifar", num_classes=10).eval()
    out = ela_hf.export_pruned(model, tmp_path / "restored", pruning_history=CALLBACK_HISTORY, verify=False)
    text = (out / "README.md").read_text()
    assert "| Attention layers skipped | 0 of 6 |" in text
    assert "**Note:** this model runs attention layers 0.1, which the history has skipped (by a\nwindow below, or before the run)" in text
    # no note when the model carries the history's mask
    model.set_skip_mask(CALLBACK_HISTORY["decisions"][0]["skip_mask"])
    out = ela_hf.export_pruned(model, tmp_path / "pruned", pruning_history=CALLBACK_HISTORY, verify=False)
    assert "**Note:**" not in (out / "README.md").read_text()
    # a layer the run began with skipped, which this model runs, is named too
    before = dict(CALLBACK_HISTORY, skipped_before_run=[{"name": "layer3.1", "stage": 2, "block": 1}])
    out = ela_hf.export_pruned(model, tmp_path / "before", pruning_history=before, verify=False)
    assert "**Note:** this model runs attention layers 2.1, which the history has skipped" in (out / "README.md").read_text()
    # ... and one the architecture does not have (or can never skip) is another model's history
    for stage, block in ((3, 7), (1, 0)):
        other = dict(CALLBACK_HISTORY, skipped_before_run=[{"name": "x", "stage": stage, "block": block}])
        with pytest.raises(ValueError, match=rf"skipped_before_run\) names attention layer {stage}\.{block} .* is it "
                                             r"the history of another model\?"):
            ela_hf.export_pruned(model, tmp_path / "other", pruning_history=other, verify=False)


def test_bad_history_files_are_clear_errors(tmp_path):
    broken = tmp_path / "pruning_history.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="pruning_history.json is not valid JSON"):
        ela_hf.load_pruning_history(broken)
    with pytest.raises(ValueError, match="the window records must be a list"):
        ela_hf.load_pruning_history({"decisions": 3})
    with pytest.raises(ValueError, match="expected an object with a 'decisions' or 'windows' list"):
        ela_hf.load_pruning_history(42)


def test_a_history_that_does_not_fit_the_model_is_refused(tmp_path):
    """The history of another model (ela_resnet56's stage 2 block 5 on ela_resnet20) would describe layers
    this release does not have; a string "false" is not read as skipped; nothing is written."""
    model = timm.create_model("ela_resnet20_cifar", num_classes=10).eval()
    other = [{"epochs": [1, 3], "layers": [{"stage": 2, "block": 5, "d": 0.01, "skip": True}]}]
    with pytest.raises(ValueError, match=r"names attention layer 2.5 .* ela_resnet20_cifar \(blocks per stage \[2, 2, 2\]\) "
                                         "does not have: is it the history of another model"):
        ela_hf.export_pruned(model, tmp_path / "r", pruning_history=other, verify=False)
    with pytest.raises(ValueError, match="names attention layer 3.1"):
        ela_hf.render_model_card(
            ela_hf.hub.config_from_timm_model(model), model,
            history=ela_hf.load_pruning_history([{"layers": [{"stage": 3, "block": 1}]}]),
        )
    with pytest.raises(ValueError, match="layer 1.0 .* as skipped, but the first block of a stage is never skipped"):
        ela_hf.export_pruned(model, tmp_path / "r", verify=False,
                             pruning_history=[{"layers": [{"stage": 1, "block": 0, "skip": True}]}])
    with pytest.raises(ValueError, match="window 1, layer stage 0 block 1: 'skip' must be true or false, got 'false'"):
        ela_hf.export_pruned(model, tmp_path / "r", verify=False,
                             pruning_history=[{"layers": [{"stage": 0, "block": 1, "skip": "false"}]}])
    plain = timm.create_model("resnet20_cifar", num_classes=10).eval()
    with pytest.raises(ValueError, match="resnet20_cifar is a plain ResNet without attention layers"):
        ela_hf.export_pruned(plain, tmp_path / "r", pruning_history=HISTORY, verify=False)
    assert not (tmp_path / "r").exists() and list(tmp_path.iterdir()) == []


def test_a_history_built_in_python_is_written_as_standard_json(tmp_path):
    """NumPy scalars (a history assembled from arrays) are read, not dropped, and written as numbers; NaN
    d_t (a window that saw no data) becomes null, not the bare NaN that strict JSON readers reject."""
    np = pytest.importorskip("numpy")
    model = timm.create_model("ela_resnet20_cifar", num_classes=10).eval()
    model.set_skip_mask(MASK)
    history = {"selector": {"name": "ebqm", "q": np.float64(0.5)}, "windows": [{"epochs": (1, 3), "layers": [
        {"stage": np.int64(0), "block": np.int64(1), "d": np.float32(0.25), "skip": np.bool_(True)},
        {"stage": 2, "block": 1, "d": float("nan"), "mapped": torch.tensor(0.5), "skip": False},
    ]}]}
    out = ela_hf.export_pruned(model, tmp_path / "r", pruning_history=history, verify=False)

    def no_constants(name):
        raise AssertionError(f"{name} in pruning_history.json")

    written = json.loads((out / "pruning_history.json").read_text(), parse_constant=no_constants)
    assert written["windows"][0]["layers"] == [
        {"stage": 0, "block": 1, "d": 0.25, "skip": True},
        {"stage": 2, "block": 1, "d": None, "mapped": 0.5, "skip": False},
    ]
    assert written["windows"][0]["epochs"] == [1, 3] and written["selector"]["q"] == 0.5
    text = (out / "README.md").read_text()
    assert "| 0 | 2 | 1 | Window 1 (epochs 1-3) |" in text and "| 0.1 | 0.25 |  | yes |" in text
    # and the same history as a file with bare NaN (Python's json.dump writes it) is written back without it
    (tmp_path / "h.json").write_text('{"windows": [{"layers": [{"stage": 0, "block": 1, "d": NaN}]}]}')
    out = ela_hf.export_pruned(model, tmp_path / "r2", pruning_history=tmp_path / "h.json", verify=False)
    assert json.loads((out / "pruning_history.json").read_text(), parse_constant=no_constants)["windows"][0][
        "layers"] == [{"stage": 0, "block": 1, "d": None}]


def test_a_nan_metric_is_refused_not_written_into_the_model_index(tmp_path):
    model = timm.create_model("ela_resnet20_cifar", num_classes=10).eval()
    with pytest.raises(ValueError, match="metric 'eval_loss' is nan: a model card's results must be finite"):
        ela_hf.export_pruned(model, tmp_path / "r", metrics={"eval_accuracy": 0.9, "eval_loss": float("nan")},
                             dataset="uoft-cs/cifar10", verify=False)
    assert not (tmp_path / "r").exists()


def test_card_without_history_or_metrics_still_renders(tmp_path):
    model = timm.create_model("ela_l_resnet20_cifar", num_classes=0).eval()  # a feature extractor
    out = ela_hf.export_pruned(model, tmp_path / "plain", verify=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert "pruned" not in card.data.tags and card.data.datasets is None
    assert "0 of 6" in card.text and "MRLA-L" in card.text and "Pruning history" not in card.text
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_feature_extractor_card_shows_code_that_runs_and_only_real_metrics(tmp_path):
    model = timm.create_model("ela_resnet20_cifar", num_classes=0).eval()
    metrics = {"eval_top1": 0.91, "eval_loss": 0.3, "epoch": 3.0, "eval_runtime": 1.5,
               "eval_samples_per_second": 120.0, "eval_steps_per_second": 4.0}
    out = ela_hf.export_pruned(model, tmp_path / "features", metrics=metrics, dataset="uoft-cs/cifar10", verify=False)
    card = ModelCard.load(out / "README.md")
    assert "AutoModelForImageClassification" not in card.text and '"image-classification"' not in card.text
    assert 'AutoModel.from_pretrained("path/to/features")' in card.text
    assert 'pipeline("image-feature-extraction", model="path/to/features")' in card.text
    assert "features = model(" in card.text
    assert sorted(card.data.metrics) == ["accuracy", "loss"]
    assert "runtime" not in card.text and "| epoch |" not in card.text
    # and the code does what it says on the folder itself
    from transformers import AutoModel

    assert AutoModel.from_pretrained(out)(torch.randn(1, 3, 32, 32)).pooler_output.shape == (1, 256)


def test_numpy_and_tensor_metrics_become_numbers_and_others_are_named(tmp_path):
    np = pytest.importorskip("numpy")
    model = timm.create_model("ela_resnet20_cifar", num_classes=3).eval()
    # what scikit-learn and torchmetrics return
    metrics = {"eval_accuracy": np.float64(0.91234), "eval_top5": np.float32(0.99), "eval_loss": torch.tensor(0.5),
               "eval_count": np.int64(7)}
    out = ela_hf.export_pruned(model, tmp_path / "np", metrics=metrics, dataset="uoft-cs/cifar10", verify=False)
    card = ModelCard.load(out / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"eval_accuracy": 0.9123, "eval_top5": 0.99, "eval_loss": 0.5, "eval_count": 7}
    assert all(type(v) in (float, int) for v in results.values())
    assert "tensor(" not in card.text and "| eval_accuracy | 0.9123 |" in card.text
    with pytest.raises(ValueError, match="metric 'eval_confusion' must be a single number, got ndarray with 4 elements"):
        ela_hf.export_pruned(model, tmp_path / "bad", metrics={"eval_confusion": np.eye(2)}, verify=False)
    with pytest.raises(ValueError, match="metric 'eval_logits' must be a single number, got Tensor with 3 elements"):
        ela_hf.export_pruned(model, tmp_path / "bad", metrics={"eval_logits": torch.ones(3)}, verify=False)
    with pytest.raises(ValueError, match="metric 'eval_top1' must be a number or a string, got dict"):
        ela_hf.export_pruned(model, tmp_path / "bad", metrics={"eval_top1": {"a": 1}}, verify=False)
    assert not (tmp_path / "bad").exists()


def test_card_training_table_shows_what_decided_the_length(tmp_path):
    from transformers import TrainingArguments

    model = timm.create_model("ela_resnet20_cifar", num_classes=3).eval()
    by_steps = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=500, num_train_epochs=3, report_to="none")
    card = ModelCard.load(ela_hf.export_pruned(model, tmp_path / "a", training_args=by_steps, verify=False) / "README.md")
    assert "| max_steps | 500 |" in card.text and "num_train_epochs" not in card.text
    by_epochs = TrainingArguments(output_dir=str(tmp_path / "o"), num_train_epochs=3, report_to="none")
    card = ModelCard.load(ela_hf.export_pruned(model, tmp_path / "b", training_args=by_epochs, verify=False) / "README.md")
    assert "| num_train_epochs | 3" in card.text and "max_steps" not in card.text


@pytest.mark.parametrize("in_chans", [1, 3])
def test_the_cards_usage_snippets_run_as_copied_on_an_rgb_photo(tmp_path, in_chans):
    """A user pastes the card's code with their own `image` (a PIL photo, RGB): both front doors give the
    model's logits, also for a grey checkpoint (timm's transforms keep the image's mode: the card converts)."""
    import re

    import numpy as np

    torch.manual_seed(0)
    model = timm.create_model("ela_resnet20_cifar", num_classes=4, in_chans=in_chans).eval()
    out = ela_hf.export_pruned(model, tmp_path / "release")
    card = (out / "README.md").read_text()
    snippets = [re.sub(r"path/to/[\w.-]+", str(out), code) for code in re.findall(r"```python\n(.*?)```", card, re.S)]
    assert len(snippets) == 2
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    results = []
    for code in snippets:
        namespace = {"image": photo}
        with torch.no_grad():
            exec(code, namespace)
        results.append(namespace["logits"])
    assert results[0].shape == results[1].shape == (1, 4)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)
