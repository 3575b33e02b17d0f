"""Staged KL/EBQM pruning of attention layers (ELA): selectors and the ``transformers.Trainer`` callback."""
from .callback import HISTORY_FILE_NAME, LOG_PREFIX, ElaPruningCallback
from .selectors import (
    EbqmSelector,
    ExponentialQuantileSelector,
    FixedCountSelector,
    GammaQuantileSelector,
    LayerSelector,
    NormalQuantileSelector,
    Selection,
    SigmoidSelector,
    SoftmaxSelector,
    ThresholdSelector,
    selector_from_dict,
)

__all__ = [
    "ElaPruningCallback",
    "HISTORY_FILE_NAME",
    "LOG_PREFIX",
    "LayerSelector",
    "Selection",
    "EbqmSelector",
    "FixedCountSelector",
    "ThresholdSelector",
    "GammaQuantileSelector",
    "ExponentialQuantileSelector",
    "NormalQuantileSelector",
    "SigmoidSelector",
    "SoftmaxSelector",
    "selector_from_dict",
]
