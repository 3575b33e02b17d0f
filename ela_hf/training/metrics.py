"""Top-1 / top-5 accuracy for ``transformers.Trainer``.

``top_k_predictions`` goes in as ``preprocess_logits_for_metrics``: each process keeps only the five best
class ids per image, so the Trainer gathers ``[N, 5]`` integers across processes instead of ``[N, classes]``
logits (ImageNet's validation set would be 200 MB of float32 logits).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

__all__ = ["TOP_K", "top_k_predictions", "compute_accuracy"]

TOP_K = 5


def top_k_predictions(logits, labels) -> torch.Tensor:
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    k = min(TOP_K, logits.shape[-1])
    return logits.topk(k, dim=-1).indices


def compute_accuracy(eval_pred) -> Dict[str, float]:
    """``{"top1": ..., "top5": ...}`` (fractions) from ``top_k_predictions`` output and the labels.

    With fewer than five classes "top5" is the top-``num_classes`` accuracy, i.e. 1.0.
    """
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
    return {"top1": float(hits[:, 0].mean()), "top5": float(hits[:, :TOP_K].any(axis=1).mean())}
