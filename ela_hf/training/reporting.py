"""What a recipe reports at the end: accuracy, skipped layers per stage, time per epoch before/after pruning."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from transformers import TrainerCallback

__all__ = [
    "EpochRecord",
    "EpochTimerCallback",
    "RUN_SETTINGS_FILE",
    "RunSettingsCallback",
    "card_settings",
    "release_name",
    "format_epoch_times",
    "format_summary",
    "format_skip_mask",
    "close_distributed",
    "log_rank_result",
    "setup_logging",
]


@dataclass
class EpochRecord:
    epoch: int                 # 1-indexed
    seconds: float             # training only: the evaluation that follows an epoch is not counted
    active_layers: Optional[int]  # active attention layers while the epoch ran (None: no attention layers)
    steps: int = 0             # optimizer steps it ran (fewer in an epoch cut short or resumed midway; 0: unknown)


class EpochTimerCallback(TrainerCallback):
    """Wall time of every training epoch, with the number of attention layers active during it."""

    def __init__(self):
        self.records: List[EpochRecord] = []
        self._start: Optional[float] = None
        self._active: Optional[int] = None

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self._start = time.perf_counter()
        self._active = _active_layers(model)
        self._first_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._start is None:
            return
        # state.epoch is fractional after an epoch cut short (max_steps): that is still the epoch ceil() names
        epoch = math.ceil(round(state.epoch, 6)) if state.epoch is not None else len(self.records) + 1
        steps = state.global_step - self._first_step
        self.records.append(EpochRecord(epoch, time.perf_counter() - self._start, self._active, steps))
        self._start = None


RUN_SETTINGS_FILE = "run_settings.json"


class RunSettingsCallback(TrainerCallback):
    """Writes the run's model-card settings (:func:`card_settings`) into every checkpoint it saves, as
    ``run_settings.json``: ``--export_only`` compares them with its own command's, whose card it writes, and a
    resume its seed (:func:`check_checkpoint_unfinished`).

    Not an ``ExportableState``: ``restore_callback_states_from_checkpoint=True`` would replace it with one
    holding the checkpoint's settings, so a resumed run would record the earlier run's.
    """

    def __init__(self, settings: Dict[str, Any]):
        self.settings = dict(settings)

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from ela_hf.pruning.callback import _write_json_atomically

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            _write_json_atomically(os.path.join(folder, RUN_SETTINGS_FILE), self.settings)


def _active_layers(model) -> Optional[int]:
    from ela_hf.models import get_skip_mask

    if model is None:
        return None
    try:
        mask = get_skip_mask(model)
    except ValueError:  # a plain ResNet: nothing to prune
        return None
    return sum(not skipped for stage in mask for skipped in stage)


def format_skip_mask(mask: Optional[List[List[bool]]]) -> str:
    """One line per stage: which blocks' attention layers are skipped (block indices as in ``layerN.M``)."""
    if mask is None:
        return "  (plain ResNet: no attention layers)"
    lines = []
    for i, stage in enumerate(mask):
        skipped = [j for j, s in enumerate(stage) if s]
        which = f"blocks {', '.join(map(str, skipped))}" if skipped else "none"
        # the first block of a stage is never skipped, so len(stage) - 1 layers can be
        lines.append(f"  layer{i + 1}: {len(skipped)} of {len(stage) - 1} skippable skipped ({which})")
    total = sum(map(sum, mask))
    lines.append(f"  total: {total} of {sum(len(s) - 1 for s in mask)} skippable attention layers skipped")
    return "\n".join(lines)


def _epoch_span(records: List[EpochRecord]) -> str:
    epochs = [r.epoch for r in records]
    return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"


def _mean_seconds(records: List[EpochRecord]) -> float:
    return sum(r.seconds for r in records) / len(records)


def format_epoch_times(records: List[EpochRecord], num_layers: Optional[int], final_active: Optional[int],
                       steps_per_epoch: Optional[int] = None) -> str:
    """Mean epoch time with every attention layer active vs. with the final mask.

    ``num_layers``: attention layers of the model (None for a plain ResNet). With ``steps_per_epoch``, epochs
    that ran fewer steps (cut short by ``max_steps``, or resumed midway) are left out: their fixed costs
    (dataloader workers starting) would not compare. A resumed run may have no whole epoch of one kind; that
    is said rather than guessed.
    """
    if not records:
        return "  (no epoch ran in this process)"
    whole = [r for r in records if not steps_per_epoch or not r.steps or r.steps >= steps_per_epoch]
    note = ""
    if len(whole) < len(records):
        cut = [r.epoch for r in records if r not in whole]
        note = f"\n  (epoch{'s' if len(cut) > 1 else ''} {', '.join(map(str, cut))} ran only part of " \
               f"{steps_per_epoch} steps: left out)"
    if not whole:
        return "  no whole epoch ran in this process" + note
    if num_layers is None:
        return f"  {_mean_seconds(whole):.1f} s per epoch ({_epoch_span(whole)}; no attention layers)" + note
    before = [r for r in whole if r.active_layers == num_layers]
    after = [r for r in whole if r.active_layers == final_active]
    if final_active == num_layers:
        return f"  {_mean_seconds(before):.1f} s per epoch with all {num_layers} attention layers " \
               f"({_epoch_span(before)}); nothing was pruned" + note
    lines = []
    if before:
        t0 = _mean_seconds(before)
        lines.append(f"  before pruning: {t0:.1f} s per epoch with {num_layers} attention layers ({_epoch_span(before)})")
    else:
        lines.append(f"  before pruning: no whole epoch of this run had all {num_layers} attention layers (resumed?)")
    if after:
        t1 = _mean_seconds(after)
        ratio = f": {t1 / t0:.2f}x" if before else ""
        lines.append(f"  after pruning:  {t1:.1f} s per epoch with {final_active} attention layers "
                     f"({_epoch_span(after)}){ratio}")
    else:
        lines.append(f"  after pruning:  no whole epoch ran with the final {final_active} attention layers")
    return "\n".join(lines) + note


def format_summary(
    model_name: str, dataset: str, metrics: Dict[str, float], num_eval: int, skip_mask, records: List[EpochRecord],
    export_dir: Optional[str] = None, steps_per_epoch: Optional[int] = None,
) -> str:
    num_layers = None if skip_mask is None else sum(len(stage) for stage in skip_mask)
    final_active = None if skip_mask is None else sum(not s for stage in skip_mask for s in stage)
    top1, top5 = metrics.get("eval_top1"), metrics.get("eval_top5")
    accuracy = "n/a" if top1 is None else f"top-1 {100 * top1:.2f}%" + (
        "" if top5 is None else f", top-5 {100 * top5:.2f}%")  # no top-5 of <= 5 classes
    lines = [
        "",
        "=" * 72,
        f"{model_name} on {dataset}: {accuracy} on {num_eval} evaluation images",
        "attention layers skipped per stage:",
        format_skip_mask(skip_mask),
        "time per training epoch (this process, evaluation excluded):",
        format_epoch_times(records, num_layers, final_active, steps_per_epoch),
    ]
    if export_dir is not None:
        lines.append(f"slim Hub-ready export (weights, config, model card): {export_dir}")
    lines.append("=" * 72)
    return "\n".join(lines)


def setup_logging(logger: logging.Logger, training_args) -> None:
    """The recipe's logger talks at INFO on the main process, replicas at ``--log_level_replica``
    (default warning); transformers' own loggers follow ``--log_level`` / ``--log_level_replica``. On replicas
    ela_hf's loggers follow ``--log_level_replica`` too, except that they leave out the warnings rank 0 already
    gives (at warning, the default, they say errors only)."""
    import transformers

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logger.setLevel(logging.INFO if training_args.should_log else training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    # ela_hf's warnings about the run (arguments, data, resume) are the same on every process: replicas
    # repeat them only when asked for more than warnings (--log_level_replica info or debug)
    if not training_args.should_log:
        level = training_args.get_process_log_level()
        logging.getLogger("ela_hf").setLevel(logging.ERROR if level >= logging.WARNING else level)


def close_distributed(logger: logging.Logger) -> None:
    """Destroy the default process group (from ``accelerate launch``) before the interpreter exits, as torch
    asks: left to interpreter shutdown, its threads can end a finished process with SIGABRT ("terminate
    called without an active exception"). Nothing to do in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    logger.info(f"rank {rank}/{world}: process group closed")


def log_rank_result(logger: logging.Logger, training_args, metrics: Dict[str, float], model) -> Dict[str, Any]:
    """One INFO line per process with what must agree across ranks: accuracy, skip mask, a weight checksum.

    Replicas print it with ``--log_level_replica info``.
    """
    from ela_hf.models import get_skip_mask

    try:
        mask = get_skip_mask(model)
    except ValueError:
        mask = None
    result = {
        "eval_top1": metrics.get("eval_top1"),
        "skip_mask": mask,
        "weights_sum": float(sum(p.detach().double().sum() for p in model.parameters())),
    }
    logger.info(f"rank {training_args.process_index}/{training_args.world_size} result: {json.dumps(result)}")
    return result


def remove_stale_pruning_history(training_args, resuming: bool, pruning: bool) -> None:
    """A fresh run without pruning windows deletes the ``pruning_history.json`` an earlier run left in
    ``--output_dir`` (a pruning run's callback replaces it itself): it would describe another model."""
    from ela_hf.pruning.callback import HISTORY_FILE_NAME

    path = os.path.join(training_args.output_dir, HISTORY_FILE_NAME)
    if resuming or pruning or training_args.process_index != 0 or not os.path.isfile(path):
        return
    os.remove(path)
    logging.getLogger(__name__).info(f"removed {path}: an earlier run's pruning decisions, not this run's")


def card_settings(
    recipe: str, args, training_args, schedule, learning_rate: float, total_batch_size: int, selector=None
) -> Dict[str, Any]:
    """The training settings shown in the exported model card."""
    decay = ", ".join(f"{e:g}" for e in schedule.lr_decay_epochs)
    windows = ", ".join(f"{s}-{e}" for s, e in schedule.kl_windows) or "none"
    return {
        "recipe": f"recipes/{recipe}.py",
        "dataset": _dataset_label(args.dataset),
        # the run's real length: fractional with --max_steps (shown too) or a fractional --num_train_epochs
        "epochs": _whole_or_rounded(schedule.run_epochs if schedule.run_epochs is not None else schedule.num_epochs),
        "max_steps": training_args.max_steps if training_args.max_steps > 0 else None,
        "optimizer": f"SGD, momentum {args.momentum:g}",
        "learning_rate": learning_rate,
        "total_batch_size": total_batch_size,
        "weight_decay": training_args.weight_decay,
        "lr_schedule": (f"x{args.lr_decay_rate:g} after epochs {decay}" if schedule.lr_decay_epochs else "constant")
        + f"; {schedule.warmup_epochs:g} warm-up epochs",
        "drop_path_rate": args.drop_path_rate if _has_attention(args.model) else None,  # attention branch only
        "kl_windows": f"{windows} ({schedule.window_unit}s)",
        "selector": None if selector is None else json.dumps(selector.to_dict()),
        "seed": training_args.seed,
    }


def _has_attention(model: str) -> bool:
    from ela_hf.models import MODEL_ARGS

    return MODEL_ARGS.get(model, {}).get("attn_type") is not None


def _whole_or_rounded(value: float):
    return int(value) if float(value).is_integer() else round(float(value), 3)


def _dataset_label(dataset: str) -> str:
    # a local path would leak the training machine's layout into a published card: keep its last part
    from .data import DIGITS_DATASET, hub_dataset_id

    if dataset == DIGITS_DATASET or hub_dataset_id(dataset) is not None:
        return dataset
    return f"local: {_last_part(dataset)}"


def _last_part(dataset: str) -> str:
    """The last path component; a local path is made absolute first (``.`` or ``train/..`` name the folder itself;
    a symlink keeps its own name)."""
    path = os.path.expanduser(dataset)
    if os.path.exists(path):
        path = os.path.abspath(path)
    return os.path.basename(os.path.normpath(path))


def release_name(model: str, dataset: str) -> str:
    """A folder/repo-style name for the release, e.g. ``ela_resnet56_cifar-cifar100``."""
    last = _last_part(dataset).replace(":", "-")
    stem = last[: -len(".parquet")] if last.endswith(".parquet") else last
    return f"{model}-{stem}"
