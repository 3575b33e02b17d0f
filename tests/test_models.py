"""The layer-attention ResNet families (SPEC section 1-2): registration, shapes, parameters, skipping."""
import copy
import math
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck

import ela_hf
from ela_hf.layers import MrlaBase, MrlaLight, eca_kernel_size
from ela_hf.models import MODEL_ARGS, ElaBasicBlock, ElaBottleneck, LayerAttentionResNet, slim_state_dict

EXPECTED_NAMES = (
    [f"ela_resnet{d}" for d in (18, 34, 50, 101, 152)]
    + ["ela_l_resnet50", "ela_l_resnet101"]
    + [f"mrla_{k}_resnet{d}" for k in ("l", "b") for d in (50, 101, 152)]
    + ["ela_resnet50d", "ela_resnet101d", "mrla_b_resnet50d"]
    + [f"{p}resnet{d}_cifar" for p in ("ela_", "ela_l_", "mrla_l_", "mrla_b_", "") for d in (20, 56, 110)]
)


def test_every_expected_name_is_registered_with_a_pretrained_cfg():
    registered = set(timm.list_models())
    missing = [n for n in EXPECTED_NAMES if n not in registered]
    assert not missing, missing
    assert sorted(MODEL_ARGS) == sorted(EXPECTED_NAMES)
    for name in EXPECTED_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.has_weights, "no weights are published: the cfg must not point at a download"
        assert cfg.classifier == "fc"
        # names a real weight: timm adapts it to another in_chans when loading pretrained weights
        model = timm.create_model(name, num_classes=2)
        assert isinstance(model.get_submodule(cfg.first_conv), torch.nn.Conv2d), (name, cfg.first_conv)
        assert len(cfg.mean) == 3 and len(cfg.std) == 3
        if name.endswith("_cifar"):
            assert cfg.input_size == (3, 32, 32)
        else:
            assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875


def test_pretrained_without_a_checkpoint_is_an_error_not_random_weights():
    with pytest.raises(ValueError, match="no pretrained weights are published for 'ela_resnet20_cifar'"):
        timm.create_model("ela_resnet20_cifar", pretrained=True)
    assert not [n for n in timm.list_models(pretrained=True) if n in EXPECTED_NAMES]


def test_pretrained_rgb_weights_load_into_a_grey_deep_stem_model(tmp_path):
    rgb = timm.create_model("ela_resnet50d", num_classes=4)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    grey = timm.create_model("ela_resnet50d", num_classes=4, in_chans=1, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.pth"), num_classes=4))
    assert grey.conv1[0].weight.shape[1] == 1
    torch.testing.assert_close(grey.conv1[0].weight, rgb.conv1[0].weight.sum(dim=1, keepdim=True))


def test_pretrained_weights_that_would_leave_random_layers_are_refused_for_backbones_and_new_heads(tmp_path):
    # timm loads non-strictly for features_only and for another num_classes, and only logs missing keys at INFO
    torch.manual_seed(0)
    trained = timm.create_model("ela_resnet20_cifar", num_classes=5)
    torch.save(trained.state_dict(), tmp_path / "ela20.pth")
    shallow = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "ela20.pth")))
    for kwargs in (dict(features_only=True), dict(num_classes=3), dict(features_only=True, feature_cls="getter")):
        with pytest.raises(ValueError, match=r"the pretrained weights for 'ela_resnet56_cifar' miss \d+ of the "
                                             r"model's parameters and buffers \(layer1\.2\..* Give a checkpoint"):
            timm.create_model("ela_resnet56_cifar", **kwargs, **shallow)
    # one active attention layer's weights gone
    partial = {k: v for k, v in trained.state_dict().items() if not k.startswith("layer2.1.attn.")}
    torch.save(partial, tmp_path / "partial.pth")
    file = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "partial.pth")))
    with pytest.raises(ValueError, match=r"miss \d+ .*\(layer2\.1\.attn\..*Only attention layers are missing"):
        timm.create_model("ela_resnet20_cifar", features_only=True, **file)
    # a plain ResNet's weights: every attention layer would be random (ela_hf.init_from_resnet is the way)
    torch.save(timm.create_model("resnet20_cifar").state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match=r"init_from_resnet"):
        timm.create_model("ela_resnet20_cifar", features_only=True, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "plain.pth")))
    # opting out keeps timm's behaviour; complete weights load as before, the new head aside
    timm.create_model("ela_resnet20_cifar", features_only=True, pretrained_strict=False, **file)
    ours = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "ela20.pth")))
    backbone = timm.create_model("ela_resnet20_cifar", features_only=True, **ours).eval()
    finetune = timm.create_model("ela_resnet20_cifar", num_classes=3, **ours)
    torch.testing.assert_close(finetune.layer2[1].attn.wq.weight, trained.layer2[1].attn.wq.weight)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone(x)[-1], trained.eval().forward_features(x))


def test_pretrained_weights_with_parts_the_model_lacks_are_refused(tmp_path):
    # only missing keys were checked: a deeper network's weights, or MRLA-L's (its lam) under an MRLA-B network,
    # loaded into features_only backbones and new heads with a log line at most (timm drops unexpected keys there)
    torch.manual_seed(0)
    files = {}
    for name in ("ela_resnet56_cifar", "ela_resnet20_cifar", "ela_l_resnet20_cifar"):
        files[name] = tmp_path / f"{name}.pth"
        torch.save(timm.create_model(name, num_classes=5).state_dict(), files[name])

    def file(name):
        return dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(files[name])))

    for kwargs in (dict(features_only=True), dict(num_classes=3)):
        with pytest.raises(ValueError, match=r"'ela_resnet20_cifar' hold \d+ parameters and buffers this model does "
                                             r"not have \(layer1\.2\..*deeper network"):
            timm.create_model("ela_resnet20_cifar", **kwargs, **file("ela_resnet56_cifar"))
        with pytest.raises(ValueError, match=r"not the same ones \(e\.g\. layer1\.0\.attn\.lam.* not in the model\)"
                                             r".*another attention type .* than 'ela_resnet20_cifar'"):
            timm.create_model("ela_resnet20_cifar", **kwargs, **file("ela_l_resnet20_cifar"))
        # the other way round named the wrong cause (a slim checkpoint's lost mask)
        with pytest.raises(ValueError, match=r"layer1\.0\.attn\.lam[^)]* missing\).*another attention type .* "
                                             r"than 'ela_l_resnet20_cifar'"):
            timm.create_model("ela_l_resnet20_cifar", **kwargs, **file("ela_resnet20_cifar"))
    # the full weights of skipped layers, which a slim model was built without, are not needed: they load as before
    mask = [[False, True], [False, False], [False, True]]
    pruned = timm.create_model("ela_resnet20_cifar", num_classes=5)
    ela_hf.set_skip_mask(pruned, mask)
    files["pruned"] = tmp_path / "pruned.pth"
    torch.save(pruned.state_dict(), files["pruned"])
    assert "layer1.1.attn.wv.weight" in torch.load(files["pruned"])
    slim = timm.create_model("ela_resnet20_cifar", features_only=True, skip_mask=mask, **file("pruned"))
    assert slim.layer1[1].attn is None
    timm.create_model("ela_resnet20_cifar", features_only=True, pretrained_strict=False, **file("ela_resnet56_cifar"))


def test_a_type_error_inside_a_users_pretrained_filter_is_reported_as_that_filters(tmp_path):
    torch.save(timm.create_model("ela_resnet20_cifar").state_dict(), tmp_path / "w.pth")
    file = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")), num_classes=10)

    def broken_filter(state_dict, model):
        return {k: v for k, v in state_dict.items() if k.startswith(3)}  # TypeError inside the user's code

    with pytest.raises(RuntimeError, match=r"pretrained_filter_fn .*broken_filter raised TypeError: startswith"):
        timm.create_model("ela_resnet20_cifar", pretrained_filter_fn=broken_filter, **file)


def test_a_users_pretrained_filter_runs_before_the_completeness_check(tmp_path):
    # a pretrained_filter_fn of the user's turned the check off: a filter dropping attention weights loaded
    # with those layers random, silently
    torch.manual_seed(0)
    trained = timm.create_model("ela_resnet20_cifar", num_classes=5)
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    file = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")), num_classes=10)
    calls = []

    def drop_attention(state_dict, model):
        calls.append(type(model).__name__)
        return {k: v for k, v in state_dict.items() if ".attn." not in k}

    with pytest.raises(ValueError, match=r"miss \d+ .*Only attention layers are missing"):
        timm.create_model("ela_resnet20_cifar", pretrained_filter_fn=drop_attention, **file)
    assert calls == ["LayerAttentionResNet"]
    # a filter that renames keys (timm's one-argument form too) runs, and its result is what loads
    renamed = {f"net.{k}": v for k, v in trained.state_dict().items()}
    torch.save(renamed, tmp_path / "wrapped.pth")
    strip = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "wrapped.pth")), num_classes=10)
    model = timm.create_model("ela_resnet20_cifar", **strip,
                              pretrained_filter_fn=lambda sd: {k[len("net."):]: v for k, v in sd.items()})
    torch.testing.assert_close(model.layer2[1].attn.wq.weight, trained.layer2[1].attn.wq.weight)
    # opting out still accepts what the filter leaves
    timm.create_model("ela_resnet20_cifar", pretrained_filter_fn=drop_attention, pretrained_strict=False, **file)


def test_a_fitting_head_that_timm_would_drop_is_named_in_a_warning(tmp_path):
    # timm keeps a checkpoint's classifier only when num_classes equals the pretrained config's, which for a
    # weights file is the architecture's default (100 here), not the file's: a 4-class release loaded with
    # num_classes=4 got a random head without a word
    torch.manual_seed(0)
    trained = timm.create_model("ela_resnet20_cifar", num_classes=4).eval()
    torch.save(trained.state_dict(), tmp_path / "four.pth")
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"classifier 'fc' fits this 'ela_resnet20_cifar' with num_classes=4, but "
                                         r"timm discards it .* num_classes=100: the head starts from random weights"):
        dropped = timm.create_model("ela_resnet20_cifar", num_classes=4, pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(tmp_path / "four.pth"))).eval()
    assert not torch.equal(dropped.fc.weight, trained.fc.weight)  # what the warning says
    # the way out it names keeps the head, silently; heads that do not fit and backbones are not warned about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = timm.create_model("ela_resnet20_cifar", num_classes=4, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "four.pth"), num_classes=4)).eval()
        timm.create_model("ela_resnet20_cifar", num_classes=3, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "four.pth")))
        timm.create_model("ela_resnet20_cifar", features_only=True, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "four.pth")))
    torch.testing.assert_close(kept(x), trained(x))


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_registered_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "every parameter takes part in the loss"
    assert torch.isfinite(out).all()


def test_attention_type_and_structure_follow_the_name():
    assert isinstance(timm.create_model("ela_resnet50").layer3[2].attn, MrlaBase)
    assert isinstance(timm.create_model("ela_l_resnet50").layer3[2].attn, MrlaLight)
    assert isinstance(timm.create_model("mrla_l_resnet50").layer1[0].attn, MrlaLight)
    assert isinstance(timm.create_model("ela_resnet18").layer1[0], ElaBasicBlock)
    plain = timm.create_model("resnet56_cifar")
    assert all(blk.attn is None for stage in plain.stages for blk in stage)
    assert plain.skip_mask is None
    deep = timm.create_model("ela_resnet50d")
    assert isinstance(deep.conv1, nn.Sequential) and len(deep.conv1) == 7
    assert isinstance(timm.create_model("ela_resnet50").conv1, nn.Conv2d)
    cifar = timm.create_model("ela_resnet110_cifar")
    assert [len(s) for s in cifar.stages] == [12, 12, 12]
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and cifar.conv1.out_channels == 16
    assert cifar.num_features == 256


def test_eca_kernel_sizes():
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_count_formulas_per_layer(channels):
    k = eca_kernel_size(channels)
    light = MrlaLight(channels, dim_per_head=32)
    base = MrlaBase(channels, dim_per_head=16)
    assert sum(p.numel() for p in light.parameters()) == 12 * channels + 2 * k
    assert sum(p.numel() for p in base.parameters()) == 11 * channels + 2 * k


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_whole_network_parameter_counts():
    r50 = _n_params(timm.create_model("resnet50"))
    assert _n_params(timm.create_model("mrla_l_resnet50")) - r50 == 181_420
    assert _n_params(timm.create_model("mrla_b_resnet50")) - r50 == 166_316
    assert _n_params(timm.create_model("ela_resnet50")) - r50 == 166_316
    # SPEC: plain ResNet-110 for CIFAR-100 has 1.17M parameters
    assert round(_n_params(timm.create_model("resnet110_cifar", num_classes=100)) / 1e6, 2) == 1.17
    # timm's own ResNet-18/34 match our plain conv path: ela adds exactly the attention layers
    ela18 = timm.create_model("ela_resnet18")
    attn18 = sum(11 * blk._out_channels() + 2 * eca_kernel_size(blk._out_channels()) for s in ela18.stages for blk in s)
    assert _n_params(ela18) - _n_params(timm.create_model("resnet18")) == attn18


def test_default_dim_per_head():
    assert timm.create_model("ela_resnet50").layer1[0].attn.dim_per_head == 16
    assert timm.create_model("mrla_l_resnet50").layer1[0].attn.dim_per_head == 32
    assert timm.create_model("ela_resnet56_cifar").layer1[0].attn.dim_per_head == 32


@pytest.mark.parametrize("name", ["ela_resnet20_cifar", "ela_l_resnet20_cifar"])
def test_bad_dim_per_head_is_refused_at_construction(name):
    # 0 failed with ZeroDivisionError, -1 with "math domain error", "16" in `%`, 16.0 only at the first forward
    for value in (0, -16):
        with pytest.raises(ValueError, match=f"dim_per_head must be a positive number .*, got {value}"):
            timm.create_model(name, dim_per_head=value)
    for value, kind in (("16", "str"), (16.0, "float"), (True, "bool")):
        with pytest.raises(TypeError, match=rf"dim_per_head must be an int .*, got {value!r} \({kind}\)"):
            timm.create_model(name, dim_per_head=value)
    with pytest.raises(ValueError, match=r"channels \(64\) must be a multiple of dim_per_head \(48\)"):
        timm.create_model(name, dim_per_head=48)
    model = timm.create_model(name, dim_per_head=np.int64(8))  # NumPy integers are integers
    assert model.layer1[0].attn.dim_per_head == 8 and type(model.layer1[0].attn.dim_per_head) is int
    for value in (0, 1.5, True):  # the layers' own dilation (the models set it from output_stride)
        with pytest.raises(ValueError, match=rf"dilation must be a positive int .*, got {value!r}"):
            (MrlaLight if "_l_" in name else MrlaBase)(64, dilation=value)


def _copy_conv_weights(src: nn.Module, dst: nn.Module):
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if not k.startswith("attn")}, strict=True)


@pytest.mark.parametrize("plain_cls,ela_cls", [(Bottleneck, ElaBottleneck), (BasicBlock, ElaBasicBlock)])
@pytest.mark.parametrize("training", [False, True])
def test_skipped_block_equals_plain_block(plain_cls, ela_cls, training):
    torch.manual_seed(0)
    inplanes, planes = 32, 16
    outplanes = planes * plain_cls.expansion
    down = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=2, bias=False), nn.BatchNorm2d(outplanes))
    ela = ela_cls(inplanes, planes, stride=2, downsample=down)
    ela._init_layer_attention("mrla_b", 16, 0.0, skipped=False)
    ela.skip_attention()
    plain = plain_cls(inplanes, planes, stride=2, downsample=nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride=2, bias=False), nn.BatchNorm2d(outplanes)))
    # non-trivial BN statistics and affine parameters so that the comparison means something
    for m in ela.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    _copy_conv_weights(ela, plain)
    ela.train(training)
    plain.train(training)
    x = torch.randn(3, inplanes, 8, 8)
    torch.testing.assert_close(ela(x.clone()), plain(x.clone()), rtol=0, atol=0)


def test_model_built_with_all_skippable_layers_skipped_matches_plain_resnet_with_same_weights():
    torch.manual_seed(0)
    mask = [[False] + [True] * 1 for _ in range(3)]
    ela = timm.create_model("ela_resnet20_cifar", num_classes=5, skip_mask=mask).eval()
    plain = timm.create_model("resnet20_cifar", num_classes=5).eval()
    # the plain net takes every non-attention weight of the ELA net
    sd = {k: v for k, v in ela.state_dict().items() if ".attn." not in k and not k.endswith("attn_skipped")}
    plain.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    # first blocks still attend, so outputs differ from the plain net...
    assert not torch.allclose(ela(x), plain(x))
    # ...but a skipped block is exactly the plain block on the same input
    feats = {}
    ela.layer2[1].register_forward_hook(lambda m, i, o: feats.__setitem__("ela", (i[0], o)))
    ela(x)
    inp, out = feats["ela"]
    torch.testing.assert_close(out, plain.layer2[1](inp), rtol=0, atol=0)


class _Recorder:
    """Forward hooks on every block of a stage: inputs/outputs and the MRLA-B cache length seen by its attention."""

    def __init__(self, stage):
        self.outputs, self.cache_lengths = {}, {}
        self.handles = []
        for j, blk in enumerate(stage):
            self.handles.append(blk.register_forward_hook(self._out_hook(j)))
            if blk.attn is not None:
                self.handles.append(blk.attn.register_forward_hook(self._attn_hook(j)))

    def _out_hook(self, j):
        def hook(mod, inputs, output):
            self.outputs[j] = output.detach().clone()
        return hook

    def _attn_hook(self, j):
        def hook(mod, inputs, output):
            state = inputs[-1]
            self.cache_lengths[j] = len(state.values)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_mrla_b_skipping_a_layer_keeps_earlier_blocks_and_removes_it_from_later_attention():
    torch.manual_seed(0)
    model = timm.create_model("ela_resnet56_cifar", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    rec = _Recorder(model.layer2)
    model(x)
    before = dict(rec.outputs)
    assert rec.cache_lengths == {j: j + 1 for j in range(6)}
    model.set_skip_mask([[False] * 6, [False, False, True, False, False, False], [False] * 6])
    rec.outputs.clear(), rec.cache_lengths.clear()
    model(x)
    for j in (0, 1):
        torch.testing.assert_close(rec.outputs[j], before[j], rtol=0, atol=0)
    assert 2 not in rec.cache_lengths, "a skipped layer's attention never runs"
    assert rec.cache_lengths == {0: 1, 1: 2, 3: 3, 4: 4, 5: 5}
    assert not torch.allclose(rec.outputs[3], before[3])
    rec.remove()


def test_mrla_b_later_block_attends_exactly_over_active_layers():
    """Block 3's output after skipping layer 2 equals a by-hand softmax over layers 0, 1 and 3 only."""
    torch.manual_seed(0)
    stage = LayerAttentionResNet(layers=(4,), channels=(16,), stem_type="cifar", stem_width=16, dim_per_head=32,
                                 skip_mask=[[False, False, True, False]], num_classes=3).eval().layer1
    x = torch.randn(2, 16, 8, 8)
    outs = []
    for blk in stage:
        blk.register_forward_hook(lambda m, i, o: outs.append(o))
    stage(x)
    # recompute by hand from the conv-path outputs
    h = x
    keys, values = [], []
    for j, blk in enumerate(stage):
        sc = h if blk.downsample is None else blk.downsample(h)
        y = blk.act3(blk._conv_path(h) + sc)
        if blk.is_skipped:
            h = y
            torch.testing.assert_close(outs[j], y)
            continue
        a = blk.attn
        g = y.mean((2, 3)).unsqueeze(1)
        q = a.wq(g).view(2, a.heads, a.dim_per_head)
        k = a.wk(g).view(2, a.heads, a.dim_per_head)
        v = a.wv(y)
        keys.append(k), values.append(v)
        o = torch.zeros_like(v)
        for b in range(2):
            for head in range(a.heads):
                scores = torch.stack([(q[b, head] * kk[b, head]).sum() for kk in keys]) / math.sqrt(a.dim_per_head)
                w = torch.softmax(scores, 0)
                sl = slice(head * a.dim_per_head, (head + 1) * a.dim_per_head)
                o[b, sl] = sum(w[s] * values[s][b, sl] for s in range(len(keys)))
        h = y + torch.relu(a.bn(o))
        torch.testing.assert_close(outs[j], h, rtol=1e-5, atol=1e-5)
    assert len(keys) == 3


def test_skipped_layer_runs_no_kernel_in_training_or_inference():
    model = timm.create_model("ela_l_resnet20_cifar", num_classes=5)
    model.set_skip_mask([[False, True], [False, False], [False, True]])
    calls = []
    for stage in model.stages:
        for blk in stage:
            if blk.is_skipped:
                for mod in blk.attn.modules():
                    mod.register_forward_pre_hook(lambda m, i: calls.append(m))
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with model.kl_recording():
        model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        model(x)
    assert calls == []
    # the skipped layers' parameters stay (optimizers, DDP) but receive no gradient
    assert model.layer1[1].attn.wv.weight.grad is None
    assert model.layer2[1].attn.wv.weight.grad is not None


def test_skip_masks_from_numpy_and_torch_are_read_like_lists():
    expected = [[False, True], [False, False], [False, True]]
    for mask in (
        np.array(expected),
        torch.tensor(expected),
        [np.array(stage) for stage in expected],
        [[np.bool_(v) for v in stage] for stage in expected],
        np.array(expected, dtype=np.int64),
    ):
        model = timm.create_model("ela_resnet20_cifar")
        model.set_skip_mask(mask)
        assert model.skip_mask == expected, type(mask)
    with pytest.raises(ValueError, match=r"skip_mask\[0\]\[0\] must be a bool, got 0.0"):
        model.set_skip_mask(np.array([[0.0, 0.5], [0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"skip_mask\[1\]\[1\] must be a bool, got 2"):
        model.set_skip_mask(np.array([[0, 1], [0, 2], [0, 1]]))


def test_set_skip_mask_keeps_parameters_and_is_cumulative():
    model = timm.create_model("ela_resnet20_cifar", num_classes=5)
    params_before = [id(p) for p in model.parameters()]
    model.set_skip_mask([[False, True], [False, False], [False, False]])
    assert [id(p) for p in model.parameters()] == params_before
    model.set_skip_mask([[False, True], [False, True], [False, False]])
    assert model.skip_mask == [[False, True], [False, True], [False, False]]
    with pytest.raises(ValueError, match="cumulative"):
        model.set_skip_mask([[False, False], [False, True], [False, False]])
    assert model.skip_mask == [[False, True], [False, True], [False, False]], "a refused mask changes nothing"


def test_building_with_a_mask_removes_parameters():
    full = timm.create_model("ela_resnet56_cifar")
    mask = [[False, True, False, True, False, True]] * 3
    slim = timm.create_model("ela_resnet56_cifar", skip_mask=mask)
    assert slim.skip_mask == mask
    assert slim.layer1[1].attn is None and slim.layer1[2].attn is not None
    removed = sum(_n_params(full.get_submodule(f"layer{i + 1}.{j}.attn")) for i in range(3) for j in (1, 3, 5))
    assert _n_params(full) - _n_params(slim) == removed > 0


def test_mask_survives_state_dict_save_and_load(tmp_path):
    mask = [[False, True], [False, False], [False, True]]
    model = timm.create_model("ela_resnet20_cifar", num_classes=5)
    model.set_skip_mask(mask)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = timm.create_model("ela_resnet20_cifar", num_classes=5)
    assert fresh.skip_mask == [[False, False]] * 3
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert fresh.skip_mask == mask
    model.eval(), fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))
    # slim: the reduced architecture takes the slim state dict and computes the same
    slim = timm.create_model("ela_resnet20_cifar", num_classes=5, skip_mask=mask).eval()
    slim.load_state_dict(slim_state_dict(model))
    torch.testing.assert_close(slim(x), model(x))


def test_loading_a_checkpoint_with_active_layers_into_a_slim_model_is_an_error():
    full = timm.create_model("ela_resnet20_cifar", num_classes=5)
    slim = timm.create_model("ela_resnet20_cifar", num_classes=5, skip_mask=[[False, True], [False, False], [False, False]])
    sd = {k: v for k, v in full.state_dict().items() if not k.startswith("layer1.1.attn.")}
    with pytest.raises(RuntimeError, match="layer1.1: the checkpoint marks this attention layer active"):
        slim.load_state_dict(sd)


def test_plain_resnet_weights_load_into_ela_model_with_only_attention_missing():
    plain = timm.create_model("resnet50")
    ela = timm.create_model("ela_resnet50")
    result = ela.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".attn." in k or k.endswith("attn_skipped") for k in result.missing_keys)


@pytest.mark.parametrize("name,size,channels,reductions", [
    ("ela_resnet50", 64, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
    ("mrla_l_resnet50", 64, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
    ("ela_resnet18", 64, [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
    ("ela_resnet50d", 64, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
    ("ela_resnet20_cifar", 32, [16, 64, 128, 256], [1, 1, 2, 4]),
])
def test_features_only(name, size, channels, reductions):
    model = timm.create_model(name, features_only=True)
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == reductions
    feats = model(torch.randn(2, 3, size, size))
    assert [f.shape[1] for f in feats] == channels
    assert [size // f.shape[-1] for f in feats] == reductions
    sub = timm.create_model(name, features_only=True, out_indices=(1, 2))
    assert [f.shape[1] for f in sub(torch.randn(2, 3, size, size))] == channels[1:3]


@pytest.mark.parametrize("feature_cls", ["list", "getter", "hook"])
def test_features_only_out_indices_that_select_nothing_or_too_much_are_refused(feature_cls):
    # [] and 0 gave a backbone returning no feature map ('getter': "max() arg is an empty sequence"), [9] an IndexError
    maps = r"the model has 5 feature maps \(0 = the stem, 1..4 = the stages\)"
    cases = [([], ValueError, "out_indices is empty: name at least one feature map; "),
             ((), ValueError, "out_indices is empty"),
             (0, ValueError, r"out_indices=0 \(the last n feature maps\) must be in 1..5: "),
             ([9], ValueError, r"out_indices \[9\] has indices \[9\] out of range: "),
             (["a"], TypeError, r"out_indices must be an int or a list of ints, got \['a'\]; "),
             # the maps come back in network order, once each, while feature_info listed them as given
             ((3, 1), ValueError, r"out_indices \[3, 1\] \(maps \[3, 1\]\) must name each feature map once, in "
                                  r"network order: .*; "),
             ((-1, 1), ValueError, r"out_indices \[-1, 1\] \(maps \[4, 1\]\) must name each"),
             ((1, 1), ValueError, r"out_indices \[1, 1\] \(maps \[1, 1\]\) must name each"),
             ((1, -4), ValueError, r"out_indices \[1, -4\] \(maps \[1, 1\]\) must name each")]
    for out_indices, error, message in cases:
        with pytest.raises(error, match=message + (maps if message.endswith(" ") else "")):
            timm.create_model("ela_resnet18", features_only=True, feature_cls=feature_cls, out_indices=out_indices)
    backbone = timm.create_model("ela_resnet18", features_only=True, feature_cls=feature_cls, out_indices=(-5, 4))
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [64, 512] == backbone.feature_info.channels()


def test_features_only_matches_forward_features():
    torch.manual_seed(0)
    model = timm.create_model("ela_resnet20_cifar").eval()
    feats = timm.create_model("ela_resnet20_cifar", features_only=True).eval()
    feats.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(feats(x)[-1], model.forward_features(x))
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape[1] for t in inter] == [16, 64, 128, 256]


def test_timm_head_interface():
    model = timm.create_model("ela_resnet20_cifar", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 256, 8, 8)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)


def test_timm_head_width_dtype_and_mode_follow_the_model():
    # head_hidden_size ignored 'catavgmax' (twice the features) until a reset; reset_classifier built a float32
    # head in training mode on the CPU whatever the model was
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model("ela_resnet20_cifar", global_pool="catavgmax").eval()
    assert model.head_hidden_size == model.forward_head(model.forward_features(x), pre_logits=True).shape[1] == 512
    model = model.double()
    model.reset_classifier(7)
    assert model.fc.weight.dtype == torch.float64 and not model.fc.training and model.head_hidden_size == 512
    assert model(x.double()).shape == (2, 7)
    model.train().reset_classifier(3, "avg")
    assert model.fc.training and model.head_hidden_size == 256


def test_timm_factory_device_and_dtype_arguments(tmp_path):
    # timm >= 1.0.21 passes device= and dtype= to every model; they were refused (TypeError)
    meta = timm.create_model("ela_resnet20_cifar", device="meta", num_classes=5)
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    feats = timm.create_model("ela_l_resnet20_cifar", features_only=True, device="meta")
    assert {p.device.type for p in feats.parameters()} == {"meta"}
    # deferred initialisation: to_empty leaves the KL statistics as garbage until timm's re-init of the
    # non-persistent buffers (checkpoints do not hold them)
    from timm.models._manipulate import reinit_non_persistent_buffers

    model = meta.to_empty(device="cpu")
    for layer in model.modules():
        if hasattr(layer, "kl_sum"):
            layer.kl_sum.fill_(float("nan"))
    reinitialised = reinit_non_persistent_buffers(model)
    assert reinitialised and all(name.endswith(".attn") for name in reinitialised)
    assert all(float(m.kl_sum) == 0 == float(m.kl_count) for m in model.modules() if hasattr(m, "kl_sum"))
    torch.manual_seed(0)
    reference = timm.create_model("ela_resnet20_cifar", num_classes=5).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference(x))
    # no checkpoint to load: init_weights(needs_reset=True) (timm's convention after to_empty) gives a fresh
    # model. to_empty left the persistent skip flags as leftover memory (first blocks "skipped" too), which
    # neither the re-init of non-persistent buffers nor init_weights() touched
    for name in ("ela_resnet20_cifar", "ela_l_resnet20_cifar"):
        built = [[False, False], [False, True], [False, True]]
        fresh = timm.create_model(name, device="meta", num_classes=5, skip_mask=built).to_empty(device="cpu")
        for m in fresh.modules():
            if hasattr(m, "attn_skipped"):
                m.attn_skipped.fill_(True)
            for buf in m.buffers(recurse=False):
                if buf.is_floating_point():
                    buf.fill_(float("nan"))
            for p in m.parameters(recurse=False):
                p.data.fill_(float("nan"))
        fresh.init_weights(needs_reset=True)
        assert ela_hf.get_skip_mask(fresh) == built
        assert [blk.is_skipped for blk in fresh.layer1] == [False, False]
        assert [blk.is_skipped for blk in fresh.layer2] == [False, True]
        state = fresh.state_dict()
        assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
        assert all(float(t) == 0 for k, t in state.items() if k.endswith("num_batches_tracked"))
        assert all(float(m.kl_count) == 0 for m in fresh.modules() if hasattr(m, "kl_count"))
        assert all(bool((m.running_var == 1).all()) for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm2d))
        normal = timm.create_model(name, num_classes=5, skip_mask=built)
        assert float(fresh.layer1[0].bn3.weight.detach().abs().max()) == 0 == float(normal.layer1[0].bn3.weight.detach().abs().max())
        assert bool(torch.isfinite(fresh.eval()(x)).all())
        if name.startswith("ela_l"):  # MRLA-L's lambda drawn afresh, as at construction
            lam = fresh.layer1[1].attn.lam.detach()
            assert bool(torch.isfinite(lam).all()) and 0.3 < float(lam.std()) < 3
    # dtype: the weights in it, the KL statistics float32
    half = timm.create_model("ela_resnet20_cifar", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.layer1[1].attn.kl_sum.dtype == torch.float32 and half.layer1[1].attn_skipped.dtype == torch.bool
    assert half(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        timm.create_model("ela_resnet20_cifar", dtype=torch.int8)


@pytest.mark.parametrize("name", ["ela_resnet20_cifar", "ela_l_resnet20_cifar"])
def test_grad_checkpointing_gives_the_same_outputs_gradients_and_batchnorm_statistics(name):
    # the recompute in backward updated every BatchNorm's running statistics a second time with the same batch
    torch.manual_seed(0)
    a = timm.create_model(name, num_classes=5, skip_mask=[[False, True], [False, False], [False, False]])
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    for model in (a, b):
        model(x).sum().backward()
        # two forwards before one backward (the second's recompute must keep the first's updates)
        (model(x2).square().sum() + model(x).sum()).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    stats = [n for n, _ in a.named_buffers() if "running" in n or "num_batches" in n]
    assert len(stats) > 40
    for n in stats:
        assert torch.equal(a.get_buffer(n), b.get_buffer(n)), n
    assert int(b.bn1.num_batches_tracked) == 3
    # under torch.compile too (the checkpoint takes no context of ours there)
    torch._dynamo.reset()
    c = copy.deepcopy(b)
    d = copy.deepcopy(b)
    d.set_grad_checkpointing(False)
    for model in (c, d):
        torch.compile(model, backend="aot_eager")(x).sum().backward()
    for n in stats:
        torch.testing.assert_close(c.get_buffer(n), d.get_buffer(n), msg=n, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_drop_path_acts_on_the_attention_branch_only():
    model = timm.create_model("ela_resnet56_cifar", drop_path_rate=0.2)
    blocks = [blk for s in model.stages for blk in s]
    probs = [blk.attn.drop_path.drop_prob if hasattr(blk.attn.drop_path, "drop_prob") else 0.0 for blk in blocks]
    assert probs[0] == 0.0 and math.isclose(probs[-1], 0.2)
    assert all(p2 >= p1 for p1, p2 in zip(probs, probs[1:]))
    assert all(blk.drop_path is None for blk in blocks), "the conv path has no stochastic depth"
    # in training the branch is dropped for some samples: outputs of two passes differ; in eval they do not
    model.train()
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    out1 = model.forward_features(x)
    torch.manual_seed(2)
    out2 = model.forward_features(x)
    assert not torch.allclose(out1, out2)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_dilates_the_later_stages_with_the_same_weights(output_stride, tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model("ela_resnet18", num_classes=3).eval()
    model = timm.create_model("ela_resnet18", num_classes=3, output_stride=output_stride).eval()
    model.load_state_dict(plain.state_dict())  # dilation adds no weights: the same checkpoint loads strictly
    assert model.layer4[1].conv2.dilation == (32 // output_stride,) * 2
    x = torch.randn(1, 3, 64, 64)
    assert model.forward_features(x).shape[-1] == 64 // output_stride
    assert not torch.allclose(model(x), plain(x))
    # the attention layers' depthwise value conv is dilated with its stage (the first block too), so the network
    # is the stride-32 one evaluated more densely: its feature maps, subsampled, are the stride-32 ones (up to
    # the attention's global pooling, which also sees the positions in between)
    for i, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        d = 4 * 2**i // min(4 * 2**i, output_stride)  # the stride the stage no longer takes
        assert [blk.attn.wv.dilation for blk in stage] == [(d, d)] * len(stage), (i, d)
    with torch.no_grad():
        plain.train()(torch.randn(4, 3, 64, 64) * 2 + 1)  # BatchNorm statistics other than the identity
    model.load_state_dict(plain.eval().state_dict())
    dense, coarse = model.forward_features(x), plain.forward_features(x)
    step = 32 // output_stride
    assert (dense[..., ::step, ::step] - coarse).abs().max() < 1e-2 * coarse.abs().max()
    want = [2, 4, 8, min(16, output_stride), output_stride]
    backbone = timm.create_model("ela_resnet18", features_only=True, output_stride=output_stride)
    assert backbone.feature_info.reduction() == want
    assert [64 // f.shape[-1] for f in backbone(x)] == want
    # ELA on a dilated network: mask and KL recording as usual
    model.set_skip_mask([[False, False], [False, True], [False, False], [False, True]])
    with model.kl_recording():
        model.train()(torch.randn(2, 3, 64, 64))
    assert set(model.kl_statistics()) == {(0, 1), (2, 1)}
    # the slim release rebuilds the dilated network (timm and transformers)
    ela_hf.export_pruned(model.eval(), tmp_path / "release")
    release = timm.create_model(f"local-dir:{tmp_path / 'release'}", pretrained=True).eval()
    assert release.layer4[1].conv2.dilation == (32 // output_stride,) * 2
    torch.testing.assert_close(release(x), model(x))
    hf = ela_hf.ElaForImageClassification.from_pretrained(tmp_path / "release").eval()
    torch.testing.assert_close(hf(pixel_values=x).logits, model(x))
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 4"):
        timm.create_model("ela_resnet18", output_stride=4)
    with pytest.raises(ValueError, match="output_stride=16 is for the ImageNet stems"):
        timm.create_model("ela_resnet20_cifar", output_stride=16)


def test_detr_dilated_backbone_builds_an_output_stride_16_ela_backbone():
    """DETR's DC5 (``dilation=True``) asks its timm backbone for ``output_stride=16``."""
    from transformers import DetrConfig, DetrForObjectDetection

    small = dict(num_queries=3, d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16,
                 decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2)
    config = DetrConfig(use_timm_backbone=True, backbone="ela_resnet18", use_pretrained_backbone=False,
                        dilation=True, **small)
    detr = DetrForObjectDetection(config).eval()
    backbone = detr.model.backbone.model
    assert backbone.feature_info.reduction()[-1] == 16
    with torch.no_grad():
        out = detr(pixel_values=torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 3, config.num_labels + 1)


def test_drop_block_rate_acts_on_the_conv_path_of_stages_3_and_4():
    from timm.layers import DropBlock2d

    torch.manual_seed(0)
    model = timm.create_model("ela_resnet18", drop_block_rate=0.3, zero_init_last=False)
    assert [type(blk.drop_block) for s in model.stages for blk in s] == [nn.Identity] * 4 + [DropBlock2d] * 4
    plain = timm.create_model("ela_resnet18")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 160, 160)  # stage 3 at 10x10: room for DropBlock's 5x5 blocks
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))  # eval: no blocks dropped
    model.train(), plain.train()
    assert torch.equal(plain(x), plain(x))
    assert not torch.allclose(model(x), plain(x))
    with pytest.raises(ValueError, match="drop_block_rate must be in"):
        timm.create_model("ela_resnet18", drop_block_rate=1.5)


@pytest.mark.parametrize("name,rate", [("drop_rate", -1.0), ("drop_rate", 1.5), ("drop_path_rate", 2.0),
                                       ("drop_path_rate", -0.1)])
def test_drop_rates_outside_0_1_are_refused_at_construction(name, rate):
    with pytest.raises(ValueError, match=f"{name} must be in \\[0, 1\\), got {rate}"):
        timm.create_model("ela_resnet20_cifar", **{name: rate})
    from ela_hf import ElaConfig, ElaForImageClassification

    with pytest.raises(ValueError, match=f"{name} must be in"):
        ElaForImageClassification(ElaConfig(architecture="ela_resnet20_cifar", **{name: rate}))


@pytest.mark.parametrize("name", ["drop_rate", "drop_path_rate", "drop_block_rate"])
def test_drop_rates_that_are_not_numbers_are_refused_at_construction(name):
    # a string failed in the range check itself: "'<=' not supported between instances of 'float' and 'str'"
    with pytest.raises(TypeError, match=rf"{name} must be a number in \[0, 1\), got '0.1' \(str\)"):
        timm.create_model("ela_resnet20_cifar", **{name: "0.1"})
    timm.create_model("ela_resnet20_cifar", **{name: np.float32(0.1)})  # NumPy numbers are numbers


def test_getter_backbone_drops_the_unused_stages_and_matches_the_full_network():
    """``feature_cls='getter'`` calls prune_intermediate_layers: later stages and the head are removed."""
    torch.manual_seed(0)
    full = timm.create_model("ela_resnet20_cifar").eval()
    getter = timm.create_model("ela_resnet20_cifar", features_only=True, feature_cls="getter", out_indices=(1, 2))
    net = getter.model
    assert net.stage_names == ["layer1", "layer2"] and not hasattr(net, "layer3")
    missing, unexpected = net.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith(("layer3.", "fc.")) for k in unexpected)
    assert getter.feature_info.channels() == [64, 128]
    x = torch.randn(2, 3, 32, 32)
    want = full.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    got = getter.eval()(x)
    assert len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # the skip mask and the KL statistics cover the kept stages
    assert net.skip_mask == [[False, False], [False, False]]
    with ela_hf.kl_recording(getter):
        getter.train()(x)
    assert set(ela_hf.kl_statistics(getter)) == {(0, 1), (1, 1)}


def test_bad_inputs_raise_clear_errors():
    model = timm.create_model("ela_resnet20_cifar", num_classes=5)
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        model(torch.randn(3, 32, 32))
    # timm's features_only backbones call the stem directly: the same checks (plain and deep stem)
    for name in ("ela_resnet20_cifar", "ela_resnet50d"):
        backbone = timm.create_model(name, features_only=True)
        with pytest.raises(ValueError, match="expected 3 input channels, got 4"):
            backbone(torch.randn(2, 4, 32, 32))
        with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
            backbone(torch.randn(3, 32, 32))
        # raw pixels: PyTorch's "expected scalar type Byte but found Float" said nothing of what to do
        with pytest.raises(ValueError, match=r"expected floating-point images \(normalised .*\), got torch.uint8; "
                                             r"convert raw pixels first"):
            backbone(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected floating-point images .*, got torch.int64"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="skip_mask has 2 stages but the architecture has 3"):
        timm.create_model("ela_resnet20_cifar", skip_mask=[[False, False], [False, False]])
    with pytest.raises(ValueError, match="stage 1 has 3 entries but the stage has 2 blocks"):
        model.set_skip_mask([[False, False], [False, False, True], [False, False]])
    with pytest.raises(ValueError, match=r"skip_mask\[2\]\[0\] skips the first block of stage 2"):
        model.set_skip_mask([[False, False], [False, False], [True, False]])
    with pytest.raises(ValueError, match=r"skip_mask\[0\]\[1\] must be a bool"):
        model.set_skip_mask([[False, "yes"], [False, False], [False, False]])
    with pytest.raises(ValueError, match="list of per-stage lists"):
        model.set_skip_mask([False, True])
    with pytest.raises(ValueError, match="its stage 0 is a str: 'ab'"):
        model.set_skip_mask(["ab", [False, False], [False, False]])
    with pytest.raises(ValueError, match="no attention layers"):
        timm.create_model("resnet20_cifar", skip_mask=[[False, False]] * 3)
    with pytest.raises(ValueError, match="contains no layer-attention"):
        ela_hf.set_skip_mask(timm.create_model("resnet20_cifar"), [[False, False]] * 3)
    with pytest.raises(ValueError, match="attn_type must be one of"):
        LayerAttentionResNet(layers=(1,), channels=(16,), attn_type="mrla_x")
    assert model.skip_mask == [[False, False]] * 3, "refused masks leave the model untouched"


@pytest.mark.parametrize("name", ["ela_resnet18", "ela_resnet20_cifar", "ela_resnet50d"])
def test_bad_in_chans_is_refused_at_construction(name):
    # 0 built a model that no input fits, -1 failed in torch's Conv2d ("negative dimension"), "3" and 3.0 there too
    for value in (0, -1):
        with pytest.raises(ValueError, match=f"in_chans must be a positive number of input image channels, got {value}"):
            timm.create_model(name, in_chans=value)
    for value, kind in (("3", "str"), (3.0, "float")):
        with pytest.raises(TypeError, match=rf"in_chans must be an int .*, got {value!r} \({kind}\)"):
            timm.create_model(name, in_chans=value)
    assert timm.create_model(name, in_chans=np.int64(2)).in_chans == 2


def test_torch_tensor_masks_are_accepted():
    model = timm.create_model("ela_resnet20_cifar", num_classes=5)
    model.set_skip_mask(torch.tensor([[False, True], [False, False], [False, True]]))
    assert model.skip_mask == [[False, True], [False, False], [False, True]]


def test_a_model_ema_follows_the_skip_flags_copied_into_it():
    """timm's ModelEma copies buffers in place: the EMA model must run the layers its flags skip, as the
    checkpoint saved from it will."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("ela_resnet20_cifar", num_classes=4)
    ema = ModelEmaV3(model, decay=0.0)
    ela_hf.set_skip_mask(model, [[False, True], [False, False], [False, True]])
    ema.update(model)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    ema.module.eval()
    assert ema.module.skip_mask == model.skip_mask
    with torch.no_grad():
        torch.testing.assert_close(ema.module(x), model(x), rtol=0, atol=0)
    reloaded = timm.create_model("ela_resnet20_cifar", num_classes=4).eval()
    reloaded.load_state_dict(ema.module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), ema.module(x), rtol=0, atol=0)


def test_drop_path_on_a_plain_resnet_is_said_to_do_nothing():
    with pytest.warns(UserWarning, match=r"drop_path_rate=0.9 has no effect on a plain ResNet"):
        plain = timm.create_model("resnet20_cifar", drop_path_rate=0.9)
    assert not any("DropPath" in type(m).__name__ for m in plain.modules())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timm.create_model("resnet20_cifar")
        timm.create_model("ela_resnet20_cifar", drop_path_rate=0.9)


def test_an_mrla_b_block_run_outside_its_stage_warns():
    # nn.Sequential(*model.layer2) or a loop over the blocks gives each block a fresh stage state: the later
    # blocks attend to no earlier layer and the output differs from the network's, silently
    model = timm.create_model("ela_resnet20_cifar").eval()
    x = torch.randn(2, 64, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole = model.layer2(x)  # a stage: no warning
        model.layer2[0](x)  # a stage's first block on its own is the stage's start
        timm.create_model("ela_l_resnet20_cifar").eval().layer2[1](whole)  # MRLA-L reads the shortcut only
    with pytest.warns(UserWarning, match=r"block 1 of its stage\) ran on its own.*nn.Sequential"):
        h = x
        for blk in model.layer2:
            h = blk(h)
    assert (h - whole).abs().max() > 1e-4  # (what the warning is about)
