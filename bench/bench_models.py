"""Training-step time and peak memory of MRLA-L, MRLA-B and ELA, as ratios to the plain ResNet.

Every model of a case is timed in the same process, one step each in turn (interleaved), for
``--repeats`` rounds; the table gives medians. Interleaving spreads a shared machine's load changes
over all models alike, so the ratios stay meaningful while the absolute times drift. The last column
gives the quartiles of each round's own ratio to the ResNet's step: how far the ratio moves within the
run.

Cases (the issue's two settings):
- ``cifar``: CIFAR ResNet-110 (``resnet110_cifar`` and the MRLA/ELA variants), 32x32, batch 64, 100 classes.
- ``imagenet``: ResNet-50 (timm ``resnet50`` and the MRLA/ELA variants), 128x128, batch 8 on CPU
  (224x224, batch 256 with ``--device cuda``).

A training step is: ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward, SGD step
(momentum 0.9). ELA is the MRLA-B network with the attention layers of blocks 1, 3, 5, ... of every
stage skipped in place (``set_skip_mask``), as during ELA training after a pruning decision.

Peak memory, on every device above what is live before the step with the gradients set to None (model,
optimizer state, input batch), so the figure holds the step's activations, its new gradients and its
temporaries:
- CPU: the high-water mark of live tensor bytes during one training step (MRLA-B's pooled stage
  buffers are released first, so the step allocates and counts them), from the allocation events of ``torch.profiler``
  (``profile_memory=True``): every tensor allocated through PyTorch's CPU allocator, activations saved
  for backward, gradients and temporaries included; memory the C libraries allocate on their own
  (oneDNN/MKL scratch space, allocator caching) is not in it.
- CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the allocated bytes before it.

Inference (whatever ``--models`` says): images/s of the plain ResNet and of the slim ELA model (built with
``timm.create_model(name, skip_mask=mask)``, skipped layers absent), eval mode, eager and under
``torch.compile``.

Examples::

    python bench/bench_models.py                      # both cases, 7 rounds, with torch.compile
    python bench/bench_models.py --quick              # 3 rounds, no torch.compile
    python bench/bench_models.py --cases cifar --models resnet mrla_b --repeats 11
    python bench/bench_models.py --device cuda --amp bf16 --channels-last
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # less of the profiler's chatter on stderr

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ela_hf  # noqa: E402,F401  (registers the models with timm)
from ela_hf.layers import fast_ops  # noqa: E402
from ela_hf.layers.mrla import clear_value_buffer_pool  # noqa: E402
from ela_hf.models import set_skip_mask  # noqa: E402

MODEL_KINDS = ("resnet", "mrla_l", "mrla_l_plain", "mrla_l_unfused", "mrla_l_qk_ops", "mrla_b", "mrla_b_plain",
               "mrla_b_bmm", "mrla_b_qk_ops", "ela")
DEFAULT_KINDS = ("resnet", "mrla_l", "mrla_b", "ela")
LABELS = {"resnet": "ResNet", "mrla_l": "MRLA-L", "mrla_b": "MRLA-B", "ela": "ELA (half skipped)",
          "mrla_l_plain": "MRLA-L, CPU fast paths off", "mrla_b_plain": "MRLA-B, CPU fast paths off",
          "mrla_l_unfused": "MRLA-L, conv and tail kernels separate",
          "mrla_b_bmm": "MRLA-B, slot contractions on torch.bmm",
          "mrla_l_qk_ops": "MRLA-L, gate in PyTorch ops", "mrla_b_qk_ops": "MRLA-B, attention weights in PyTorch ops"}
# kind suffix -> the fast_ops switch that is off during that kind's steps (before/after comparisons)
SWITCHES = {"_plain": "FAST_CPU_PATHS", "_unfused": "FUSED_LIGHT_LAYER", "_bmm": "SLOT_KERNELS",
            "_qk_ops": "WEIGHT_KERNELS"}


@contextlib.contextmanager
def switched_off(switch: Optional[str]):
    """Sets the ``fast_ops`` flag named ``switch`` to False for the block (nothing for None), then back."""
    if switch is None:
        yield
        return
    was = getattr(fast_ops, switch)
    setattr(fast_ops, switch, False)
    try:
        yield
    finally:
        setattr(fast_ops, switch, was)


@dataclass
class Case:
    name: str
    title: str
    names: Dict[str, str]  # model kind -> timm name
    image_size: int
    batch_size: int
    num_classes: int


def make_cases(device: str) -> Dict[str, Case]:
    cuda = device == "cuda"
    return {
        "cifar": Case(
            "cifar", "CIFAR ResNet-110",
            dict(resnet="resnet110_cifar", mrla_l="mrla_l_resnet110_cifar", mrla_b="mrla_b_resnet110_cifar",
                 ela="ela_resnet110_cifar"),
            image_size=32, batch_size=64, num_classes=100,
        ),
        "imagenet": Case(
            "imagenet", "ImageNet ResNet-50",
            dict(resnet="resnet50", mrla_l="mrla_l_resnet50", mrla_b="mrla_b_resnet50", ela="ela_resnet50"),
            image_size=224 if cuda else 128, batch_size=256 if cuda else 8, num_classes=1000,
        ),
    }


def case_batch(case: Case, device: str):
    """The case's batch: the same images and targets for every model (its own generator, not the one
    that initialised the weights)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch_size, 3, case.image_size, case.image_size, generator=gen)
    target = torch.randint(0, case.num_classes, (case.batch_size,), generator=gen)
    return x.to(device), target.to(device)


def alternating_skip_mask(model: nn.Module) -> List[List[bool]]:
    """Blocks 1, 3, 5, ... of every stage skipped: half (rounded up) of the non-first layers."""
    return [[j % 2 == 1 for j in range(n)] for n in model.stage_sizes]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Runner:
    """One model ready to train: model, optimizer, a fixed batch and the step function."""

    kind: str
    model: nn.Module
    step: Callable[[], None]
    times: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    batch: tuple = ()


def build_runner(case: Case, kind: str, args) -> Runner:
    torch.manual_seed(0)
    # the same network with a part of ela_hf.layers.fast_ops switched off
    base, switch = kind, None
    for suffix, name in SWITCHES.items():
        if kind.endswith(suffix):
            base, switch = kind.removesuffix(suffix), name
    model = timm.create_model(case.names[base], num_classes=case.num_classes)
    if kind == "ela":
        set_skip_mask(model, alternating_skip_mask(model))
    model.to(args.device).train()
    x, target = case_batch(case, args.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = autocast(args)

    def step() -> None:
        with switched_off(switch):
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()

    return Runner(kind, model, step, batch=(x, target))


def autocast(args) -> Callable[[], contextlib.AbstractContextManager]:
    if args.amp == "none":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=args.device, dtype=torch.bfloat16)


def time_call(fn: Callable[[], None], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_step_bytes(runner: Runner, device: str) -> Optional[int]:
    """Peak live tensor bytes during one step above those live before it (see the module docstring)."""
    # MRLA-B keeps its large CPU stage buffers between steps; let this step allocate them so they count
    clear_value_buffer_pool()
    # the same starting point on both devices: without the previous step's gradients (the step's own
    # zero_grad would free them, which CUDA's counter sees and the profiler, for memory allocated before
    # it started, does not)
    runner.model.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    try:  # the raw allocation events (kineto results) are not a public API
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
    except AttributeError:
        print("  (this torch exposes no profiler memory events: peak memory left out)", file=sys.stderr)
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def run_training_case(case: Case, args) -> Dict[str, Runner]:
    runners = {kind: build_runner(case, kind, args) for kind in args.models}
    for r in runners.values():  # warm-up: allocator pools, oneDNN primitive caches, optimizer state
        for _ in range(args.warmup):
            r.step()
    order = list(runners.values())
    for i in range(args.repeats):
        # rotate the order every round so that no model always runs right after the same neighbour
        for r in order[i % len(order):] + order[: i % len(order)]:
            r.times.append(time_call(r.step, args.device))
    if args.memory:
        for r in runners.values():
            r.peak_bytes = peak_step_bytes(r, args.device)
    return runners


def throughput_case(case: Case, args) -> Dict[str, Dict[str, float]]:
    """Images/s of the plain ResNet and the slim ELA model, eval mode, eager and compiled."""
    torch.manual_seed(0)
    plain = timm.create_model(case.names["resnet"], num_classes=case.num_classes)
    probe = timm.create_model(case.names["ela"], num_classes=case.num_classes)
    mask = alternating_skip_mask(probe)
    del probe
    slim = timm.create_model(case.names["ela"], num_classes=case.num_classes, skip_mask=mask)
    x = torch.randn(case.batch_size, 3, case.image_size, case.image_size, device=args.device)
    models = {"resnet": plain, "ela": slim}
    for m in models.values():
        m.to(args.device).eval()
        if args.channels_last:
            m.to(memory_format=torch.channels_last)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = autocast(args)
    fns: Dict[str, Callable[[], None]] = {}
    for kind, m in models.items():
        fns[f"{kind}/eager"] = (lambda m=m: m(x))
        if args.compile:
            compiled = torch.compile(m)
            fns[f"{kind}/compiled"] = (lambda c=compiled: c(x))

    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.inference_mode(), amp():
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(max(args.warmup, 2 if "compiled" in key else 1)):
                fn()
            sync(args.device)
            if "compiled" in key:
                print(f"  [{case.name}] {key}: compiled and warmed up in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        keys = list(fns)
        for i in range(args.repeats):
            for key in keys[i % len(keys):] + keys[: i % len(keys)]:
                times[key].append(time_call(fns[key], args.device))
    return {key: {"img_s": case.batch_size / statistics.median(t)} for key, t in times.items()}


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}"


def round_quartiles(runner: Runner, base: Optional[Runner]) -> str:
    """The first and third quartiles of ``runner``'s step time over the ResNet's in the same round: how far
    the ratio moves within this run (the table's ratio is of the medians)."""
    if base is None or len(runner.times) < 2:
        return "-"
    # 'inclusive': quartiles within the observed ratios (the default extrapolates from few rounds)
    q1, _, q3 = statistics.quantiles([t / b for t, b in zip(runner.times, base.times)], n=4, method="inclusive")
    return f"{fmt_ratio(q1)}-{fmt_ratio(q3)}"


def render(case: Case, runners: Dict[str, Runner], infer: Optional[Dict[str, Dict[str, float]]], args) -> str:
    base = runners.get("resnet")
    lines = [f"#### {case.title}: {case.image_size}x{case.image_size}, batch {case.batch_size}, {case.num_classes} classes", ""]
    header = ("| model | step time / ResNet | step time / MRLA-B | peak memory / ResNet | median step (s) | peak memory (MiB) "
              "| per-round step time / ResNet, quartiles |")
    lines += [header, "|---|---|---|---|---|---|---|"]
    mrla_b = runners.get("mrla_b")
    for kind, r in runners.items():
        med = statistics.median(r.times)
        vs_base = fmt_ratio(med / statistics.median(base.times)) if base else "-"
        vs_b = fmt_ratio(med / statistics.median(mrla_b.times)) if mrla_b else "-"
        if r.peak_bytes is not None and base is not None and base.peak_bytes:
            mem_ratio = fmt_ratio(r.peak_bytes / base.peak_bytes)
        else:
            mem_ratio = "-"
        mem = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "-"
        lines.append(f"| {LABELS[kind]} | {vs_base} | {vs_b} | {mem_ratio} | {med:.3f} | {mem} | {round_quartiles(r, base)} |")
    if infer:
        lines += ["", "| inference (eval) | images/s | / ResNet eager | / ResNet same mode |", "|---|---|---|---|"]
        plain_eager = infer["resnet/eager"]["img_s"]
        for key, v in infer.items():
            kind, mode = key.split("/")
            same = infer.get(f"resnet/{mode}", {}).get("img_s")
            label = "ResNet" if kind == "resnet" else "ELA slim (half skipped)"
            lines.append(
                f"| {label}, {mode} | {v['img_s']:.1f} | {fmt_ratio(v['img_s'] / plain_eager)} | "
                f"{fmt_ratio(v['img_s'] / same) if same else '-'} |"
            )
    return "\n".join(lines)


def kernel_note(args) -> str:
    """Which CPU path the attention layers take, for the header (compiles the kernels now, outside any timed step)."""
    if args.device == "cuda":
        return ""
    state = fast_ops.describe_kernels()
    if state == "unavailable":
        return ", C++ kernels unavailable (pure-PyTorch paths)"
    if args.amp != "none":
        return f", C++ kernels {state} but not used (they do not run under autocast)"
    if args.channels_last:
        return (f", C++ kernels {state}: only the attention-weight, gate and slot kernels run (the conv, tail "
                "and fused kernels take NCHW tensors)")
    return f", C++ kernels {state}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=("cifar", "imagenet"), default=["cifar", "imagenet"],
                   help="cifar: CIFAR ResNet-110 at 32x32, batch 64; imagenet: ResNet-50 at 128x128, batch 8 "
                        "(224x224, batch 256 on CUDA)")
    p.add_argument("--models", nargs="+", choices=MODEL_KINDS, default=list(DEFAULT_KINDS),
                   help="model kinds to train (ratios need 'resnet'; the ELA/MRLA-B column needs 'mrla_b'); "
                        "*_plain: the same network with ela_hf.layers.fast_ops switched off; mrla_l_unfused: "
                        "MRLA-L without its fused layer; mrla_b_bmm: MRLA-B with its slot contractions on "
                        "torch.bmm; *_qk_ops: MRLA-L's gate and MRLA-B's attention weights in PyTorch ops instead "
                        "of their C++ kernels (before/after)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default 7, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model before timing (default 2, --quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="3 rounds, 1 warm-up step, no torch.compile (explicit --repeats / --warmup win)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: the current CUDA device")
    p.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast dtype (bf16 on CPU and CUDA)")
    p.add_argument("--channels-last", action="store_true", help="models and batch in channels_last memory format")
    p.add_argument("--batch-size", type=int, default=None, help="override the case's batch size")
    p.add_argument("--image-size", type=int, default=None, help="override the case's image size")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile throughput")
    p.add_argument("--no-inference", dest="inference", action="store_false",
                   help="skip the throughput table (it always times the plain ResNet and the slim ELA, whatever --models)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory step")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.quick:
        args.compile = False
    for flag, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--batch-size", args.batch_size, 1), ("--image-size", args.image_size, 1),
                               ("--threads", args.threads, 1)):
        if value is not None and value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch.cuda.is_available() is False")
    off_kinds = [k for k in args.models if any(k.endswith(suffix) for suffix in SWITCHES)]
    if off_kinds and (args.device != "cpu" or args.amp != "none"):
        p.error(
            f"{', '.join(off_kinds)} {'switches' if len(off_kinds) == 1 else 'switch'} some of the C++ CPU kernels off, "
            f"but with --device {args.device} --amp {args.amp} no "
            "kernel runs (they take float32/float64 CPU tensors without autocast): the comparison would time the "
            "same network twice"
        )
    if args.channels_last and "mrla_l_unfused" in args.models:
        p.error("mrla_l_unfused switches MRLA-L's fused layer off, which never runs with --channels-last "
                "(it takes NCHW tensors): the comparison would time the same network twice")
    for name, case in make_cases(args.device).items():
        if name not in args.cases:
            continue
        batch = args.batch_size or case.batch_size
        size = args.image_size or case.image_size
        final = size
        for _ in range(2 if name == "cifar" else 5):  # the stride-2 steps to the last stage
            final = -(-final // 2)
        if batch * final * final < 2:
            p.error(
                f"[{name}] batch {batch} at {size}x{size} leaves one value per channel for the last stage's "
                "batch norm in training (final feature map 1x1): use --batch-size 2 or more, or a larger --image-size"
            )
    args.models = [k for k in MODEL_KINDS if k in args.models]  # table order
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    load_before = os.getloadavg()[0]
    cases = make_cases(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    kernels = kernel_note(args)
    out = [
        f"ela_hf benchmark, {datetime.date.today().isoformat()}: torch {torch.__version__}, timm {timm.__version__}, "
        f"{device_name}, threads={torch.get_num_threads()}, amp={args.amp}, channels_last={args.channels_last}"
        f"{kernels}, medians of {args.repeats} interleaved rounds",
        "",
        "command: `python " + " ".join(["bench/bench_models.py"] + (argv if argv is not None else sys.argv[1:])) + "`",
        "",
    ]
    print("\n".join(out), flush=True)  # each case's table follows as soon as it is done
    for name in args.cases:
        case = cases[name]
        if args.batch_size is not None:
            case.batch_size = args.batch_size
        if args.image_size is not None:
            case.image_size = args.image_size
        print(f"[{name}] training {', '.join(args.models)} ...", file=sys.stderr)
        runners = run_training_case(case, args)
        infer = None
        if args.inference:
            print(f"[{name}] inference throughput ...", file=sys.stderr)
            infer = throughput_case(case, args)
        print(render(case, runners, infer, args) + "\n", flush=True)
        del runners
        gc.collect()
    print(
        f"load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"({os.cpu_count()} CPUs; other processes share them)"
    )


if __name__ == "__main__":
    main()
