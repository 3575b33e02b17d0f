"""Which attention layers to skip, given one window-averaged KL divergence per layer (SPEC.md section 4).

Every selector takes ``d``: one mean ``d_t`` per candidate layer (the active, non-first attention layers
of the whole network, in network order) and answers one bool per layer (True = skip).
``select(d)`` returns just those bools; ``explain(d)`` also returns what the decision was based on
(the quantile, which layers were candidates, and the mapped value each candidate was thresholded on),
which is what :class:`~ela_hf.pruning.ElaPruningCallback` logs.

:class:`EbqmSelector` is the paper's Enhanced Beta Quantile Mapping (Algorithm 1). The others are the
baselines of its ablations (paper section 5 and Appendix A), under the same interface:

==============================  ==========================================================================
:class:`FixedCountSelector`     skip the ``k`` smallest ``d_t`` (no quantile, no threshold)
:class:`ThresholdSelector`      quantile + min-max normalisation, threshold without a mapping
:class:`GammaQuantileSelector`  ... mapped through a Gamma CDF ("GQM")
:class:`ExponentialQuantileSelector`  ... mapped through an Exponential CDF ("EQM")
:class:`NormalQuantileSelector` ... mapped through a Normal CDF
:class:`SigmoidSelector`        ... mapped through a sigmoid
:class:`SoftmaxSelector`        ... mapped through a softmax over the candidates
==============================  ==========================================================================

Degenerate inputs, for every quantile-based selector (EBQM included):

* a non-finite ``d_t`` (NaN: nothing was recorded for that layer; +-inf) is no evidence of redundancy:
  that layer is never skipped and takes no part in the quantile or the normalisation;
* fewer than two finite values: nothing is skipped (there is nothing to compare a layer with);
* no value strictly below the ``q``-quantile (e.g. all values equal): no candidates, nothing is skipped;
* zero range, i.e. every candidate has the same ``d_t`` (always so for a single candidate): the
  min-max normalisation ``0/0`` is defined as ``x_t = 0``, since each candidate *is* the candidates'
  minimum. This is the limit of the general case, where the smallest candidate always maps to 0.
  With EBQM that gives ``y_t = BetaCDF(0) = 0``, so the candidates are skipped whenever ``tau > 0``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Type

import numpy as np
from scipy import special, stats

__all__ = [
    "Selection",
    "LayerSelector",
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


@dataclass(frozen=True)
class Selection:
    """One selector decision and what it was based on (one entry per layer, network order).

    ``mapped`` is the value a candidate was compared with the threshold on (None for non-candidates and
    for selectors without a mapping); ``quantile`` is the ``q``-quantile of the finite ``d_t`` (None when
    the selector uses none or there were fewer than two finite values).
    """

    skip: List[bool]
    candidate: List[bool]
    mapped: List[Optional[float]]
    quantile: Optional[float] = None


def _as_vector(d: Any) -> np.ndarray:
    try:
        arr = np.asarray(d, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"d must be a sequence of numbers (one mean KL per layer), got {d!r}") from e
    if arr.ndim != 1:
        raise ValueError(f"d must be one-dimensional (one mean KL per layer), got shape {tuple(arr.shape)}")
    return arr


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    value = _real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def _tau(value: Any) -> float:
    value = _real("tau", value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {value!r}")
    return value


def _quantile_level(value: Any) -> float:
    value = _real("q", value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"q must be in the open interval (0, 1), got {value!r}")
    return value


_REGISTRY: Dict[str, Type["LayerSelector"]] = {}


class LayerSelector:
    """Base class: subclasses implement :meth:`explain`, set a unique ``name``, and keep each constructor
    argument in the attribute of the same name (or override :meth:`config`).

    Subclasses register themselves under ``name`` so that a selector stored in a checkpoint's
    ``trainer_state.json`` (as :meth:`to_dict`) can be rebuilt on resume by :func:`selector_from_dict`.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            _REGISTRY[cls.name] = cls

    def explain(self, d: Sequence[float]) -> Selection:
        raise NotImplementedError

    def select(self, d: Sequence[float]) -> List[bool]:
        """One bool per layer of ``d`` (network order): True = skip that attention layer."""
        return self.explain(d).skip

    def config(self) -> Dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this selector.

        By default every named argument of the subclass's ``__init__``, in signature order, read back
        from the attribute of the same name (what the built-in selectors store, validated). A subclass
        that stores its arguments otherwise overrides this.
        """
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names = [p.name for p in inspect.signature(type(self).__init__).parameters.values() if p.kind in kinds]
        missing = [n for n in names[1:] if not hasattr(self, n)]
        if missing:
            raise NotImplementedError(
                f"{type(self).__name__} does not store its constructor arguments {missing} as attributes of the "
                "same name: override config()"
            )
        return {n: getattr(self, n) for n in names[1:]}  # names[0] is self

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, **self.config()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerSelector) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_dict().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def selector_from_dict(spec: Dict[str, Any]) -> LayerSelector:
    """Inverse of :meth:`LayerSelector.to_dict`."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a selector spec must be a dict with a 'name' key, got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if name not in _REGISTRY:
        raise ValueError(f"unknown selector {name!r}; known: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"invalid arguments for selector {name!r}: {e}") from e


class _QuantileMappingSelector(LayerSelector):
    """SPEC section 4 with a pluggable mapping: quantile -> candidates -> min-max -> map -> threshold."""

    def __init__(self, tau: float, q: float):
        self.tau = _tau(tau)
        self.q = _quantile_level(q)

    def _map(self, x: np.ndarray) -> np.ndarray:
        """Normalised candidate values in [0, 1] -> the values compared with ``tau``."""
        raise NotImplementedError

    def explain(self, d: Sequence[float]) -> Selection:
        d = _as_vector(d)
        n = d.shape[0]
        finite = np.isfinite(d)
        candidate = np.zeros(n, dtype=bool)
        quantile = None
        if finite.sum() >= 2:
            quantile = float(np.quantile(d[finite], self.q, method="linear"))
            candidate = finite & (d < quantile)
        mapped: List[Optional[float]] = [None] * n
        skip = np.zeros(n, dtype=bool)
        if candidate.any():
            values = d[candidate]
            lo, hi = values.min(), values.max()
            # zero range (one candidate, or all equal): each candidate is the minimum, so x = 0
            x = np.zeros_like(values) if hi == lo else (values - lo) / (hi - lo)
            y = np.asarray(self._map(x), dtype=np.float64)
            idx = np.flatnonzero(candidate)
            skip[idx] = y < self.tau
            for i, v in zip(idx, y):
                mapped[i] = float(v)
        return Selection(skip=skip.tolist(), candidate=candidate.tolist(), mapped=mapped, quantile=quantile)


class EbqmSelector(_QuantileMappingSelector):
    """Enhanced Beta Quantile Mapping (paper Algorithm 1, SPEC section 4).

    ``Q = quantile(D, q)``; candidates are the layers with ``d_t < Q``; their ``d_t`` are min-max
    normalised to ``x_t`` in [0, 1] and mapped through the Beta CDF, ``y_t = I_x(alpha, beta)``
    (scipy's regularised incomplete beta); a candidate is skipped iff ``y_t < tau``. The Beta CDF
    spreads clustered normalised values apart before thresholding, so small run-to-run shifts of the KL
    values do not flip many decisions at once. See the module docstring for the degenerate cases.

    Args:
        q: quantile level in (0, 1); the paper does not state it, 0.5 by default.
        alpha, beta: Beta shape parameters (> 0). Paper: 5 and 1 for CIFAR, 2 and 5 for ImageNet/COCO.
        tau: threshold in [0, 1]. Paper: 0.3 CIFAR, 0.25 ImageNet, 0.2 COCO.
    """

    name = "ebqm"

    def __init__(self, q: float = 0.5, alpha: float = 2.0, beta: float = 5.0, tau: float = 0.25):
        super().__init__(tau=tau, q=q)
        self.alpha = _positive("alpha", alpha)
        self.beta = _positive("beta", beta)

    def _map(self, x: np.ndarray) -> np.ndarray:
        return stats.beta.cdf(x, self.alpha, self.beta)


class FixedCountSelector(LayerSelector):
    """Ablation baseline: skip the ``k`` layers with the smallest finite ``d_t`` (ties: earlier layer first).

    Skips every finite layer when there are fewer than ``k``; non-finite ``d_t`` are never skipped.
    """

    name = "fixed_count"

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        self.k = int(k)

    def explain(self, d: Sequence[float]) -> Selection:
        d = _as_vector(d)
        finite = np.isfinite(d)
        idx = np.flatnonzero(finite)
        order = idx[np.argsort(d[idx], kind="stable")][: self.k]
        skip = np.zeros(d.shape[0], dtype=bool)
        skip[order] = True
        return Selection(skip=skip.tolist(), candidate=finite.tolist(), mapped=[None] * d.shape[0])


class ThresholdSelector(_QuantileMappingSelector):
    """Ablation baseline: EBQM without the mapping, i.e. skip a candidate iff its normalised ``x_t < tau``."""

    name = "threshold"

    def __init__(self, tau: float = 0.25, q: float = 0.5):
        super().__init__(tau=tau, q=q)

    def _map(self, x: np.ndarray) -> np.ndarray:
        return x



# The paper does not give the parameters of its other target distributions. The defaults below match
# the mean (and, for the Normal, the spread) of Beta(2, 5), the ImageNet setting, so the same tau means
# roughly the same thing; pass your own to rerun an ablation with other targets.


class GammaQuantileSelector(_QuantileMappingSelector):
    """Ablation "GQM": the normalised candidates mapped through a Gamma CDF (``shape``, ``scale``)."""

    name = "gqm"

    def __init__(self, tau: float = 0.25, shape: float = 2.0, scale: float = 1.0 / 7.0, q: float = 0.5):
        super().__init__(tau=tau, q=q)
        self.shape = _positive("shape", shape)
        self.scale = _positive("scale", scale)

    def _map(self, x: np.ndarray) -> np.ndarray:
        return stats.gamma.cdf(x, self.shape, scale=self.scale)


class ExponentialQuantileSelector(_QuantileMappingSelector):
    """Ablation "EQM": the normalised candidates mapped through an Exponential CDF, ``1 - exp(-rate x)``."""

    name = "eqm"

    def __init__(self, tau: float = 0.25, rate: float = 3.5, q: float = 0.5):
        super().__init__(tau=tau, q=q)
        self.rate = _positive("rate", rate)

    def _map(self, x: np.ndarray) -> np.ndarray:
        return stats.expon.cdf(x, scale=1.0 / self.rate)


class NormalQuantileSelector(_QuantileMappingSelector):
    """Ablation: the normalised candidates mapped through a Normal CDF (``mean``, ``std``)."""

    name = "normal_qm"

    def __init__(self, tau: float = 0.25, mean: float = 2.0 / 7.0, std: float = 0.16, q: float = 0.5):
        super().__init__(tau=tau, q=q)
        self.mean = _real("mean", mean)
        self.std = _positive("std", std)

    def _map(self, x: np.ndarray) -> np.ndarray:
        return stats.norm.cdf(x, loc=self.mean, scale=self.std)


class SigmoidSelector(_QuantileMappingSelector):
    """Ablation: the normalised candidates mapped through ``sigmoid(steepness * (x - center))``."""

    name = "sigmoid"

    def __init__(self, tau: float = 0.25, center: float = 0.5, steepness: float = 10.0, q: float = 0.5):
        super().__init__(tau=tau, q=q)
        self.center = _real("center", center)
        self.steepness = _positive("steepness", steepness)

    def _map(self, x: np.ndarray) -> np.ndarray:
        return special.expit(self.steepness * (x - self.center))


class SoftmaxSelector(_QuantileMappingSelector):
    """Ablation: the normalised candidates mapped through ``softmax(x / temperature)`` over the candidates.

    Unlike the CDF mappings, the mapped values sum to one, so they shrink as the number of candidates
    grows (a lone candidate maps to 1 and is never skipped): one reason it is a weak baseline.
    """

    name = "softmax"

    def __init__(self, tau: float = 0.25, temperature: float = 1.0, q: float = 0.5):
        super().__init__(tau=tau, q=q)
        self.temperature = _positive("temperature", temperature)

    def _map(self, x: np.ndarray) -> np.ndarray:
        return special.softmax(x / self.temperature)
