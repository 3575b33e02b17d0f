"""Pruning in a loop of one's own under FSDP (1 and 2), in a real 2-process gloo job: tests/fsdp_run.py."""
import pytest
import torch
import torch.nn as nn

import timm

import ela_hf
from ela_hf.pruning import FixedCountSelector
from two_ranks import launch_two_ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    r0, r1 = launch_two_ranks("fsdp_run.py", tmp_path_factory.mktemp("fsdp"))
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    return r0, r1


@pytest.mark.parametrize("variant, wrapper", [("fsdp1", "FullyShardedDataParallel"), ("fsdp2", "FSDPLayerAttentionResNet")])
def test_records_pools_and_skips_identically_under_fsdp(ranks, variant, wrapper):
    r0, r1 = ranks[0][variant], ranks[1][variant]
    assert r0["wrapper"] == r1["wrapper"] == wrapper
    # every rank recorded its own images into float32 accumulators (FSDP1's bf16 buffer_dtype cast them to
    # bf16, which stops counting at 256; FSDP1 units around the attention layers kept recording off)
    assert r0["dtypes"] == r1["dtypes"] == ["torch.float32"]
    for local in (r0["local"], r1["local"]):
        assert [c for _, c in local.values()] == [320.0] * 3
    assert r0["local"] != r1["local"]
    assert r0["warnings"] == r1["warnings"] == []
    # one decision on the pooled statistics, the same on both ranks, layers named as in the model built
    assert r0["decision"] == r1["decision"]
    layers = r0["decision"]["layers"]
    assert [e["name"] for e in layers] == ["layer1.1", "layer2.1", "layer3.1"]
    pooled = []
    for e in layers:
        (s0, c0), (s1, c1) = r0["local"][f"{e['stage']}.{e['block']}"], r1["local"][f"{e['stage']}.{e['block']}"]
        assert e["samples"] == 640
        assert e["d_t"] == pytest.approx((s0 + s1) / (c0 + c1), rel=1e-6)
        pooled.append(e["d_t"])
    skip = FixedCountSelector(1).select(pooled)
    assert [e["skip"] for e in layers] == skip and sum(skip) == 1
    # the skipped layer no longer runs; training went on
    skipped = next(e["name"] for e in layers if e["skip"])
    for r in (r0, r1):
        assert r["mask"] == r0["decision"]["skip_mask"]
        assert f"{skipped}.attn" not in r["calls_after"]
        assert len(r["calls_after"]) == 5 and set(r["calls_after"].values()) == {2}


@pytest.mark.parametrize("variant", ["fsdp1", "fsdp2"])
def test_export_pruned_refuses_a_sharded_model_and_its_recipe_works(ranks, variant):
    r0 = ranks[0][variant]
    refusal = r0["refusal"]
    assert refusal is not None and "FSDP (or another DTensor layout) shards them" in refusal
    assert "get_model_state_dict" in refusal and "full_state_dict=True" in refusal
    assert "timm.create_model('ela_resnet20_cifar', num_classes=4)" in refusal
    # gathered, loaded into an unsharded network and exported: the release holds the mask, not the skipped layer
    mask = r0["decision"]["skip_mask"]
    assert r0["exported_mask"] == r0["reloaded_mask"] == mask
    skipped = next(e["name"] for e in r0["decision"]["layers"] if e["skip"])
    assert not any(k.startswith(f"{skipped}.attn.") for k in r0["exported_keys"])
    assert any(k.startswith("layer1.0.attn.") for k in r0["exported_keys"])


class _Wrapper(nn.Module):
    """Stands in for a wrapper that holds the module it wraps under an attribute of its own and forwards
    attribute reads to it, as FSDP1's FullyShardedDataParallel and torch's checkpoint_wrapper do."""

    def __init__(self, inner, hop):
        super().__init__()
        self.hop = hop
        self.add_module(hop, inner)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self._modules.get(self.__dict__.get("hop"))
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, *args, **kwargs):
        return self._modules[self.hop](*args, **kwargs)


def _wrap_in_place(net, hop):
    for stage in net.stages:
        for j, blk in enumerate(list(stage)):
            if blk.attn is not None:
                blk.attn = _Wrapper(blk.attn, hop)
            stage.add_module(str(j), _Wrapper(blk, hop))
    return net


@pytest.mark.parametrize("hop", ["_fsdp_wrapped_module", "_checkpoint_wrapped_module"])
def test_blocks_and_attention_layers_wrapped_in_place_record_and_keep_their_names(hop):
    """What FSDP1's auto-wrap and torch's checkpoint_wrapper do to blocks and attention layers, in one process:
    recording reaches the layers, names leave the wrapper hops out, and slim_state_dict still drops the
    skipped layer's weights."""
    torch.manual_seed(0)
    net = _wrap_in_place(timm.create_model("ela_resnet20_cifar", num_classes=4), hop)
    net.train()
    with ela_hf.kl_recording(net):
        net(torch.randn(3, 3, 16, 16))
    counts = [float(c) for *_, c in ela_hf.models.kl_accumulators(net)]
    assert counts == [3.0, 3.0, 3.0]
    record = ela_hf.skip_redundant_layers(net, FixedCountSelector(1))
    assert [e["name"] for e in record["layers"]] == ["layer1.1", "layer2.1", "layer3.1"]
    skipped = next(e["name"] for e in record["layers"] if e["skip"])
    slim = ela_hf.models.slim_state_dict(net)
    clean = [".".join(p for p in k.split(".") if p != hop) for k in slim]
    assert not any(k.startswith(f"{skipped}.attn.") for k in clean)
    assert any(k.startswith("layer1.0.attn.") for k in clean)


def test_names_leave_out_torch_compile_hop():
    torch.manual_seed(0)
    compiled = torch.compile(timm.create_model("ela_resnet20_cifar", num_classes=4))  # not run: no compilation
    with pytest.warns(UserWarning, match="no attention layer recorded"):
        record = ela_hf.skip_redundant_layers(compiled, FixedCountSelector(1))
    assert [e["name"] for e in record["layers"]] == ["layer1.1", "layer2.1", "layer3.1"]


def _cast_buffers_as_fsdp_does(model, dtype):
    # FSDP1's _cast_buffers_to_dtype_and_device (`buffer.data = ...`, around nn.Module._apply), here on the KL
    # accumulators alone: FSDP also casts parameters and inputs, which this float32 model does not take
    for name, b in model.named_buffers():
        if name.endswith(("kl_sum", "kl_count")):
            b.data = b.data.to(dtype)


def test_accumulators_cast_down_before_recording_count_on_in_float32():
    torch.manual_seed(0)
    net = timm.create_model("ela_resnet20_cifar", num_classes=4).train()
    _cast_buffers_as_fsdp_does(net, torch.bfloat16)
    sums = [s for *_, s, _ in ela_hf.models.kl_accumulators(net)]
    assert {s.dtype for s in sums} == {torch.bfloat16}
    x = torch.randn(100, 3, 8, 8)
    with ela_hf.kl_recording(net), torch.no_grad():
        for _ in range(3):  # 300 images: bf16 counts 256, 256 + 44 = 300 is no bf16 number
            net(x)
    after = ela_hf.models.kl_accumulators(net)
    assert [s is t for (*_, s, _), t in zip(after, sums)] == [True] * 3  # the same tensors, promoted in place
    assert {s.dtype for *_, s, _ in after} == {c.dtype for *_, c in after} == {torch.float32}
    assert [float(c) for *_, c in after] == [300.0] * 3


def test_accumulators_cast_down_after_recording_began_warn():
    torch.manual_seed(0)
    net = timm.create_model("ela_resnet20_cifar", num_classes=4).train()
    x = torch.randn(4, 3, 8, 8)
    with ela_hf.kl_recording(net), torch.no_grad():
        net(x)
        _cast_buffers_as_fsdp_does(net, torch.bfloat16)
        with pytest.warns(RuntimeWarning, match="cast to a lower precision after recording began"):
            net(x)
    assert [float(c) for *_, c in ela_hf.models.kl_accumulators(net)] == [8.0] * 3
    assert {s.dtype for *_, s, _ in ela_hf.models.kl_accumulators(net)} == {torch.float32}


@pytest.mark.parametrize("arch", ["ela_resnet20_cifar", "mrla_b_resnet20_cifar"])
def test_blocks_sharded_with_input_casting_share_their_stage_state(tmp_path, arch):
    """FSDP2's MixedPrecisionPolicy (and FSDP1's cast_forward_inputs) maps over each unit's inputs and rebuilt
    the stage state, a dataclass then, for every block: later blocks saw none of the earlier ones' keys, values
    or attention (other outputs, nothing recorded), without an error."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.utils import _apply_to_tensors

    from ela_hf.layers import StageState
    from ela_hf.models.ela_resnet import _LayerAttentionBlockMixin
    from two_ranks import one_rank_group

    state = StageState(keys=[torch.ones(1)])
    assert _apply_to_tensors(lambda t: t.double(), state) is state  # what FSDP's input casting does to it

    torch.manual_seed(0)
    plain = timm.create_model(arch, num_classes=4)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with one_rank_group(tmp_path):
        mesh = init_device_mesh("cpu", (1,))
        net = copy.deepcopy(plain)
        policy = MixedPrecisionPolicy(param_dtype=torch.float32)  # casts the inputs (bf16 BatchNorm needs a GPU)
        for m in net.modules():
            if isinstance(m, _LayerAttentionBlockMixin):
                fully_shard(m, mesh=mesh, mp_policy=policy)
        fully_shard(net, mesh=mesh, mp_policy=policy)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-6)
        net.train()
        with ela_hf.kl_recording(net):
            net(x).sum().backward()
        assert [float(c) for *_, c in ela_hf.models.kl_accumulators(net)] == [4.0, 4.0, 4.0]


def test_buffer_pool_forgets_one_off_shapes():
    """The pool counts the passes asking for each shape; a server's stream of one-off shapes must not pile up
    counts without end (they were trimmed only when a buffer was kept)."""
    from ela_hf.layers import mrla

    pool = mrla._SLOT_POOL
    mrla.clear_value_buffer_pool()
    torch.manual_seed(0)
    model = timm.create_model("mrla_b_resnet20_cifar", num_classes=4).eval()
    with torch.no_grad():
        for batch in range(1, 301):  # every batch size a shape of its own, asked for once
            model(torch.randn(batch, 3, 4, 4))
    assert pool.free_bytes() == 0 and not pool._free
    assert len(pool._recent) <= 256
    mrla.clear_value_buffer_pool()
