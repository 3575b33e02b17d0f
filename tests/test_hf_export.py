"""Slim releases (`ela_hf.export_pruned`): both front doors, atomic writes, and the errors bad checkpoints give."""
import copy
import json
import os

import pytest
import timm
import torch
from safetensors import safe_open
from transformers import AutoModelForImageClassification

import ela_hf
import ela_hf.hub
from ela_hf import ElaConfig, ElaForImageClassification

ARCH = "ela_resnet20_cifar"
MASK = [[False, True], [False, False], [False, True]]


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _pruned_timm_model(arch=ARCH, mask=MASK):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    model.set_skip_mask(mask)
    return model.eval()


def _keys(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", [ARCH, "ela_l_resnet20_cifar"])
def test_slim_release_round_trips_through_both_front_doors(tmp_path, images, arch):
    model = _pruned_timm_model(arch)
    expected = model(images)
    out = ela_hf.export_pruned(model, tmp_path / "release")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    keys = _keys(out)
    assert not any(k.startswith(("layer1.1.attn.", "layer3.1.attn.")) for k in keys), "skipped layers are not in the file"
    assert "layer2.1.attn.wv.weight" in keys and "layer1.1.attn_skipped" in keys
    assert keys == set(ela_hf.models.slim_state_dict(model))
    config = json.loads((out / "config.json").read_text())
    assert config["skip_mask"] == MASK and config["model_args"]["skip_mask"] == MASK
    assert config["architecture"] == arch and config["model_type"] == "ela"

    via_hf = AutoModelForImageClassification.from_pretrained(out).eval()
    via_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    for net in (via_hf.timm_model, via_timm):
        assert net.layer1[1].attn is None and net.layer3[1].attn is None, "the reduced model is built"
        assert net.layer2[1].attn is not None
    assert via_hf.config.is_slim and via_hf.skip_mask == MASK
    torch.testing.assert_close(via_hf(images).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(via_timm(images), expected, rtol=0, atol=0)
    # the release has fewer parameters than the training model, by exactly the skipped attention layers
    skipped = sum(p.numel() for s, b in ((0, 1), (2, 1)) for p in model.stages[s][b].attn.parameters())
    assert sum(p.numel() for p in via_timm.parameters()) == sum(p.numel() for p in model.parameters()) - skipped


def test_export_from_the_transformers_model_and_reexport_of_a_slim_model(tmp_path, images):
    torch.manual_seed(0)
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, id2label={0: "a", 1: "b"})).eval()
    model.set_skip_mask([[False, True], [False, False], [False, False]])
    out = ela_hf.export_pruned(model, tmp_path / "first")
    slim = AutoModelForImageClassification.from_pretrained(out).eval()
    assert slim.config.id2label == {0: "a", 1: "b"}
    # prune the slim model further in place, then release again: both masks end up structural
    slim.set_skip_mask(MASK)
    expected = slim(images).logits
    out2 = ela_hf.export_pruned(slim, tmp_path / "second")
    again = AutoModelForImageClassification.from_pretrained(out2).eval()
    assert again.skip_mask == MASK and again.timm_model.layer3[1].attn is None
    torch.testing.assert_close(again(images).logits, expected, rtol=0, atol=0)


def test_export_is_atomic_and_does_not_overwrite_by_accident(tmp_path, monkeypatch):
    model = _pruned_timm_model()
    target = tmp_path / "release"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the weights are being written

    monkeypatch.setattr(ela_hf.hub, "render_model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ela_hf.export_pruned(model, target, verify=False)
    assert list(tmp_path.iterdir()) == [], "no release folder and no leftover temporary folder"
    monkeypatch.undo()

    ela_hf.export_pruned(model, target, verify=False)
    with pytest.raises(FileExistsError, match="already exists"):
        ela_hf.export_pruned(model, target, verify=False)
    (target / "pruning_history.json").write_text("{}")  # an older release's, which this one does not have
    ela_hf.export_pruned(model, target, overwrite=True, verify=False)
    assert not (target / "pruning_history.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_a_failed_replace_puts_the_earlier_export_back(tmp_path, monkeypatch):
    model = _pruned_timm_model()
    target = ela_hf.export_pruned(model, tmp_path / "release", verify=False)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".partial-" in str(src):  # moving the new export into place fails (e.g. a permission error)
            raise PermissionError("cannot rename")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(PermissionError):
        ela_hf.export_pruned(_pruned_timm_model(mask=[[False, True], [False, True], [False, True]]), target,
                             overwrite=True, verify=False)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before, "the earlier export is back in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"], "no parked or partial folder left"


@pytest.mark.parametrize("training_output", ["checkpoint-2/", "trainer_state.json", "training_args.bin",
                                             "digits.parquet", "notes.txt"])
def test_overwrite_never_replaces_a_training_output_dir(tmp_path, training_output):
    out = tmp_path / "out"
    ela_hf.export_pruned(_pruned_timm_model(), out, verify=False)  # looks like a release, plus:
    if training_output.endswith("/"):
        (out / training_output).mkdir()
        (out / training_output / "model.safetensors").write_bytes(b"weights of a training run")
    else:
        (out / training_output).write_text("{}")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for overwrite in (True, False):  # without overwrite too: the error names the files, not overwrite=True
        with pytest.raises(FileExistsError, match=f"is not an earlier export: it holds {training_output}, which "
                                                  "overwrite=True would delete, so it is never replaced"):
            ela_hf.export_pruned(_pruned_timm_model(), out, overwrite=overwrite, verify=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder left behind"


def test_an_export_is_readable_by_others_as_the_umask_allows(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        out = ela_hf.export_pruned(_pruned_timm_model(), tmp_path / "out", verify=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == dict.fromkeys(
        ["README.md", "config.json", "model.safetensors"], 0o644)


def test_overwrite_replaces_an_earlier_export_with_what_tools_add_beside_it(tmp_path):
    out = ela_hf.export_pruned(_pruned_timm_model(), tmp_path / "out", verify=False)
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"a sharded re-save")
    (out / "model.fp16.safetensors").write_bytes(b"a variant save")
    (out / "model.safetensors.index.fp16.json").write_text("{}")
    ela_hf.export_pruned(_pruned_timm_model(), out, overwrite=True, verify=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_overwrite_keeps_a_processor_config_saved_beside_an_earlier_export(tmp_path, caplog):
    """A user's ``AutoImageProcessor.save_pretrained`` beside an export is what pipelines read: replacing the
    export must not silently drop it (the preprocessing, here the crop, would change)."""
    from transformers import AutoImageProcessor

    out = ela_hf.export_pruned(_pruned_timm_model(), tmp_path / "out", verify=False)
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    AutoImageProcessor.from_pretrained(str(out), pretrained_cfg={**cfg, "crop_pct": 0.5}).save_pretrained(str(out))
    saved = (out / "preprocessor_config.json").read_bytes()
    with caplog.at_level("WARNING"):
        ela_hf.export_pruned(_pruned_timm_model(), out, overwrite=True, verify=False)
    assert (out / "preprocessor_config.json").read_bytes() == saved
    assert AutoImageProcessor.from_pretrained(str(out)).pretrained_cfg["crop_pct"] == 0.5
    assert "kept the preprocessor_config.json saved beside the earlier export" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder left behind"


def test_export_rejects_what_it_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="expected a timm ELA model"):
        ela_hf.export_pruned(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(ValueError, match="id2label has 3 labels but the model has 10 classes"):
        ela_hf.export_pruned(_pruned_timm_model(), tmp_path / "x", id2label={0: "a", 1: "b", 2: "c"})
    # a user's wrapper around a whole network (which the pruning callback trains): the error names where it is,
    # not the features_only recipe (a new num_classes=0 network) that does not fit it
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _pruned_timm_model()
            self.extra = torch.nn.Linear(10, 2)

    wrapper = Wrapper()
    with pytest.raises(ValueError, match=r"got Wrapper\. It holds a whole ELA network at \.backbone "
                                         r"\(LayerAttentionResNet\): export that, export_pruned\(model\.backbone"):
        ela_hf.export_pruned(wrapper, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert ela_hf.export_pruned(wrapper.backbone, tmp_path / "y", verify=False).is_dir()


def test_checkpoint_missing_weights_of_active_layers_is_an_error(tmp_path):
    out = ela_hf.export_pruned(_pruned_timm_model(), tmp_path / "release", verify=False)
    config = json.loads((out / "config.json").read_text())
    # a slim file whose config lost its mask: the config says layer1.1's attention exists
    config["skip_mask"] = None
    config["model_args"].pop("skip_mask")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"miss \d+ parameters the config says exist.*layer1\.1\.attn.*a slim "
                                         r"checkpoint needs its skip mask"):  # not "another attention type"
        AutoModelForImageClassification.from_pretrained(out)
    # weights lacking more than attention layers are not blamed on a lost mask
    config = ElaConfig(architecture=ARCH, num_labels=2)
    for state_dict in ({}, {k: v for k, v in ElaForImageClassification(config).state_dict().items()
                            if not k.startswith("timm_model.layer3.")}):
        with pytest.raises(ValueError, match=r"miss \d+ parameters the config says exist.* \d+ of them lie outside "
                                             r"the attention layers: the weights are of another architecture") as err:
            ElaForImageClassification.from_pretrained(None, config=config, state_dict=state_dict)
        assert "slim" not in str(err.value)


def test_config_and_weights_disagreeing_on_the_mask_is_an_error(tmp_path):
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    model.set_skip_mask(MASK)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["skip_mask"] = [[False, False]] * 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"disagree on which attention layers are skipped.*\(0, 1\)"):
        AutoModelForImageClassification.from_pretrained(tmp_path)
    # a slim release whose config.json names the same mask at the top and in model_args, with weights that
    # skip one more layer (hand-edited): still refused, only timm's config.json (no top-level mask) adopts flags
    release = ela_hf.export_pruned(_pruned_timm_model(), tmp_path / "release", verify=False)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(release / "model.safetensors"))
    weights["layer2.1.attn_skipped"] = torch.tensor(True)
    save_file(weights, str(release / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"disagree on which attention layers are skipped.*\(1, 1\)"):
        AutoModelForImageClassification.from_pretrained(release)
    config["skip_mask"] = MASK
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"or skip_mask= given to from_pretrained.*\(1, 1\).*set_skip_mask after"):
        AutoModelForImageClassification.from_pretrained(tmp_path, skip_mask=[[False, True], [False, True], [False, True]])


def test_corrupt_or_missing_weight_file_is_a_clear_error(tmp_path):
    ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not ours")  # another library's file: not blamed
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(ValueError, match=r"[/\\]model\.safetensors is corrupt or truncated"):
        AutoModelForImageClassification.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match="has a config.json but no weight file"):
        AutoModelForImageClassification.from_pretrained(tmp_path)
    # a sharded checkpoint with one truncated shard: that shard is named
    ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).save_pretrained(
        tmp_path / "sharded", max_shard_size="300KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shard.name} is corrupt or truncated"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "sharded")
    shard.unlink()
    with pytest.raises(ValueError, match=f"the weight index names shards that are missing: \\['{shard.name}'\\]"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "sharded")
    # a folder with only a variant's weights: a truncated variant file is named, not "no weight file"
    ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).save_pretrained(tmp_path / "v", variant="fp16")
    variant = tmp_path / "v" / "model.fp16.safetensors"
    variant.write_bytes(variant.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.fp16.safetensors is corrupt or truncated"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "v", variant="fp16")


def test_errors_loading_from_a_local_subfolder_are_the_real_ones(tmp_path):
    ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).save_pretrained(tmp_path / "sub")
    # a size mismatch and a mask that does not fit keep their own messages (not "no weight file" for the
    # folder above, which holds no config.json either)
    with pytest.raises(Exception, match="size mismatch|ignore_mismatched_sizes") as info:
        AutoModelForImageClassification.from_pretrained(tmp_path, subfolder="sub", num_labels=7)
    assert "no weight file" not in str(info.value)
    with pytest.raises(ValueError, match="skip_mask"):
        AutoModelForImageClassification.from_pretrained(tmp_path, subfolder="sub", skip_mask=[[False]])
    weights = tmp_path / "sub" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"sub[/\\]model\.safetensors is corrupt or truncated"):
        AutoModelForImageClassification.from_pretrained(tmp_path, subfolder="sub")
    weights.unlink()
    with pytest.raises(ValueError, match=r"sub has a config.json but no weight file"):
        AutoModelForImageClassification.from_pretrained(tmp_path, subfolder="sub")


def test_mask_in_config_json_that_does_not_fit_is_a_clear_error(tmp_path):
    ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["skip_mask"] = [[False, True, True], [False, False], [False, False]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="skip_mask does not fit the architecture: skip_mask stage 0 has 3 entries"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_a_save_in_another_layout_removes_the_earlier_weight_files(tmp_path, monkeypatch):
    old = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    old.save_pretrained(tmp_path)  # saves right after each other, as a script does
    torch.manual_seed(1)
    new = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).eval()
    new.save_pretrained(tmp_path, max_shard_size="300KB")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" not in names, "the old single file would be loaded instead of the new shards"
    assert "model.safetensors.index.json" in names
    x = torch.randn(1, 3, 32, 32)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(x).logits, new(x).logits)
    # and back to one file: the shards and their index go
    new.save_pretrained(tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("model-", ".")) or p.name.endswith("index.json")]
    torch.testing.assert_close(AutoModelForImageClassification.from_pretrained(tmp_path).eval()(x).logits, new(x).logits)
    # a save that fails leaves the earlier weights in place
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "model.safetensors"))
    import transformers.modeling_utils

    def broken_save(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        old.save_pretrained(tmp_path, max_shard_size="300KB")
    assert sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    after = load_file(str(tmp_path / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no hidden leftovers"
    monkeypatch.undo()
    # a variant is saved next to the default weights on purpose: both stay
    copy.deepcopy(new).half().save_pretrained(tmp_path, variant="fp16")
    assert {"model.safetensors", "model.fp16.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert load_file(str(tmp_path / "model.safetensors")).keys() == before.keys()


class _Crash(BaseException):
    pass


def _save_counting_changes(model, folder, crash_at: int | None = None, **kwargs) -> int:
    """``model.save_pretrained``, counting its file-system changes (os.replace / os.remove / os.link); with
    ``crash_at``, stopped just before that change (0-based), as a kill would stop it."""
    calls = []
    patched = {name: getattr(os, name) for name in ("replace", "remove", "link")}

    def change(real, *args, **kw):
        if len(calls) == crash_at:
            raise _Crash
        calls.append(args)
        return real(*args, **kw)

    try:
        for name, real in patched.items():
            setattr(os, name, lambda *a, _real=real, **k: change(_real, *a, **k))
        if crash_at is None:
            model.save_pretrained(folder, **kwargs)
        else:
            with pytest.raises(_Crash):
                model.save_pretrained(folder, **kwargs)
    finally:
        for name, real in patched.items():
            setattr(os, name, real)
    return len(calls)


def _which_save(folder, saves: dict):
    """The name of the save in ``saves`` whose every tensor ``folder`` loads; 'none' when it loads no weights."""
    try:
        loaded = AutoModelForImageClassification.from_pretrained(folder).state_dict()
    except (OSError, ValueError) as err:
        names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        read_first = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"}
        if read_first & set(names):  # weights with a config.json of another skip mask: refused by name
            assert "skip" in str(err), (err, names)
            return "refused"
        return "none"  # no weights yet (shards without their index are not read)
    whole = [name for name, model in saves.items()
             if all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.items())]
    assert whole, f"{folder} loads a mix of saves: {sorted(p.name for p in folder.iterdir())}"
    return whole[0]


def _write_bin(model, folder):
    """An earlier save in the PyTorch format (transformers 4 wrote it; transformers 5 still reads it)."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save({k.removeprefix("timm_model."): v for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")


@pytest.mark.parametrize("earlier, later, mask", [
    ("300KB", "300KB", None),  # shards of the same names replaced one by one
    ("300KB", "300KB", MASK),  # a config.json of another skip mask
    (None, "300KB", None),  # model.safetensors (read first) under new shards
    (None, None, MASK),
    ("300KB", None, None),
    ("bin", None, None),  # pytorch_model.bin under model.safetensors
    ("bin", "300KB", None),
    ("fresh", "300KB", None),  # no earlier save
    ("fresh", None, None),
])
def test_an_interrupted_save_leaves_one_whole_save_loadable(tmp_path, earlier, later, mask):
    torch.manual_seed(0)
    old = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).eval()
    torch.manual_seed(1)
    new = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).eval()
    if mask is not None:
        new.set_skip_mask(mask)  # pruned since the earlier save
    shard = {} if later is None else {"max_shard_size": later}

    def earlier_save(folder):
        if earlier == "bin":
            _write_bin(old, folder)
        elif earlier != "fresh":
            old.save_pretrained(folder, **({} if earlier is None else {"max_shard_size": earlier}))

    earlier_save(tmp_path / "count")
    steps = _save_counting_changes(new, tmp_path / "count", **shard)
    assert steps >= 2
    seen = []
    for step in range(steps):
        folder = tmp_path / f"step{step}"
        earlier_save(folder)
        _save_counting_changes(new, folder, crash_at=step, **shard)
        seen.append(_which_save(folder, {"old": old, "new": new}))
    before = "none" if earlier == "fresh" else "old"
    # the earlier save is loaded, whole, until one step switches to the new one, whole; never back. With
    # another mask, the step between config.json and the commit is refused by name, never loaded
    assert seen[0] == before and seen == sorted(seen, key=[before, "refused", "new"].index)
    assert seen.count("refused") == (mask is not None and earlier != "fresh"), seen
    # and the next save there finishes the job: only its own files are left
    new.save_pretrained(folder, **shard)
    expected = sorted(os.listdir(tmp_path / "count"))
    assert sorted(os.listdir(folder)) == expected and not [n for n in expected if n.startswith(".")]
    assert _which_save(folder, {"new": new}) == "new"


def test_a_first_save_that_fails_leaves_no_half_written_weights(tmp_path, monkeypatch):
    import transformers.modeling_utils

    def broken_save(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken_save)
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "fresh")
    assert os.listdir(tmp_path / "fresh") == [], "no config.json without weights, no truncated model.safetensors"


def test_a_variant_with_another_skip_mask_is_refused_next_to_default_weights(tmp_path, images):
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).eval()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(images).logits
    model.set_skip_mask(MASK)  # pruned further: the shared config.json would no longer fit the default weights
    with pytest.raises(ValueError, match=r"skip mask .* differs from this model's .*its own folder"):
        model.save_pretrained(tmp_path, variant="pruned")
    assert not (tmp_path / "model.pruned.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForImageClassification.from_pretrained(tmp_path).eval()(images).logits,
                                   expected)
    model.save_pretrained(tmp_path / "alone", variant="pruned")  # without default weights there: fine
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "alone", variant="pruned").skip_mask == MASK
    # another variant beside it shares the same config.json: the same mask is fine, another one is refused
    model.half().save_pretrained(tmp_path / "alone", variant="fp16", max_shard_size="100KB")
    assert any(p.name.startswith("model.fp16-") for p in (tmp_path / "alone").iterdir())  # sharded
    unpruned = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    with pytest.raises(ValueError, match=r"holds weights \(model\.fp16-00001-of-00008\.safetensors, .* and 7 more\) whose skip mask"):
        unpruned.save_pretrained(tmp_path / "alone", variant="ema")
    assert not (tmp_path / "alone" / "model.ema.safetensors").exists()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "alone", variant="pruned")
    assert loaded.skip_mask == MASK
    # a variant's own earlier files do not count: re-saving it with another mask replaces it
    (tmp_path / "own").mkdir()
    model.float().save_pretrained(tmp_path / "own", variant="pruned", max_shard_size="100KB")
    unpruned.save_pretrained(tmp_path / "own", variant="pruned", max_shard_size="100KB")
    assert not any(AutoModelForImageClassification.from_pretrained(tmp_path / "own", variant="pruned").skip_mask[0])


def test_a_folder_saved_by_timm_itself_loads_with_the_mask_of_its_weights(tmp_path, images):
    from timm.models import save_for_hf

    pruned = _pruned_timm_model().eval()  # pruned in place: every weight kept, the flags say skipped
    save_for_hf(pruned, tmp_path)  # timm's own Hub format: config.json names no mask
    assert "skip_mask" not in json.loads((tmp_path / "config.json").read_text())
    loaded = ElaForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.skip_mask == loaded.config.skip_mask == MASK
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, pruned(images), rtol=0, atol=0)
    # a slim model (layers not built: model_args' mask) pruned further in place, saved by timm
    structural = [[False, True], [False, False], [False, False]]
    slim = timm.create_model(ARCH, num_classes=10, skip_mask=structural).eval()
    slim.set_skip_mask(MASK)
    save_for_hf(slim, tmp_path / "slim", model_args={"skip_mask": structural})
    loaded = ElaForImageClassification.from_pretrained(tmp_path / "slim").eval()
    assert loaded.skip_mask == loaded.config.skip_mask == MASK
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, slim(images), rtol=0, atol=0)


@pytest.mark.parametrize("flag, problem", [
    ("first", "skips the first block of a stage, which can never be skipped"),
    ("fraction", "a skip flag must be a single boolean, got tensor(0.3"),
])
def test_invalid_skip_flags_stored_with_the_weights_are_refused_at_load(tmp_path, flag, problem):
    """A hand-edited or corrupted checkpoint: a flag on a stage's first block (which starts the stage's MRLA
    state) or a flag of 0.3 (a bool buffer reads it as skipped) loaded silently into a model running other
    layers than any valid mask."""
    from safetensors.torch import load_file, save_file
    from timm.models import save_for_hf

    state = timm.create_model(ARCH, num_classes=10).state_dict()
    if flag == "first":
        state["layer2.0.attn_skipped"] = torch.tensor(True)
    else:
        state["layer2.1.attn_skipped"] = torch.tensor(0.3)
    with pytest.raises(RuntimeError, match=problem.replace("(", r"\(")):
        timm.create_model(ARCH, num_classes=10).load_state_dict(state)
    # a folder timm wrote (no mask in config.json: the flags are the mask), through both front doors
    save_for_hf(timm.create_model(ARCH, num_classes=10), tmp_path, safe_serialization=True)
    weights = load_file(tmp_path / "model.safetensors")
    weights.update({k: v for k, v in state.items() if k.endswith("attn_skipped")})
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=problem.replace("(", r"\(")):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    # transformers' loader casts the stored flag to the model's bool buffer: 0.3 arrives as a plain True (and
    # is then a valid mask); a skipped first block is still one
    if flag == "first":
        with pytest.raises(ValueError, match=r"skip flags stored with the weights in .*skip_mask\[1\]\[0\] skips the first"):
            ElaForImageClassification.from_pretrained(tmp_path)


def test_a_variant_next_to_weights_timm_saved_is_checked_against_their_skip_flags(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(_pruned_timm_model(), tmp_path)  # config.json names no mask: the weights' flags are it
    model = ElaForImageClassification.from_pretrained(tmp_path)
    model.half().save_pretrained(tmp_path, variant="fp16")  # the same mask: fine
    assert ElaForImageClassification.from_pretrained(tmp_path).skip_mask == MASK
    model.set_skip_mask([[False, True], [False, True], [False, True]])
    with pytest.raises(ValueError, match=r"skip mask \[\[False, True\], \[False, False\], \[False, True\]\] differs"):
        model.save_pretrained(tmp_path, variant="more")


def test_a_model_with_frozen_batchnorm_exports_and_loads(tmp_path, images):
    from timm.layers import freeze_batch_norm_2d

    frozen = freeze_batch_norm_2d(_pruned_timm_model()).eval()  # detection training freezes BN
    out = ela_hf.export_pruned(frozen, tmp_path / "release")
    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, frozen(images))
    backbone = ela_hf.ElaModel(ElaConfig(architecture=ARCH))
    backbone.timm_model = freeze_batch_norm_2d(backbone.timm_model)
    backbone.save_pretrained(tmp_path / "backbone")
    ela_hf.ElaModel.from_pretrained(tmp_path / "backbone")


def test_a_features_only_backbone_is_exported_through_the_full_network(tmp_path):
    backbone = timm.create_model(ARCH, features_only=True).eval()
    ela_hf.set_skip_mask(backbone, MASK)
    with pytest.raises(ValueError, match=r"got FeatureListNet\. It contains ELA stages .*'ela_resnet20_cifar'"):
        ela_hf.export_pruned(backbone, tmp_path / "nope")
    getter = timm.create_model(ARCH, features_only=True, feature_cls="getter")
    with pytest.raises(ValueError, match=r"got FeatureGetterNet\. .*net\.load_state_dict\(ela_hf\.models\."
                                         r"slim_state_dict\(backbone\.model\)\)"):
        ela_hf.export_pruned(getter, tmp_path / "nope")
    # the route each message gives, run as written (feature_cls='hook' keeps the network under .body), on a
    # backbone with skipped layers
    import re

    def route(wrapped):
        with pytest.raises(ValueError) as refused:
            ela_hf.export_pruned(wrapped, tmp_path / "nope")
        found = re.search(r"net = (timm\.create_model\(.*?\)\)); net\.load_state_dict\((.*?\))\) \(a backbone",
                          str(refused.value))
        names = {"timm": timm, "ela_hf": ela_hf, "backbone": wrapped}
        net = eval(found.group(1), names)
        net.load_state_dict(eval(found.group(2), names))  # strict
        return net

    x = torch.randn(2, 3, 32, 32)
    for feature_cls in ("list", "dict", "hook", "getter"):
        wrapped = timm.create_model(ARCH, features_only=True, feature_cls=feature_cls).eval()
        ela_hf.set_skip_mask(wrapped, MASK)
        net = route(wrapped).eval()
        with torch.no_grad():
            torch.testing.assert_close(net.forward_intermediates(x, intermediates_only=True)[-1],
                                       list(wrapped(x).values() if feature_cls == "dict" else wrapped(x))[-1])
    # the way the error describes
    net = timm.create_model(ARCH, num_classes=0)
    net.load_state_dict(backbone.state_dict())
    out = ela_hf.export_pruned(net, tmp_path / "release")
    again = timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(again(x), backbone(x)):
            torch.testing.assert_close(a, b)
    # a backbone loaded from that slim release (the skipped layers' weights absent) and pruned further: the
    # route builds the network with its mask, so it takes the backbone's weights as they are
    ela_hf.set_skip_mask(again, [[a or b for a, b in zip(stage, [False] + [True] * (len(stage) - 1))]
                                 for stage in ela_hf.get_skip_mask(again)])
    further = ela_hf.export_pruned(route(again), tmp_path / "further")
    reloaded = timm.create_model(f"local-dir:{further}", pretrained=True, features_only=True).eval()
    assert ela_hf.get_skip_mask(reloaded) == ela_hf.get_skip_mask(again)
    with torch.no_grad():
        for a, b in zip(reloaded(x), again(x)):
            torch.testing.assert_close(a, b)


def test_the_next_save_deletes_the_hidden_folder_of_a_killed_save(tmp_path):
    """A process killed while moving a save's files in leaves its hidden folder (full weights); the next
    save into that folder deletes it, but not the folder of a save still running (or on another host)."""
    import subprocess
    import sys
    import textwrap

    target = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os
        import ela_hf
        model = ela_hf.ElaForImageClassification(ela_hf.ElaConfig(architecture={ARCH!r}, num_labels=2))
        model.save_pretrained({str(target)!r})
        os.replace = lambda *args: os._exit(3)  # killed mid-save, after the weights were written
        model.save_pretrained({str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    left = [p for p in target.iterdir() if p.name.startswith(".save-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()
    host = ela_hf.hf.modeling_ela._host_tag()
    running = target / f".save-{host}-{os.getpid()}-abcd1234"  # this process: alive
    elsewhere = target / f".save-otherhost-{left[0].name.split('-')[-2]}-abcd1234"  # a dead pid there
    running.mkdir(), elsewhere.mkdir()
    model = ElaForImageClassification.from_pretrained(target)  # the earlier weights are intact
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == sorted([running.name, elsewhere.name])


def test_a_save_of_another_pid_namespace_keeps_its_working_folder(tmp_path, monkeypatch):
    """A container sharing this host's name and the folder numbers its processes apart: a PID that is gone
    here may be its running save. Its working folder is named apart and left alone; ours of a dead PID goes."""
    import subprocess
    import sys

    import ela_hf.hf.modeling_ela as modeling

    ours = modeling._pid_namespace()
    if ours is None:
        pytest.skip("this system does not say which PID namespace a process is in")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(modeling, "_pid_namespace", lambda: ours + 1)  # as the other container names it
    theirs = tmp_path / f".save-{modeling._process_tag().rsplit('-', 1)[0]}-{dead}-abcd1234"
    monkeypatch.undo()
    mine = tmp_path / f".save-{modeling._process_tag().rsplit('-', 1)[0]}-{dead}-abcd1234"
    assert theirs != mine
    theirs.mkdir(), mine.mkdir()
    model.save_pretrained(tmp_path)
    assert theirs.is_dir() and not mine.exists()


@pytest.mark.parametrize("killed_at", ["writing", "replacing"])
def test_the_next_export_cleans_up_after_a_killed_one(tmp_path, killed_at):
    """A process killed while writing an export leaves its hidden `.partial-` folder (deleted by the next export
    there); one killed between parking the earlier export and renaming the new one into place leaves no release
    at all: the next export puts the earlier one back first (then replaces it only with overwrite=True)."""
    import subprocess
    import sys
    import textwrap

    target = tmp_path / "release"
    kill = {"writing": "safetensors.torch.save_file = lambda *a, **k: os._exit(3)",
            "replacing": "real = os.rename\nos.rename = lambda a, b: os._exit(3) if '.partial-' in str(a) else real(a, b)"}
    script = textwrap.dedent(f"""
        import os, timm, ela_hf, ela_hf.hub, safetensors.torch
        model = timm.create_model({ARCH!r}, num_classes=3)
        model.set_skip_mask([[False, True], [False, False], [False, False]])
        ela_hf.export_pruned(model, {str(target)!r}, verify=False)
        model.set_skip_mask([[False, True], [False, True], [False, False]])
    """) + kill[killed_at] + f"\nela_hf.export_pruned(model, {str(target)!r}, overwrite=True, verify=False)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    if killed_at == "writing":
        assert target.is_dir() and [h.split("-")[0] for h in hidden] == [".release.partial"]
    else:
        assert not target.exists() and [h.split("-")[0] for h in hidden] == [".release.old", ".release.partial"]
    host = ela_hf.hf.modeling_ela._host_tag()
    running = tmp_path / f".release.partial-{host}-{os.getpid()}-abcd1234"  # this process: alive
    running.mkdir()
    pruned = _pruned_timm_model(mask=[[False, True], [False, True], [False, True]])
    if killed_at == "replacing":
        with pytest.raises(FileExistsError, match="already exists"):  # the earlier release is back
            ela_hf.export_pruned(pruned, target, verify=False)
        assert json.loads((target / "config.json").read_text())["skip_mask"] == [[False, True], [False, False],
                                                                                  [False, False]]
    ela_hf.export_pruned(pruned, target, overwrite=True, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "release"])


def test_a_model_with_non_finite_outputs_is_named_at_export(tmp_path):
    model = _pruned_timm_model()
    model.fc.weight.data.fill_(float("nan"))  # a diverged run
    with pytest.raises(ValueError, match=r"outputs are not finite \(NaN/inf\).*verify=False"):
        ela_hf.export_pruned(model, tmp_path / "release")
    assert not any(tmp_path.iterdir())
    ela_hf.export_pruned(model, tmp_path / "release", verify=False)  # written anyway when asked
