"""The reference code's optimisation: SGD with momentum, a step schedule in epochs with linear warm-up.

The schedule is a ``LambdaLR`` over optimizer steps (what ``transformers.Trainer`` steps it by); epoch
boundaries become step counts through :func:`update_steps_per_epoch`, which mirrors the Trainer's own
arithmetic so that "x0.1 at epoch 30" happens exactly when the Trainer starts epoch 31.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "StepScheduleWithWarmup",
    "create_sgd",
    "create_step_scheduler",
    "scale_learning_rate",
    "update_steps_per_epoch",
]

logger = logging.getLogger(__name__)


def update_steps_per_epoch(
    num_examples: int, per_device_batch_size: int, world_size: int = 1, gradient_accumulation_steps: int = 1,
    drop_last: bool = False,
) -> int:
    """Optimizer steps per epoch of ``transformers.Trainer`` for a map-style dataset of ``num_examples``.

    Accelerate shards whole batches over the processes (an uneven tail is padded, or dropped with
    ``drop_last``); the Trainer then counts one update per ``gradient_accumulation_steps`` batches,
    rounding up.
    """
    if num_examples <= 0:
        raise ValueError(f"the training set is empty (num_examples={num_examples})")
    batches = num_examples // per_device_batch_size if drop_last else math.ceil(num_examples / per_device_batch_size)
    per_process = batches // world_size if drop_last else math.ceil(batches / world_size)
    if per_process == 0:
        raise ValueError(
            f"{num_examples} training examples make no full batch of {per_device_batch_size} per device on "
            f"{world_size} process(es) with drop_last"
        )
    return max(math.ceil(per_process / gradient_accumulation_steps), 1)


def scale_learning_rate(learning_rate: float, reference_batch_size: int | None, total_batch_size: int) -> float:
    """Linear scaling rule: ``learning_rate`` is given for ``reference_batch_size`` (None or 0: no scaling)."""
    if reference_batch_size is None or reference_batch_size == 0:
        return learning_rate
    if reference_batch_size <= 0:
        raise ValueError(f"the reference batch size for learning-rate scaling must be positive, got {reference_batch_size}")
    return learning_rate * total_batch_size / reference_batch_size


def create_sgd(model: torch.nn.Module, learning_rate: float, momentum: float = 0.9, weight_decay: float = 1e-4):
    """SGD over all trainable parameters with weight decay on every one of them, as in the reference code."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)


class StepScheduleWithWarmup:
    """LR factor at optimizer step ``step`` (0-based): linear warm-up, then x``decay_rate`` at each milestone.

    ``warmup_epochs`` and ``decay_epochs`` are in epochs (warm-up may be fractional); "decay at epoch 30"
    means the factor drops once 30 full epochs are done. A plain object, not a closure, so that
    ``LambdaLR.state_dict`` saves it: a resume compares it with the run's own (:class:`StepLR`).
    """

    def __init__(
        self, steps_per_epoch: int, warmup_epochs: float = 0.0, decay_epochs: Sequence[float] = (),
        decay_rate: float = 0.1,
    ):
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if list(decay_epochs) != sorted(decay_epochs) or any(e <= 0 for e in decay_epochs):
            raise ValueError(f"lr decay epochs must be positive and increasing, got {list(decay_epochs)}")
        if not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"lr decay rate must be in (0, 1], got {decay_rate}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))
        self.decay_steps = [int(round(e * steps_per_epoch)) for e in decay_epochs]
        self.decay_rate = float(decay_rate)

    def __call__(self, step: int) -> float:
        factor = self.decay_rate ** sum(step >= s for s in self.decay_steps)
        if step < self.warmup_steps:
            factor *= (step + 1) / self.warmup_steps
        return factor


class StepLR(LambdaLR):
    """``LambdaLR`` over a :class:`StepScheduleWithWarmup` whose resume keeps this run's schedule.

    ``LambdaLR.load_state_dict`` would replace the schedule with the checkpoint's, so a run resumed with other
    epochs, windows or batch size trained on the old milestones while its log and model card showed the new
    ones. Here the step count comes from the checkpoint and the schedule and base learning rate from the run's
    arguments; a checkpoint saved with another schedule or learning rate is named in a warning. The same holds
    for the optimizer's other settings (momentum, weight decay), which the Trainer's ``optimizer.load_state_dict``
    (run just before this one) takes from the checkpoint: they are set back to the run's own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda, last_epoch: int = -1):
        # the run's own settings, kept before a resume's optimizer.load_state_dict brings the checkpoint's
        self._run_groups = [_settings(group) for group in optimizer.param_groups]
        super().__init__(optimizer, lr_lambda, last_epoch)

    def state_dict(self):
        state = super().state_dict()
        state.pop("_run_groups", None)  # this run's, never a checkpoint's
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        state_dict.pop("_run_groups", None)
        saved_lrs = state_dict.pop("base_lrs", None)
        if saved_lrs is not None and [float(x) for x in saved_lrs] != [float(x) for x in self.base_lrs]:
            logger.warning("the checkpoint's learning rate differs from this run's, which is used from here on: "
                           "%s (checkpoint) -> %s (this run)", saved_lrs, self.base_lrs)
        saved = state_dict.pop("lr_lambdas", None) or []
        for fn, old in zip(self.lr_lambdas, saved):
            if isinstance(old, dict) and old and old != fn.__dict__:
                logger.warning(
                    "the checkpoint's learning-rate schedule differs from this run's, which is used from here on: "
                    "%s (checkpoint) -> %s (this run)", _describe(old), _describe(fn.__dict__)
                )
                break
        state_dict["lr_lambdas"] = [None] * len(self.lr_lambdas)
        super().load_state_dict(state_dict)
        # the Trainer loads the optimizer first, which brought back the checkpoint's lr: the next step must
        # already run at this run's (LambdaLR only rewrites it at its next step())
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
        for group, run in zip(self.optimizer.param_groups, self._run_groups):
            changed = {k: (group.get(k), v) for k, v in run.items() if group.get(k) != v}
            if changed:
                logger.warning(
                    "the checkpoint's optimizer settings differ from this run's, which are used from here on: %s",
                    ", ".join(f"{k} {old} (checkpoint) -> {new} (this run)" for k, (old, new) in changed.items()),
                )
                group.update(run)


def _settings(group: dict) -> dict:
    """A parameter group's settings other than its parameters and the learning rate (the schedule's)."""
    return {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}


def _describe(schedule: dict) -> str:
    keys = ("steps_per_epoch", "warmup_steps", "decay_steps", "decay_rate")
    return ", ".join(f"{k} {schedule.get(k)}" for k in keys)


def create_step_scheduler(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, warmup_epochs: float = 0.0,
    decay_epochs: Sequence[float] = (), decay_rate: float = 0.1, total_steps: Optional[int] = None,
) -> LambdaLR:
    """:class:`StepLR` over :class:`StepScheduleWithWarmup`. With ``total_steps`` (the run's optimizer steps), a
    decay that rounds to a step the run never reaches (a rescaled schedule on very few steps per epoch) is
    named in a warning."""
    schedule = StepScheduleWithWarmup(steps_per_epoch, warmup_epochs, decay_epochs, decay_rate)
    for epoch, step in zip(decay_epochs, schedule.decay_steps):
        # (a decay at or past the run's last epoch is resolve_schedule's warning; this is the rounding case)
        if total_steps is not None and step >= total_steps and epoch * steps_per_epoch < total_steps:
            logger.warning(
                "the lr step after epoch %g falls on optimizer step %d, past the last of this run's %d steps (%d per "
                "epoch): it never happens", epoch, step + 1, total_steps, steps_per_epoch,
            )
    return StepLR(optimizer, schedule)
