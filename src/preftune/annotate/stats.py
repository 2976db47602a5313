"""The statistics of human labels: agreement between annotators, proportions with confidence intervals.

* Cohen's κ (Cohen 1960): two annotators who labelled the same N items,
  κ = (p_o − p_e) / (1 − p_e), p_o the fraction of items they label alike, p_e = Σ_c p₁(c)·p₂(c) the agreement
  expected by chance from each one's label frequencies.
* Krippendorff's α for nominal labels (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"): any
  number of annotators, items with any number (≥ 2) of labels. With the coincidence matrix
  o_ck = Σ_u (number of ordered pairs of labels (c, k) within unit u) / (m_u − 1), n_c = Σ_k o_ck and n = Σ_c n_c,
  α = 1 − (n − 1)·Σ_{c≠k} o_ck / Σ_{c≠k} n_c·n_k  (1 − observed / expected disagreement). Units with one label
  carry no information about agreement and are left out. 1 is perfect agreement, 0 chance level.
* The Wilson score interval (Wilson 1927) for a binomial proportion.
* A percentile bootstrap (Efron & Tibshirani 1993) for means of per-item scores, resampling items, so several
  columns resampled with the same draws (human and judge on the same items) stay paired.

Each statistic is None when it is undefined (a single category, no data): never a made-up number.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from itertools import permutations

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's κ of two annotators' labels of the same items (``first[i]`` and ``second[i]`` label item i);
    None when there are no items or chance agreement is already 1 (both always used one and the same label)."""
    if len(first) != len(second):
        raise ValueError(f"both annotators must label the same items: {len(first)} labels against {len(second)}")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_1, count_2 = Counter(first), Counter(second)
    expected = sum(count_1[c] * count_2[c] for c in count_1) / (n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def krippendorff_alpha(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Krippendorff's α (nominal) of ``units``, each the labels one item received (any number of annotators);
    None when fewer than two labels are pairable or every pairable label is the same category."""
    coincidence: Counter = Counter()
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for c, k in permutations(labels, 2):  # ordered pairs of different labellers
            coincidence[(c, k)] += 1 / (m - 1)
    totals: Counter = Counter()
    for (c, _), weight in coincidence.items():
        totals[c] += weight
    n = sum(totals.values())
    if n < 2:
        return None
    observed = sum(w for (c, k), w in coincidence.items() if c != k)
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if expected == 0:
        return None
    return 1 - (n - 1) * observed / expected


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of the proportion ``successes / n`` (95% for the default z); None for n = 0.

    (p̂ + z²/2n ± z·√(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n). At p̂ = 0 the centre and the spread are both z²/2n, so
    the lower end is exactly 0 (and at p̂ = 1 the upper end exactly 1): set, not left to rounding (3.6e-17 for 0 of
    7, an interval that would not contain its own estimate)."""
    if n <= 0:
        return None
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    low = 0.0 if successes <= 0 else max(0.0, (centre - spread) / scale)
    high = 1.0 if successes >= n else min(1.0, (centre + spread) / scale)
    return low, high


def bootstrap_mean_intervals(columns: Sequence[Sequence[float]], *, confidence: float = 0.95, resamples: int = 4000,
                             seed: int = 0) -> list[tuple[float, float] | None]:
    """Percentile bootstrap intervals of the mean of each column (all of one length n: one value per item),
    resampling the n items with replacement ``resamples`` times with the same draws for every column, from a
    fixed ``seed`` (the same data give the same interval). None for an empty column."""
    values = np.asarray(columns, dtype=np.float64).reshape(len(columns), -1)
    n = values.shape[1]
    if n == 0:
        return [None] * len(columns)
    rng = np.random.default_rng(seed)
    means = np.empty((len(columns), resamples))
    chunk = max(1, 2_000_000 // n)  # bound the index matrix's memory
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        draws = rng.integers(0, n, size=(stop - start, n))
        means[:, start:stop] = values[:, draws].mean(axis=2)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], axis=1)
    return [(float(lo), float(hi)) for lo, hi in zip(low, high)]
