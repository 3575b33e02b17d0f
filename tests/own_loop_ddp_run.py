"""A training loop of one's own (plain accelerate, no Trainer) that prunes with ela_hf.skip_redundant_layers.

Run by tests/test_own_loop.py under ``accelerate launch --multi_gpu --num_processes 2`` on CPU; each rank
writes what it saw to ``<out>/rank<r>.json``.
"""
import json
import sys

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs

import ela_hf
from ela_hf.pruning import FixedCountSelector, LayerSelector


class FailingSelector(LayerSelector):
    name = "test_own_loop_failing"

    def explain(self, d):
        raise ValueError("this selector always fails")


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
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
