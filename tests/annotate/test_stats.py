"""Agreement and intervals against values computed by hand and values published with the methods."""

from __future__ import annotations

import math

import pytest

from preftune.annotate.stats import bootstrap_mean_intervals, cohen_kappa, krippendorff_alpha, wilson_interval


def test_cohen_kappa_by_hand():
    first = ["a", "a", "a", "a", "b", "b", "b", "tie", "tie", "a"]
    second = ["a", "a", "b", "a", "b", "b", "a", "tie", "b", "a"]
    # p_o = 7/10; label counts a 5/5, b 3/4, tie 2/1 → p_e = (25 + 12 + 2)/100 = 0.39; κ = 0.31/0.61.
    assert cohen_kappa(first, second) == pytest.approx(0.31 / 0.61)
    assert cohen_kappa(first, first) == pytest.approx(1.0)


def test_cohen_kappa_on_the_textbook_table():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 → p_o 0.7, p_e 0.5, κ 0.4 (the usual worked example).
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)


def test_cohen_kappa_is_undefined_without_variation_or_items():
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(["a"], ["a", "b"])


def test_krippendorff_alpha_by_hand():
    # Coincidences: [a, a] → o_aa 2; [a, b] → o_ab = o_ba = 1; [b, b, b] → 6 ordered pairs × 1/2 → o_bb 3;
    # [a] alone is not pairable. n_a = 3, n_b = 4, n = 7: α = 1 − 6·(1 + 1) / (2·3·4) = 0.5.
    assert krippendorff_alpha([["a", "a"], ["a", "b"], ["b", "b", "b"], ["a"]]) == pytest.approx(0.5)


def test_krippendorff_alpha_on_krippendorffs_own_example():
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", nominal data of 4 observers × 12 units
    with missing values: α = 0.743."""
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[o[u] for o in observers if o[u] is not None] for u in range(12)]
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_of_two_annotators_is_close_to_cohens_kappa():
    first = ["a", "a", "a", "a", "b", "b", "b", "tie", "tie", "a"]
    second = ["a", "a", "b", "a", "b", "b", "a", "tie", "b", "a"]
    alpha = krippendorff_alpha([list(pair) for pair in zip(first, second)])
    assert alpha == pytest.approx(cohen_kappa(first, second), abs=0.05)  # they differ by the small-sample correction
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None  # one category: undefined
    assert krippendorff_alpha([["a"], ["b"]]) is None  # nothing pairable


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: (0.8 + 0.19207 ± 1.96·√(0.016 + 0.0096037)) / 1.38415 = [0.4902, 0.9433].
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) is None
    # 10 of 10: p̂ = 1, spread = z²/2n, so the upper end is 1 and the lower end 1/(1 + z²/n) = 0.7225.
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_a_wilson_interval_at_zero_or_all_holds_its_estimate_exactly():
    # p̂ = 0: the centre and the spread are both z²/2n, so the lower end is 0, not a rounding error above it
    # (3.6e-17 for 0 of 7); p̂ = 1 likewise ends at 1 (not 0.9999999999999999 for 10 of 10).
    for n in range(1, 60):
        assert wilson_interval(0, n)[0] == 0.0 < wilson_interval(0, n)[1], n
        assert wilson_interval(n, n)[0] < 1.0 == wilson_interval(n, n)[1], n


def test_bootstrap_matches_the_normal_interval_and_keeps_columns_paired():
    n, p = 400, 0.7
    values = [1.0] * int(n * p) + [0.0] * int(n * (1 - p))
    (low, high), (mirror_low, mirror_high) = bootstrap_mean_intervals([values, [1 - v for v in values]])
    half = 1.959964 * math.sqrt(p * (1 - p) / n)
    assert low == pytest.approx(p - half, abs=0.01) and high == pytest.approx(p + half, abs=0.01)
    # The same draws for both columns: the complement's interval is the mirror image.
    assert mirror_low == pytest.approx(1 - high) and mirror_high == pytest.approx(1 - low)
    assert bootstrap_mean_intervals([values]) == bootstrap_mean_intervals([values])  # seeded: reproducible
    assert bootstrap_mean_intervals([[0.5] * 7]) == [(0.5, 0.5)]
    assert bootstrap_mean_intervals([[]]) == [None]
