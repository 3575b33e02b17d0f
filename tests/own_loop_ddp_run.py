"""A training loop of one's own (plain accelerate, no Trainer) that prunes with ela_hf.skip_redundant_layers.

Run by tests/test_own_loop.py under ``accelerate launch --multi_gpu --num_processes 2`` on CPU; each rank
writes what it saw to ``<out>/rank<r>.json``.
"""
import json
import sys

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs

import ela_hf
from ela_hf.pruning import FixedCountSelector, LayerSelector


class FailingSelector(LayerSelector):
    name = "test_own_loop_failing"

    def explain(self, d):
        raise ValueError("this selector always fails")


class Net(nn.Module):  # a user's module around the network: DDP reads the ignore list of what it wraps
    def __init__(self):
        super().__init__()
        self.body = timm.create_model("ela_resnet20_cifar", num_classes=4)

    def forward(self, x):
        return self.body(x)


def wrapped_model(accelerator, rank):
    """DDP around a wrapper is refused until the wrapper names the accumulators; then each rank keeps its own
    sums, with unequal batches (rank 0: 4 images a step, rank 1: 2)."""
    out = {}
    torch.manual_seed(0)
    exposed = accelerator.prepare(Net())
    try:
        ela_hf.set_kl_recording(exposed, True)
        out["exposed_error"] = None
    except ValueError as e:
        out["exposed_error"] = str(e)
    torch.manual_seed(0)
    net = Net()
    ela_hf.models.keep_kl_statistics_out_of_ddp(net)
    net = accelerator.prepare(net)
    g = torch.Generator().manual_seed(200 + rank)
    with ela_hf.kl_recording(net):
        for _ in range(2):
            loss = net(torch.randn(4 - 2 * rank, 3, 16, 16, generator=g)).square().mean()
            accelerator.backward(loss)  # DDP's buffer broadcast runs in the forward passes
    out["wrapped_local"] = [[float(s), float(c)] for *_, s, c in ela_hf.models.kl_accumulators(net)]
    out["wrapped_decision"] = ela_hf.skip_redundant_layers(net, FixedCountSelector(1))
    return out


def masks_that_differ(accelerator, rank):
    """Ranks that train different masks (a checkpoint loaded on one rank only) are refused on every rank, not
    summed layer by layer across different layers."""
    torch.manual_seed(0)
    model = timm.create_model("ela_resnet20_cifar", num_classes=4)
    ela_hf.set_skip_mask(model, [[False, True], [False, False], [False, False]] if rank == 0 else
                         [[False, False], [False, True], [False, False]])
    model = accelerator.prepare(model)
    try:
        ela_hf.skip_redundant_layers(model, FixedCountSelector(1))
        return {"differ_error": None}
    except ValueError as e:
        return {"differ_error": str(e)}


def main(out):
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP checks the shapes, not the values)
    model = timm.create_model("ela_resnet20_cifar", num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data

    def train_steps(n):
        for _ in range(n):
            x = torch.randn(3, 3, 16, 16, generator=g)
            y = torch.randint(0, 4, (3,), generator=g)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()

    result = {"rank": rank, "world_size": world, "ddp": type(model).__name__}
    with ela_hf.kl_recording(model):
        train_steps(2)
    result["local"] = {f"{i}.{j}": [float(s), float(c)] for i, j, s, c in ela_hf.models.kl_accumulators(model)}
    result["first"] = ela_hf.skip_redundant_layers(model, FixedCountSelector(2))
    result["after_first"] = {f"{i}.{j}": [float(s), float(c)] for i, j, s, c in ela_hf.models.kl_accumulators(model)}
    train_steps(1)  # the skipped layers' parameters get no gradients now: DDP must look for unused ones

    with ela_hf.kl_recording(model):
        train_steps(1)
    try:
        ela_hf.skip_redundant_layers(model, FailingSelector())
        result["failure"] = None
    except Exception as e:  # rank 0 raises the selector's error, the other ranks are told
        result["failure"] = [type(e).__name__, str(e)]
    result["mask"] = ela_hf.get_skip_mask(model)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    result["weights_head"] = weights[:50].tolist()
    result.update(wrapped_model(accelerator, rank))
    result.update(masks_that_differ(accelerator, rank))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
