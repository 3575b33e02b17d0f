"""Slim releases of pruned models: export to a folder, render the model card, push to the Hub.

A slim release is the checkpoint format of ``save_pretrained`` (``config.json`` with transformers' and
timm's keys, ``model.safetensors`` with timm's key names) minus the weights of skipped attention layers;
its ``config.json`` carries the mask in ``model_args["skip_mask"]``, so both
``AutoModelForImageClassification.from_pretrained(dir)`` and ``timm.create_model("local-dir:" + dir,
pretrained=True)`` build the reduced network, whose outputs equal the masked model's.

``pruning_history.json``, the record of the pruning windows written by ``ElaPruningCallback``, is read
defensively (unknown keys are ignored, malformed layer entries skipped), except where the card would be
wrong: a ``skip`` that is not a boolean, and (at export) layers the model does not have. The callback's layout::

    {
      "windows": [[1, 3], [45, 48], [91, 93]], "window_unit": "epoch",       # the schedule
      "selector": {"name": "ebqm", "q": 0.5, "alpha": 5.0, "beta": 1.0, "tau": 0.3},
      "skipped_before_run": [{"name": "layer2.3", "stage": 1, "block": 3}],   # only when the model had skips
      "decisions": [                                                          # one per finished window
        {"window": 1, "unit": "epoch", "start": 1, "end": 3, "quantile": 0.021,
         "layers": [{"name": "layer1.1", "stage": 0, "block": 1, "d_t": 0.0123, "mapped": 0.04,
                     "skip": true, ...}, ...],
         ...},
        ...
      ]
    }

Also accepted: the window records under ``"windows"`` instead of ``"decisions"``, or a bare list of them;
``"d"`` for ``"d_t"``; window labels from ``"name"``, ``"start"``/``"end"`` (+ ``"unit"``), ``"epochs"``,
``"epoch"`` or ``"step"``. Per layer, ``stage`` and ``block`` (0-based) are required; ``d_t`` (window-mean
KL divergence), ``mapped`` (the selector's mapped value, e.g. the Beta CDF) and ``skip`` (decided at this
window's end) are optional.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .hf.configuration_ela import ElaConfig, default_pretrained_cfg
from .hf.modeling_ela import (
    _PROCESS_TAGGED,
    ElaPreTrainedModel,
    _process_gone,
    _process_tag,
    _remove_abandoned_folders,
    build_timm_network,
)
from .models import follow_skip_buffers, get_skip_mask, slim_state_dict
from .models.ela_resnet import LayerAttentionResNet, LayerAttentionStage, _some

__all__ = [
    "export_pruned",
    "push_pruned_to_hub",
    "render_model_card",
    "load_pruning_history",
    "config_from_timm_model",
    "MODEL_CARD_TEMPLATE",
]

logger = logging.getLogger(__name__)

# installed from a wheel the template lies in the package (ela_hf/model_cards/, see pyproject.toml); in a
# source checkout (also an editable install) it is the tree's model_cards/
MODEL_CARD_TEMPLATE = next(
    (p for p in (Path(__file__).resolve().parent / "model_cards" / "ela_model_card.md",
                 Path(__file__).resolve().parent.parent / "model_cards" / "ela_model_card.md") if p.is_file()),
    Path(__file__).resolve().parent.parent / "model_cards" / "ela_model_card.md",
)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
HISTORY_NAME = "pruning_history.json"
PLOT_NAME = "d_t_per_window.png"

PathLike = Union[str, os.PathLike]

# TrainingArguments fields worth a line in the card (everything else is noise for a reader)
_TRAINING_KEYS = (
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "optim",
    "adam_beta1", "adam_beta2", "label_smoothing_factor", "seed", "bf16", "fp16",
)


# --------------------------------------------------------------------------------------------------
# model -> (timm network, config)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / accelerate / torch.compile wrappers keep the real model in `.module` / `._orig_mod`
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def config_from_timm_model(model: LayerAttentionResNet, id2label: Optional[Mapping[int, str]] = None) -> ElaConfig:
    """An :class:`ElaConfig` describing a timm layer-attention model as it is now (mask included)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = cfg.get("architecture")
    if architecture is None:
        raise ValueError("the timm model has no pretrained_cfg['architecture']; create it with timm.create_model")
    created_with = dict(getattr(model, "_model_args", {}) or {})
    model_args = {
        k: v for k, v in created_with.items()
        if k not in ("num_classes", "in_chans", "drop_rate", "drop_path_rate", "skip_mask", "pretrained_cfg_overlay")
    }
    structural = _structural_mask(model)
    if structural is not None and any(any(s) for s in structural):
        model_args["skip_mask"] = structural
    pretrained_cfg = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in cfg.items()
        if k not in ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "architecture")
        and (v is not None or k in ("pool_size", "first_conv", "classifier"))
    } or default_pretrained_cfg(architecture)
    kwargs: Dict[str, Any] = dict(
        architecture=architecture,
        skip_mask=model.skip_mask,
        num_channels=int(model.in_chans),
        drop_rate=float(created_with.get("drop_rate", 0.0) or 0.0),
        drop_path_rate=float(created_with.get("drop_path_rate", 0.0) or 0.0),
        model_args=model_args or None,
        pretrained_cfg=pretrained_cfg,
    )
    if id2label is not None:
        if len(id2label) != model.num_classes:
            raise ValueError(f"id2label has {len(id2label)} labels but the model has {model.num_classes} classes")
        kwargs["id2label"] = {int(k): str(v) for k, v in id2label.items()}
    elif model.num_classes and _fitting_label_names(cfg, model.num_classes):
        # a release loaded through timm ("local-dir:", "hf-hub:") keeps its class names there; ElaConfig reads
        # timm's label_names as it does from a config.json
        kwargs["label_names"] = list(cfg["label_names"])
    else:
        kwargs["num_labels"] = int(model.num_classes)
    config = ElaConfig(**kwargs)
    config.architectures = ["ElaForImageClassification" if model.num_classes else "ElaModel"]
    return config


def _fitting_label_names(cfg: Mapping[str, Any], num_classes: int) -> bool:
    names = cfg.get("label_names")
    return isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names)


def _structural_mask(net: LayerAttentionResNet) -> Optional[List[List[bool]]]:
    """Which attention layers were built without parameters."""
    if net.attn_type is None:
        return None
    return [[blk.attn is None for blk in stage] for stage in net.stages]


def _refuse_sharded(model: nn.Module) -> None:
    """A ``ValueError`` for a model whose weights FSDP (or a DTensor layout) shards over processes: an export
    on one process cannot gather them (``state_dict()`` is a collective there), so say what to do instead."""
    if not torch.distributed.is_available():
        return
    import torch.distributed.fsdp as fsdp

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        DTensor = ()

    # FSDP1's wrapper, FSDP2's fully_shard class (torch >= 2.6), and any DTensor parameter
    classes = tuple(c for c in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None))
                    if isinstance(c, type))
    where = next((name for name, m in model.named_modules() if isinstance(m, classes)), None)
    if where is None:
        where = next((name.rpartition(".")[0] for name, p in model.named_parameters() if isinstance(p, DTensor)), None)
        if where is None:
            return
    inner = next((m for m in model.modules() if isinstance(m, (ElaPreTrainedModel, LayerAttentionResNet))), None)
    if isinstance(inner, ElaPreTrainedModel):
        build = f"net = {type(inner).__name__}(model.config)"
    elif inner is not None:
        arch = (getattr(inner, "pretrained_cfg", None) or {}).get("architecture") or "<architecture>"
        structural = _structural_mask(inner)  # layers built without weights: the full state dict lacks them
        built_skipped = f", skip_mask={structural}" if structural and any(any(s) for s in structural) else ""
        build = f"net = timm.create_model({arch!r}, num_classes={inner.num_classes}{built_skipped})"
    else:
        build = "net = <the same network, built unsharded>"
    at = f"at {where!r}" if where else "the whole model"
    raise ValueError(
        f"export_pruned needs the whole weights in one process, and FSDP (or another DTensor layout) shards them "
        f"over the processes ({at}); "
        "gathering them is a collective that every process must join. On every "
        "process: from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions; "
        "full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)); "
        f"then on the main process only: {build}; net.load_state_dict(full) (the skip flags come with the "
        "weights); export_pruned(net, ...)"
    )


def _network_and_config(model: nn.Module, id2label=None) -> Tuple[LayerAttentionResNet, ElaConfig]:
    model = _unwrap(model)
    if isinstance(model, ElaPreTrainedModel):
        config = copy.deepcopy(model.config)
        if id2label is not None:
            if len(id2label) != model.timm_model.num_classes:
                raise ValueError(
                    f"id2label has {len(id2label)} labels but the model has {model.timm_model.num_classes} classes"
                )
            config.id2label = {int(k): str(v) for k, v in id2label.items()}
            config.label2id = {v: k for k, v in config.id2label.items()}
        config.architectures = [type(model).__name__]
        return model.timm_model, config
    if isinstance(model, LayerAttentionResNet):
        return model, config_from_timm_model(model, id2label)
    hint = ""
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet

    features_only = isinstance(model, (FeatureDictNet, FeatureGetterNet, FeatureHookNet))  # (FeatureListNet too)
    whole = [(name, m) for name, m in model.named_modules()
             if name and isinstance(m, (LayerAttentionResNet, ElaPreTrainedModel))]
    if whole and not features_only:
        # a user's wrapper around a whole network (a head of its own, a model with its EMA copy): name the path
        name, inner = whole[0]
        more = f" and {len(whole) - 1} more" if len(whole) > 1 else ""
        hint = (
            f". It holds a whole ELA network at .{name} ({type(inner).__name__}){more}: export that, "
            f"export_pruned(model.{name}, ...); what your wrapper adds around it is not part of the release"
        )
    elif any(isinstance(m, LayerAttentionStage) for m in model.modules()):
        # a timm features_only backbone (FeatureListNet), or a detector around one
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "<architecture>"
        # feature_cls='getter' keeps the (pruned) network under .model, 'hook' its modules under .body
        inner = next((n for n in ("model", "body") if isinstance(getattr(model, n, None), nn.Module)
                      and any(isinstance(m, LayerAttentionStage) for m in getattr(model, n).children())), None)
        network = f"backbone.{inner}" if inner else "backbone"
        # built with the backbone's mask and loaded without the skipped layers' weights: a backbone loaded from a
        # slim release (which lacks them) and pruned further takes this route too
        hint = (
            f". It contains ELA stages (a features_only backbone or a model around one): copy them into the "
            f"full network and export that: net = timm.create_model({arch!r}, num_classes=0, "
            f"skip_mask=ela_hf.get_skip_mask(backbone)); net.load_state_dict(ela_hf.models.slim_state_dict("
            f"{network})) (a backbone cut short by out_indices lacks the later stages, so it makes no whole network "
            "to release: export the network it was cut from); "
            "export_pruned(net, ...). timm.create_model('local-dir:<release>', pretrained=True, "
            "features_only=True) gives the backbone back"
        )
    raise ValueError(
        f"expected a timm ELA model (LayerAttentionResNet) or an ElaModel/ElaForImageClassification, "
        f"got {type(model).__name__}{hint}"
    )


def _slim_config(config: ElaConfig, mask: Optional[List[List[bool]]]) -> ElaConfig:
    """The config of the slim release: every skipped layer is also structurally absent."""
    data = config.to_dict()
    data.pop("transformers_version", None)
    data["skip_mask"] = mask
    model_args = dict(data.get("model_args") or {})
    if mask is not None and any(any(s) for s in mask):
        model_args["skip_mask"] = mask
    else:
        model_args.pop("skip_mask", None)
    data["model_args"] = model_args
    slim = ElaConfig.from_dict(data)
    slim.architectures = config.architectures
    return slim


@torch.no_grad()
def _verify_slim(net: LayerAttentionResNet, config: ElaConfig, state: Dict[str, torch.Tensor]) -> None:
    """Build the reduced model from the exported config, load the slim weights strictly, compare outputs.

    Both models run on the network's device and dtype, so the comparison sees the same kernels.
    """
    param = next(net.parameters())
    reduced = build_timm_network(config, int(net.num_classes))
    reduced.load_state_dict(state, strict=True)
    reduced.to(device=param.device, dtype=param.dtype).eval()
    # any spatial size checks the weights; a small one keeps the check cheap for ImageNet nets on CPU
    channels, height, width = list(config.pretrained_cfg.get("input_size") or [net.in_chans, 32, 32])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, min(height, 64), min(width, 64), generator=generator)
    x = x.to(device=param.device, dtype=param.dtype)
    was_training = net.training
    net.eval()
    try:
        expected = net(x).float()
        got = reduced(x).float()
    finally:
        net.train(was_training)
    rtol, atol = (1e-4, 1e-5) if param.dtype == torch.float32 else (2e-2, 1e-3)
    if not torch.isfinite(expected).all():
        raise ValueError(
            "the model's outputs are not finite (NaN/inf): its weights are (training diverged?), so the export "
            "cannot be checked; export a checkpoint from before, or pass verify=False to write it anyway"
        )
    if not torch.allclose(expected, got, rtol=rtol, atol=atol):
        raise RuntimeError(
            "the slim export does not reproduce the masked model "
            f"(max abs difference {float((expected - got).abs().max()):.3g}); please report this"
        )
    del reduced


# --------------------------------------------------------------------------------------------------
# pruning history


def load_pruning_history(history: Union[None, PathLike, Mapping, Sequence]) -> Optional[Dict[str, Any]]:
    """Read ``pruning_history.json`` (a path, or its parsed content) into ``{"selector", "windows",
    "skipped_before"}``.

    Windows become ``{"label", "layers": [{"stage", "block", "d", "mapped", "skip"}]}``; ``skipped_before`` is
    the sorted ``(stage, block)`` pairs of the layers already skipped when the run began. Raises
    ``ValueError`` when the file is not JSON or not one of the layouts in this module's docstring.
    """
    if history is None:
        return None
    return _parse_history(*_read_history(history))


def _parse_history(history: Any, source: str) -> Dict[str, Any]:
    """:func:`load_pruning_history` of content already read; ``source`` names it in errors."""
    if isinstance(history, Mapping):
        selector = history.get("selector")
        windows = history.get("decisions")
        if windows is None:
            windows = history.get("windows", [])
            # the callback's "windows" is the schedule ([start, end] pairs), not decisions
            if isinstance(windows, Sequence) and windows and all(not isinstance(w, Mapping) for w in windows):
                windows = []
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        windows, selector = history, None
    else:
        raise ValueError(f"{source}: expected an object with a 'decisions' or 'windows' list, or a list of windows")
    if not isinstance(windows, Sequence) or isinstance(windows, (str, bytes)):
        raise ValueError(f"{source}: the window records must be a list, got {type(windows).__name__}")
    unit = history.get("window_unit") if isinstance(history, Mapping) else None
    out = []
    for idx, window in enumerate(windows):
        if not isinstance(window, Mapping):
            logger.warning("%s: window %d is not an object; ignored", source, idx)
            continue
        layers = []
        for entry in window.get("layers") or ():
            if not isinstance(entry, Mapping) or not _is_int(entry.get("stage")) or not _is_int(entry.get("block")):
                continue
            stage, block = int(entry["stage"]), int(entry["block"])
            skip = entry.get("skip", False)
            if isinstance(skip, np.bool_):
                skip = bool(skip)
            if not isinstance(skip, bool):
                # "false" or 0.3 read as bool() would mark a layer the run kept as skipped
                raise ValueError(
                    f"{source}: window {idx + 1}, layer stage {stage} block {block}: 'skip' must be true or false, "
                    f"got {skip!r}"
                )
            layers.append(
                dict(
                    stage=stage,
                    block=block,
                    d=_as_float(entry.get("d_t", entry.get("d"))),
                    mapped=_as_float(entry.get("mapped")),
                    skip=skip,
                )
            )
        layers.sort(key=lambda e: (e["stage"], e["block"]))
        out.append(dict(label=_window_label(window, idx, unit), layers=layers, quantile=_as_float(window.get("quantile"))))
    # the layers the model already skipped when the run began (read defensively, as the window records are)
    before = history.get("skipped_before_run") if isinstance(history, Mapping) else None
    if not isinstance(before, Sequence) or isinstance(before, (str, bytes)):
        before = ()
    skipped_before = sorted((int(e["stage"]), int(e["block"])) for e in before
                            if isinstance(e, Mapping) and _is_int(e.get("stage")) and _is_int(e.get("block")))
    return dict(selector=selector if isinstance(selector, Mapping) else None, windows=out,
                skipped_before=skipped_before)


def _read_history(history: Any) -> Tuple[Any, str]:
    """The parsed content of a history given as a path (or as content), and how to name it in errors."""
    if not isinstance(history, (str, os.PathLike)):
        return history, "pruning history"
    try:
        with open(history, encoding="utf-8") as f:
            return json.load(f), str(history)
    except json.JSONDecodeError as err:
        raise ValueError(f"{history} is not valid JSON: {err}") from None


def _plain_json(obj: Any) -> Any:
    """``obj`` with NumPy / one-element torch scalars as Python numbers, tuples as lists and NaN / inf as
    None: what ``json.dump(..., allow_nan=False)`` writes as standard JSON (bare ``NaN`` is not JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_json(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _plain_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _check_history_fits(history: Optional[Dict[str, Any]], net: LayerAttentionResNet, architecture: str) -> None:
    """Refuse a pruning history that names layers ``net`` does not have, or skips a layer that can never be
    skipped: the history of another model, whose card would describe layers this release does not have."""
    if not history:
        return
    sizes = net.stage_sizes
    # the windows' layers, and those the run began with skipped (skipped_before_run)
    entries = [(window["label"], layer["stage"], layer["block"], layer["skip"])
               for window in history["windows"] for layer in window["layers"]]
    entries += [("skipped_before_run", i, j, True) for i, j in history.get("skipped_before", ())]
    for label, i, j, skip in entries:
        where = f"pruning history ({label}) names attention layer {i}.{j} (stage {i}, block {j})"
        if net.attn_type is None:
            raise ValueError(f"{where}, but {architecture} is a plain ResNet without attention layers")
        if not (0 <= i < len(sizes) and 0 <= j < sizes[i]):
            raise ValueError(
                f"{where}, which {architecture} (blocks per stage {sizes}) does not have: "
                "is it the history of another model?"
            )
        if skip and j == 0:
            raise ValueError(f"{where} as skipped, but the first block of a stage is never skipped: is it the "
                             "history of another model?")


def _is_int(value: Any) -> bool:
    # NumPy integers too (numbers.Integral), so that a history built in Python is not silently dropped
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _as_float(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _window_label(window: Mapping, idx: int, unit: Optional[str] = None) -> str:
    number = window.get("window") if _is_int(window.get("window")) else idx + 1
    if isinstance(window.get("name"), str):
        return window["name"]
    unit = window.get("unit") or unit or "epoch"
    if "start" in window and "end" in window:
        span = f"{window['start']}" if window["start"] == window["end"] else f"{window['start']}-{window['end']}"
        return f"Window {number} ({unit}{'' if window['start'] == window['end'] else 's'} {span})"
    epochs = window.get("epochs")
    if isinstance(epochs, Sequence) and len(epochs) == 2 and not isinstance(epochs, str):
        return f"Window {number} (epochs {epochs[0]}-{epochs[1]})"
    if "start_epoch" in window and "end_epoch" in window:
        return f"Window {number} (epochs {window['start_epoch']}-{window['end_epoch']})"
    if "epoch" in window:
        return f"Window {number} (epoch {window['epoch']})"
    if "step" in window:
        return f"Window {number} (step {window['step']})"
    return f"Window {number}"


def _plot_history(history: Dict[str, Any], path: Path) -> bool:
    """PNG of d_t per layer, one line per window, skipped layers marked. False when there is nothing to plot."""
    windows = [w for w in history["windows"] if any(layer["d"] is not None for layer in w["layers"])]
    if not windows:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = sorted({(layer["stage"], layer["block"]) for w in windows for layer in w["layers"]})
    position = {name: i for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names)), 3.6), dpi=100)
    try:
        for k, w in enumerate(windows):
            color = f"C{k % 10}"
            for n, stage in enumerate(sorted({l["stage"] for l in w["layers"]})):
                pts = [(position[(l["stage"], l["block"])], l["d"]) for l in w["layers"] if l["stage"] == stage and l["d"] is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, color=color, label=w["label"] if n == 0 else None)
            skipped = [(position[(l["stage"], l["block"])], l["d"]) for l in w["layers"] if l["skip"] and l["d"] is not None]
            if skipped:
                sx, sy = zip(*skipped)
                ax.scatter(sx, sy, marker="x", s=60, color="red", zorder=3)
        ax.scatter([], [], marker="x", color="red", label="skipped at this window")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{s}.{b}" for s, b in names], rotation=90, fontsize=7)
        ax.set_xlabel("layer (stage.block)")
        ax.set_ylabel("d_t (KL to previous layer)")
        if all(l["d"] > 0 for w in windows for l in w["layers"] if l["d"] is not None):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# model card


def _training_rows(training: Any) -> List[Tuple[str, Any]]:
    if training is None:
        return []
    if hasattr(training, "to_dict") and not isinstance(training, Mapping):
        training = {k: v for k, v in training.to_dict().items() if k in _TRAINING_KEYS}
    if not isinstance(training, Mapping):
        raise ValueError(f"training settings must be a dict or TrainingArguments, got {type(training).__name__}")
    max_steps = training.get("max_steps")
    # the Trainer runs max_steps when it is positive and ignores num_train_epochs; -1 means "not set"
    by_steps = isinstance(max_steps, numbers.Real) and max_steps > 0
    hidden = {"num_train_epochs"} if by_steps else {"max_steps"} if max_steps is not None and max_steps <= 0 else set()
    return [(str(k), v) for k, v in training.items() if v is not None and k not in hidden]


def _metric_rows(metrics: Optional[Mapping[str, Any]]) -> List[Tuple[str, Any]]:
    if not metrics:
        return []
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict of name -> value, got {type(metrics).__name__}")
    return [(str(k), _metric_value(str(k), v)) for k, v in metrics.items() if not _is_bookkeeping(str(k))]


def _metric_value(name: str, value: Any) -> Any:
    """A metric as a plain Python number (NumPy scalars and one-element tensors, e.g. from scikit-learn
    or torchmetrics, included) or string; anything else is refused, naming the metric."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, RuntimeError, TypeError):
            count = value.numel() if hasattr(value, "numel") else getattr(value, "size", "several")
            raise ValueError(
                f"metric {name!r} must be a single number, got {type(value).__name__} with {count} elements"
            ) from None
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            # bare NaN is not JSON, and the Hub's model-index needs a number
            raise ValueError(f"metric {name!r} is {value}: a model card's results must be finite (leave it out of metrics)")
        return round(float(value), 4)
    raise ValueError(f"metric {name!r} must be a number or a string, got {type(value).__name__}: {value!r}")


# what trainer.evaluate() reports besides the metrics: not a result of the model
_BOOKKEEPING_SUFFIXES = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def _is_bookkeeping(name: str) -> bool:
    bare = re.sub(r"^(eval|test|train)_", "", name)
    return bare in ("epoch", "step", "global_step") or bare.endswith(_BOOKKEEPING_SUFFIXES)


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4g}"


def render_model_card(
    config: ElaConfig,
    net: LayerAttentionResNet,
    *,
    history: Optional[Dict[str, Any]] = None,
    plot_file: Optional[str] = None,
    training: Any = None,
    metrics: Optional[Mapping[str, Any]] = None,
    dataset: Optional[Union[str, List[str]]] = None,
    repo_id: Optional[str] = None,
    model_name: Optional[str] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    template_path: Optional[PathLike] = None,
    revision: Optional[str] = None,
):
    """The model card (a ``huggingface_hub.ModelCard``) of ``net`` described by ``config``.

    ``revision``: the branch the release is pushed to; the usage code then loads that revision.

    Metadata: ``library_name: timm``, ``pipeline_tag: image-classification``, tags, ``datasets``,
    ``metrics`` and, when both a dataset and metrics are known, a ``model-index`` with the results.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .models import MODEL_ARGS

    template_path = Path(template_path or MODEL_CARD_TEMPLATE)
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model card template {template_path} not found (it ships in the source tree's model_cards/); "
            "pass template_path="
        )
    architecture = config.architecture
    _check_history_fits(history, net, architecture)
    arch_args = dict(MODEL_ARGS[architecture], **(config.model_args or {}))
    mask = config.skip_mask
    attn_type = arch_args.get("attn_type")
    attention_kind = {"mrla_b": "MRLA-B layer attention", "mrla_l": "MRLA-L layer attention"}.get(attn_type, "plain ResNet")
    stage_sizes = list(arch_args["layers"])
    total_layers = sum(stage_sizes) if attn_type else 0
    skipped_layers = sum(sum(stage) for stage in mask) if mask else 0
    # the release's parameters: the network minus the attention layers it leaves out
    num_params = sum(p.numel() for p in net.parameters()) - sum(
        p.numel() for stage in net.stages for blk in stage if blk.attn is not None and blk.is_skipped
        for p in blk.attn.parameters()
    )
    attention_params = sum(
        p.numel() for stage in net.stages for blk in stage if blk.attn is not None and not blk.is_skipped
        for p in blk.attn.parameters()
    )

    windows = []
    first_skip: Dict[Tuple[int, int], str] = {}
    # layers the model skipped when the recorded run began (a pruned checkpoint fine-tuned and pruned further)
    skipped_before = {tuple(e) for e in (history or {}).get("skipped_before", ())}
    if history:
        for w in history["windows"]:
            windows.append(
                dict(
                    label=w["label"],
                    quantile=_fmt(w.get("quantile")) or None,
                    layers=[dict(l, d=_fmt(l["d"]), mapped=_fmt(l["mapped"])) for l in w["layers"]],
                )
            )
            for l in w["layers"]:
                if l["skip"]:
                    first_skip.setdefault((l["stage"], l["block"]), w["label"])
    skip_table = []
    if mask:
        for i, stage in enumerate(mask):
            blocks = [j for j, s in enumerate(stage) if s]
            when = sorted({first_skip.get((i, j), "before this run" if (i, j) in skipped_before else "not recorded")
                           for j in blocks})
            skip_table.append(
                dict(stage=i, blocks=len(stage), skipped=blocks, windows=", ".join(when) if blocks else "")
            )

    # layers a window skipped, or the run began with skipped, that this model runs (its weights predate that)
    undone_skips = [
        f"{i}.{j}" for (i, j) in sorted({*first_skip, *skipped_before})
        if not (mask and i < len(mask) and j < len(mask[i]) and mask[i][j])
    ]

    selector = None
    if history and history.get("selector"):
        selector = ", ".join(f"{k}={v}" for k, v in history["selector"].items())
    datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
    metric_rows = _metric_rows(metrics)
    eval_results = None
    if datasets and metric_rows:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=datasets[0],
                dataset_name=datasets[0],
                metric_type=_metric_type(name),
                metric_name=name,
                metric_value=value,
            )
            for name, value in metric_rows
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ] or None
    name = model_name or (repo_id.split("/")[-1] if repo_id else architecture)
    tags = ["image-feature-extraction" if not net.num_classes else "image-classification", "timm", "transformers", "ela_hf", "layer-attention", attn_type or "resnet"]
    if skipped_layers:
        tags.append("pruned")
    headless = not net.num_classes
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-feature-extraction" if headless else "image-classification",
        license=license or config.pretrained_cfg.get("license") or "apache-2.0",
        tags=tags,
        datasets=datasets or None,
        metrics=sorted({_metric_type(n) for n, _ in metric_rows}) or None,
        base_model=base_model,
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    hub_ref = repo_id or f"path/to/{name}"
    if not attn_type:
        summary = f"`{architecture}`, a plain ResNet baseline of the ELA experiments."
    elif windows:
        summary = (f"`{architecture}` ({attention_kind}) with {skipped_layers} of {total_layers} attention layers "
                   "skipped by ELA's KL/EBQM pruning.")
    elif skipped_layers:
        summary = f"`{architecture}` ({attention_kind}) with {skipped_layers} of {total_layers} attention layers skipped."
    else:
        summary = f"`{architecture}` ({attention_kind}) with all {total_layers} attention layers active (no ELA pruning)."
    pcfg = config.pretrained_cfg or {}
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=name,
        summary=summary,
        architecture=architecture,
        attention_kind=attention_kind,
        block=arch_args.get("block", "bottleneck"),
        stage_sizes=stage_sizes,
        num_params=num_params,
        attention_params=attention_params,
        active_layers=total_layers - skipped_layers,
        skipped_layers=skipped_layers,
        total_layers=total_layers,
        input_size=list(pcfg.get("input_size") or []),
        mean=list(pcfg.get("mean") or []),
        std=list(pcfg.get("std") or []),
        crop_pct=pcfg.get("crop_pct"),
        interpolation=pcfg.get("interpolation"),
        num_classes=config.num_labels if net.num_classes else "none (feature extractor)",
        slim=config.is_slim,
        skip_table=skip_table,
        undone_skips=undone_skips,
        windows=windows,
        selector=selector,
        plot_file=plot_file,
        training=_training_rows(training),
        metrics=metric_rows,
        timm_id=(f"hf-hub:{hub_ref}" + (f"@{revision}" if revision else "")) if repo_id else f"local-dir:{hub_ref}",
        hf_id=hub_ref,
        revision=revision if repo_id else None,
        headless=headless,
        num_channels=config.num_channels,
        image_mode={1: "L", 3: "RGB", 4: "RGBA"}.get(config.num_channels),
    )
    # the template's control blocks leave runs of blank lines; markdown needs at most one
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def _metric_type(name: str) -> str:
    name = name.lower().removeprefix("eval_").removeprefix("test_")
    return "accuracy" if name in ("acc", "top1", "acc1", "top1_acc", "accuracy") else name


# --------------------------------------------------------------------------------------------------
# export and push


def export_pruned(
    model: nn.Module,
    out_dir: PathLike,
    *,
    pruning_history: Union[None, PathLike, Mapping, Sequence] = None,
    training_args: Any = None,
    metrics: Optional[Mapping[str, Any]] = None,
    dataset: Optional[Union[str, List[str]]] = None,
    id2label: Optional[Mapping[int, str]] = None,
    repo_id: Optional[str] = None,
    model_name: Optional[str] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    card_template: Optional[PathLike] = None,
    overwrite: bool = False,
    verify: bool = True,
    revision: Optional[str] = None,
) -> Path:
    """Write the slim release of ``model`` to ``out_dir`` and return its path.

    ``model``: a timm ELA model (``timm.create_model("ela_resnet50", ...)``), an ``ElaModel`` /
    ``ElaForImageClassification``, or either wrapped by DDP / accelerate / ``torch.compile``. A model that
    FSDP shards is refused with the recipe to follow: gather a full state dict on every process and export
    a model that holds it.

    The folder holds ``config.json`` (transformers + timm keys, mask in ``skip_mask`` and
    ``model_args["skip_mask"]``), ``model.safetensors`` (timm key names, no weights for skipped attention
    layers), ``README.md`` (the model card), and, with a pruning history, ``pruning_history.json`` and the
    ``d_t_per_window.png`` plot. ``training_args`` (a dict or ``TrainingArguments``), ``metrics`` and
    ``dataset`` (Hub dataset id) go into the card, and ``repo_id`` / ``revision`` into its usage code;
    ``card_template`` replaces ``model_cards/ela_model_card.md`` (a Jinja2 template receiving the same variables). With ``verify`` (default), the reduced model is built from
    the written config and must reproduce the masked model's outputs.

    The folder is written under a temporary name next to ``out_dir`` and renamed into place at the end: an
    interrupted export leaves no ``out_dir``. An existing ``out_dir`` raises ``FileExistsError`` unless
    ``overwrite=True``, and always when it holds sub-folders or Trainer files (``trainer_state.json``,
    ``training_args.bin``): a training ``output_dir`` is never replaced. A ``preprocessor_config.json`` saved
    beside the earlier export is kept, with a warning.
    """
    _refuse_sharded(model)
    out_dir = Path(out_dir)
    if out_dir.parent.is_dir():
        _clean_up_abandoned_exports(out_dir)
    _check_replaceable(out_dir, overwrite)
    follow_skip_buffers(model)  # an EMA copy's flags, copied in place, before anything reads the mask
    net, config = _network_and_config(model, id2label)
    mask = get_skip_mask(net) if net.attn_type is not None else None
    slim_config = _slim_config(config, mask)
    state = {k: v.detach().to("cpu").contiguous() for k, v in slim_state_dict(net).items()}
    if verify:
        _verify_slim(net, slim_config, state)
    history = raw_history = None
    if pruning_history is not None:  # read once: parsed for the card, written back as standard JSON
        raw_history, source = _read_history(pruning_history)
        history = _parse_history(raw_history, source)
    _check_history_fits(history, net, config.architecture)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{_process_tag()}-", dir=out_dir.parent))
    try:
        from safetensors.torch import save_file

        slim_config.to_json_file(tmp / CONFIG_NAME)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        plot_file = None
        if history is not None:
            with open(tmp / HISTORY_NAME, "w", encoding="utf-8") as f:
                json.dump(_plain_json(raw_history), f, indent=2, allow_nan=False)
            if _plot_history(history, tmp / PLOT_NAME):
                plot_file = PLOT_NAME
        card = render_model_card(
            slim_config,
            net,
            history=history,
            plot_file=plot_file,
            training=training_args,
            metrics=metrics,
            dataset=dataset,
            repo_id=repo_id,
            model_name=model_name or (None if repo_id else out_dir.name),
            base_model=base_model,
            license=license,
            template_path=card_template,
            revision=revision,
        )
        card.save(tmp / "README.md")
        _keep_processor_config(out_dir, tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# every file an export can write, and what marks a folder as more than an earlier export: an export has no
# sub-folders and no Trainer files
PROCESSOR_NAME = "preprocessor_config.json"  # a user's AutoImageProcessor.save_pretrained beside an export
_EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", HISTORY_NAME, PLOT_NAME)
_TRAINER_FILES = ("trainer_state.json", "training_args.bin")
# weight files of other layouts that a release (one model.safetensors) replaces
_OTHER_WEIGHT_FILES = (
    "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
)


# what a user's save_pretrained(variant=...) adds beside an export (model.fp16.safetensors, its shards and index)
_VARIANT_WEIGHT_FILES = ("model.*.safetensors", "model.safetensors.index.*.json", "pytorch_model.*.bin",
                         "pytorch_model.bin.index.*.json")


def _export_may_hold(name: str) -> bool:
    """A file an export writes, or that the Hub / transformers tools add beside one."""
    return (
        name in _EXPORT_FILES
        or name in (PROCESSOR_NAME, ".gitattributes")
        or any(fnmatch.fnmatch(name, pattern) for pattern in _OTHER_WEIGHT_FILES + _VARIANT_WEIGHT_FILES)
    )


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """An existing ``out_dir`` is replaced only with ``overwrite``, and never when it holds training output."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; export_pruned writes a folder")
    kept = sorted(p.name + "/" for p in out_dir.iterdir() if p.is_dir())
    kept += [name for name in _TRAINER_FILES if (out_dir / name).exists()]
    # files an export does not write (a dataset, notes): the folder is not an earlier export
    kept += sorted(
        p.name for p in out_dir.iterdir()
        if not p.is_dir() and p.name not in _TRAINER_FILES and not _export_may_hold(p.name)
    )
    if kept:  # named first: overwrite=True is no way out here
        raise FileExistsError(
            f"{out_dir} is not an earlier export: it holds {_some(kept, 5)}, which overwrite=True would delete, so it "
            "is never replaced. Nothing was written; export to another folder (not a training output_dir)"
        )
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists (an earlier export); pass overwrite=True to replace it")


def _keep_processor_config(out_dir: Path, tmp: Path) -> None:
    """A ``preprocessor_config.json`` saved beside an earlier export is the user's, not the export's: it goes into
    the new folder (as a push keeps it on the Hub), named in a warning, since it may not fit the new model."""
    saved = out_dir / PROCESSOR_NAME
    if saved.is_file():
        shutil.copy2(saved, tmp / PROCESSOR_NAME)
        logger.warning("export_pruned: kept the %s saved beside the earlier export in %s (pipelines and "
                       "AutoImageProcessor read it, not config.json's pretrained_cfg); delete it if it does not "
                       "fit this model", PROCESSOR_NAME, out_dir)


def _clean_up_abandoned_exports(out_dir: Path) -> None:
    """What exports into ``out_dir`` left when their process died (killed, out of memory), on this host: a
    half-written ``.<name>.partial-*`` folder is deleted; an earlier export parked as ``.<name>.old-*`` while
    the new one was renamed into place goes back to ``out_dir`` when that is missing, and is deleted otherwise."""
    pattern = re.compile(re.escape(f".{out_dir.name}.") + r"(?P<kind>partial|old)-" + _PROCESS_TAGGED)
    for entry in sorted(os.scandir(out_dir.parent), key=lambda e: e.name):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False) or not _process_gone(match["host"], match["pid"]):
            continue
        if match["kind"] == "old" and not out_dir.exists():
            os.rename(entry.path, out_dir)
            logger.warning("export_pruned: an export into %s was interrupted while replacing the earlier one; "
                           "the earlier export was put back", out_dir)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700
    for file in tmp.iterdir():  # safetensors writes its files 0600: a release is for others to read
        os.chmod(file, 0o666 & ~umask)
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    # park the old folder first: a crash between the two renames leaves no out_dir, never a mixed one
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{_process_tag()}-", dir=out_dir.parent))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # the earlier export goes back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)


_PUSH_PREFIX = "ela_hf-push-"


# a push's temporary folder: TemporaryDirectory removes it only when the process lives to leave the with block
_PUSH_FOLDER = re.compile(re.escape(_PUSH_PREFIX) + _PROCESS_TAGGED)


def push_pruned_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    endpoint: Optional[str] = None,
    **export_kwargs,
):
    """Export the slim release of ``model`` (see :func:`export_pruned`) and upload it to ``repo_id`` in one commit.

    The repository is created when missing; a ``repo_id`` without a namespace goes to the token's user
    (resolved first, so the card's usage code names the full id, and ``revision`` too). Returns
    huggingface_hub's ``CommitInfo``. Nothing is uploaded if the export fails, and the single commit means a
    repository never holds half a release: it also deletes the history and plot an earlier release left
    when this one has none. ``private`` applies to a repository this call creates; for an existing one
    whose visibility differs, a warning says so (change it with ``HfApi.update_repo_settings``).
    """
    from huggingface_hub import HfApi

    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        raise ValueError(
            f"revision={revision!r} is a commit id; a push goes to a branch: name one (it is created if missing)"
        )
    api = HfApi(endpoint=endpoint, token=token)
    if "/" not in repo_id:
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    net, _ = _network_and_config(model)
    skipped = sum(sum(s) for s in get_skip_mask(net)) if net.attn_type is not None else 0
    card_revision = None if create_pr else revision
    with contextlib.suppress(OSError):  # (a temp folder that cannot be listed has nothing to clean up)
        _remove_abandoned_folders(tempfile.gettempdir(), _PUSH_FOLDER)  # of pushes killed mid-export or mid-upload
    with tempfile.TemporaryDirectory(prefix=f"{_PUSH_PREFIX}{_process_tag()}-") as tmp:
        folder = export_pruned(model, Path(tmp) / "release", repo_id=repo_id, revision=card_revision, **export_kwargs)
        # only asked when it matters: whether private= can take effect
        existed = private is not None and api.repo_exists(repo_id, repo_type="model")
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = repo_url.repo_id
        if existed:
            is_private = getattr(api.model_info(repo_id), "private", None)
            if is_private is not None and bool(is_private) != bool(private):
                warnings.warn(
                    f"push_pruned_to_hub: {repo_id} already exists and is {'private' if is_private else 'public'}; "
                    f"private={private} applies only to a repository it creates, so its visibility is unchanged"
                )
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # the files an export may write but this one did not (an earlier release's history and plot), and
        # weights in other layouts (an earlier push_to_hub's shards or .bin files): they would be stale
        stale = sorted(name for name in _EXPORT_FILES if not (folder / name).exists()) + list(_OTHER_WEIGHT_FILES)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload slim ELA release ({skipped} attention layers skipped)",
            revision=revision,
            create_pr=create_pr,
            delete_patterns=stale or None,
        )
