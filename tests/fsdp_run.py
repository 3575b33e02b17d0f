"""A training loop of one's own under FSDP (FSDP1's FullyShardedDataParallel, FSDP2's fully_shard) that prunes
with ela_hf.skip_redundant_layers, then exports as ela_hf.export_pruned's refusal says.

Run by tests/test_fsdp.py under ``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo): accelerate
itself turns FSDP on only for accelerators, so the loop wraps the model with torch's FSDP directly. Each rank
writes what it saw to ``<out>/rank<r>.json``.
"""
import json
import sys
import warnings
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ela_hf
from ela_hf.layers.mrla import _LayerAttentionBase
from ela_hf.models import LayerAttentionStage
from ela_hf.models.ela_resnet import _LayerAttentionBlockMixin
from ela_hf.pruning import FixedCountSelector

BATCH, STEPS = 16, 20  # 320 images per rank and layer: more than bf16 can count (256)


def build():
    torch.manual_seed(0)
    net = timm.create_model("ela_resnet20_cifar", num_classes=4)
    calls = {}
    for name, m in net.named_modules():  # count each attention layer's runs, wherever FSDP puts it
        if isinstance(m, _LayerAttentionBase):
            m.register_forward_pre_hook(lambda mod, args, _n=name: calls.__setitem__(_n, calls.get(_n, 0) + 1))
    return net, calls


def fsdp1(net):
    """Attention layers and stages as FSDP units of their own, bf16 mixed precision for parameters and buffers
    (what accelerate's FSDP1 with mixed_precision='bf16' builds)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    attention = {type(m) for m in net.modules() if isinstance(m, _LayerAttentionBase)}
    bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    return FullyShardedDataParallel(
        net, auto_wrap_policy=ModuleWrapPolicy(attention | {LayerAttentionStage}), mixed_precision=bf16,
        use_orig_params=True, device_id=torch.device("cpu"),
    )


def fsdp2(net):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for m in net.modules():
        if isinstance(m, _LayerAttentionBlockMixin):
            fully_shard(m, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def run(variant, wrap, rank, out_dir):
    out = {}
    net, calls = build()
    model = wrap(net)
    out["wrapper"] = type(model).__name__
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)

    def steps(n):
        for _ in range(n):
            x = torch.randn(BATCH, 3, 16, 16, generator=g)
            y = torch.randint(0, 4, (BATCH,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x).float(), y).backward()
            opt.step()

    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ela_hf.kl_recording(model):
            steps(STEPS)
        accumulators = ela_hf.models.kl_accumulators(model)
        out["dtypes"] = sorted({str(s.dtype) for *_, s, _ in accumulators} | {str(c.dtype) for *_, c in accumulators})
        out["local"] = {f"{i}.{j}": [float(s), float(c)] for i, j, s, c in accumulators}
        out["decision"] = ela_hf.skip_redundant_layers(model, FixedCountSelector(1))
    out["warnings"] = [str(w.message) for w in caught if "KL" in str(w.message) or "recorded" in str(w.message)]
    out["mask"] = ela_hf.get_skip_mask(model)
    calls.clear()
    steps(2)
    out["calls_after"] = dict(calls)

    # export_pruned refuses the sharded model on the main process alone, without a collective (no hang)
    release = Path(out_dir) / f"release_{variant}"
    if rank == 0:
        try:
            ela_hf.export_pruned(model, release)
            out["refusal"] = None
        except ValueError as e:
            out["refusal"] = str(e)
    dist.barrier()

    # what the refusal says: gather a full state dict on every rank, export an unsharded model on one
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = timm.create_model("ela_resnet20_cifar", num_classes=4)
        plain.load_state_dict(full)
        ela_hf.export_pruned(plain, release)
        weights = json.loads((release / "config.json").read_text())
        out["exported_mask"] = weights["skip_mask"]
        from safetensors.torch import load_file

        out["exported_keys"] = sorted(load_file(str(release / "model.safetensors")))
        reloaded = timm.create_model(f"local-dir:{release}", pretrained=True)
        out["reloaded_mask"] = ela_hf.get_skip_mask(reloaded)
    dist.barrier()
    return out


def main():
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"rank": rank, "world_size": dist.get_world_size()}
    for variant, wrap in (("fsdp1", fsdp1), ("fsdp2", fsdp2)):
        result[variant] = run(variant, wrap, rank, out_dir)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
