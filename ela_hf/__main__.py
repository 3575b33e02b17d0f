"""``python -m ela_hf``: a quick offline check that the models build and run (no downloads)."""
import argparse
import time

import timm
import torch

import ela_hf  # noqa: F401  (registers the models)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ela_hf", description=__doc__)
    parser.add_argument("--model", default="ela_resnet56_cifar")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    from ela_hf.models import MODEL_ARGS

    if args.model not in MODEL_ARGS:
        parser.error(f"--model {args.model!r} is not an ela_hf model; choose one of: {', '.join(sorted(MODEL_ARGS))}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    model = timm.create_model(args.model, num_classes=10)
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(args.batch_size, 3, size, size)
    start = time.perf_counter()
    logits = model(x)
    logits.sum().backward()
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    mask = f"skip mask {model.skip_mask}" if model.skip_mask is not None else "plain ResNet (no attention layers)"
    print(f"{args.model}: {params:,} parameters, {mask}")
    print(f"forward+backward on {tuple(x.shape)} -> {tuple(logits.shape)} in {elapsed:.2f}s (fresh random weights)")


if __name__ == "__main__":
    main()
