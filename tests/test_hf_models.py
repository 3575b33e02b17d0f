"""transformers front door: config, models, image processor, and the one folder format both libraries read."""
import copy
import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

import ela_hf
from ela_hf import ElaConfig, ElaForImageClassification, ElaImageProcessor, ElaModel

ARCH = "ela_resnet20_cifar"
MASK = [[False, True], [False, False], [False, True]]


def _trained_bn(model):
    """One training-mode pass so BatchNorm statistics differ from their init (outputs then depend on them)."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model.eval()


def _weight_keys(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_config_documents_and_validates_its_fields():
    config = ElaConfig(architecture=ARCH, num_labels=10, skip_mask=MASK, drop_path_rate=0.2)
    assert config.model_type == "ela"
    assert config.num_labels == 10 and config.skip_mask == MASK and not config.is_slim
    assert config.stage_sizes == [2, 2, 2]
    assert config.pretrained_cfg["input_size"] == [3, 32, 32]
    # default classes come from the architecture's timm cfg (CIFAR-100 nets)
    assert ElaConfig(architecture=ARCH).num_labels == 100
    for field in ("architecture", "num_labels", "skip_mask", "slim", "num_channels", "drop_path_rate", "model_args", "pretrained_cfg"):
        assert f"{field} (`" in ElaConfig.__doc__, field
    slim = ElaConfig(architecture=ARCH, skip_mask=MASK, slim=True)
    assert slim.is_slim and slim.model_args["skip_mask"] == MASK
    assert ElaConfig.from_dict(slim.to_dict()).to_dict() == slim.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(architecture="resnet50"), "not an ela_hf layer-attention model"),
        (dict(architecture=ARCH, skip_mask=[[False, True]] * 2), "has 2 stages but the architecture has 3"),
        (dict(architecture=ARCH, skip_mask=[[False, True, False]] * 3), "stage 0 has 3 entries"),
        (dict(architecture=ARCH, skip_mask=[[True, False]] * 3), "first block"),
        (dict(architecture="resnet20_cifar", skip_mask=MASK), "no attention layers"),
        (dict(architecture=ARCH, model_args={"skip_mask": MASK}), None),
        (dict(architecture=ARCH, skip_mask=[[False, False]] * 3, model_args={"skip_mask": MASK}), "says are active"),
        (dict(architecture=ARCH, slim=True), "slim=True needs a skip_mask"),
    ],
)
def test_config_rejects_masks_that_do_not_fit(kwargs, message):
    if message is None:  # a structural mask alone implies the run-time mask
        assert ElaConfig(**kwargs).skip_mask == MASK
        return
    with pytest.raises(ValueError, match=message):
        ElaConfig(**kwargs)


def test_config_architecture_cannot_be_reassigned_after_construction(tmp_path):
    # the derived fields (data config, default labels, mask checks) stayed the old architecture's: a CIFAR config
    # switched to ela_resnet50 kept 32x32 inputs and CIFAR's mean/std for the image processor, silently
    config = ElaConfig(architecture=ARCH)
    with pytest.raises(ValueError, match=r"config.architecture cannot be changed after the config is built "
                                         r"\('ela_resnet20_cifar' -> 'ela_resnet50'\).*ElaConfig\(architecture="):
        config.architecture = "ela_resnet50"
    with pytest.raises(ValueError, match="cannot be changed"):
        config.update({"architecture": "ela_resnet50"})
    assert config.architecture == ARCH and config.pretrained_cfg["input_size"] == [3, 32, 32]
    config.architecture = ARCH  # the same value is no change
    # the ways that rebuild the derived fields still work: construction, from_pretrained(architecture=)
    config.save_pretrained(tmp_path)
    other = ElaConfig.from_pretrained(tmp_path, architecture="ela_l_resnet20_cifar")
    assert other.architecture == "ela_l_resnet20_cifar" and copy.deepcopy(other).architecture == other.architecture
    assert ElaConfig(architecture="ela_resnet50").pretrained_cfg["input_size"] == [3, 224, 224]


def test_config_refuses_a_num_channels_that_is_not_an_int():
    # "3" failed in the range check ('<' not supported between 'str' and 'int'); model_args in_chans "x" in int()
    # and 2.7 was cut to 2
    for kwargs, bad in ((dict(num_channels="3"), "'3' (str)"), (dict(model_args={"in_chans": "x"}), "'x' (str)"),
                        (dict(model_args={"in_chans": 2.7}), "2.7 (float)")):
        with pytest.raises(TypeError, match=re.escape(f"num_channels (timm's in_chans) must be an int, got {bad}")):
            ElaConfig(architecture=ARCH, **kwargs)
    assert ElaConfig(architecture=ARCH, model_args={"in_chans": np.int64(1)}).num_channels == 1
    assert type(ElaConfig(architecture=ARCH, num_channels=np.int64(1)).to_dict()["num_channels"]) is int


def test_config_refuses_timm_features_only_switches_in_model_args():
    # features_only=True built a FeatureListNet that failed at the first forward ("no attribute 'forward_features'")
    from ela_hf import ElaBackbone

    for model_args in ({"features_only": True}, {"out_indices": [1]}, {"feature_cls": "getter"}):
        with pytest.raises(ValueError, match=rf"model_args \['{next(iter(model_args))}'\] \(timm's features_only "
                                             r"switches\) are not taken by ElaConfig.*ElaBackbone"):
            ElaConfig(architecture=ARCH, model_args=model_args)
    for cls in (ElaForImageClassification, ElaModel, ElaBackbone):
        assert cls(ElaConfig(architecture=ARCH, model_args={"features_only": False}))(torch.randn(1, 3, 32, 32))


def test_auto_classes_are_registered_on_import(tmp_path):
    config = AutoConfig.for_model("ela", architecture=ARCH, num_labels=3)
    assert isinstance(config, ElaConfig)
    assert isinstance(AutoModel.from_config(config), ElaModel)
    assert isinstance(AutoModelForImageClassification.from_config(config), ElaForImageClassification)


def test_forward_outputs_loss_and_hidden_states(images):
    torch.manual_seed(0)
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=4)).eval()
    out = model(images, labels=torch.tensor([0, 3]), output_hidden_states=True)
    assert type(out).__name__ == "ImageClassifierOutputWithNoAttention"
    assert out.logits.shape == (2, 4)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 3])))
    # stem + one feature map per stage
    assert [h.shape[1] for h in out.hidden_states] == [16, 64, 128, 256]
    assert torch.equal(model(images).logits, out.logits)
    loss, logits = model(images, labels=torch.tensor([0, 1]), return_dict=False)[:2]
    assert logits.shape == (2, 4) and loss.ndim == 0

    backbone = ElaModel(ElaConfig(architecture=ARCH)).eval()
    features = backbone(images)
    assert type(features).__name__ == "BaseModelOutputWithPoolingAndNoAttention"
    assert features.last_hidden_state.shape == (2, 256, 8, 8)
    assert torch.allclose(features.pooler_output, features.last_hidden_state.mean(dim=(2, 3)), atol=1e-6)
    assert not hasattr(backbone.timm_model.fc, "weight"), "the base model has no classifier"


def test_hidden_states_can_be_selected_by_index_as_in_transformers(images):
    """transformers 5 lets output_hidden_states be an index or a list of indices: the tuple keeps its positions,
    with None for the hidden states left out (negative indices count from the end, out of range selects nothing)."""
    from ela_hf import ElaBackbone

    torch.manual_seed(0)
    config = ElaConfig(architecture=ARCH, num_labels=4, out_features=["stage2", "stage3"])
    models = [cls(config).eval() for cls in (ElaForImageClassification, ElaModel)]
    models.append(ElaBackbone(config).eval())
    for model in models:
        everything = model(images, output_hidden_states=True).hidden_states
        assert len(everything) == 4 and all(h is not None for h in everything)
        for selection, kept in (([1, -1], {1, 3}), (2, {2}), ((0, 7), {0}), ([-4], {0}), (0, {0})):
            out = model(images, output_hidden_states=selection)
            assert len(out.hidden_states) == 4
            assert {i for i, h in enumerate(out.hidden_states) if h is not None} == kept
            for i in kept:
                assert torch.equal(out.hidden_states[i], everything[i])
        assert model(images, output_hidden_states=[]).hidden_states is None  # (an empty selection, as False)
        as_tuple = model(images, output_hidden_states=[3], return_dict=False)
        assert as_tuple[-1][:3] == (None, None, None) and torch.equal(as_tuple[-1][3], everything[3])
        for wrong in (["stage2"], 1.5, [True]):
            with pytest.raises(ValueError, match="output_hidden_states must be True/False, a hidden-state index"):
                model(images, output_hidden_states=wrong)
    backbone = models[2]
    assert [f.shape[1] for f in backbone(images, output_hidden_states=[0]).feature_maps] == [128, 256]


def test_wrong_channel_count_is_a_clear_error(images):
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    with pytest.raises(ValueError, match="pixel_values has 1 channels but this model expects 3"):
        model(images[:, :1])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(images[0])
    gray = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2, num_channels=1)).eval()
    assert gray(images[:, :1]).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="expects 1"):
        gray(images)


def test_raw_integer_pixels_are_refused_not_cast(images):
    """uint8 0-255 images would run as if normalised: every front door of the transformers models refuses them."""
    from ela_hf import ElaBackbone

    raw = (images.clamp(-1, 1) * 127 + 128).to(torch.uint8)
    for cls in (ElaForImageClassification, ElaModel, ElaBackbone):
        model = cls(ElaConfig(architecture=ARCH, num_labels=2)).eval()
        for pixels in (raw, raw.long(), raw.bool()):
            with pytest.raises(ValueError, match=r"pixel_values must be a floating-point tensor .* image processor"):
                model(pixels)
        model(raw.float())  # floats of any kind still run
        model(images.double())


def test_pixel_values_that_are_not_tensors_are_refused(images):
    """NumPy arrays (e.g. from return_tensors="np") failed in torch.is_floating_point, lists on `.ndim`."""
    from ela_hf import ElaBackbone

    for cls in (ElaForImageClassification, ElaModel, ElaBackbone):
        model = cls(ElaConfig(architecture=ARCH, num_labels=2)).eval()
        for pixels, kind in ((images.numpy(), "numpy.ndarray"), (images.tolist(), "builtins.list")):
            with pytest.raises(TypeError, match=rf"pixel_values must be a torch.Tensor, got {kind}; run the image "
                                                r"processor .*torch.from_numpy"):
                model(pixels)


def test_id2label_must_name_every_logit_from_zero():
    with pytest.raises(ValueError, match=r"id2label must have the keys 0..2 \(one per logit\), got \[1, 2, 3\]"):
        ElaConfig(architecture=ARCH, id2label={1: "cat", 2: "dog", 3: "owl"})
    assert ElaConfig(architecture=ARCH, id2label={"1": "dog", "0": "cat"}).id2label == {0: "cat", 1: "dog"}
    model = timm.create_model(ARCH, num_classes=3)
    with pytest.raises(ValueError, match="id2label must have the keys 0..2"):
        ela_hf.export_pruned(model, "never-written", id2label={1: "cat", 2: "dog", 3: "owl"}, verify=False)


def test_fresh_model_initialises_like_the_timm_constructor():
    torch.manual_seed(0)
    hf = ElaForImageClassification(ElaConfig(architecture="ela_l_resnet20_cifar", num_labels=10)).timm_model
    ref = timm.create_model("ela_l_resnet20_cifar", num_classes=10)
    for blk_hf, blk_ref in zip(hf.layer2, ref.layer2):
        assert torch.count_nonzero(blk_hf.bn3.weight) == torch.count_nonzero(blk_ref.bn3.weight) == 0  # zero_init_last
        assert torch.all(blk_hf.bn1.weight == 1)
        # Kaiming normal, fan_out: std sqrt(2 / fan_out)
        expected = (2.0 / (blk_hf.conv2.weight.shape[0] * 9)) ** 0.5
        assert abs(blk_hf.conv2.weight.std().item() - expected) / expected < 0.1
        assert 0.7 < blk_hf.attn.lam.std().item() < 1.3  # lambda ~ randn
        assert not bool(blk_hf.attn_skipped)
    assert hf.fc.weight.abs().max() <= 1 / hf.fc.weight.shape[1] ** 0.5 + 1e-6  # PyTorch Linear default


def test_full_checkpoint_round_trip_through_both_front_doors(tmp_path, images):
    torch.manual_seed(0)
    model = _trained_bn(ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=5)))
    model.set_skip_mask(MASK)  # pruned during training: parameters kept
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    # transformers keys and timm keys side by side
    assert config["model_type"] == "ela" and config["architectures"] == ["ElaForImageClassification"]
    assert config["architecture"] == ARCH and config["num_classes"] == 5
    assert config["pretrained_cfg"]["mean"] == list(timm.data.resolve_data_config(model=model.timm_model)["mean"])
    assert config["skip_mask"] == MASK
    assert "skip_mask" not in config["model_args"], "a training checkpoint keeps every layer's weights"
    keys = _weight_keys(tmp_path)
    assert "layer1.1.attn.wv.weight" in keys and "layer1.1.attn_skipped" in keys
    assert not any(k.startswith("timm_model.") for k in keys), "timm's key names, no wrapper prefix"

    expected = model(images).logits
    via_hf = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    via_timm = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert via_hf.skip_mask == MASK and via_timm.skip_mask == MASK
    assert via_hf.timm_model.layer1[1].attn is not None, "full structure: training can resume"
    torch.testing.assert_close(via_hf(images).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(via_timm(images), expected, rtol=0, atol=0)
    # and the reloaded model writes the same format again
    via_hf.save_pretrained(tmp_path / "again")
    assert _weight_keys(tmp_path / "again") == keys


def test_base_model_folder_loads_through_both_front_doors(tmp_path, images):
    torch.manual_seed(0)
    model = _trained_bn(ElaModel(ElaConfig(architecture=ARCH)))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == 0 and config["model_args"]["num_classes"] == 0
    pooled = model(images).pooler_output
    torch.testing.assert_close(AutoModel.from_pretrained(tmp_path).eval()(images).pooler_output, pooled)
    torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(images), pooled)
    # a classifier on top of the saved backbone: only the head is new
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3).eval()
    torch.testing.assert_close(classifier.timm_model.forward_head(classifier.timm_model.forward_features(images), pre_logits=True), pooled)


def test_trainer_style_load_state_dict_accepts_timm_keys(tmp_path, images):
    torch.manual_seed(0)
    source = _trained_bn(ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=3)))
    source.set_skip_mask(MASK)
    source.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    target = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=3)).eval()
    result = target.load_state_dict(load_file(str(tmp_path / "model.safetensors")), False)
    assert not result.missing_keys and not result.unexpected_keys
    assert target.skip_mask == MASK, "the skip flags travel with the weights"
    torch.testing.assert_close(target(images).logits, source(images).logits)


def test_image_processor_matches_timm_eval_transform_and_round_trips(tmp_path):
    ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, ElaImageProcessor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    expected = transform(image).unsqueeze(0)
    torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected)
    gray = image.convert("L")
    assert processor([gray, image])["pixel_values"].shape == (2, 3, 32, 32)
    # a processor saved on its own (the Trainer does this) reloads with the same settings
    processor.save_pretrained(tmp_path / "proc")
    again = ElaImageProcessor.from_pretrained(tmp_path / "proc")
    assert again.data_config == processor.data_config


def test_pipeline_classifies_a_pil_image(tmp_path):
    torch.manual_seed(0)
    config = ElaConfig(architecture=ARCH, id2label={0: "cat", 1: "dog", 2: "bird"})
    _trained_bn(ElaForImageClassification(config)).save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    result = classify(image, top_k=3)
    assert sorted(r["label"] for r in result) == ["bird", "cat", "dog"]
    assert abs(sum(r["score"] for r in result) - 1.0) < 1e-4
    # same numbers as running the model by hand
    model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        probs = model(**AutoImageProcessor.from_pretrained(tmp_path)(image)).logits.softmax(-1)[0]
    assert abs(result[0]["score"] - probs.max().item()) < 1e-5


def test_set_skip_mask_on_the_transformers_model(images):
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).eval()
    assert model.skip_mask == [[False, False]] * 3
    model.set_skip_mask(MASK)
    assert model.skip_mask == MASK and model.config.skip_mask == MASK
    # the generic helpers see through the wrapper
    assert ela_hf.get_skip_mask(model) == MASK
    with pytest.raises(ValueError, match="skips are cumulative"):
        model.set_skip_mask([[False, False]] * 3)
    with pytest.raises(ValueError, match="stage 1 has 3 entries"):
        model.set_skip_mask([[False, True], [False, True, True], [False, True]])


def test_generic_set_skip_mask_keeps_the_config_current():
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    ela_hf.set_skip_mask(model, MASK)
    assert model.config.skip_mask == MASK, "config.skip_mask must follow the model, not wait for save_pretrained"
    # also through a user's wrapper module (DDP, a detector, ...)
    wrapped = torch.nn.Sequential(ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)))
    ela_hf.set_skip_mask(wrapped, MASK)
    assert wrapped[0].config.skip_mask == MASK
    # a refused mask leaves the config as it was
    with pytest.raises(ValueError, match="skips are cumulative"):
        ela_hf.set_skip_mask(model, [[False, False]] * 3)
    assert model.config.skip_mask == MASK


def test_activation_checkpointing_is_reported_and_its_options_are_not_silently_dropped():
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable()
    # the Trainer reads this flag (e.g. to configure DDP); it must say what the network does
    assert model.is_activation_checkpointing and model.timm_model.grad_checkpointing
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not model.timm_model.grad_checkpointing
    with pytest.warns(UserWarning, match=r"use_reentrant=False\); the activation checkpointing options"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(UserWarning, match=r"options \{'every_n_layers': 2\} are not used"):
        model.activation_checkpointing_enable(every_n_layers=2)
    with pytest.warns(UserWarning, match=r"options \{'checkpoint function'"):
        model.activation_checkpointing_enable(offload=True)
    assert model.timm_model.grad_checkpointing
    x = torch.randn(2, 3, 16, 16)
    model.train()(x).logits.sum().backward()  # still trains


def test_config_mask_follows_a_loaded_state_dict():
    # Trainer resume and load_best_model_at_end load a state dict: the skip flags come with it
    unpruned = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).state_dict()
    pruned = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2, skip_mask=MASK)).state_dict()
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2))
    model.load_state_dict(pruned)
    assert model.skip_mask == MASK and model.config.skip_mask == MASK
    # a checkpoint from before a decision brings the layers back: the config says so too
    model.load_state_dict(unpruned)
    assert model.config.skip_mask == [[False, False]] * 3
    assert ElaForImageClassification(model.config).skip_mask == model.skip_mask
    # also when loaded through a parent module
    wrapped = torch.nn.Sequential(model)
    wrapped.load_state_dict({f"0.{k}": v for k, v in pruned.items()})
    assert model.config.skip_mask == MASK
    # and through the timm network's own load_state_dict (weights shared with a timm model): the config stayed
    model.load_state_dict(unpruned)
    strip = len("timm_model.")
    model.timm_model.load_state_dict({k[strip:]: v for k, v in pruned.items()})
    assert model.config.skip_mask == MASK
    # a copy's network updates the copy's config, not the original's; the model still pickles
    copy_ = copy.deepcopy(model)
    copy_.timm_model.load_state_dict({k[strip:]: v for k, v in unpruned.items()})
    assert copy_.config.skip_mask == [[False, False]] * 3 and model.config.skip_mask == MASK
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).config.skip_mask == MASK


def test_grey_checkpoint_gets_one_channel_normalisation(tmp_path):
    torch.manual_seed(0)
    config = ElaConfig(architecture=ARCH, num_labels=3, num_channels=1)
    rgb_cfg = ElaConfig(architecture=ARCH, num_labels=3).pretrained_cfg
    assert config.pretrained_cfg["input_size"] == [1, 32, 32]
    for key in ("mean", "std"):
        assert config.pretrained_cfg[key] == pytest.approx([sum(rgb_cfg[key]) / 3])
    ElaForImageClassification(config).save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8), mode="L")
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixels = processor([image, image.convert("RGB")])["pixel_values"]
    assert pixels.shape == (2, 1, 32, 32)
    # the training and evaluation transforms convert on their own too
    for transform in (processor.train_transforms, processor.val_transforms):
        assert transform(image.convert("RGB")).shape == (1, 32, 32)
    # timm's own transform for the same folder gives the same tensor
    timm_model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=timm_model))
    torch.testing.assert_close(pixels[0], transform(image))
    result = pipeline("image-classification", model=str(tmp_path), device="cpu")(image, top_k=3)
    assert abs(sum(r["score"] for r in result) - 1.0) < 1e-4


def test_image_processor_refuses_normalisation_of_the_wrong_length():
    cfg = ElaConfig(architecture=ARCH, num_labels=2).pretrained_cfg
    with pytest.raises(ValueError, match=r"input_size \[4, 32, 32\] \(4 channels\) but a 3-long mean"):
        ElaImageProcessor(pretrained_cfg=dict(cfg, input_size=[4, 32, 32]))


def test_input_size_must_be_channels_height_width():
    # [32, 32] became [3, 32] in the config (timm's builder then failed with a bare AssertionError), and the
    # processor read it as 32 channels; [3, 32] ran with a 3x32 crop
    cfg = dict(ElaConfig(architecture=ARCH).pretrained_cfg)
    for bad in ([32, 32], [3, 32], [3, 32, 32, 1], "3,32,32", [3, 0, 32], [3, 32.0, 32]):
        message = re.escape(f"pretrained_cfg['input_size'] must be [channels, height, width] (three positive ints, "
                            f"e.g. [3, 224, 224]), got {bad!r}")
        with pytest.raises(ValueError, match=message):
            ElaConfig(architecture=ARCH, pretrained_cfg=dict(cfg, input_size=bad))
        with pytest.raises(ValueError, match=message):
            ElaImageProcessor(pretrained_cfg=dict(cfg, input_size=bad))
    assert ElaImageProcessor(pretrained_cfg=dict(cfg, input_size=(3, 16, 16))).size == {"height": 16, "width": 16}


def test_image_processor_options_are_applied_through_pretrained_cfg_or_refused(tmp_path):
    ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    # options other processors take would be silently ignored: refused, naming them
    with pytest.raises(ValueError, match=r"does not take the options \['do_normalize', 'size'\]"):
        processor(image, do_normalize=False, size={"height": 16, "width": 16})
    with pytest.raises(ValueError, match=r"from_pretrained does not take \['crop_pct'\]"):
        AutoImageProcessor.from_pretrained(tmp_path, crop_pct=0.5)
    with pytest.raises(ValueError, match="got no images"):
        processor([])
    as_numpy = processor(image, return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, processor(image)["pixel_values"].numpy())
    with pytest.raises(ValueError, match="got return_tensors='tf'"):
        processor(image, return_tensors="tf")
    # another data config, given at load time or set later, is what the processor then does
    small = dict(processor.pretrained_cfg, input_size=[3, 16, 16])
    assert AutoImageProcessor.from_pretrained(tmp_path, pretrained_cfg=small)(image)["pixel_values"].shape[-1] == 16
    processor.pretrained_cfg = small
    assert processor(image)["pixel_values"].shape[-1] == 16
    processor.save_pretrained(tmp_path / "proc")
    assert ElaImageProcessor.from_pretrained(tmp_path / "proc")(image)["pixel_values"].shape[-1] == 16
    with pytest.raises(ValueError, match="'resnet18' is not an ela_hf layer-attention model"):
        ElaImageProcessor(architecture="resnet18")
    with pytest.raises(ValueError, match=r"does not take \['size'\]"):
        ElaImageProcessor(architecture=ARCH, size=10)
    # grey [H, W] arrays and tensors, alone or in a list, and RGBA arrays read like the PIL images
    grey = np.asarray(image.convert("L"))
    expected = processor(image.convert("L"))["pixel_values"]
    torch.testing.assert_close(processor(grey)["pixel_values"], expected)
    torch.testing.assert_close(processor([grey, torch.from_numpy(grey.copy())])["pixel_values"], expected.repeat(2, 1, 1, 1))
    short = np.asarray(image)[:4]  # channels last, 4 rows: not mistaken for 4 channels first
    torch.testing.assert_close(processor(short)["pixel_values"], processor(Image.fromarray(short))["pixel_values"])
    rgba = np.asarray(image.convert("RGBA"))
    torch.testing.assert_close(processor(rgba)["pixel_values"], processor(image.convert("RGBA"))["pixel_values"])
    # half-precision tensors are read like float ones
    as_float = processor(torch.rand(3, 20, 20))["pixel_values"]
    assert processor(torch.rand(3, 20, 20).bfloat16())["pixel_values"].shape == as_float.shape


def test_image_processor_exposes_size_and_normalisation_like_other_processors(tmp_path):
    """transformers' run_image_classification example builds its torchvision transforms from these."""
    from torchvision.transforms import CenterCrop, Compose, Normalize, RandomResizedCrop, Resize, ToTensor

    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=2)).eval()
    model.save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    size = (processor.size["height"], processor.size["width"])
    assert size == tuple(processor.data_config["input_size"][1:]) and processor.crop_size == processor.size
    normalize = Normalize(mean=processor.image_mean, std=processor.image_std)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    train = Compose([RandomResizedCrop(size), ToTensor(), normalize])(image)
    evaluate = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])(image)
    assert train.shape == evaluate.shape == processor(image)["pixel_values"].shape[1:]
    assert model(evaluate.unsqueeze(0)).logits.shape == (1, 2)
    # read-only views of the data config: they follow it
    processor.pretrained_cfg = dict(processor.pretrained_cfg, input_size=[3, 16, 16], mean=[0.5] * 3)
    assert processor.size == {"height": 16, "width": 16} and processor.image_mean == [0.5] * 3


def test_image_processor_keeps_the_contrast_of_16_bit_images():
    processor = ElaImageProcessor(architecture=ARCH)
    ramp = np.linspace(0, 65535, 40 * 48, dtype=np.uint16).reshape(40, 48)
    as_8_bit = Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8))
    # Pillow's own conversion clips at 255: most of the image would turn white
    torch.testing.assert_close(processor(Image.fromarray(ramp))["pixel_values"], processor(as_8_bit)["pixel_values"])
    grey = ElaImageProcessor(pretrained_cfg=ElaConfig(architecture=ARCH, num_channels=1).pretrained_cfg)
    converted = grey.train_transforms.transforms[0](Image.fromarray(ramp))
    assert converted.mode == "L" and np.array_equal(np.asarray(converted), np.asarray(as_8_bit))


def test_image_processor_turns_photos_upright_as_training_and_pipeline_do(tmp_path):
    """A phone stores a portrait photo sideways with an EXIF orientation tag; datasets (training) and pipeline()
    turn it upright, so the processor must too, else the model sees a rotated image at serving time."""
    import io

    from datasets import Image as DatasetsImage
    from transformers.image_utils import load_image

    processor = ElaImageProcessor(architecture=ARCH)
    yy, xx = np.mgrid[0:48, 0:30]  # smooth (JPEG keeps it), and no two turns of it alike
    upright = Image.fromarray(np.stack([xx * 8, yy * 5, (xx + yy) * 3], -1).astype(np.uint8))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # sideways, as the camera wrote the pixels
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation 6: to view it, turn it back (Pillow's exif_transpose: ROTATE_270)
    path = tmp_path / "portrait.jpg"
    stored.save(path, exif=exif, quality=100, subsampling=0)
    photo = Image.open(path)
    assert photo.size == (48, 30)
    served = processor(photo)["pixel_values"]
    trained = processor(DatasetsImage().decode_example({"path": str(path), "bytes": None}))["pixel_values"]
    piped = processor(load_image(str(path)))["pixel_values"]
    torch.testing.assert_close(served, trained)
    torch.testing.assert_close(served, piped)
    # and it is the upright picture (JPEG-close), not the sideways one
    reference = processor(upright)["pixel_values"]
    sideways = processor(upright.transpose(Image.Transpose.ROTATE_90))["pixel_values"]  # (no tag)
    assert (served - reference).abs().mean() < 0.1 < (sideways - reference).abs().mean()
    # an image without the tag (or one already turned) is left as it is
    torch.testing.assert_close(processor(upright)["pixel_values"], reference)


def test_image_processor_reads_arrays_by_their_dtype():
    """transformers' heuristic read float images whose values are all 0 or 1 (an all-white 1.0 image, a binary
    mask) and bool arrays as 8-bit values (nearly black), and refused uint16 arrays that PIL scales."""
    processor = ElaImageProcessor(architecture=ARCH)

    def same(array, reference):
        torch.testing.assert_close(processor(array)["pixel_values"], processor(reference)["pixel_values"])

    white = np.full((20, 24, 3), 255, dtype=np.uint8)
    same(np.ones((20, 24, 3), dtype=np.float32), white)
    same(torch.ones(3, 20, 24), white)
    mask = np.zeros((20, 24), dtype=bool)
    mask[5:, 3:] = True
    as_image = Image.fromarray(mask.astype(np.uint8) * 255)
    same(mask, as_image)
    same(mask.astype(np.float64), as_image)
    ramp = np.linspace(0, 65535, 20 * 24).astype(np.uint16).reshape(20, 24)
    same(ramp, Image.fromarray(ramp))
    pixels = np.random.default_rng(0).uniform(0, 255, (20, 24, 3))
    same(pixels, np.rint(pixels).astype(np.uint8))  # float 0-255 values are rounded, not refused
    same(pixels.astype(np.int64).clip(0, 255), pixels.astype(np.uint8))
    with pytest.raises(ValueError, match=r"float image must hold values in \[0, 1\] \(or 0-255\), got \[-.*the processor normalises"):
        processor(processor(pixels.astype(np.uint8))["pixel_values"][0].numpy())  # normalised already
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor(np.full((20, 24, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"integer image of dtype int64 must hold 0-255 values, got \[0, 300\]"):
        processor(np.linspace(0, 300, 20 * 24 * 3).astype(np.int64).reshape(20, 24, 3))


def test_image_processor_data_config_cannot_be_edited_in_place(tmp_path):
    """An edit in place was saved with the processor but did not change its transforms."""
    processor = ElaImageProcessor(architecture=ARCH)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    before = processor(image)["pixel_values"]
    with pytest.raises(TypeError, match=r"cannot be changed in place .* processor.pretrained_cfg = \{\*\*processor"):
        processor.pretrained_cfg["input_size"] = (3, 16, 16)
    with pytest.raises(TypeError, match="cannot be changed in place"):
        processor.pretrained_cfg.update(mean=(0.0, 0.0, 0.0))
    processor.save_pretrained(tmp_path)
    assert ElaImageProcessor.from_pretrained(tmp_path).pretrained_cfg == processor.pretrained_cfg
    torch.testing.assert_close(processor(image)["pixel_values"], before)
    # copies are plain dicts to edit, and assigning one rebuilds the transforms
    edited = copy.deepcopy(processor.pretrained_cfg)
    edited["input_size"] = (3, 16, 16)
    processor.pretrained_cfg = edited
    assert processor(image)["pixel_values"].shape[-2:] == (16, 16)


def test_image_processor_of_a_four_channel_checkpoint(tmp_path):
    cfg = dict(ElaConfig(architecture=ARCH, num_labels=2).pretrained_cfg, input_size=[4, 32, 32],
               mean=[0.5] * 4, std=[0.25] * 4)
    processor = ElaImageProcessor(pretrained_cfg=cfg)
    hwc = np.random.default_rng(0).integers(0, 255, (40, 48, 4), dtype=np.uint8)
    from_pil = processor(Image.fromarray(hwc, mode="RGBA"))["pixel_values"]
    assert from_pil.shape == (1, 4, 32, 32)
    # arrays and tensors, channels last or first, give the same pixels
    torch.testing.assert_close(processor(hwc)["pixel_values"], from_pil)
    torch.testing.assert_close(processor(hwc.transpose(2, 0, 1).copy())["pixel_values"], from_pil)
    torch.testing.assert_close(processor(torch.from_numpy(hwc).permute(2, 0, 1))["pixel_values"], from_pil)
    with pytest.raises(ValueError, match="takes 4-channel images, got a 3-channel 'RGB' image"):
        processor(Image.fromarray(hwc[..., :3]))


@pytest.mark.parametrize("shape", [(40, 48, 2), (5, 40, 48), (40, 48, 6)])
def test_image_processor_names_an_array_without_a_channel_axis_it_takes(shape):
    processor = ElaImageProcessor(pretrained_cfg=ElaConfig(architecture=ARCH, num_labels=2).pretrained_cfg)
    array = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    with pytest.raises(ValueError, match=rf"shape {re.escape(str(shape))} has no axis of \[1, 3, 4\] channels: "
                                         "this checkpoint takes 3-channel images"):
        processor(array)


def test_backbone_returns_the_selected_feature_maps(tmp_path, images):
    from transformers import AutoBackbone

    torch.manual_seed(0)
    config = ElaConfig(architecture=ARCH, out_features=["stage1", "stage3"])
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, ela_hf.ElaBackbone)
    assert backbone.stage_names == ["stem", "stage1", "stage2", "stage3"] and backbone.channels == [64, 256]
    out = backbone(images)
    assert [tuple(f.shape) for f in out.feature_maps] == [(2, 64, 32, 32), (2, 256, 8, 8)]
    assert out.hidden_states is None
    everything = backbone(images, output_hidden_states=True)
    assert len(everything.hidden_states) == 4
    torch.testing.assert_close(everything.feature_maps[1], backbone.timm_model.forward_features(images))
    with pytest.raises(ValueError, match="out_features must be a subset of stage_names"):
        ElaConfig(architecture=ARCH, out_features=["stage4"])
    # an empty selection failed at the backbone's forward, inside timm ("max() arg is an empty sequence")
    for name in ("out_indices", "out_features"):
        with pytest.raises(ValueError, match=rf"{name} is empty: name at least one of stage_names \['stem', 'stage1', "):
            ElaConfig(architecture=ARCH, **{name: []})
    # the backbone folder is the same format (no classifier) and keeps the selection
    backbone.save_pretrained(tmp_path)
    again = ela_hf.ElaBackbone.from_pretrained(tmp_path).eval()
    assert again.out_features == ["stage1", "stage3"]
    torch.testing.assert_close(again(images).feature_maps[1], out.feature_maps[1])
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 0


def test_a_saved_folder_loads_as_a_backbone_with_other_feature_maps(tmp_path, images):
    # config.json holds out_features and out_indices: a new choice of one disagreed with the stored other
    # ("should correspond to the same stages"), where transformers' ResNetBackbone takes it
    from transformers import AutoBackbone

    torch.manual_seed(0)
    model = _trained_bn(ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=3)))
    model.save_pretrained(tmp_path)
    tmp_path = str(tmp_path)
    hidden = model(pixel_values=images, output_hidden_states=True).hidden_states
    for choice, picked in ((dict(out_features=["stage2"]), [2]), (dict(out_indices=[1, 3]), [1, 3]),
                           (dict(out_features=["stem", "stage3"], out_indices=[0, 3]), [0, 3])):
        backbone = ela_hf.ElaBackbone.from_pretrained(tmp_path, **choice).eval()
        assert backbone.out_indices == picked and backbone.channels == [hidden[i].shape[1] for i in picked]
        for got, i in zip(backbone(images).feature_maps, picked):
            torch.testing.assert_close(got, hidden[i])
    assert AutoConfig.from_pretrained(tmp_path, out_indices=[2]).out_features == ["stage2"]
    assert ela_hf.ElaBackbone.from_pretrained(tmp_path, config=AutoConfig.from_pretrained(
        tmp_path, out_features=["stage1"])).channels == [hidden[1].shape[1]]
    assert AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path, out_indices=[1])).channels == [
        hidden[1].shape[1]]
    with pytest.raises(ValueError, match="same stages"):  # both given, disagreeing: still an error
        ElaConfig.from_pretrained(tmp_path, out_features=["stage1"], out_indices=[2])


def test_config_names_depths_and_hidden_sizes_as_transformers_backbone_configs_do():
    for architecture in ("ela_resnet20_cifar", "ela_resnet18", "ela_resnet50d"):
        config = ElaConfig(architecture=architecture, out_features=None)
        backbone = ela_hf.ElaBackbone(ElaConfig(architecture=architecture, out_indices=list(range(
            1, len(config.stage_sizes) + 1))))
        assert config.depths == config.stage_sizes and len(config.depths) == len(config.stage_names) - 1
        assert config.hidden_sizes == backbone.channels
    wide = ElaConfig(architecture="ela_resnet20_cifar", model_args={"channels": [8, 16, 32]})
    assert wide.hidden_sizes == [32, 64, 128]


@pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing_(enable|disable)?:FutureWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_a_parent_models_checkpointing_switch_reaches_the_ela_network():
    # a DETR / UperNet holding an ElaBackbone sets `gradient_checkpointing` on every submodule that has it: the
    # backbone had none, so its stages ran without checkpointing, silently
    from transformers import PretrainedConfig, PreTrainedModel

    class Parent(PreTrainedModel):
        config_class = PretrainedConfig
        supports_gradient_checkpointing = True

        def __init__(self, config):
            super().__init__(config)
            self.backbone = ela_hf.ElaBackbone(ElaConfig(architecture=ARCH))
            self.post_init()

    parent = Parent(PretrainedConfig())
    net = parent.backbone.timm_model
    assert not parent.is_gradient_checkpointing and not net.grad_checkpointing
    parent.gradient_checkpointing_enable()
    assert net.grad_checkpointing and parent.backbone.gradient_checkpointing and parent.is_gradient_checkpointing
    parent.gradient_checkpointing_disable()
    assert not net.grad_checkpointing and not parent.is_gradient_checkpointing
    model = ElaForImageClassification(ElaConfig(architecture=ARCH, num_labels=3))
    model.gradient_checkpointing = True  # the attribute is the network's switch
    assert model.timm_model.grad_checkpointing and model.is_gradient_checkpointing
    # transformers' UperNet refuses the parent call for every backbone: the README's way is the backbone's own
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    upernet = UperNetForSemanticSegmentation(UperNetConfig(
        backbone_config=ElaConfig(architecture=ARCH, out_features=["stage1", "stage2", "stage3"]), num_labels=3,
        hidden_size=16, use_auxiliary_head=False))
    upernet.backbone.gradient_checkpointing_enable()
    assert upernet.backbone.timm_model.grad_checkpointing
    upernet.train()(pixel_values=torch.randn(2, 3, 32, 32)).logits.sum().backward()


def test_image_processor_without_arguments_is_elaconfigs_default():
    # transformers' common image-processor test builds one without arguments: it was a ValueError
    default = ElaImageProcessor()
    assert default.architecture == ElaConfig().architecture
    assert dict(default.pretrained_cfg) == dict(ElaImageProcessor(architecture=ElaConfig().architecture).pretrained_cfg)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 280, 3), dtype=np.uint8))
    assert default(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)


@pytest.mark.parametrize("architecture", ["ela_resnet20_cifar", "ela_l_resnet20_cifar"])
def test_weights_offloaded_with_a_device_map_are_brought_in(architecture, tmp_path, monkeypatch):
    # accelerate's offloading (device_map with "disk", or "auto" past max_memory) keeps a stage's weights on the
    # meta device and loads them when a module is called; the attention layers read wv/wq/wk/bn's weights
    # directly: MRLA-B's kernels crashed the process (a meta pointer), the plain paths raised
    from ela_hf.layers import fast_ops

    for name in ("DEPTHWISE_MIN_PLANE", "TAIL_MIN_PLANE", "LIGHT_MIN_PLANE"):  # the kernels on these small maps
        monkeypatch.setattr(fast_ops, name, 0)
    torch.manual_seed(0)
    model = _trained_bn(ElaForImageClassification(ElaConfig(architecture=architecture, num_labels=3,
                                                            skip_mask=MASK)))
    model.save_pretrained(tmp_path / "m")
    stem = ["conv1", "bn1", "act1", "maxpool"]
    device_map = {f"timm_model.{n}": "cpu" for n in [*stem, "layer1", "layer3", "global_pool", "fc"]}
    device_map["timm_model.layer2"] = "disk"
    offloaded = ElaForImageClassification.from_pretrained(tmp_path / "m", device_map=device_map,
                                                          offload_folder=str(tmp_path / "offload")).eval()
    assert offloaded.timm_model.layer2[1].attn.wv.weight.device.type == "meta"  # really offloaded
    x = torch.rand(2, 3, 32, 32)
    for fast in (True, False):
        monkeypatch.setattr(fast_ops, "FAST_CPU_PATHS", fast)
        with torch.no_grad():
            torch.testing.assert_close(offloaded(pixel_values=x).logits, model(pixel_values=x).logits)
    assert ela_hf.get_skip_mask(offloaded) == MASK
