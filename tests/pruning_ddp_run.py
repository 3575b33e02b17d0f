"""Run by tests/test_callback_multiprocess.py under ``accelerate launch --multi_gpu --num_processes 2``.

Run A trains the tiny model with two step windows, gradient accumulation, evaluation inside a window and
a checkpoint inside window 2; run B resumes from that checkpoint. Each rank writes what it saw, recorded
and decided to ``<out>/rank<r>.json`` for the test to compare.
"""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pruning_toy import RandomImages, TinyElaClassifier, training_args  # noqa: E402

import ela_hf  # noqa: E402
from ela_hf.models import attention_layers  # noqa: E402
from ela_hf.pruning import ElaPruningCallback  # noqa: E402

WINDOWS = [(2, 3), (5, 6)]


def tap_recorded_kl(model, tally):
    """Count what each attention layer accumulates on this rank, independently of its buffers."""
    names = {id(m): n for n, m in model.named_modules()}
    for _, _, blk in attention_layers(model):
        original = blk.attn._accumulate

        def tapped(d, _name=names[id(blk)], _original=original):
            entry = tally.setdefault(_name, [0.0, 0])
            entry[0] += float(d.double().sum())
            entry[1] += int(d.shape[0])
            _original(d)

        blk.attn._accumulate = tapped


class SpyingPruningCallback(ElaPruningCallback):
    """Keeps this rank's own (unreduced) totals, and the independent tally, at each reduction."""

    def __init__(self, *args, tally=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tally = tally if tally is not None else {}
        self.local_at_decisions = []
        self.tally_at_decisions = []
        self.local_at_snapshots = {}  # global step -> totals
        self._step = 0

    def on_step_end(self, args, state, control, **kwargs):
        self._step = state.global_step
        return super().on_step_end(args, state, control, **kwargs)

    def _decide(self, state):
        self._drain()
        self.local_at_decisions.append(self._totals.tolist())
        self.tally_at_decisions.append({k: list(v) for k, v in self.tally.items()})
        self.tally.clear()
        super()._decide(state)

    def _take_snapshot(self):
        self._drain()
        self.local_at_snapshots[self._step] = self._totals.tolist()
        super()._take_snapshot()


def run(out_dir, name, resume_from=None):
    model = TinyElaClassifier()
    tally = {}
    tap_recorded_kl(model, tally)
    callback = SpyingPruningCallback(windows=WINDOWS, window_unit="step", tally=tally)
    args = training_args(
        os.path.join(out_dir, name),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=2,  # step 2 evaluates inside window 1: not recorded, and a reduction point
        save_strategy="steps",
        save_steps=5,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(n=64),
        eval_dataset=RandomImages(n=8, seed=1),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, model, callback


class TwoForwardsTrainer(Trainer):
    """Two forward passes per step (R-Drop / consistency losses): DDP broadcasts buffers before each."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        first = model(**inputs)
        second = model(**inputs)
        loss = (first["loss"] + second["loss"]) / 2
        return (loss, first) if return_outputs else loss


def run_two_forwards(out_dir):
    model = TinyElaClassifier()
    tally = {}
    tap_recorded_kl(model, tally)
    callback = SpyingPruningCallback(windows=[(1, 2)], window_unit="step", tally=tally)
    args = training_args(os.path.join(out_dir, "two"), per_device_train_batch_size=2, max_steps=3)
    TwoForwardsTrainer(model=model, args=args, train_dataset=RandomImages(n=16), callbacks=[callback]).train()
    return callback


def run_checkpointed(out_dir):
    """A transformers model with --gradient_checkpointing: left None, the Trainer would run DDP without the
    unused-parameter search and fail at the first skip, so the callback refuses it up front; with
    ddp_find_unused_parameters=True it trains through a decision."""
    from ela_hf import ElaConfig, ElaForImageClassification
    from ela_hf.pruning import FixedCountSelector

    def trainer(find_unused):
        torch.manual_seed(0)
        model = ElaForImageClassification(ElaConfig(architecture="ela_resnet20_cifar", num_labels=4))
        args = training_args(os.path.join(out_dir, "gc"), max_steps=3, gradient_checkpointing=True,
                             ddp_find_unused_parameters=find_unused)
        callback = ElaPruningCallback(windows=[(1, 1)], window_unit="step", selector=FixedCountSelector(1))
        data = [{"pixel_values": x["pixel_values"], "labels": x["labels"]} for x in RandomImages(n=32)]
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]), model

    try:
        trainer(None)[0].train()
        error = None
    except ValueError as e:
        error = str(e)
    t, model = trainer(True)
    t.train()
    ddp = isinstance(t.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    return error, (ela_hf.get_skip_mask(model) if model.timm_model.grad_checkpointing else None), ddp, model


def save_from_every_rank(out_dir, model):
    """Every rank calls save_pretrained on a folder holding an earlier save (transformers writes on rank 0
    only): the weights must be there afterwards."""
    folder = os.path.join(out_dir, "shared")
    for rank in (0, 0, 1):  # an earlier save, rank 0's save, then rank 1's call (which writes nothing)
        if dist.get_rank() == rank:
            model.save_pretrained(folder)
        dist.barrier()
    return sorted(os.listdir(folder))


def warnings_said():
    """What the callback's two ways of warning say on this rank: [UserWarnings, log records]."""
    import logging
    import warnings

    from ela_hf.pruning import callback as module

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    module.logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module._warn("ElaPruningCallback: a probe")
            module.logger.warning("ElaPruningCallback: a probe")
    finally:
        module.logger.removeHandler(handler)
    return [len(caught), len(records)]


def main(out_dir):
    trainer, model, callback = run(out_dir, "a")
    rank, world = dist.get_rank(), dist.get_world_size()
    said = warnings_said()
    try:
        callback._check_ddp(SimpleNamespace(ddp_find_unused_parameters=False, ddp_static_graph=None), model)
        ddp_check_raised = False
    except ValueError:
        ddp_check_raised = True

    _, model_b, callback_b = run(out_dir, "b", resume_from=os.path.join(out_dir, "a", "checkpoint-5"))
    gc_default_error, gc_mask, gc_ddp, gc_model = run_checkpointed(out_dir)
    two = run_two_forwards(out_dir)
    shared_files = save_from_every_rank(out_dir, gc_model)
    result = {
        "rank": rank,
        "world_size": world,
        "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        "seen_indices": model.seen_indices,
        "mask": ela_hf.get_skip_mask(model),
        "history": callback.history,
        "local_at_decisions": callback.local_at_decisions,
        "tally_at_decisions": callback.tally_at_decisions,
        "local_at_snapshots": callback.local_at_snapshots,
        "ddp_check_raised": ddp_check_raised,
        "warnings_said": said,
        "resumed_mask": ela_hf.get_skip_mask(model_b),
        "resumed_history": callback_b.history,
        "gc_default_error": gc_default_error,
        "gc_mask": gc_mask,
        "gc_ddp": gc_ddp,
        "shared_files": shared_files,
        "two_forwards_local": two.local_at_decisions,
        "two_forwards_tally": two.tally_at_decisions,
        "two_forwards_history": two.history,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
