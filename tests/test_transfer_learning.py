"""Fine-tuning a published ELA checkpoint on other data: other labels, other input channels, timm's tools."""
import json
import shutil

import numpy as np
import pytest
import timm
import timm.optim
import torch
from PIL import Image
from timm.models._manipulate import group_parameters
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import ela_hf


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A 'published' 3-class RGB checkpoint with class names."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("published")
    config = ela_hf.ElaConfig(architecture="ela_resnet20_cifar", id2label={0: "cat", 1: "dog", 2: "owl"})
    ela_hf.ElaForImageClassification(config).save_pretrained(folder)
    return folder


def test_a_grey_fine_tune_through_from_pretrained_gets_a_grey_data_config(published, tmp_path):
    # from_pretrained's keyword arguments were set on the finished config, past the adjustments ElaConfig makes
    # for num_channels: the saved folder's processor and timm's transforms then fed 3 channels to a 1-channel net
    model = AutoModelForImageClassification.from_pretrained(published, num_channels=1, num_labels=4,
                                                            ignore_mismatched_sizes=True)
    built = ela_hf.ElaConfig(architecture="ela_resnet20_cifar", num_channels=1)
    assert model.config.num_channels == 1 and model.timm_model.conv1.in_channels == 1
    assert model.config.pretrained_cfg["input_size"] == built.pretrained_cfg["input_size"] == [1, 32, 32]
    assert model.config.pretrained_cfg["mean"] == built.pretrained_cfg["mean"]
    model.save_pretrained(tmp_path / "grey")
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8))
    assert len(pipeline("image-classification", model=str(tmp_path / "grey"))(grey)) == 4
    net = timm.create_model(f"local-dir:{tmp_path / 'grey'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=net))
    assert net(transform(grey).unsqueeze(0)).shape == (1, 4)


def test_from_pretrained_checks_new_labels_as_the_config_does(published, tmp_path):
    with pytest.raises(ValueError, match=r"id2label must have the keys 0..1 \(one per logit\), got \[1, 2\]"):
        AutoModelForImageClassification.from_pretrained(published, id2label={1: "cat", 2: "dog"},
                                                        ignore_mismatched_sizes=True)
    model = AutoModelForImageClassification.from_pretrained(published, id2label={0: "ant", 1: "bee"},
                                                            ignore_mismatched_sizes=True)
    assert model.config.label2id == {"ant": 0, "bee": 1}  # not the published labels' names
    model.save_pretrained(tmp_path / "ft")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "ft")
    assert again.config.id2label == {0: "ant", 1: "bee"} and again.config.num_labels == 2


@pytest.mark.parametrize("door", ["transformers", "timm-overlay", "timm-cfg"])
def test_a_malformed_input_size_is_a_value_error_through_every_door(published, door):
    bad = {"input_size": [3, 64], "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ValueError, match=r"pretrained_cfg\['input_size'\] must be \[channels, height, width\]"):
        if door == "transformers":
            AutoModelForImageClassification.from_pretrained(published, pretrained_cfg=bad)
        elif door == "timm-overlay":
            timm.create_model("ela_resnet20_cifar", pretrained_cfg_overlay=bad)
        else:
            timm.create_model("ela_resnet20_cifar", pretrained_cfg=bad)
    if door == "transformers":  # the processor says the same, not "Unrecognized image processor"
        with pytest.raises(ValueError, match=r"pretrained_cfg\['input_size'\] must be"):
            AutoImageProcessor.from_pretrained(published, pretrained_cfg=bad)


def test_a_release_loaded_through_timm_exports_again_with_its_class_names(published, tmp_path):
    net = timm.create_model(f"local-dir:{published}", pretrained=True)
    assert net.pretrained_cfg["label_names"] == ["cat", "dog", "owl"]
    out = ela_hf.export_pruned(net, tmp_path / "again")
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "owl"}
    # names that do not fit the head (reset_classifier) are not taken over
    net.reset_classifier(5)
    config = json.loads((ela_hf.export_pruned(net, tmp_path / "five") / "config.json").read_text())
    assert config["id2label"] == {str(i): f"LABEL_{i}" for i in range(5)}


def test_layer_wise_lr_decay_groups_the_transformers_model_as_its_timm_network():
    model = ela_hf.ElaForImageClassification(ela_hf.ElaConfig(architecture="ela_resnet20_cifar", num_labels=3))
    for coarse in (False, True):
        ours = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
        timms = group_parameters(model.timm_model, model.timm_model.group_matcher(coarse=coarse), reverse=True)
        assert {k.removeprefix("timm_model."): v for k, v in ours.items()} == timms
        assert len(set(timms.values())) > 2
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", layer_decay=0.75)
    scales = sorted({round(g["lr_scale"], 4) for g in optimizer.param_groups})
    assert len(scales) == 8 and scales[-1] == 1.0  # stem, 6 blocks, the rest (head)


def test_init_from_an_rgb_resnet_adapts_the_stem_to_other_input_channels():
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18")
    grey = timm.create_model("ela_resnet18", in_chans=1)
    report = ela_hf.init_from_resnet(grey, resnet)
    assert report.adapted_stem == "conv1.weight" and "adapted to the model's input channels" in str(report)
    torch.testing.assert_close(grey.conv1.weight[:, 0], resnet.conv1.weight.sum(1))
    assert torch.equal(grey.layer1[0].conv1.weight, resnet.layer1[0].conv1.weight)
    hf = ela_hf.ElaForImageClassification.from_timm_resnet(resnet, architecture="ela_resnet18", num_labels=3,
                                                           num_channels=1)
    torch.testing.assert_close(hf.timm_model.conv1.weight[:, 0], resnet.conv1.weight.sum(1))
    # a stem of another shape (kernel size) is still a mismatch
    other = dict(resnet.state_dict(), **{"conv1.weight": torch.randn(64, 3, 5, 5)})
    with pytest.raises(ValueError, match=r"does not fit this architecture .*conv1\.weight: checkpoint \(64, 3, 5, 5\)"):
        ela_hf.init_from_resnet(timm.create_model("ela_resnet18"), other)


def test_weights_of_another_attention_type_are_named_as_such(published):
    # MRLA-B weights under an MRLA-L architecture: every layer is in the file, MRLA-L's lambda is not; the error
    # used to blame a slim checkpoint's missing skip mask
    with pytest.raises(ValueError, match=r"do not fit the model's attention layers: .*layer1\.0\.attn\.lam[^)]* missing.* "
                                         r"weights of another attention type \(MRLA-B against MRLA-L\) than "
                                         r"'ela_l_resnet20_cifar'"):
        AutoModelForImageClassification.from_pretrained(published, architecture="ela_l_resnet20_cifar")


def test_weights_the_model_does_not_have_are_refused(tmp_path):
    # MRLA-L weights under an MRLA-B architecture (lam left over) and a deeper network's loaded with a log line
    torch.manual_seed(0)
    for name in ("ela_l_resnet20_cifar", "ela_resnet56_cifar"):
        ela_hf.ElaForImageClassification(ela_hf.ElaConfig(architecture=name, num_labels=3)).save_pretrained(
            tmp_path / name)
    with pytest.raises(ValueError, match=r"do not fit the model's attention layers: .*layer1\.0\.attn\.lam[^)]* not in "
                                         r"the model.* another attention type .* than 'ela_resnet20_cifar'"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "ela_l_resnet20_cifar",
                                                        architecture="ela_resnet20_cifar")
    # a deeper network's weight file in a folder whose config is the shallower one's
    ela_hf.ElaForImageClassification(ela_hf.ElaConfig(architecture="ela_resnet20_cifar", num_labels=3)).save_pretrained(
        tmp_path / "mixed")
    shutil.copy(tmp_path / "ela_resnet56_cifar" / "model.safetensors", tmp_path / "mixed" / "model.safetensors")
    with pytest.raises(ValueError, match=r"hold \d+ parameters and buffers the model does not have, e.g. "
                                         r"\['layer1\.2\..*deeper network or another architecture than "
                                         r"'ela_resnet20_cifar'"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "mixed")
