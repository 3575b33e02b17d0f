"""Process groups for tests: a real 2-process DDP job on CPU (``accelerate launch --multi_gpu``, gloo), or a
one-process gloo group in the test's own process (DDP wrappers without a launcher)."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

HERE = Path(__file__).resolve().parent


def launch_two_ranks(script: str, out: Path) -> Tuple[dict, dict]:
    """Launch ``tests/<script> <out>`` on 2 processes; each must write ``<out>/rank<r>.json``, returned in rank
    order. (``--cpu --num_processes 2`` would silently start one process: callers assert the world size.)"""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(HERE / script), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


@contextlib.contextmanager
def one_rank_group(tmp_path: Path):
    """A gloo process group of this process alone, destroyed on exit (other tests must not see it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
