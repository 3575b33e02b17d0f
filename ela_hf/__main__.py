"""``python -m ela_hf``: a quick offline check that the models build and run (no downloads)."""
import argparse
import time

import timm
import torch

import ela_hf  # noqa: F401  (registers the models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ela_resnet56_cifar")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model = timm.create_model(args.model, num_classes=10)
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(args.batch_size, 3, size, size)
    start = time.perf_counter()
    logits = model(x)
    logits.sum().backward()
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params:,} parameters, skip mask {model.skip_mask}")
    print(f"forward+backward on {tuple(x.shape)} -> {tuple(logits.shape)} in {elapsed:.2f}s (fresh random weights)")


if __name__ == "__main__":
    main()
