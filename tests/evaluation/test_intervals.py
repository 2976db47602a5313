"""The seeded frontier's statistics: reward at a KL budget read along a run, intervals over seeds and over prompts,
selection on validation reported on test. A planted difference between methods is found and a noise-only one is
not; the interval covers the true mean at its stated rate."""

from __future__ import annotations

import math
import random

import pytest

from preftune.experiments.intervals import (
    Interval,
    chi2_quantile,
    evaluation_interval,
    interval,
    reward_at,
    select,
    separated,
    spent_at,
    t_quantile,
)


def test_reward_at_a_budget_interpolates_where_the_run_first_spends_it():
    run = [(0.0, 0.50), (1.0, 0.60), (3.0, 0.70), (2.5, 0.90), (6.0, 0.80)]
    assert reward_at(run, 2.0) == pytest.approx(0.65)  # between (1, .60) and (3, .70), the first crossing
    assert reward_at(run, 1.0) == pytest.approx(0.60)  # a checkpoint at the budget gives its own reward
    assert reward_at(run, 4.0) == pytest.approx(0.90 + (4.0 - 2.5) / 3.5 * -0.10)  # later crossing, after a dip
    assert reward_at(run, 7.0) is None  # never reached: no value, not the last one
    assert reward_at([(0.0, 0.5)], 0.0) == 0.5
    assert spent_at([(0.0, 0.5, 0.0), (2.0, 0.7, 10.0)], 1.5) == pytest.approx(7.5)


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228),
                                       (30, 2.042)])
def test_t_quantiles_match_the_tables(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)


def test_the_seed_interval_covers_the_true_mean_at_its_rate():
    """3 seeds at a time, 2,000 draws: the t interval covers the mean 95% of the time (±1.5%), where the normal
    interval with the same s would cover only ≈ 87%."""
    rng = random.Random(0)
    covered = normal = 0
    for _ in range(2000):
        values = [rng.gauss(0.7, 0.05) for _ in range(3)]
        iv = interval(values)
        covered += iv.low <= 0.7 <= iv.high
        half = 1.959964 * iv.half / t_quantile(0.975, 2)
        normal += iv.mean - half <= 0.7 <= iv.mean + half
    assert 0.935 <= covered / 2000 <= 0.965
    assert normal / 2000 < 0.9
    assert math.isinf(interval([0.5]).half) and str(interval([0.5])) == "0.500 (1 seed)"


def test_an_evaluation_interval_clusters_samples_by_prompt():
    """Two samples of each prompt are copies: the interval is the one of the prompt means, not of 2P samples."""
    rng = random.Random(1)
    means = [rng.random() for _ in range(400)]
    copied = evaluation_interval([m for m in means for _ in range(2)], group_size=2)
    single = evaluation_interval(means, group_size=1)
    assert copied.mean == pytest.approx(single.mean) and copied.half == pytest.approx(single.half)
    assert copied.n == 400
    with pytest.raises(ValueError, match="5 rewards are not whole groups of 2"):
        evaluation_interval([0.1] * 5, 2)


def _seeds(rng: random.Random, mean: float, spread: float, n: int = 3) -> list[float]:
    return [rng.gauss(mean, spread) for _ in range(n)]


def test_a_planted_difference_is_found_and_a_noise_only_one_is_not():
    """Family A is 0.1 above B (seed spread 0.01): separated in ≥ 99% of draws. C equals B up to noise: across 500 draws
    the intervals separate about as rarely as the 95% level allows (< 1%, as two overlapping-interval tests are
    stricter than one test at 5%)."""
    rng = random.Random(2)
    found = spurious = 0
    for _ in range(500):
        a, b, c = (interval(_seeds(rng, m, 0.01)) for m in (0.8, 0.7, 0.7))
        found += separated(a, b)
        spurious += separated(b, c)
    assert found / 500 >= 0.99
    assert spurious / 500 < 0.01


def test_selection_happens_on_validation_and_is_reported_on_test():
    """The setting with the best validation mean is chosen, even where another setting looks better on test (the
    test numbers are never searched); forgiving counts settings within 0.02 of the best on validation, a setting
    whose seeds do not all reach the budget counting as not forgiving."""
    validation = {"lr=1e-4": [0.70, 0.71, 0.69], "lr=3e-4": [0.75, 0.74, 0.76], "lr=1e-3": [0.74, 0.73, 0.75],
                  "lr=3e-3": [0.80, None, 0.82]}
    test = {"lr=1e-4": [0.90, 0.91, 0.92], "lr=3e-4": [0.72, 0.73, 0.71], "lr=1e-3": [0.70, 0.70, 0.71],
            "lr=3e-3": [0.81, None, 0.80]}
    chosen = select(validation, test)
    assert chosen.setting == "lr=3e-4"
    assert chosen.test.mean == pytest.approx(0.72) and chosen.validation.mean == pytest.approx(0.75)
    assert chosen.forgiving == pytest.approx(2 / 4)  # 3e-4 and 1e-3 (0.74 ≥ 0.73); 1e-4 is 0.05 below; 3e-3 missing
    assert (chosen.settings_reaching, chosen.settings_total) == (3, 4)
    assert chosen.seed_spread == pytest.approx(0.01)  # the sample deviation of 0.72, 0.73, 0.71
    # its 95% interval from χ²(2): s·√(2/7.3778) to s·√(2/0.05064)
    assert chosen.spread_interval == pytest.approx((0.01 * math.sqrt(2 / 7.3778), 0.01 * math.sqrt(2 / 0.050636)),
                                                   rel=1e-4)
    assert select({"a": [None, 0.5]}, {"a": [None, 0.5]}) is None


def test_intervals_print_with_their_half_width():
    assert str(Interval(0.7123, 0.0151, 3)) == "0.712 ± 0.015"
    assert not separated(Interval(0.70, 0.02, 3), Interval(0.73, 0.02, 3))
    assert separated(Interval(0.70, 0.01, 3), Interval(0.73, 0.01, 3))


@pytest.mark.parametrize(("p", "df", "table"), [(0.975, 1, 5.0239), (0.025, 1, 0.000982), (0.975, 2, 7.3778),
                                                (0.025, 2, 0.05064), (0.975, 3, 9.3484), (0.025, 3, 0.2158),
                                                (0.95, 10, 18.307), (0.5, 50, 49.335)])
def test_chi2_quantiles_match_the_tables(p, df, table):
    assert chi2_quantile(p, df) == pytest.approx(table, rel=2e-4)


def test_the_spread_interval_covers_the_true_deviation_at_its_stated_rate():
    """Seeds drawn from N(0.8, 0.03²), 3 at a time: the χ² interval of their standard deviation holds 0.03 in
    ≈95% of 2,000 draws (binomial 99% band: 0.938–0.962), and a stability difference planted ×10 is found from
    5 seeds while equal spreads are not told apart."""
    rng = random.Random(7)

    def spread(values):
        return select({"s": values}, {"s": values})

    covered = 0
    for _ in range(2000):
        low, high = spread([rng.gauss(0.8, 0.03) for _ in range(3)]).spread_interval
        covered += low <= 0.03 <= high
    assert 0.938 <= covered / 2000 <= 0.962

    def apart(a, b):
        (a_low, a_high), (b_low, b_high) = a.spread_interval, b.spread_interval
        return a_high < b_low or b_high < a_low

    found = sum(apart(spread([rng.gauss(0.8, 0.003) for _ in range(5)]),
                      spread([rng.gauss(0.8, 0.03) for _ in range(5)])) for _ in range(200))
    false = sum(apart(spread([rng.gauss(0.8, 0.03) for _ in range(5)]),
                      spread([rng.gauss(0.8, 0.03) for _ in range(5)])) for _ in range(200))
    assert found / 200 > 0.9 and false / 200 < 0.05
