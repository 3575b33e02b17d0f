"""One pruning decision from the recorded KL statistics: the step that ``ElaPruningCallback`` takes at a
window's end, also available to training loops of your own (timm-style scripts, plain ``accelerate``,
Lightning) as :func:`skip_redundant_layers`.

Under ``torch.distributed`` a decision is a collective: every process's statistics are summed, the
selector runs once (on rank 0), and every process applies that one decision, so the ranks never disagree
even where floating-point sums could.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.attention_tools import (
    _attention,
    _module_names,
    attention_layers,
    check_ddp_keeps_kl_statistics,
    get_skip_mask,
    reset_kl_statistics,
    set_skip_mask,
)
from .selectors import EbqmSelector, LayerSelector, Selection, selector_from_dict

__all__ = ["skip_redundant_layers"]

Layer = Tuple[int, int, str, nn.Module]  # (stage, block, qualified name, attention module)


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finite_or_none(v: Optional[float]) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


def as_selector(selector: Optional[Union[LayerSelector, Dict[str, Any]]]) -> LayerSelector:
    """``selector``, its ``to_dict()`` form rebuilt, or the default :class:`EbqmSelector` for None."""
    if selector is None:
        return EbqmSelector()
    if isinstance(selector, dict):
        return selector_from_dict(selector)
    if not isinstance(selector, LayerSelector):
        raise ValueError(
            f"selector must be an ela_hf.pruning.LayerSelector (or its to_dict() form), got {type(selector).__name__}"
        )
    return selector


def candidate_layers(model: nn.Module, names: Optional[Dict[int, str]] = None) -> List[Layer]:
    """The layers a decision can skip: active attention layers that are not their stage's first, in network
    order, each named by its module name in ``model`` (``names``: ``id(block) -> name``, computed if not given)."""
    if names is None:
        names = _module_names(model)
    return [
        (i, j, names.get(id(blk), f"stage{i}.block{j}"), _attention(blk))
        for i, j, blk in attention_layers(model)
        if j > 0 and not blk.is_skipped
    ]


def selection_record(
    model: nn.Module, layers: List[Layer], selector: LayerSelector, sums: List[float], counts: List[float]
) -> Dict[str, Any]:
    """Run ``selector`` on the mean ``d_t`` of ``layers`` and describe the decision (JSON-ready): each layer's
    ``d_t`` and sample count, the candidates, mapped values and skips, and the model's new skip mask."""
    d = [s / c if c > 0 else float("nan") for s, c in zip(sums, counts)]
    if layers and not any(c > 0 for c in counts):
        warnings.warn(
            f"no attention layer recorded any image since the statistics were last reset ({len(layers)} candidate "
            f"layer{'s' if len(layers) != 1 else ''}): recording was off (ela_hf.set_kl_recording(model, True)) or the model ran in eval mode; "
            "nothing is skipped",
            stacklevel=5,
        )
    selection = _checked_selection(selector, selector.explain(d), len(d))
    entries = [
        {
            "name": name,
            "stage": i,
            "block": j,
            "d_t": finite_or_none(d[k]),
            "samples": int(counts[k]),
            "candidate": bool(selection.candidate[k]),
            "mapped": finite_or_none(selection.mapped[k]),
            "skip": bool(selection.skip[k]),
        }
        for k, (i, j, name, _) in enumerate(layers)
    ]
    mask = [list(m) for m in get_skip_mask(model)]
    for entry in entries:
        if entry["skip"]:
            mask[entry["stage"]][entry["block"]] = True
    return {
        "quantile": finite_or_none(selection.quantile),
        "layers": entries,
        "skipped_now": [e["name"] for e in entries if e["skip"]],
        "active_layers_per_stage": [sum(not s for s in stage) for stage in mask],
        "skip_mask": mask,
    }


def _checked_selection(selector: LayerSelector, selection: Any, n: int) -> Selection:
    """A selector's ``explain()`` result, refused unless it has one boolean skip and candidate flag per layer
    (``bool("false")`` would skip a layer) and one mapped value or None per layer."""
    name = f"{type(selector).__name__}.explain()"
    if not isinstance(selection, Selection):
        raise ValueError(f"{name} must return a Selection with one entry per layer ({n}), got {selection!r}")
    for field in ("skip", "candidate", "mapped"):
        values = getattr(selection, field)
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(
                f"{name} must return a Selection with one entry per layer ({n}); its {field!r} is {values!r}"
            )
    for field in ("skip", "candidate"):
        wrong = [v for v in getattr(selection, field) if not isinstance(v, (bool, np.bool_))]
        if wrong:
            raise ValueError(f"{name}: the Selection's {field!r} entries must be True or False, got {wrong[0]!r}")
    wrong = [v for v in selection.mapped if v is not None and not isinstance(v, numbers.Real)]
    if wrong:
        raise ValueError(f"{name}: the Selection's 'mapped' entries must be numbers or None, got {wrong[0]!r}")
    return selection


def check_same_layers_everywhere(layers: List[Layer], who: str) -> None:
    """Under torch.distributed, refuse (on every rank) candidate layers that differ between the processes: their
    statistics would be summed position by position across different layers (a collective)."""
    rank, size = world()
    if size == 1:
        return
    mine = [(i, j) for i, j, _, _ in layers]
    everyone: List[Any] = [None] * size
    dist.all_gather_object(everyone, mine)
    differ = [r for r, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differ:
        raise ValueError(
            f"{who}: the processes disagree on the layers still active (rank 0: {everyone[0]}, rank {differ[0]}: "
            f"{everyone[differ[0]]}): every process must train the same skip mask (load checkpoints on every rank)"
        )


def check_ddp_drops_unused_parameters(model: nn.Module, who: str) -> None:
    """Refuse a DistributedDataParallel in ``model`` that would fail at the first step after a skip: skipped layers'
    parameters get no gradients, which DDP accepts only with ``find_unused_parameters=True`` and without a
    static graph."""
    from torch.nn.parallel import DistributedDataParallel

    for ddp in model.modules():
        if isinstance(ddp, DistributedDataParallel) and (not ddp.find_unused_parameters or ddp.static_graph):
            raise ValueError(
                f"{who}: skipped attention layers' parameters receive no gradients, so DistributedDataParallel must "
                "be built with find_unused_parameters=True and without static_graph (with accelerate: "
                "Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]))"
            )


# the order of a decision record's keys, as the callback and skip_redundant_layers write them; a record that went
# through trainer_state.json (written with sorted keys) is put back in it, so that a resumed run's
# pruning_history.json is byte for byte the uninterrupted run's
WINDOW_FIELDS = ("window", "unit", "start", "end", "global_step", "epoch")
DECISION_FIELDS = ("quantile", "layers", "skipped_now", "active_layers_per_stage", "skip_mask")
LAYER_FIELDS = ("name", "stage", "block", "d_t", "samples", "candidate", "mapped", "skip")


def _ordered(mapping: Dict[str, Any], fields: Tuple[str, ...]) -> Dict[str, Any]:
    known = {k: mapping[k] for k in fields if k in mapping}
    return {**known, **{k: v for k, v in mapping.items() if k not in known}}


def in_record_order(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` (a decision, as stored) with its keys and its layers' keys in the order they were written."""
    out = _ordered(record, WINDOW_FIELDS + DECISION_FIELDS)
    if isinstance(out.get("layers"), list):
        out["layers"] = [_ordered(e, LAYER_FIELDS) if isinstance(e, dict) else e for e in out["layers"]]
    return out


def decided_on_rank_zero(make_record: Callable[[], Dict[str, Any]], who: str) -> Dict[str, Any]:
    """``make_record()`` run on rank 0 and broadcast to every process (a collective). A failure on rank 0 is
    raised there and, as a RuntimeError naming it, on the other ranks, instead of leaving them waiting."""
    rank, size = world()
    record, failure = None, None
    if rank == 0:
        try:
            record = make_record()
        except Exception as e:
            failure = e
    if size > 1:
        box = [record if failure is None else {"error": f"{type(failure).__name__}: {failure}"}]
        dist.broadcast_object_list(box, src=0)
        if failure is None and "error" in box[0]:
            raise RuntimeError(f"{who}: the pruning decision failed on rank 0: {box[0]['error']}")
        record = box[0]
    if failure is not None:
        raise failure
    return record


def apply_decision(model: nn.Module, record: Dict[str, Any]) -> None:
    """Skip the layers ``record`` skips (skips already in the model stay)."""
    current = get_skip_mask(model)
    set_skip_mask(model, [[a or b for a, b in zip(cur, new)] for cur, new in zip(current, record["skip_mask"])])


def skip_redundant_layers(
    model: nn.Module, selector: Optional[Union[LayerSelector, Dict[str, Any]]] = None
) -> Dict[str, Any]:
    """Decide from the KL statistics recorded so far, skip the chosen layers, and start the statistics afresh.

    For training loops of your own: record a window's training steps inside ``ela_hf.kl_recording(model)``
    (or with ``ela_hf.set_kl_recording``), then call this at the window's end. ``selector`` is a
    :class:`~ela_hf.pruning.LayerSelector` (default :class:`~ela_hf.pruning.EbqmSelector`, the paper's EBQM)
    or its ``to_dict()`` form. ``model`` is any module containing the attention layers (a DDP-wrapped one too).

    Under ``torch.distributed`` every process must call it at the same point: the statistics of all
    processes are summed, rank 0 decides, and every process applies that decision.

    Returns the decision as ``pruning_history.json`` records it, without the window fields: ``quantile``,
    ``layers`` (one entry per candidate layer: ``name``, ``stage``, ``block``, ``d_t``, ``samples``,
    ``candidate``, ``mapped``, ``skip``), ``skipped_now``, ``active_layers_per_stage`` and ``skip_mask``.
    Layers that recorded nothing have ``d_t`` None and are never skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"skip_redundant_layers needs the model (a torch.nn.Module), got {type(model).__name__}")
    selector = as_selector(selector)
    layers = candidate_layers(model)  # ValueError for a model without layer-attention stages
    check_ddp_keeps_kl_statistics(model)
    check_ddp_drops_unused_parameters(model, "skip_redundant_layers")
    check_same_layers_everywhere(layers, "skip_redundant_layers")
    if layers:
        totals = torch.stack(
            [torch.stack([a.kl_sum for *_, a in layers]), torch.stack([a.kl_count for *_, a in layers])]
        ).double()
    else:
        totals = torch.zeros(2, 0, dtype=torch.float64)
    if world()[1] > 1 and layers:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    sums, counts = totals.cpu().tolist()
    record = decided_on_rank_zero(
        lambda: selection_record(model, layers, selector, sums, counts), "skip_redundant_layers"
    )
    apply_decision(model, record)
    reset_kl_statistics(model)
    return record
