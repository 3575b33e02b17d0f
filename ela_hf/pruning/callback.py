"""Staged KL/EBQM pruning of attention layers as a ``transformers.TrainerCallback`` (SPEC.md sections 3-4).

Training is split by *windows*: 1-indexed, inclusive ranges of epochs (or of optimizer steps). While a
window is open every active attention layer records its adjacent-layer KL divergence ``d_t`` of
training-mode forward passes; at the window's end the statistics are summed over all processes, the
selector decides once (on rank 0) which layers to skip, the decision is broadcast, and every process
applies the same skip mask. Skipped layers never come back.

How the per-rank statistics stay exact:

* the attention layers accumulate into small on-device buffers; the callback moves ("drains") them into
  its own float64 totals after every micro-batch (``on_substep_end`` / ``on_step_end``). DDP broadcasts
  rank 0's module buffers to the other ranks at the start of every synchronising forward pass
  (``broadcast_buffers=True``): the accumulators are named in ``_ddp_params_and_buffers_to_ignore`` of
  the module DDP wraps (the models do it themselves, the callback for the Trainer's model when the
  Trainer is built), so that broadcast never overwrites another rank's running sums, also with several
  forward passes per step.
* a checkpoint saved inside a window stores the window's partial sums *reduced over all processes*
  (the reduction runs on every rank right before the save: ``control.should_save`` at step/epoch end,
  and after each evaluation for ``save_strategy="best"``), in ``TrainerState`` via ``ExportableState``.
"""
from __future__ import annotations

import copy
import json
import logging as std_logging
import math
import numbers
import os
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import has_length
from transformers.utils import logging

from ..models import LayerAttentionStage, keep_kl_statistics_out_of_ddp
from ..models.attention_tools import (
    _module_names,
    attention_layers,
    get_skip_mask,
    reset_kl_statistics,
    set_kl_recording,
    set_skip_mask,
)
from .decision import (
    _checked_selection,
    apply_decision,
    as_selector,
    candidate_layers,
    check_same_layers_everywhere,
    decided_on_rank_zero,
    finite_or_none as _finite_or_none,
    in_record_order,
    selection_record,
    world as _world,
)
from .selectors import EbqmSelector, LayerSelector

logger = logging.get_logger(__name__)

__all__ = ["ElaPruningCallback", "HISTORY_FILE_NAME", "LOG_PREFIX"]

HISTORY_FILE_NAME = "pruning_history.json"
LOG_PREFIX = "ela_pruning"
WINDOW_UNITS = ("epoch", "step")

Window = Tuple[int, int]


def _validate_windows(windows: Any) -> List[Window]:
    if hasattr(windows, "tolist") and not isinstance(windows, (str, bytes)):
        windows = windows.tolist()  # a NumPy array or tensor of pairs
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise ValueError(f"windows must be a list of (start, end) pairs, got {windows!r}")
    if len(windows) == 0:
        raise ValueError("windows is empty: give at least one (start, end) pair")
    out: List[Window] = []
    for w in windows:
        if hasattr(w, "tolist") and not isinstance(w, (str, bytes)):
            w = w.tolist()
        if isinstance(w, (str, bytes)) or not isinstance(w, Sequence) or len(w) != 2:
            raise ValueError(f"each window must be a (start, end) pair, got {w!r}")
        start, end = w
        for v in (start, end):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"window bounds must be integers, got {w!r}")
        if start < 1:
            raise ValueError(f"windows are 1-indexed: window {tuple(w)} starts before 1")
        if end < start:
            raise ValueError(f"window {tuple(w)} is reversed (end < start); windows are inclusive (start, end) ranges")
        if out and start <= out[-1][1]:
            if start >= out[-1][0]:
                raise ValueError(f"windows {out[-1]} and {(start, end)} overlap")
            raise ValueError(f"windows must be given in increasing order, got {out[-1]} before {(start, end)}")
        out.append((int(start), int(end)))
    return out


# the Trainer's model -> (its TrainingArguments, the settings of the callback the Trainer was constructed with,
# a weak reference to that callback), from on_init_end. Weak, so that nothing here keeps a model, arguments or
# a callback alive; the settings are a copy, so that they outlive a callback the Trainer drops when it rebuilds
# one from a checkpoint; the arguments object tells that Trainer from an earlier one on the same model
_CONFIGURED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _update_steps_per_epoch(dataloader, args) -> Optional[int]:
    """Optimizer steps per epoch as the Trainer counts them (None without a dataloader length)."""
    if dataloader is None or not has_length(dataloader):
        return None
    return max(math.ceil(len(dataloader) / getattr(args, "gradient_accumulation_steps", 1)), 1)


def _as_json(obj: Any) -> Any:
    """``obj`` as a JSON round trip gives it back (tuples become lists): how a checkpoint stores a callback's
    arguments, so that settings compare equal to stored ones."""
    return json.loads(json.dumps(obj))


def _weak(obj: Any):
    """A weak reference, or a function returning None where ``obj`` cannot have one."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: None


class _MainProcessOnly(std_logging.Filter):
    """Every process decides the same (one decision, broadcast): the callback's log lines are said once, by
    rank 0, not once per GPU."""

    def filter(self, record) -> bool:
        return _world()[0] == 0


logger.addFilter(_MainProcessOnly())


def _follow_trainer_log_level(args) -> None:
    """``TrainingArguments(log_level=...)`` (and ``log_level_replica``) set the callback's level as they set the
    Trainer's: ``log_level="info"`` shows when windows open and what each decision skipped. Where nothing else
    would print those lines (no handler on the root logger), they go to stderr as transformers' own do.
    Each Trainer's arguments decide afresh: a later Trainer left at ``passive`` gets the logger's defaults back,
    and once logging is configured (a root handler) the lines go there instead of the handler added here."""
    passive = getattr(args, "log_level", "passive") in (None, "passive") or not hasattr(args, "get_process_log_level")
    level = std_logging.NOTSET if passive else args.get_process_log_level()
    logger.setLevel(level)
    wanted = not passive and level <= std_logging.INFO and not std_logging.getLogger().handlers
    if wanted and _OWN_HANDLER[0] is None:
        handler = std_logging.StreamHandler()
        handler.setFormatter(std_logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        _OWN_HANDLER[0] = handler
    elif not wanted and _OWN_HANDLER[0] is not None:
        logger.removeHandler(_OWN_HANDLER[0])
        logger.propagate = True
        _OWN_HANDLER[0] = None


_OWN_HANDLER: List[Optional[std_logging.Handler]] = [None]  # the stderr handler added above, while it is there


def _warn(message: str) -> None:
    """``warnings.warn`` on rank 0 only, for the same reason."""
    if _world()[0] == 0:
        warnings.warn(message, stacklevel=3)


def _write_json_atomically(path: str, payload: Dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ElaPruningCallback(TrainerCallback, ExportableState):
    """Skip redundant attention layers during ``Trainer.train()``: ELA's staged KL/EBQM pruning.

    Args:
        windows: 1-indexed inclusive ``(start, end)`` ranges of epochs (or optimizer steps), in
            increasing order, not overlapping. The KL statistics are averaged over each window and the
            decision is made at its end.
        selector: a :class:`~ela_hf.pruning.LayerSelector` (default :class:`~ela_hf.pruning.EbqmSelector`
            with its defaults), or its ``to_dict()`` form.
        window_unit: ``"epoch"`` or ``"step"`` (optimizer steps, i.e. after gradient accumulation; for
            short runs and fine-tuning).

    Presets with the paper's settings: :meth:`cifar`, :meth:`imagenet`, :meth:`detection`.

    The callback finds the attention layers anywhere inside the Trainer's model (a timm model, the
    transformers wrappers, or a module wrapping either). Under DDP the skipped layers' parameters stop
    receiving gradients, so DDP must look for unused parameters: that is the Trainer's default
    (``ddp_find_unused_parameters=None`` -> True for models without activation checkpointing);
    ``ddp_find_unused_parameters=False`` or ``ddp_static_graph=True`` raise ``ValueError`` at train begin.

    Per window it logs ``ela_pruning/...`` scalars into the Trainer's logs (``state.log_history`` and
    the ``logs`` seen by callbacks after this one) and appends a record to ``pruning_history.json`` in
    ``output_dir`` (main process, written atomically).
    """

    def __init__(
        self,
        windows: Sequence[Sequence[int]],
        selector: Optional[Union[LayerSelector, Dict[str, Any]]] = None,
        window_unit: str = "epoch",
    ):
        if window_unit not in WINDOW_UNITS:
            raise ValueError(f"window_unit must be one of {WINDOW_UNITS}, got {window_unit!r}")
        self.windows = _validate_windows(windows)
        self.selector = as_selector(selector)
        self.window_unit = window_unit

        # progress that must survive resume_from_checkpoint (see state())
        self.windows_done = 0
        self.history: List[Dict[str, Any]] = []
        self.partial_window: Optional[int] = None
        self.partial_kl: Optional[List[Dict[str, Any]]] = None
        self.steps_per_epoch: Optional[int] = None  # optimizer steps per epoch of the run (epoch windows)
        # attention layers the model already skipped when the run began: {"name", "stage", "block"}
        self.skipped_before: List[Dict[str, Any]] = []

        # run-time only
        self._model: Optional[nn.Module] = None
        self._open: Optional[int] = None  # index of the window being recorded
        self._layers: List[Tuple[int, int, str, nn.Module]] = []  # (stage, block, name, attention module)
        self._totals: Optional[torch.Tensor] = None  # [2, n] float64: this rank's sums and counts
        self._carried: Optional[torch.Tensor] = None  # [2, n] float64: all ranks' sums from before a resume
        self._snapshot: Optional[List[List[float]]] = None  # reduced sums taken right before a save
        self._pending_logs: Optional[Dict[str, Any]] = None
        self._output_dir: Optional[str] = None
        self._names: Dict[int, str] = {}  # id(block) -> its qualified name in the model, for logs
        self._epochs_ended = 0  # epochs of this run that ended (cut short too), counted from train begin
        self._given: Optional["ElaPruningCallback"] = None  # see _check_not_rebuilt_differently
        self.restored_by_trainer = False
        self._check_resumed_schedule = False  # a resume with windows left: see _warn_if_schedule_not_resumed

    # ------------------------------------------------------------------------------------------------
    # presets (SPEC section 4 table)
    @classmethod
    def cifar(cls, q: float = 0.5) -> "ElaPruningCallback":
        """CIFAR-10/100, 180 epochs: windows 1-3, 45-48, 91-93; Beta(5, 1), tau 0.3."""
        return cls([(1, 3), (45, 48), (91, 93)], EbqmSelector(q=q, alpha=5.0, beta=1.0, tau=0.3), "epoch")

    @classmethod
    def imagenet(cls, q: float = 0.5) -> "ElaPruningCallback":
        """ImageNet-1K, 100 epochs: windows 1-3, 51-53; Beta(2, 5), tau 0.25."""
        return cls([(1, 3), (51, 53)], EbqmSelector(q=q, alpha=2.0, beta=5.0, tau=0.25), "epoch")

    @classmethod
    def detection(cls, q: float = 0.5) -> "ElaPruningCallback":
        """COCO detection, 12 epochs: windows 1 and 7; Beta(2, 5), tau 0.2."""
        return cls([(1, 1), (7, 7)], EbqmSelector(q=q, alpha=2.0, beta=5.0, tau=0.2), "epoch")

    # DESIGN.md spells the presets ``for_<task>()``; both spellings are the same classmethods.
    for_cifar = cifar
    for_imagenet = imagenet
    for_detection = detection

    # ------------------------------------------------------------------------------------------------
    # ExportableState: what a checkpoint stores (trainer_state.json -> stateful_callbacks)
    def _args(self) -> Dict[str, Any]:
        return {
            "windows": [list(w) for w in self.windows],
            "selector": self.selector.to_dict(),
            "window_unit": self.window_unit,
        }

    def state(self) -> dict:
        return {
            "args": self._args(),
            "attributes": {
                "windows_done": self.windows_done,
                "history": self.history,
                "partial_window": self._open,
                "partial_kl": self._partial_for_checkpoint(),
                "steps_per_epoch": self.steps_per_epoch,
                "skipped_before": self.skipped_before,
                # set on the object that restore_callback_states_from_checkpoint=True makes the Trainer
                # build from this state (it sets every attribute), never on the one the user built
                "restored_by_trainer": True,
            },
        }

    @classmethod
    def _saved_history(cls, stateful_callbacks: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """The ``pruning_history.json`` content (as :meth:`_write_history` writes it) of the state a checkpoint
        keeps in ``stateful_callbacks`` (its trainer_state.json); None without one (or with several).
        ``KeyError`` / ``TypeError`` for a state without args or history."""
        saved = (stateful_callbacks or {}).get(cls.__name__)
        if isinstance(saved, list):  # transformers keeps a list when there were several
            saved = saved[0] if len(saved) == 1 else None
        if not isinstance(saved, dict):
            return None
        attributes = saved["attributes"]
        return cls._history_payload(saved["args"], attributes.get("skipped_before"), attributes["history"])

    @staticmethod
    def _history_payload(args: Dict[str, Any], skipped_before: Optional[List[Dict[str, Any]]],
                         decisions: List[Dict[str, Any]]) -> Dict[str, Any]:
        """``pruning_history.json``'s content: the schedule, the layers skipped before the run (when there are
        any), the decisions."""
        payload = dict(args)
        if skipped_before:
            payload["skipped_before_run"] = skipped_before
        payload["decisions"] = decisions
        return payload

    def _partial_for_checkpoint(self) -> Optional[List[Dict[str, Any]]]:
        if self._open is None:
            return None
        if self._snapshot is not None:
            sums, counts = self._snapshot
        elif _world()[1] == 1:
            self._drain()
            totals = self._totals + self._carried
            sums, counts = totals.cpu().tolist()
        else:
            # Called on the main process only, so no collective is possible here; only a save that
            # bypassed the Trainer's step/epoch/evaluate hooks ends up here.
            logger.warning(
                "ElaPruningCallback: a checkpoint is being saved inside pruning window %d without statistics "
                "reduced over the processes; a run resumed from it averages only the steps after the resume.",
                self._open + 1,
            )
            return None
        return [
            {"stage": i, "block": j, "name": name, "sum": s, "count": c}
            for (i, j, name, _), s, c in zip(self._layers, sums, counts)
        ]

    # ------------------------------------------------------------------------------------------------
    # statistics
    def _drain(self) -> None:
        """Move this rank's per-layer sums from the attention layers' buffers into our float64 totals."""
        if self._open is None or not self._layers:
            return
        sums = [a.kl_sum for _, _, _, a in self._layers]
        counts = [a.kl_count for _, _, _, a in self._layers]
        self._totals[0] += torch.stack(sums).to(self._totals)
        self._totals[1] += torch.stack(counts).to(self._totals)
        torch._foreach_zero_(sums + counts)  # one fused kernel rather than one per layer on GPUs
        self._snapshot = None

    def _reduced_totals(self) -> torch.Tensor:
        """All ranks' sums and counts (a collective: every rank must call it at the same point)."""
        self._drain()
        totals = self._totals.clone()
        _, world = _world()
        if world > 1 and totals.numel() > 0:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return totals + self._carried

    def _take_snapshot(self) -> None:
        self._snapshot = self._reduced_totals().cpu().tolist()

    def _open_window(self, idx: int, carried: Optional[List[Dict[str, Any]]] = None) -> None:
        model = self._model
        self._layers = candidate_layers(model, self._names)
        if not self._layers:
            logger.warning(
                "ElaPruningCallback: pruning window %d opens with every skippable attention layer already "
                "skipped; there is nothing left to decide.", idx + 1,
            )
        device = self._layers[0][3].kl_sum.device if self._layers else torch.device("cpu")
        n = len(self._layers)
        self._totals = torch.zeros(2, n, dtype=torch.float64, device=device)
        self._carried = torch.zeros(2, n, dtype=torch.float64, device=device)
        if carried is not None:
            by_layer = {(int(e["stage"]), int(e["block"])): (float(e["sum"]), float(e["count"])) for e in carried}
            keys = [(i, j) for i, j, _, _ in self._layers]
            if set(by_layer) != set(keys):
                logger.warning(
                    "ElaPruningCallback: the checkpoint's partial statistics of window %d do not match the "
                    "model's active layers; averaging only the steps after the resume.",
                    idx + 1,
                )
            else:
                values = [by_layer[k] for k in keys]
                self._carried = torch.tensor(values, dtype=torch.float64, device=device).T.contiguous()
        reset_kl_statistics(model)
        set_kl_recording(model, True)
        self._open = idx
        self._snapshot = None
        start, end = self.windows[idx]
        logger.info(
            "ElaPruningCallback: pruning window %d (%ss %d-%d) opens: recording KL over %d skippable attention "
            "layer%s%s", idx + 1, self.window_unit, start, end, n, "" if n == 1 else "s",
            " (with the statistics of its steps before the resume)" if carried is not None else "",
        )

    def _close_window(self) -> None:
        set_kl_recording(self._model, False)
        reset_kl_statistics(self._model)
        self._open = None
        self._layers, self._totals, self._carried, self._snapshot = [], None, None, None

    def _decide(self, state) -> None:
        """Window end: reduce, decide on rank 0, broadcast, apply everywhere, log."""
        idx = self._open
        start, end = self.windows[idx]
        if self.window_unit == "epoch" and state.epoch is not None and state.epoch < end - 1e-6:
            _warn(
                f"ElaPruningCallback: pruning window {idx + 1} ({start}-{end} epochs) is decided at epoch "
                f"{state.epoch:.2f}, before its end, because that epoch ends there (max_steps, a fractional "
                f"num_train_epochs, or an epoch cut short); its average covers only the part of epoch {end} that ran."
            )
        check_same_layers_everywhere(self._layers, "ElaPruningCallback")
        totals = self._reduced_totals()

        def make_record() -> Dict[str, Any]:
            sums, counts = totals.cpu().tolist() if totals.numel() else ([], [])
            return self._decision_record(idx, state, sums, counts)

        record = decided_on_rank_zero(make_record, "ElaPruningCallback")
        apply_decision(self._model, record)
        self.history.append(record)
        self.windows_done = idx + 1
        self._close_window()
        metrics = self._log_metrics(record)
        self._pending_logs = {"step": state.global_step, "epoch": state.epoch, "metrics": metrics}
        if logger.isEnabledFor(std_logging.INFO):
            skipped_now, quantile = record["skipped_now"], record["quantile"]
            logger.info(
                "ElaPruningCallback: window %d decided at step %d: skips %s%s; %d attention layer%s skipped in all, "
                "active per stage %s", idx + 1, state.global_step,
                ", ".join(skipped_now) if skipped_now else "no layer",
                "" if quantile is None else f" (EBQM quantile {quantile:.4g})",
                sum(sum(stage) for stage in record["skip_mask"]),
                "" if sum(sum(stage) for stage in record["skip_mask"]) == 1 else "s",
                record["active_layers_per_stage"],
            )
        if state.is_world_process_zero:
            self._write_history()

    def _decision_record(self, idx: int, state, sums: List[float], counts: List[float]) -> Dict[str, Any]:
        start, end = self.windows[idx]
        return {
            "window": idx + 1,
            "unit": self.window_unit,
            "start": start,
            "end": end,
            "global_step": int(state.global_step),
            "epoch": _finite_or_none(state.epoch),
            **selection_record(self._model, self._layers, self.selector, sums, counts),
        }

    def _log_metrics(self, record: Dict[str, Any]) -> Dict[str, float]:
        metrics: Dict[str, float] = {f"{LOG_PREFIX}/window": float(record["window"])}
        for e in record["layers"]:
            if e["d_t"] is not None:
                metrics[f"{LOG_PREFIX}/d_t/{e['name']}"] = e["d_t"]
            if e["mapped"] is not None:
                metrics[f"{LOG_PREFIX}/mapped/{e['name']}"] = e["mapped"]
            metrics[f"{LOG_PREFIX}/skip/{e['name']}"] = float(e["skip"])
        for i, n in enumerate(record["active_layers_per_stage"]):
            metrics[f"{LOG_PREFIX}/active_layers/stage{i}"] = float(n)
        metrics[f"{LOG_PREFIX}/skipped_layers"] = float(sum(sum(s) for s in record["skip_mask"]))
        if record["quantile"] is not None:
            metrics[f"{LOG_PREFIX}/quantile"] = record["quantile"]
        if record["layers"]:
            # every layer normally sees every image: the fewest shows a layer that recorded little or nothing
            metrics[f"{LOG_PREFIX}/samples"] = float(min(e["samples"] for e in record["layers"]))
        return metrics

    def _write_history(self) -> None:
        if not self._output_dir:
            return
        payload = self._history_payload(self._args(), self.skipped_before, self.history)
        _write_json_atomically(os.path.join(self._output_dir, HISTORY_FILE_NAME), payload)

    # ------------------------------------------------------------------------------------------------
    # windows
    def _advance_to(self, position: int) -> None:
        """``position``: the 1-indexed epoch or optimizer step about to run. Opens its window if due."""
        while self.windows_done < len(self.windows) and self._open is None:
            start, end = self.windows[self.windows_done]
            if position > end:
                _warn(
                    f"ElaPruningCallback: pruning window {self.windows_done + 1} ({start}-{end} {self.window_unit}s) "
                    "was never observed (training resumed past it without its state); no decision is made for it."
                )
                self.windows_done += 1
                continue
            if position >= start:
                if position > start:
                    _warn(
                        f"ElaPruningCallback: pruning window {self.windows_done + 1} opens late, at {self.window_unit} "
                        f"{position} instead of {start}; its average covers only the rest of the window."
                    )
                self._open_window(self.windows_done)
            return

    def _last_epoch_window(self) -> bool:
        """The open epoch window ends in the epoch now running (which may stop before its end)."""
        return self.window_unit == "epoch" and self._epochs_ended + 1 >= self.windows[self._open][1]

    @staticmethod
    def _stopped_early(state, control) -> bool:
        """Training stops before its length (max_steps, or num_train_epochs' steps): a callback such as
        EarlyStoppingCallback asked it to."""
        return bool(control.should_training_stop) and not (state.max_steps and state.global_step >= state.max_steps)

    def _window_ended(self, state) -> bool:
        end = self.windows[self._open][1]
        if self.window_unit == "step":
            return state.global_step >= end
        # state.epoch is exactly `end` after the last optimizer step of epoch `end`
        return state.epoch is not None and state.epoch >= end

    # ------------------------------------------------------------------------------------------------
    # TrainerCallback events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and any(isinstance(m, LayerAttentionStage) for m in model.modules()):
            _CONFIGURED[model] = (_weak(args), _as_json(self._args()), weakref.ref(self))
            keep_kl_statistics_out_of_ddp(model)  # before the Trainer wraps it in DDP
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("ElaPruningCallback needs the Trainer's model")
        if self._open is not None:  # left open by an interrupted earlier train() call on this instance
            self._close_window()
        self._check_resumed_schedule = False
        self._check_not_rebuilt_differently(args, state, model)
        if isinstance(state.stateful_callbacks, dict):
            # a callback added with trainer.add_callback is missing here, where the Trainer's checkpoint saving
            # looks its entry up (a KeyError at the first save otherwise)
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        self._model = model
        _follow_trainer_log_level(args)
        reporters = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
        if reporters:
            logger.warning(
                "ElaPruningCallback: the pruning values (%s/...) reach trainer.state.log_history and the callbacks "
                "after this one, but not the report_to integrations %s, which the Trainer calls first; to plot "
                "them, use report_to='none' and callbacks=[this callback, <the integration's callback>()] (e.g. "
                "transformers.integrations.TensorBoardCallback).", LOG_PREFIX, reporters,
            )
        self._epochs_ended = int(math.floor(state.epoch or 0.0))
        self._names = _module_names(model)
        list(attention_layers(model))  # ValueError when the model has no layer-attention stages
        self._output_dir = args.output_dir
        self._check_epochs_exist(kwargs.get("train_dataloader"))
        self._check_training_length(args, state)
        self._check_ddp(args, model)
        self._check_selector_runs(model)
        self.steps_per_epoch = _update_steps_per_epoch(kwargs.get("train_dataloader"), args)
        if state.global_step > 0 and self._restore(state):
            self._reapply_history()
            # the Trainer loads the optimizer and schedule after this event: checked at the first step
            self._check_resumed_schedule = self.windows_done < len(self.windows)
            if self.partial_window is not None and self.partial_window == self.windows_done:
                if self.partial_kl is None:
                    _warn(
                        f"ElaPruningCallback: resuming inside pruning window {self.partial_window + 1} without its "
                        "partial statistics; its average covers only the steps after the resume."
                    )
                self._open_window(self.partial_window, carried=self.partial_kl)
        else:
            # a fresh run: progress from an earlier train() call on this instance does not carry over
            self.windows_done, self.history = 0, []
            self.skipped_before = self._skipped_layers(model)
            if self.skipped_before:
                names = [e["name"] for e in self.skipped_before]
                _warn(
                    f"ElaPruningCallback: the model already skips {len(names)} attention layer"
                    f"{'' if len(names) == 1 else 's'} as this run begins ({', '.join(names)}): a pruned checkpoint, "
                    "an earlier train() call, or a retry of auto_find_batch_size after running out of memory. They stay "
                    "skipped (skips are cumulative) and are no candidates of this run's windows; pruning_history.json "
                    "lists them under skipped_before_run. To start from every layer, build the model afresh (e.g. "
                    "Trainer(model_init=...))."
                )
        self.partial_window, self.partial_kl = None, None
        # the file always describes this run: a fresh run replaces an earlier run's decisions at once
        if state.is_world_process_zero:
            self._write_history()
        if getattr(args, "load_best_model_at_end", False):
            logger.warning(
                "ElaPruningCallback with load_best_model_at_end=True: if the best checkpoint was saved before a "
                "pruning decision, the model restored at the end runs the attention layers skipped after it."
            )
        return control

    def _skipped_layers(self, model) -> List[Dict[str, Any]]:
        """The attention layers ``model`` skips now, named as in the logs."""
        return [{"name": self._names.get(id(blk), f"stage{i}.block{j}"), "stage": i, "block": j}
                for i, j, blk in attention_layers(model) if blk.is_skipped]

    def _check_selector_runs(self, model) -> None:
        """A dry run of the selector on made-up ``d_t`` values (one per candidate layer, all different) at train
        begin, so that a custom selector that raises or answers malformed selections fails now, not at the end of
        the first window, hours into the run. It runs on a copy: a selector that counts its calls or keeps earlier
        decisions is left as it was (one that cannot be copied is not tried)."""
        n = len(candidate_layers(model))
        if n == 0:
            return
        try:
            selector = copy.deepcopy(self.selector)
        except Exception:  # noqa: BLE001 - locks, open files, ...: no dry run then
            logger.debug("ElaPruningCallback: the selector cannot be copied; no dry run at train begin")
            return
        made_up = [0.05 * (k + 1) for k in range(n)]
        try:
            _checked_selection(selector, selector.explain(made_up), n)
        except Exception as e:
            raise ValueError(
                f"ElaPruningCallback: the selector {self.selector!r} failed a dry run at train begin on made-up "
                f"d_t values for the model's {n} candidate layers ({type(e).__name__}: {e}); it would fail the same "
                "way at the end of the first pruning window"
            ) from e

    def _check_not_rebuilt_differently(self, args, state, model) -> None:
        """With ``restore_callback_states_from_checkpoint=True`` the Trainer replaces the callback it was
        given by one built from the checkpoint's arguments: that one must not silently drop the given ones."""
        entry = _CONFIGURED.get(model)
        if entry is not None and entry[0]() is not args:  # registered by another Trainer on this model
            entry = None
        given = entry[2]() if entry is not None else None
        # the marker comes with the state of checkpoints written since it exists; for older ones, a resume with
        # the flag set by another callback object than the one the Trainer was built with
        rebuilt = self.restored_by_trainer or (
            bool(getattr(args, "restore_callback_states_from_checkpoint", False)) and state.global_step > 0
            and (state.stateful_callbacks or {}).get(type(self).__name__) is not None
            and entry is not None and given is not self
        )
        if not rebuilt:
            return
        if entry is None:
            logger.warning(
                "ElaPruningCallback: restore_callback_states_from_checkpoint=True rebuilt this callback from the "
                "checkpoint, with its settings %s; the settings of the callback you gave could not be compared "
                "(one added with add_callback, or a model_init run), and that object gets none of this run's "
                "decisions: read them from trainer.callback_handler.callbacks or <output_dir>/pruning_history.json",
                self._args(),
            )
            return
        if entry[1] != _as_json(self._args()):
            raise ValueError(
                f"the checkpoint was written by an ElaPruningCallback with {self._args()}, but this one has "
                f"{entry[1]}; resume with the same windows, selector and window_unit "
                "(restore_callback_states_from_checkpoint=True rebuilt the callback from the checkpoint)"
            )
        if given is not None and type(given) is type(self):
            self._given = given  # the object the user holds: it gets this run's decisions at train end

    def _check_epochs_exist(self, dataloader) -> None:
        if self.window_unit != "epoch" or dataloader is None:
            return
        if not has_length(dataloader):
            raise ValueError(
                "ElaPruningCallback with window_unit='epoch' needs a training dataset with a length: for an "
                "IterableDataset the Trainer counts no real epochs (max_steps sets the length); give the "
                "windows in optimizer steps with window_unit='step'"
            )

    def _check_training_length(self, args, state) -> None:
        last_start, last_end = self.windows[-1]
        if self.window_unit == "epoch":
            limit = state.num_train_epochs
            length = f"num_train_epochs = {limit}"
            if args.max_steps > 0:  # the Trainer's epoch count then comes from max_steps, not num_train_epochs
                length = (f"the run has {limit} epoch{'' if limit == 1 else 's'}: max_steps = {args.max_steps} ends in "
                          f"epoch {limit}, and overrides num_train_epochs")
        else:
            limit = state.max_steps
            length = f"max_steps = {limit}"
            if args.max_steps <= 0:  # the run is given in epochs: the Trainer's max_steps is a number nobody wrote
                length = (f"the run has {limit} optimizer steps, from num_train_epochs = {args.num_train_epochs}; "
                          "step windows count optimizer steps")
        # (0 too: num_train_epochs=0 trains nothing, and a window there would only be named missing at the end)
        if limit is not None and last_end > limit:
            raise ValueError(
                f"pruning window ({last_start}, {last_end}) ends after the end of training "
                f"({length}, window_unit={self.window_unit!r}); to train in pieces (time-limited jobs), "
                "give every piece the whole run's length and resume each from the last one's checkpoint"
            )

    def _check_ddp(self, args, model) -> None:
        if _world()[1] == 1:
            return
        if getattr(args, "ddp_find_unused_parameters", None) is False:
            raise ValueError(
                "ElaPruningCallback skips attention layers during training, which leaves their parameters "
                "without gradients; under DDP set ddp_find_unused_parameters=True (or leave it None)"
            )
        # left None, the Trainer turns DDP's unused-parameter search off for a transformers model with
        # activation checkpointing: the first skip would then stop training with a DDP reduction error
        # (transformers before 5.23 names the model's flag is_gradient_checkpointing)
        flag = next(
            (f for f in ("is_activation_checkpointing", "is_gradient_checkpointing") if hasattr(type(model), f)), None
        )
        checkpointing = getattr(args, "gradient_checkpointing", False) or getattr(
            args, "activation_checkpointing", False
        ) or bool(flag and getattr(model, flag))
        sharded = bool(getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)) or any(
            os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true") for name in ("FSDP", "DEEPSPEED")
        )  # FSDP and DeepSpeed do not wrap the model in DDP
        if getattr(args, "ddp_find_unused_parameters", None) is None and checkpointing and not sharded and isinstance(
            model, PreTrainedModel
        ):
            raise ValueError(
                "ElaPruningCallback under DDP with activation checkpointing: the Trainer then runs DDP with "
                "find_unused_parameters=False, which fails once a layer is skipped. Set "
                "ddp_find_unused_parameters=True (ela_hf checkpoints stages non-reentrantly, which works with it)"
            )
        if getattr(args, "ddp_static_graph", None):
            raise ValueError(
                "ElaPruningCallback changes which layers run during training; ddp_static_graph=True cannot follow that"
            )

    def _restore(self, state) -> bool:
        """Take over the progress stored in a resumed checkpoint's TrainerState. False when there is none."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if saved is None:
            return False
        candidates = saved if isinstance(saved, list) else [saved]
        mine = _as_json(self._args())
        matching = [c for c in candidates if _as_json(c.get("args", {})) == mine]
        if not matching:
            raise ValueError(
                f"the checkpoint was written by an ElaPruningCallback with {candidates[0].get('args')}, "
                f"but this one has {mine}; resume with the same windows, selector and window_unit"
            )
        attrs = self._checked_attributes(matching[0].get("attributes", {}))
        self.windows_done = attrs["windows_done"]
        self.history = [in_record_order(record) for record in attrs["history"]]
        self.partial_window = attrs["partial_window"]
        self.partial_kl = attrs["partial_kl"]
        self.skipped_before = attrs["skipped_before"]
        self._check_same_epochs(attrs["steps_per_epoch"])
        return True

    def _checked_attributes(self, attrs: Any) -> Dict[str, Any]:
        """The stored progress, checked: a damaged or hand-edited trainer_state.json is named as such rather
        than failing later inside the callback (or resuming with a mask no window decided)."""

        def damaged(what: str) -> ValueError:
            return ValueError(
                f"the checkpoint's ElaPruningCallback state (stateful_callbacks in trainer_state.json) is damaged: "
                f"{what}; resume from another checkpoint"
            )

        def whole(value, low, high) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        if not isinstance(attrs, dict):
            raise damaged(f"'attributes' is a {type(attrs).__name__}, not an object")
        count = len(self.windows)
        done = attrs.get("windows_done", 0)
        if not whole(done, 0, count):
            raise damaged(f"windows_done must be a whole number in 0..{count}, got {done!r}")
        history = attrs.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history) or len(history) > done:
            raise damaged(f"history must be a list of at most windows_done={done} window records, got {history!r:.200}")
        if history and "skip_mask" not in history[-1]:
            raise damaged("the last history record has no skip_mask")
        partial = attrs.get("partial_window")
        if partial is not None and not whole(partial, 0, count - 1):
            raise damaged(f"partial_window must be null or a window index in 0..{count - 1}, got {partial!r}")
        partial_kl = attrs.get("partial_kl")
        numbers_ok = lambda e: all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool)  # noqa: E731
                                   for k in ("stage", "block", "sum", "count"))
        if partial_kl is not None and not (
            isinstance(partial_kl, list) and all(isinstance(e, dict) and numbers_ok(e) for e in partial_kl)
        ):
            raise damaged(f"partial_kl must be null or a list of {{stage, block, sum, count}}, got {partial_kl!r:.200}")
        if partial is not None and partial != done:
            raise damaged(f"partial_window {partial} is not the window after the {done} decided ones")
        for e in partial_kl or []:
            # (a negative count turned every d_t into null, a NaN or negative sum skipped or kept layers at random;
            # KL divergences are >= 0, up to float rounding)
            total, n = e["sum"], e["count"]
            if not (math.isfinite(n) and n >= 0 and float(n).is_integer()):
                raise damaged(f"partial_kl count {n!r} of stage {e['stage']} block {e['block']} is not a whole number >= 0")
            if not math.isfinite(total) or total < -1e-6 * max(n, 1.0) or (n == 0 and total != 0):
                raise damaged(f"partial_kl sum {total!r} of stage {e['stage']} block {e['block']} cannot be a sum of "
                              f"{n:g} KL divergences")
        spe = attrs.get("steps_per_epoch")
        if spe is not None and not whole(spe, 1, float("inf")):
            raise damaged(f"steps_per_epoch must be null or a positive whole number, got {spe!r}")
        before = attrs.get("skipped_before", [])  # absent in checkpoints of earlier versions
        if not isinstance(before, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and whole(e.get("stage"), 0, float("inf"))
            and whole(e.get("block"), 1, float("inf")) for e in before
        ):
            raise damaged(f"skipped_before must be a list of {{name, stage, block}}, got {before!r:.200}")
        return dict(windows_done=done, history=list(history), partial_window=partial, partial_kl=partial_kl,
                    steps_per_epoch=spe, skipped_before=list(before))

    def _check_same_epochs(self, saved: Optional[int]) -> None:
        """The Trainer re-counts a resumed run's epochs as ``global_step // steps per epoch`` with the new run's
        steps per epoch: where that changed, the epoch windows still to come would cover other data than the
        checkpoint's run, and an open one would be decided at once."""
        current = self.steps_per_epoch
        if self.window_unit != "epoch" or self.windows_done >= len(self.windows) or not saved or not current:
            return
        if int(saved) != current:
            left = ", ".join(f"{a}-{b}" for a, b in self.windows[self.windows_done:])
            raise ValueError(
                f"the checkpoint's run took {int(saved)} optimizer steps per epoch, this one takes {current} (the "
                "number of processes, the per-device batch size, gradient_accumulation_steps or the training set "
                f"changed): the Trainer counts the resumed run's epochs from its step count with the new value, "
                f"which would move the epoch pruning window(s) {left} still to be decided. Resume with the "
                "checkpoint's settings, or give the windows in optimizer steps (window_unit='step')"
            )

    def _reapply_history(self) -> None:
        """The checkpoint's weights already carry the mask; this keeps a model loaded some other way in step."""
        if not self.history and not self.skipped_before:
            return
        current = get_skip_mask(self._model)
        if self.history:
            recorded = [list(stage) for stage in self.history[-1]["skip_mask"]]
        else:
            recorded = [[False] * len(stage) for stage in current]
        for e in self.skipped_before:
            if e["stage"] < len(recorded) and e["block"] < len(recorded[e["stage"]]):
                recorded[e["stage"]][e["block"]] = True
        mask = [[a or b for a, b in zip(cur, rec)] for cur, rec in zip(current, recorded)]
        set_skip_mask(self._model, mask)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.window_unit == "epoch":
            # counted, not read off state.epoch: an epoch cut short (should_epoch_stop, an iterator shorter
            # than its len) leaves state.epoch short of its index
            self._advance_to(self._epochs_ended + 1)
        return control

    def _warn_if_schedule_not_resumed(self, state, lr_scheduler) -> None:
        """A checkpoint without optimizer and schedule state (``save_only_model=True`` writes such) resumes with a
        fresh optimizer and a schedule counted from step 0: the windows still to come then see another training
        than the uninterrupted run's. Told apart by the schedule's step count (whatever the optimizer)."""
        self._check_resumed_schedule = False
        schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
        steps = getattr(schedule, "last_epoch", None)
        if (isinstance(schedule, torch.optim.lr_scheduler.LRScheduler)
                and not isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau)
                and isinstance(steps, int) and steps < state.global_step):
            _warn(
                f"ElaPruningCallback: the run resumed at step {state.global_step} without the checkpoint's optimizer "
                f"and learning-rate schedule state (its schedule restarts at step {steps}; save_only_model=True "
                "writes such checkpoints): the pruning windows still to come can decide other layers than the "
                "uninterrupted run would have."
            )

    def on_step_begin(self, args, state, control, **kwargs):
        if self._check_resumed_schedule:
            self._warn_if_schedule_not_resumed(state, kwargs.get("lr_scheduler"))
        if self.window_unit == "step":
            self._advance_to(state.global_step + 1)
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        self._drain()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._open is None:
            return control
        self._drain()
        if self._window_ended(state) or (
            control.should_training_stop and self._last_epoch_window() and not self._stopped_early(state, control)
        ):
            # also when training reaches its length inside the last epoch (max_steps): decided before the
            # final save, so that the last checkpoint carries the decision
            self._decide(state)
            control.should_log = True  # a log entry at this very step carries the decision
        elif control.should_save:
            self._take_snapshot()
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # the last epoch can be cut short (max_steps, should_epoch_stop, an exhausted iterator): its window
        # then ends here. A stop before training's length (EarlyStoppingCallback) decides nothing, in the
        # last epoch as in the others: on_train_end names the window.
        if self._open is not None:
            if self._last_epoch_window() and not self._stopped_early(state, control):
                self._decide(state)
                control.should_log = True
            elif control.should_save:
                self._take_snapshot()
        self._epochs_ended += 1
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        # save_strategy="best" decides to save only after evaluating, on every rank
        if self._open is not None:
            self._take_snapshot()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_logs is None:
            return control
        pending, self._pending_logs = self._pending_logs, None
        if logs is not None:
            logs.update(pending["metrics"])  # seen by the callbacks after this one
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == pending["step"] and f"{LOG_PREFIX}/window" not in last:
            last.update(pending["metrics"])
        else:
            state.log_history.append({**pending["metrics"], "epoch": pending["epoch"], "step": pending["step"]})
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending_logs is not None:
            pending, self._pending_logs = self._pending_logs, None
            state.log_history.append({**pending["metrics"], "epoch": pending["epoch"], "step": pending["step"]})
        if self._open is not None:
            start, end = self.windows[self._open]
            logger.warning(
                "ElaPruningCallback: training ended inside pruning window %d (%d-%d %ss); no decision was made.",
                self._open + 1, start, end, self.window_unit,
            )
            self._close_window()
            first_unreached = self.windows_done + 1
        else:
            first_unreached = self.windows_done
        if first_unreached < len(self.windows):
            where = f"epoch {state.epoch:.2f}, " if state.epoch is not None else ""
            logger.warning(
                "ElaPruningCallback: training ended (%sstep %d) before pruning window(s) %s; no decision was made "
                "for them (stopped early, e.g. by EarlyStoppingCallback or should_training_stop?).",
                where, state.global_step,
                ", ".join(f"{k + 1} ({a}-{b} {self.window_unit}s)"
                          for k, (a, b) in enumerate(self.windows) if k >= first_unreached),
            )
        self._warn_if_skips_were_undone()
        if self._given is not None:
            self._given.windows_done, self._given.history = self.windows_done, self.history
            self._given.skipped_before = self.skipped_before
        return control

    def _warn_if_skips_were_undone(self) -> None:
        """A checkpoint loaded after the last decision (load_best_model_at_end) can bring skipped layers back."""
        if not self.history or self._model is None:
            return
        current = get_skip_mask(self._model)
        # module names, as in the log keys and the other messages
        names = {(e.get("stage"), e.get("block")): e.get("name") for h in self.history for e in h.get("layers", [])}
        undone = [
            names.get((i, j)) or f"stage {i} block {j}"
            for i, (now, decided) in enumerate(zip(current, self.history[-1]["skip_mask"]))
            for j, (a, b) in enumerate(zip(now, decided))
            if b and not a
        ]
        if undone:
            logger.warning(
                "ElaPruningCallback: the model at the end of training runs attention layers %s that pruning "
                "skipped; its weights were loaded from a checkpoint saved before that decision (e.g. "
                "load_best_model_at_end). Its mask is %s, not the pruning history's.",
                ", ".join(undone), current,
            )
