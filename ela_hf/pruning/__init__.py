"""Staged KL/EBQM pruning of attention layers (ELA): selectors, the ``transformers.Trainer`` callback, and
:func:`skip_redundant_layers` (one decision) for training loops of your own."""
from .callback import HISTORY_FILE_NAME, LOG_PREFIX, ElaPruningCallback
from .decision import skip_redundant_layers
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
    "skip_redundant_layers",
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
