"""What a recipe reports at the end: accuracy, skipped layers per stage, time per epoch before/after pruning."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from transformers import TrainerCallback

__all__ = ["EpochRecord", "EpochTimerCallback", "format_summary", "format_skip_mask"]


@dataclass
class EpochRecord:
    epoch: int                 # 1-indexed
    seconds: float             # training only: the evaluation that follows an epoch is not counted
    active_layers: Optional[int]  # active attention layers while the epoch ran (None: no attention layers)


class EpochTimerCallback(TrainerCallback):
    """Wall time of every training epoch, with the number of attention layers active during it."""

    def __init__(self):
        self.records: List[EpochRecord] = []
        self._start: Optional[float] = None
        self._active: Optional[int] = None

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self._start = time.perf_counter()
        self._active = _active_layers(model)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._start is None:
            return
        epoch = int(round(state.epoch)) if state.epoch is not None else len(self.records) + 1
        self.records.append(EpochRecord(epoch, time.perf_counter() - self._start, self._active))
        self._start = None


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


def format_epoch_times(records: List[EpochRecord], final_active: Optional[int]) -> str:
    if not records:
        return "  (no epoch ran in this process)"
    lines = []
    full = max((r.active_layers for r in records if r.active_layers is not None), default=None)
    before = [r for r in records if r.active_layers is not None and r.active_layers == full]
    after = [r for r in records if r.active_layers is not None and r.active_layers == final_active]
    if full is None:
        lines.append(f"  {_mean_seconds(records):.1f} s per epoch ({_epoch_span(records)}; no attention layers)")
    elif final_active == full or not after:
        lines.append(f"  {_mean_seconds(before):.1f} s per epoch, all {full} attention layers active "
                     f"({_epoch_span(before)}); nothing was pruned")
    else:
        t0, t1 = _mean_seconds(before), _mean_seconds(after)
        lines.append(f"  before pruning: {t0:.1f} s per epoch with {full} attention layers ({_epoch_span(before)})")
        lines.append(f"  after pruning:  {t1:.1f} s per epoch with {final_active} attention layers "
                     f"({_epoch_span(after)}): {t1 / t0:.2f}x")
    return "\n".join(lines)


def format_summary(
    model_name: str, dataset: str, metrics: Dict[str, float], num_eval: int, skip_mask, records: List[EpochRecord],
    export_dir: Optional[str] = None,
) -> str:
    final_active = None if skip_mask is None else sum(not s for stage in skip_mask for s in stage)
    top1, top5 = metrics.get("eval_top1"), metrics.get("eval_top5")
    accuracy = "n/a" if top1 is None else f"top-1 {100 * top1:.2f}%, top-5 {100 * top5:.2f}%"
    lines = [
        "",
        "=" * 72,
        f"{model_name} on {dataset}: {accuracy} on {num_eval} evaluation images",
        "attention layers skipped per stage:",
        format_skip_mask(skip_mask),
        "time per training epoch (this process, evaluation excluded):",
        format_epoch_times(records, final_active),
    ]
    if export_dir is not None:
        lines.append(f"slim Hub-ready export (weights, config, model card): {export_dir}")
    lines.append("=" * 72)
    return "\n".join(lines)
