"""Training-step cost of KL recording during a pruning window, as a ratio against the same steps without it.

For each model: one process, a fixed batch, SGD steps (forward, backward, optimizer step), alternating
"recording off" and "recording on" samples (the order flips every repeat so drift cancels). Reported:
the median time per step of each mode, their ratio, the median of the per-pair ratios (each "on"
sample against the "off" sample next to it, which is what survives a machine whose load changes
under the benchmark), and the share of the "on" steps' time spent inside the recording code itself
(the layers' ``_record`` and the callback's drain, timed in place): the least noisy estimate of the
overhead on a busy machine. "On" is exactly what ElaPruningCallback adds inside a window: the attention
layers record d_t in training-mode passes and the callback drains their accumulators after every step.
Prints one table row per model; the target is a ratio of at most 1.05.

It runs single-threaded by default: on a CPU shared with other jobs, multi-threaded (OpenMP) steps
swing by 10x or more from one step to the next, which drowns a few-percent effect.

    python bench/bench_recording.py                 # both models, CPU
    python bench/bench_recording.py --repeats 9 --steps 3 --models ela_resnet50
"""
import argparse
import re
import statistics
import tempfile
import time

import timm
import torch
import torch.nn.functional as F
from transformers import TrainerControl, TrainerState, TrainingArguments

import ela_hf
from ela_hf.layers.mrla import MrlaBase, MrlaLight
from ela_hf.models import set_kl_recording
from ela_hf.pruning import ElaPruningCallback

_RECORDING_SECONDS = [0.0]


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _RECORDING_SECONDS[0] += time.perf_counter() - t0

    return wrapper


# time the recording code where it runs (forward passes only record; backward never touches it)
MrlaBase._record = _timed(MrlaBase._record)
MrlaLight._record = _timed(MrlaLight._record)
ElaPruningCallback._drain = _timed(ElaPruningCallback._drain)

CASES = {
    # name: (image size, batch size, classes)
    "ela_resnet110_cifar": (32, 64, 100),
    "ela_resnet50": (128, 8, 1000),
}


def bench_model(name, repeats, steps, warmup, device):
    size, batch, classes = CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    # a real callback with one long step window, driven by hand like the Trainer would; its history file
    # goes to a temporary output_dir that lives as long as the callback
    output_dir = tempfile.TemporaryDirectory(prefix="ela_hf-bench-recording-")
    args = TrainingArguments(output_dir=output_dir.name, use_cpu=device == "cpu", report_to="none")
    state, control = TrainerState(max_steps=10**9, num_train_epochs=1), TrainerControl()
    callback = ElaPruningCallback(windows=[(1, 10**9 - 1)], window_unit="step")
    callback.on_train_begin(args, state, control, model=model)
    callback.on_step_begin(args, state, control)  # opens the window: recording on

    def run(record, n):
        set_kl_recording(model, record)
        if device != "cpu":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if record:
                callback.on_step_end(args, state, control)  # drains the accumulators
        if device != "cpu":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / n

    if warmup:
        run(False, warmup)
        run(True, warmup)
    times = {False: [], True: []}
    _RECORDING_SECONDS[0] = 0.0
    for r in range(repeats):
        for record in ((False, True) if r % 2 == 0 else (True, False)):
            times[record].append(run(record, steps))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    paired = statistics.median(a / b for a, b in zip(times[True], times[False]))
    share = _RECORDING_SECONDS[0] / (sum(times[True]) * steps)
    output_dir.cleanup()
    return off, on, paired, share


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=11, help="samples per mode (interleaved)")
    parser.add_argument("--steps", type=int, default=1, help="training steps per sample")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before timing")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    a = parser.parse_args(argv)
    for flag, value, least in (("--repeats", a.repeats, 1), ("--steps", a.steps, 1), ("--warmup", a.warmup, 0),
                               ("--threads", a.threads, 0)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if a.device != "cpu" and re.fullmatch(r"cuda(:\d+)?", a.device) is None:
        parser.error(f"--device must be cpu, cuda or cuda:<index>, got {a.device!r}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {a.device} was given but torch.cuda.is_available() is False")
    if a.device.startswith("cuda:") and int(a.device[5:]) >= torch.cuda.device_count():
        parser.error(f"--device {a.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, "
          f"{a.repeats} interleaved samples x {a.steps} steps per mode, medians")
    print("| model | input | batch | step, recording off (s) | step, recording on (s) | ratio of medians "
          "| median paired ratio | recording code / step |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.models:
        size, batch, _ = CASES[name]
        off, on, paired, share = bench_model(name, a.repeats, a.steps, a.warmup, a.device)
        print(f"| {name} | {size}x{size} | {batch} | {off:.3f} | {on:.3f} | {on / off:.3f} | {paired:.3f} "
              f"| {100 * share:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
