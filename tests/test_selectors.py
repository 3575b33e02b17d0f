"""EBQM (SPEC section 4) and the ablation selectors, against hand-computed values."""
import math

import numpy as np
import pytest

from ela_hf.pruning import (
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


def beta25_cdf(x):
    # I_x(2, 5) = P(Binomial(6, x) >= 2): independent of scipy's incomplete beta
    return 1.0 - (1.0 - x) ** 6 - 6.0 * x * (1.0 - x) ** 5


# candidates below the median 0.3 are 0.1, 0.2, 0.15 -> normalised 0, 1, 0.5
HAND_D = [0.9, 0.1, 0.5, 0.2, 0.3, 0.8, 0.15]


def test_ebqm_hand_vector_imagenet_parameters():
    sel = EbqmSelector(q=0.5, alpha=2, beta=5, tau=0.25)
    out = sel.explain(HAND_D)
    assert out.quantile == pytest.approx(0.3)
    assert out.candidate == [False, True, False, True, False, False, True]
    assert out.mapped[1] == pytest.approx(0.0)
    assert out.mapped[3] == pytest.approx(1.0)
    assert out.mapped[6] == pytest.approx(beta25_cdf(0.5)) and beta25_cdf(0.5) == pytest.approx(57 / 64)
    assert out.mapped[0] is None and out.mapped[4] is None  # at or above the quantile: not mapped
    assert out.skip == [False, True, False, False, False, False, False]
    # tau just above I_0.5(2,5) = 0.890625 also takes the middle candidate, never the maximum
    assert EbqmSelector(alpha=2, beta=5, tau=0.9).select(HAND_D) == [False, True, False, False, False, False, True]
    assert sel.select(HAND_D) == out.skip


def test_ebqm_hand_vector_cifar_parameters():
    # Beta(5, 1) has CDF x**5: 0.5 -> 0.03125 < 0.3, so both lower candidates go
    out = EbqmSelector(alpha=5, beta=1, tau=0.3).explain(HAND_D)
    assert out.mapped[6] == pytest.approx(0.5**5)
    assert out.skip == [False, True, False, False, False, False, True]


def test_ebqm_quantile_level_moves_the_candidate_set():
    d = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert EbqmSelector(q=0.5, tau=0.5).explain(d).candidate == [True, True, False, False, False]
    # q = 0.9 -> Q = 0.46: four candidates, normalised 0, 1/3, 2/3, 1
    out = EbqmSelector(q=0.9, alpha=2, beta=5, tau=0.5).explain(d)
    assert out.quantile == pytest.approx(0.46)
    assert out.candidate == [True, True, True, True, False]
    assert out.mapped[:4] == pytest.approx([beta25_cdf(x) for x in (0, 1 / 3, 2 / 3, 1)])
    assert beta25_cdf(1 / 3) == pytest.approx(0.6488, abs=1e-4)  # above tau: only the minimum goes
    assert out.skip == [True, False, False, False, False]


def _clustered_run(cluster):
    # paper section 3.3: six candidates cluster around the threshold 0.3 after normalisation (min 0,
    # max 1), the rest of the network sits far above the median
    return [0.0, *cluster, 1.0] + [5.0 + k for k in range(9)]


def test_beta_mapping_spreads_clustered_values_away_from_the_threshold():
    run_a = _clustered_run([0.31, 0.315, 0.32, 0.325, 0.33, 0.318])
    run_b = _clustered_run([0.27, 0.275, 0.28, 0.285, 0.29, 0.278])
    threshold = ThresholdSelector(tau=0.3)
    ebqm = EbqmSelector(alpha=5, beta=1, tau=0.3)  # the paper's CIFAR setting

    # without a mapping, a small shift of the cluster flips six decisions at once
    flips_threshold = sum(a != b for a, b in zip(threshold.select(run_a), threshold.select(run_b)))
    assert flips_threshold == 6
    # the Beta CDF moves the cluster far below tau in both runs: the same layers are skipped
    assert ebqm.select(run_a) == ebqm.select(run_b)
    for run in (run_a, run_b):
        x = np.array(threshold.explain(run).mapped[1:7])
        y = np.array(ebqm.explain(run).mapped[1:7])
        assert np.abs(x - 0.3).max() < 0.031
        assert np.abs(y - 0.3).min() > 0.29  # y = x**5 <= 0.004
        assert y == pytest.approx(x**5)


def test_beta_mapping_widens_a_cluster_of_small_values():
    # ImageNet setting Beta(2, 5): the CDF is steepest at the mode 0.2 (density 2.46), so a tight cluster
    # of normalised values there is stretched apart
    d = [0.0, 0.18, 0.2, 0.22, 0.24, 1.0] + [5.0 + k for k in range(7)]
    out_x = ThresholdSelector(tau=0.1).explain(d)
    out_y = EbqmSelector(alpha=2, beta=5, tau=0.1).explain(d)
    x = np.array(out_x.mapped[1:5])
    y = np.array(out_y.mapped[1:5])
    assert (y.max() - y.min()) > 2.3 * (x.max() - x.min())
    assert y == pytest.approx([beta25_cdf(v) for v in x])


# ------------------------------------------------------------------------------------------------
# degenerate cases (documented in ela_hf.pruning.selectors)
@pytest.mark.parametrize("d", [[], [0.3], [float("nan")], [float("nan"), 0.2]])
def test_fewer_than_two_finite_values_skip_nothing(d):
    out = EbqmSelector(tau=1.0).explain(d)
    assert out.skip == [False] * len(d)
    assert out.candidate == [False] * len(d)
    assert out.quantile is None


def test_all_equal_values_have_no_candidates():
    out = EbqmSelector(tau=1.0).explain([0.4, 0.4, 0.4, 0.4])
    assert out.quantile == pytest.approx(0.4)
    assert out.skip == [False] * 4 and out.candidate == [False] * 4


def test_single_candidate_has_zero_range_and_maps_to_zero():
    d = [0.2, 0.5, 0.9]  # median 0.5: only 0.2 is a candidate
    out = EbqmSelector(alpha=5, beta=1, tau=0.3).explain(d)
    assert out.candidate == [True, False, False]
    assert out.mapped[0] == 0.0
    assert out.skip == [True, False, False]
    # tau = 0 skips nothing, even at y = 0 (the rule is a strict y < tau)
    assert EbqmSelector(tau=0.0).select(d) == [False, False, False]


def test_equal_candidates_have_zero_range_and_are_all_skipped():
    d = [0.1, 0.1, 0.1, 0.7, 0.8, 0.9, 1.0]  # median 0.7: three equal candidates
    out = EbqmSelector(tau=0.25).explain(d)
    assert out.candidate == [True, True, True, False, False, False, False]
    assert out.mapped[:3] == [0.0, 0.0, 0.0]
    assert out.skip == [True, True, True, False, False, False, False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_kept_and_ignored_by_quantile_and_normalisation(bad):
    clean = [0.9, 0.1, 0.5, 0.2, 0.3, 0.8, 0.15]
    dirty = clean[:3] + [bad] + clean[3:]
    sel = EbqmSelector(alpha=2, beta=5, tau=0.9)
    out_clean, out_dirty = sel.explain(clean), sel.explain(dirty)
    assert out_dirty.skip[3] is False and out_dirty.candidate[3] is False and out_dirty.mapped[3] is None
    assert out_dirty.quantile == out_clean.quantile
    assert out_dirty.skip[:3] + out_dirty.skip[4:] == out_clean.skip
    assert out_dirty.mapped[:3] + out_dirty.mapped[4:] == out_clean.mapped


def test_all_nan_skips_nothing():
    assert EbqmSelector(tau=1.0).select([float("nan")] * 4) == [False] * 4


@pytest.mark.parametrize("bad", [[[0.1, 0.2]], "abc", [0.1, "x"], 0.5])
def test_input_must_be_a_vector_of_numbers(bad):
    with pytest.raises(ValueError, match="d must be"):
        EbqmSelector().select(bad)


# ------------------------------------------------------------------------------------------------
# the ablation selectors
def test_fixed_count_skips_the_k_smallest_with_ties_in_network_order():
    d = [0.5, 0.1, 0.3, 0.1, float("nan"), 0.2]
    assert FixedCountSelector(2).select(d) == [False, True, False, True, False, False]
    assert FixedCountSelector(3).select(d) == [False, True, False, True, False, True]
    assert FixedCountSelector(1).select([0.2, 0.2, 0.2]) == [True, False, False]
    assert FixedCountSelector(0).select(d) == [False] * 6
    # more than the finite layers: every finite one, never the NaN
    assert FixedCountSelector(10).select(d) == [True, True, True, True, False, True]
    assert FixedCountSelector(1).explain(d).mapped == [None] * 6


def test_threshold_selector_thresholds_the_normalised_values():
    out = ThresholdSelector(tau=0.6).explain(HAND_D)
    assert out.mapped[1] == 0.0 and out.mapped[3] == 1.0 and out.mapped[6] == pytest.approx(0.5)
    assert out.skip == [False, True, False, False, False, False, True]
    assert ThresholdSelector(tau=0.4).select(HAND_D) == [False, True, False, False, False, False, False]


HALF = 0.5  # HAND_D's middle candidate normalises to 0.5


@pytest.mark.parametrize(
    "selector, expected_at_half",
    [
        (GammaQuantileSelector(tau=0.5, shape=2.0, scale=0.25), 1 - math.exp(-HALF / 0.25) * (1 + HALF / 0.25)),
        (ExponentialQuantileSelector(tau=0.5, rate=3.0), 1 - math.exp(-3.0 * HALF)),
        (NormalQuantileSelector(tau=0.5, mean=0.3, std=0.2), 0.5 * (1 + math.erf((HALF - 0.3) / (0.2 * math.sqrt(2))))),
        (SigmoidSelector(tau=0.5, center=0.4, steepness=8.0), 1 / (1 + math.exp(-8.0 * (HALF - 0.4)))),
    ],
)
def test_cdf_and_sigmoid_mappings_match_their_formulas(selector, expected_at_half):
    out = selector.explain(HAND_D)
    assert out.candidate == [False, True, False, True, False, False, True]
    assert out.mapped[6] == pytest.approx(expected_at_half)
    assert out.skip[6] == (expected_at_half < 0.5)
    assert out.skip[0] is False and out.skip[4] is False  # non-candidates are never skipped


def test_gamma_exponential_normal_map_the_extremes_as_formulas_say():
    out = ExponentialQuantileSelector(tau=0.5, rate=3.0).explain(HAND_D)
    assert out.mapped[1] == 0.0 and out.mapped[3] == pytest.approx(1 - math.exp(-3.0))
    out = NormalQuantileSelector(tau=0.5, mean=0.3, std=0.2).explain(HAND_D)
    assert out.mapped[1] == pytest.approx(0.5 * (1 + math.erf(-0.3 / (0.2 * math.sqrt(2)))))


def test_softmax_mapping_normalises_over_the_candidates():
    out = SoftmaxSelector(tau=0.3, temperature=0.5).explain(HAND_D)
    z = np.exp(np.array([0.0, 1.0, 0.5]) / 0.5)
    expected = z / z.sum()
    assert [out.mapped[1], out.mapped[3], out.mapped[6]] == pytest.approx(expected.tolist())
    assert sum(v for v in out.mapped if v is not None) == pytest.approx(1.0)
    assert out.skip == [False, expected[0] < 0.3, False, expected[1] < 0.3, False, False, expected[2] < 0.3]
    # a lone candidate gets the whole mass and stays
    assert SoftmaxSelector(tau=0.99).select([0.2, 0.5, 0.9]) == [False, False, False]


ALL_SELECTORS = [
    EbqmSelector(q=0.4, alpha=3.0, beta=2.0, tau=0.2),
    FixedCountSelector(3),
    ThresholdSelector(tau=0.2, q=0.6),
    GammaQuantileSelector(tau=0.1, shape=3.0, scale=0.5, q=0.3),
    ExponentialQuantileSelector(tau=0.1, rate=2.0),
    NormalQuantileSelector(tau=0.1, mean=0.1, std=0.3),
    SigmoidSelector(tau=0.1, center=0.2, steepness=5.0),
    SoftmaxSelector(tau=0.1, temperature=2.0),
]


@pytest.mark.parametrize("selector", ALL_SELECTORS, ids=lambda s: type(s).__name__)
def test_selectors_round_trip_through_their_dict_form(selector):
    spec = selector.to_dict()
    rebuilt = selector_from_dict(spec)
    assert type(rebuilt) is type(selector) and rebuilt == selector
    d = [0.4, 0.05, 0.3, 0.2, 0.9, 0.1, 0.7, 0.25]
    assert rebuilt.select(d) == selector.select(d)
    out = selector.explain(d)
    assert isinstance(out, Selection) and len(out.skip) == len(d) and out.skip == selector.select(d)


def test_selector_from_dict_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="unknown selector"):
        selector_from_dict({"name": "nope"})
    with pytest.raises(ValueError, match="invalid arguments"):
        selector_from_dict({"name": "ebqm", "gamma": 1.0})
    with pytest.raises(ValueError, match="'name'"):
        selector_from_dict({"q": 0.5})


def test_custom_selectors_register_by_name():
    class EveryOther(LayerSelector):
        name = "test_every_other"

        def explain(self, d):
            skip = [i % 2 == 1 for i in range(len(d))]
            return Selection(skip=skip, candidate=[True] * len(d), mapped=[None] * len(d))

        def config(self):
            return {}

    assert isinstance(selector_from_dict({"name": "test_every_other"}), EveryOther)
    assert EveryOther().select([1, 2, 3]) == [False, True, False]


def test_config_is_read_back_from_the_constructor_arguments():
    """Every selector's config() (hence to_dict, repr and resume) is its __init__ arguments in order."""

    class Stride(LayerSelector):
        name = "test_stride"

        def __init__(self, step: int = 2, offset: int = 1):
            self.step, self.offset = step, offset

        def explain(self, d):
            skip = [i % self.step == self.offset for i in range(len(d))]
            return Selection(skip=skip, candidate=[True] * len(d), mapped=[None] * len(d))

    sel = Stride(step=3, offset=0)
    assert sel.to_dict() == {"name": "test_stride", "step": 3, "offset": 0}
    assert selector_from_dict(sel.to_dict()) == sel and repr(sel) == "Stride(step=3, offset=0)"
    assert list(GammaQuantileSelector(shape=3.0).config()) == ["tau", "shape", "scale", "q"]
    assert EbqmSelector(q=0.4, alpha=5, beta=1, tau=0.3).config() == {"q": 0.4, "alpha": 5.0, "beta": 1.0, "tau": 0.3}

    class Hidden(Stride):
        name = "test_hidden"

        def __init__(self, every: int = 2):
            super().__init__(step=every)

    with pytest.raises(NotImplementedError, match=r"\['every'\].*override config"):
        Hidden().config()


# ------------------------------------------------------------------------------------------------
# invalid parameters raise at construction
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EbqmSelector(alpha=0), "alpha"),
        (lambda: EbqmSelector(alpha=-1.0), "alpha"),
        (lambda: EbqmSelector(beta=0.0), "beta"),
        (lambda: EbqmSelector(beta=-2), "beta"),
        (lambda: EbqmSelector(tau=-0.01), "tau"),
        (lambda: EbqmSelector(tau=1.01), "tau"),
        (lambda: EbqmSelector(q=0.0), "q"),
        (lambda: EbqmSelector(q=1.0), "q"),
        (lambda: EbqmSelector(q=-0.5), "q"),
        (lambda: EbqmSelector(q=1.5), "q"),
        (lambda: EbqmSelector(q=float("nan")), "q"),
        (lambda: EbqmSelector(alpha=float("inf")), "alpha"),
        (lambda: EbqmSelector(tau="0.3"), "tau"),
        (lambda: EbqmSelector(alpha=True), "alpha"),
        (lambda: FixedCountSelector(-1), "k"),
        (lambda: FixedCountSelector(1.5), "k"),
        (lambda: FixedCountSelector(True), "k"),
        (lambda: ThresholdSelector(tau=2.0), "tau"),
        (lambda: ThresholdSelector(q=1.0), "q"),
        (lambda: GammaQuantileSelector(shape=0.0), "shape"),
        (lambda: GammaQuantileSelector(scale=-1.0), "scale"),
        (lambda: ExponentialQuantileSelector(rate=0.0), "rate"),
        (lambda: NormalQuantileSelector(std=0.0), "std"),
        (lambda: NormalQuantileSelector(mean=float("nan")), "mean"),
        (lambda: SigmoidSelector(steepness=-1.0), "steepness"),
        (lambda: SigmoidSelector(center=float("inf")), "center"),
        (lambda: SoftmaxSelector(temperature=0.0), "temperature"),
        (lambda: SoftmaxSelector(tau=-1.0), "tau"),
    ],
)
def test_invalid_parameters_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()
