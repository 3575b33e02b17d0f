"""Starting an ELA model from plain ResNet weights: backbone copied, attention layers fresh, mismatches refused."""
import pytest
import timm
import torch

import ela_hf
from ela_hf import ElaForImageClassification


def _plain_cifar_resnet(num_classes=10):
    torch.manual_seed(0)
    resnet = timm.create_model("resnet20_cifar", num_classes=num_classes)
    resnet.train()
    with torch.no_grad():
        resnet(torch.randn(4, 3, 32, 32))  # non-trivial BatchNorm statistics
    return resnet.eval()


def test_cifar_state_dict_maps_onto_the_backbone():
    resnet = _plain_cifar_resnet()
    torch.manual_seed(1)
    model = timm.create_model("ela_resnet20_cifar", num_classes=10)
    report = ela_hf.init_from_resnet(model, resnet.state_dict())
    source = resnet.state_dict()
    own = model.state_dict()
    assert report.mapped == sorted(source), "every plain ResNet tensor has a home"
    assert not report.unexpected and not report.reinitialized_head
    for key in source:
        assert torch.equal(own[key], source[key]), key
    assert report.missing and all(".attn." in k or k.endswith("attn_skipped") for k in report.missing)
    assert "layer2.1.attn.wv.weight" in report.missing
    # the convolutional path now computes exactly what the ResNet computes
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.forward_stem(x), resnet.maxpool(resnet.act1(resnet.bn1(resnet.conv1(x)))))
        blk, ref = model.layer1[0], resnet.layer1[0]
        stem = model.forward_stem(x)
        torch.testing.assert_close(blk._final_act(blk._conv_path(stem) + blk.downsample(stem)), ref(stem))


def test_imagenet_resnet50_names_map_and_a_new_head_is_reported():
    resnet = timm.create_model("resnet50")  # random weights, ImageNet key names
    model, report = ElaForImageClassification.from_timm_resnet(
        resnet, architecture="ela_resnet50", num_labels=10, output_loading_info=True
    )
    assert report.reinitialized_head == ["fc.bias", "fc.weight"]
    assert len(report.mapped) == len(resnet.state_dict()) - 2
    assert torch.equal(model.timm_model.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    assert model.config.num_labels == 10 and model.timm_model.fc.out_features == 10


def test_transformers_model_keeps_the_resnet_head_when_sizes_agree():
    resnet = _plain_cifar_resnet(num_classes=7)
    model = ElaForImageClassification.from_timm_resnet(resnet, architecture="ela_l_resnet20_cifar")
    assert model.config.num_labels == 7
    assert torch.equal(model.timm_model.fc.weight, resnet.fc.weight)


def test_shape_mismatch_and_foreign_checkpoints_are_refused():
    model = timm.create_model("ela_resnet20_cifar", num_classes=10)
    plain = _plain_cifar_resnet().state_dict()
    with pytest.raises(ValueError, match=r"conv1.weight: checkpoint \(8, 3, 3, 3\) vs model \(16, 3, 3, 3\)"):
        ela_hf.init_from_resnet(model, dict(plain, **{"conv1.weight": torch.zeros(8, 3, 3, 3)}))
    with pytest.raises(ValueError, match=r"blocks the model does not have, e.g. \['layer1\.2', 'layer1\.3'\] \(a deeper"):
        ela_hf.init_from_resnet(model, timm.create_model("resnet56_cifar", num_classes=10).state_dict())
    with pytest.raises(ValueError, match="lacks .* backbone tensors"):
        ela_hf.init_from_resnet(model, {"fc.weight": torch.zeros(10, 256)})
    with pytest.raises(ValueError, match="expected a ResNet state dict"):
        ela_hf.init_from_resnet(model, [1, 2, 3])
    # a checkpoint saved from DDP carries a `module.` prefix on every key
    wrapped = {f"module.{k}": v for k, v in _plain_cifar_resnet().state_dict().items()}
    assert ela_hf.init_from_resnet(model, wrapped).mapped


def test_resnets_of_another_kind_are_named_as_such():
    """The hints said "a deeper ResNet?" for an SE-ResNet and "the same depth and width" for a ResNet-D stem."""
    with pytest.raises(ValueError, match=r"weights a plain ResNet block does not have, e.g. \['layer1.0.se.fc1.weight'"
                                         r".*squeeze-excitation.*timm's resnet18\)") as info:
        ela_hf.init_from_resnet(timm.create_model("ela_resnet18"), timm.create_model("seresnet18"))
    assert "deeper" not in str(info.value)
    with pytest.raises(ValueError, match="another ResNet variant: 7x7 stem and strided-conv downsampling, where the "
                                         "model has a deep 3x3 stem and average-pool downsampling.*timm's resnet50d"):
        ela_hf.init_from_resnet(timm.create_model("ela_resnet50d"), timm.create_model("resnet50"))
    with pytest.raises(ValueError, match="deep 3x3 stem and average-pool downsampling, where the model has a 7x7"):
        ela_hf.init_from_resnet(timm.create_model("ela_resnet50"), timm.create_model("resnet50d"))
    with pytest.raises(ValueError, match=r"it has no blocks \['layer1.2', 'layer2.2', 'layer2.3'\] \(a shallower ResNet\?\)"):
        ela_hf.init_from_resnet(timm.create_model("ela_resnet34"), timm.create_model("resnet18"))


def test_a_resnet_without_batchnorm_step_counters_initialises_the_model():
    """Frozen BatchNorms (timm's freeze_batch_norm_2d, detection backbones) and pre-0.4.1 checkpoints have no
    num_batches_tracked; they were refused as "not a plain ResNet"."""
    from timm.layers import freeze_batch_norm_2d

    resnet = _plain_cifar_resnet()
    frozen = freeze_batch_norm_2d(resnet)
    assert not any(k.endswith("num_batches_tracked") for k in frozen.state_dict())
    model = timm.create_model("ela_resnet20_cifar", num_classes=10)
    report = ela_hf.init_from_resnet(model, frozen)
    assert "layer1.0.bn1.num_batches_tracked" in report.missing
    assert torch.equal(model.layer1[0].bn1.running_var, resnet.layer1[0].bn1.running_var)
    assert torch.equal(model.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)


def test_an_ela_checkpoint_is_not_taken_for_a_plain_resnet():
    pruned = timm.create_model("ela_resnet20_cifar", num_classes=10)
    pruned.set_skip_mask([[False, True], [False, False], [False, True]])
    model = timm.create_model("ela_resnet20_cifar", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"has layer-attention weights .* load it whole"):
        ela_hf.init_from_resnet(model, pruned)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "nothing copied"
    assert model.skip_mask == [[False, False]] * 3


def test_a_headless_resnet_leaves_the_classifier_fresh_and_says_so():
    resnet = timm.create_model("resnet20_cifar", num_classes=0)
    model, report = ElaForImageClassification.from_timm_resnet(
        resnet, architecture="ela_resnet20_cifar", num_labels=5, output_loading_info=True
    )
    assert report.reinitialized_head == ["fc.bias", "fc.weight"]
    assert all(".attn." in k or k.endswith("attn_skipped") for k in report.missing)
    assert "classifier re-initialised: True" in str(report)


@pytest.mark.parametrize("feature_cls", ["getter", "hook"])
def test_a_features_only_backbone_is_initialised_through_its_wrapper(feature_cls):
    backbone = timm.create_model("ela_resnet20_cifar", features_only=True, feature_cls=feature_cls)
    resnet = _plain_cifar_resnet()
    report = ela_hf.init_from_resnet(backbone, resnet)
    assert len(report.mapped) > 50
    inner = backbone.model if feature_cls == "getter" else backbone.body
    torch.testing.assert_close(dict(inner.named_parameters())["layer1.0.conv1.weight"], resnet.layer1[0].conv1.weight)


@pytest.mark.parametrize("feature_cls", ["list", "dict", "getter", "hook"])
def test_a_backbone_cut_short_by_out_indices_is_initialised_and_a_nested_one_is_named(feature_cls):
    """timm leaves out the stages after the last feature a features_only backbone returns: their weights are
    unused, not a deeper ResNet's (Faster R-CNN's C4 backbone, out_indices=(1, 2), failed with that error)."""
    resnet = _plain_cifar_resnet()
    backbone = timm.create_model("ela_resnet20_cifar", features_only=True, feature_cls=feature_cls, out_indices=(1, 2))
    report = ela_hf.init_from_resnet(backbone, resnet)
    inner = {"getter": "model", "hook": "body"}.get(feature_cls)
    net = getattr(backbone, inner) if inner else backbone
    own = dict(net.named_parameters())
    for name, weight in resnet.named_parameters():
        if name in own:
            torch.testing.assert_close(own[name], weight)
    assert own.keys() & dict(resnet.named_parameters()).keys() >= {"conv1.weight", "layer2.1.conv2.weight"}
    if feature_cls != "hook":  # (timm's hook wrapper keeps the whole network)
        assert "layer3.0.conv1.weight" not in own and "layer3.0.conv1.weight" in report.unexpected
    # a deeper ResNet is still refused (blocks in a stage the backbone has)
    deeper = timm.create_model("resnet56_cifar").state_dict()
    with pytest.raises(ValueError, match=r"blocks the model does not have, e.g. \['layer1\.2', 'layer1\.3'\]"):
        ela_hf.init_from_resnet(timm.create_model("ela_resnet20_cifar", features_only=True, out_indices=(1, 2)), deeper)

    class Detector(torch.nn.Module):  # the network deeper inside a module of the user's: where it is, is named
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.ModuleDict({"body": timm.create_model("ela_resnet20_cifar", features_only=True)})

    with pytest.raises(ValueError, match=r"this Detector holds the ResNet blocks under \.backbone\.body, not at its "
                                         r"top level: initialise that network, init_from_resnet\(model\.backbone\.body"):
        ela_hf.init_from_resnet(Detector(), resnet)

    class Wrapped(torch.nn.Module):  # a detector (under .model, as transformers' are) around this backbone
        def __init__(self):
            super().__init__()
            self.model = torch.nn.ModuleDict({"backbone": timm.create_model(
                "ela_resnet20_cifar", features_only=True, feature_cls=feature_cls, out_indices=(1, 2))})

    # the path named is the features wrapper's (what init_from_resnet takes), from the module passed
    with pytest.raises(ValueError, match=r"under \.model\.backbone, not at its top level: initialise that network, "
                                         r"init_from_resnet\(model\.model\.backbone, \.\.\.\)"):
        ela_hf.init_from_resnet(Wrapped(), resnet)
    detector = Wrapped()
    ela_hf.init_from_resnet(detector.model.backbone, resnet)  # the named path works


def test_other_models_and_half_fitting_heads():
    model = timm.create_model("ela_resnet20_cifar", num_classes=10)
    vit_like = {"blocks.0.attn.qkv.weight": torch.zeros(3, 3), "layers.0.blocks.0.norm1.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="lacks .* backbone tensors.*plain ResNet") as info:
        ela_hf.init_from_resnet(model, vit_like)
    assert "layer-attention" not in str(info.value) and "deeper ResNet" not in str(info.value)
    # a head whose weight differs but whose bias fits: the classifier stays fresh as a whole
    catavgmax = timm.create_model("ela_resnet20_cifar", num_classes=10, global_pool="catavgmax")
    fresh_bias = catavgmax.fc.bias.clone()
    report = ela_hf.init_from_resnet(catavgmax, _plain_cifar_resnet())
    assert report.reinitialized_head == ["fc.bias", "fc.weight"]
    assert torch.equal(catavgmax.fc.bias, fresh_bias)
