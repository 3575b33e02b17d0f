"""Top-1 / top-5 accuracy for ``transformers.Trainer``.

``top_k_predictions`` goes in as ``preprocess_logits_for_metrics``: each process keeps only the five best
class ids per image, so the Trainer gathers ``[N, 5]`` integers across processes instead of ``[N, classes]``
logits (ImageNet's validation set would be 200 MB of float32 logits). With five classes or fewer every image's
label is among the five best, so top-5 says nothing: only the best class is kept, and only top-1 is reported.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["TOP_K", "top_k_predictions", "compute_accuracy", "check_metric_for_best_model"]

TOP_K = 5


def top_k_predictions(logits, labels) -> torch.Tensor:
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    k = TOP_K if logits.shape[-1] > TOP_K else 1  # top-5 of <= 5 classes is 1.0 by construction
    return logits.topk(k, dim=-1).indices


def compute_accuracy(eval_pred) -> Dict[str, float]:
    """``{"top1": ..., "top5": ...}`` (fractions) from ``top_k_predictions`` output and the labels; ``{"top1": ...}``
    alone when the predictions rank fewer than five classes (``top_k_predictions`` of five classes or fewer)."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim == 1:
        predictions = predictions[:, None]
    if len(labels) == 0:
        raise ValueError("the evaluation set is empty")
    hits = predictions == labels[:, None]
    metrics = {"top1": float(hits[:, 0].mean())}
    if predictions.shape[1] >= TOP_K:
        metrics["top5"] = float(hits[:, :TOP_K].any(axis=1).mean())
    return metrics


def check_metric_for_best_model(metric: Optional[str], num_classes: int) -> None:
    """``--metric_for_best_model`` must be one of the metrics the evaluation reports (``loss``, ``top1``, and
    ``top5`` with more than five classes), with or without ``eval_``: the Trainer would otherwise stop with a
    ``KeyError`` at the first evaluation, after a whole epoch of training."""
    if metric is None:
        return
    reported = ["loss", "top1"] + (["top5"] if num_classes > TOP_K else [])
    if (metric[len("eval_"):] if metric.startswith("eval_") else metric) not in reported:
        why = f" (top5 is not reported with {num_classes} classes: every label is among the five best)" \
            if metric in ("top5", "eval_top5") else ""
        raise ValueError(f"--metric_for_best_model {metric!r} is not a metric the evaluation reports{why}; "
                         f"choose one of {', '.join(reported)}")
