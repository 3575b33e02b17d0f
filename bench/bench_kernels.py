"""Op-level benchmark of the conv, tail and fused C++ CPU kernels against PyTorch's own ops, in one process.

(The slot, attention-weight and gate kernels are timed in whole networks instead:
``bench_models.py --models mrla_b mrla_b_bmm mrla_b_qk_ops mrla_l mrla_l_qk_ops``.)

For the attention tensors of the two benchmark networks (CIFAR ResNet-110 at 32x32 and batch 64,
ResNet-50 at 128x128 and batch 8, one shape per stage, read off the MRLA-L models themselves), times
forward + backward of:

- the depthwise 3x3 value conv: ``fast_ops.depthwise_conv3x3(conv, x, with_mean=True)`` against
  ``conv(x)`` plus the pooling, as the layers computed them before;
- MRLA-L's tail ``y + BN(gate * V + lambda * sc)`` and MRLA-B's ``y + relu(BN(O))``:
  ``fast_ops.attention_tail`` against the same expressions in PyTorch ops;
- the whole MRLA-L layer on its fused kernels (``fast_ops.light_layer``: the conv, the pooling and the
  tail, V never stored) against the same layer on the conv and tail kernels
  (``fast_ops.FUSED_LIGHT_LAYER = False``). Its baseline is the kernels, not PyTorch.

The kernels run at every plane size here (the layers hand planes smaller than
``fast_ops.DEPTHWISE_MIN_PLANE`` / ``TAIL_MIN_PLANE`` elements to PyTorch, and planes below
``LIGHT_MIN_PLANE`` to the separate kernels; the last column says which path the layers take: at the
fused layer's sizes MRLA-L runs neither the separate conv nor its tail kernel). Medians over interleaved rounds (the PyTorch and fast versions alternate), with a large buffer
rewritten before every call so that the data is not in cache, as inside a training step. Prints times
and the ratio fast / PyTorch (below 1: faster).

    python bench/bench_kernels.py --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ela_hf  # noqa: E402,F401  (registers the models with timm)
from ela_hf.layers import fast_ops  # noqa: E402
from ela_hf.layers.mrla import MrlaLight, StageState  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import make_cases, switched_off  # noqa: E402  (the same networks, batch and image sizes)

CASES = make_cases("cpu")
FUSED_ROW = "MRLA-L layer, fused (baseline: conv + tail kernels)"
SHAPES = {}  # case -> [(n, c, h, w), ...]; filled by attention_shapes(), or set by hand


def attention_shapes(case: str):
    """The distinct shapes of the tensors the attention layers of ``case``'s network see, in order."""
    if case not in SHAPES:
        case_ = CASES[case]
        batch, size = case_.batch_size, case_.image_size
        model = timm.create_model(case_.names["mrla_l"], num_classes=case_.num_classes).eval()
        seen = []

        def hook(module, args):
            shape = (batch, *args[0].shape[1:])
            if shape not in seen:
                seen.append(shape)

        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, MrlaLight)]
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        for h in handles:
            h.remove()
        SHAPES[case] = seen
    return SHAPES[case]


def _ops(shape):
    """name -> (pytorch_fn, fast_fn): each runs forward and backward once."""
    n, c, h, w = shape
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    sc = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    gate = torch.rand(n, c, 1, 1, requires_grad=True)
    lam = torch.randn(c, 1, 1, requires_grad=True)
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    bn = nn.BatchNorm2d(c)
    g_mean = torch.randn(n, c)
    layer = MrlaLight(c).train()
    layer_inputs = (x, sc, *layer.parameters())

    def conv_torch():
        v, m = conv(x), x.sum(dim=(2, 3)) * (1.0 / (h * w))
        torch.autograd.grad((v, m), (x, conv.weight), (grad, g_mean))

    def conv_fast():
        v, m = fast_ops.depthwise_conv3x3(conv, x, with_mean=True)
        torch.autograd.grad((v, m), (x, conv.weight), (grad, g_mean))

    light_inputs = (x, sc, gate, lam, bn.weight, bn.bias)

    def light_torch():
        out = x + bn(torch.addcmul(lam * sc, x, gate))
        torch.autograd.grad(out, light_inputs, grad)

    def light_fast():
        out = fast_ops.attention_tail(bn, x, x, sc=sc, gate=gate, lam=lam)
        torch.autograd.grad(out, light_inputs, grad)

    def base_torch():
        out = sc + F.relu(bn(x))
        torch.autograd.grad(out, (x, sc, bn.weight, bn.bias), grad)

    def base_fast():
        out = fast_ops.attention_tail(bn, x, sc, relu=True)
        torch.autograd.grad(out, (x, sc, bn.weight, bn.bias), grad)

    def layer_run(fused):
        def run():
            with switched_off(None if fused else "FUSED_LIGHT_LAYER"):
                out = layer(x, sc, StageState())
                torch.autograd.grad(out, layer_inputs, grad)

        return run

    return {
        "depthwise conv + pooling": (conv_torch, conv_fast),
        "MRLA-L tail": (light_torch, light_fast),
        "MRLA-B tail": (base_torch, base_fast),
        FUSED_ROW: (layer_run(False), layer_run(True)),
    }


def run(args) -> str:
    if fast_ops.cpu_kernels() is None:
        if os.environ.get("ELA_HF_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
            raise SystemExit("the C++ kernels are switched off (ELA_HF_CPU_KERNELS): nothing to compare")
        raise SystemExit("the C++ kernels are unavailable here (no C++ compiler?): nothing to compare")
    flush = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MiB, more than the last-level cache
    lines = [
        f"ela_hf kernel benchmark: torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"medians of {args.repeats} interleaved rounds, cold cache, C++ kernels {fast_ops.describe_kernels()}",
        "",
        "command: `python bench/bench_kernels.py " + " ".join(args.argv) + "`",
        "",
        "| case | tensor | op | baseline (ms) | fast (ms) | fast / baseline | the layers use |",
        "|---|---|---|---|---|---|---|",
    ]
    saved = (fast_ops.DEPTHWISE_MIN_PLANE, fast_ops.TAIL_MIN_PLANE, fast_ops.LIGHT_MIN_PLANE)
    limits = {"depthwise conv + pooling": saved[0], "MRLA-L tail": saved[1], "MRLA-B tail": saved[1],
              FUSED_ROW: max(saved)}
    labels = {FUSED_ROW: ("fused", "not fused")}
    fused_from = max(saved[1], saved[2]) if fast_ops.FUSED_LIGHT_LAYER else None
    # time the kernels at every size
    fast_ops.DEPTHWISE_MIN_PLANE = fast_ops.TAIL_MIN_PLANE = fast_ops.LIGHT_MIN_PLANE = 0
    try:
        for case in args.cases:
            for shape in attention_shapes(case):
                for name, (slow, fast) in _ops(shape).items():
                    times = {"slow": [], "fast": []}
                    for fn in (slow, fast):  # warm-up
                        fn()
                    for _ in range(args.repeats):
                        for key, fn in (("slow", slow), ("fast", fast)):
                            flush.add_(1)
                            t = time.perf_counter()
                            fn()
                            times[key].append(time.perf_counter() - t)
                    slow_ms = statistics.median(times["slow"]) * 1e3
                    fast_ms = statistics.median(times["fast"]) * 1e3
                    yes, no = labels.get(name, ("kernel", "PyTorch"))
                    plane = shape[2] * shape[3]
                    used = yes if plane >= limits[name] else no
                    if fused_from is not None and plane >= fused_from and name == "MRLA-L tail":
                        used = "fused layer"  # MRLA-L's tail is inside its fused kernel at these sizes
                    elif fused_from is not None and plane >= fused_from and name == "depthwise conv + pooling":
                        used = "kernel (MRLA-B); fused layer (MRLA-L)"
                    lines.append(
                        f"| {case} | {list(shape)} | {name} | {slow_ms:.2f} | {fast_ms:.2f} | {fast_ms / slow_ms:.2f} "
                        f"| {used} |"
                    )
    finally:
        fast_ops.DEPTHWISE_MIN_PLANE, fast_ops.TAIL_MIN_PLANE, fast_ops.LIGHT_MIN_PLANE = saved
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["cifar", "imagenet"])
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per op (default 15)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0: leave as is)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.threads < 0:
        p.error(f"--threads must be at least 0, got {args.threads}")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args))


if __name__ == "__main__":
    main()
