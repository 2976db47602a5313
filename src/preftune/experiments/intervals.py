"""Reward at a fixed KL budget with its uncertainty: the statistics of the seeded frontier.

A run is a trajectory of checkpoints ``(kl, reward)`` in step order, starting at π_ref's ``(0, r_ref)``. Its reward
at a KL budget ``b`` is read where the trajectory first spends the budget, linearly interpolated between the last
checkpoint below ``b`` and the first at or above it (:func:`reward_at`); a run that never reaches ``b`` has no value
there. This replaces the best checkpoint inside the budget, a maximum over noisy evaluations that is biased upward
by the number of checkpoints.

Over seeds, a setting's value at ``b`` is the mean with a Student-t 95% interval, ``x̄ ± t₀.₉₇₅,ₙ₋₁ · s/√n``
(:func:`interval`); two values differ only where their intervals do not overlap (:func:`separated`). A single
evaluation's interval clusters the samples by prompt (several samples of one prompt are not independent):
``x̄ ± 1.96 · s_prompt-means / √P`` (:func:`evaluation_interval`).

Tuning at equal budget (:func:`select`): each setting of a family's sweep is scored on the validation prompts,
the best mean over seeds is chosen there, and that setting's numbers on the test prompts are the ones reported,
so nothing reported was selected on itself. A family's stability is the spread over seeds at its chosen setting
and the fraction of its sweep whose validation mean is within ``tolerance`` of the best (how forgiving it is); the
spread's own 95% interval comes from χ² (:meth:`Selection.spread_interval`), so "more stable" is claimed only where
two spreads' intervals separate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

Z_95 = 1.959964


def reward_at(trajectory: Sequence[tuple[float, float]], budget: float) -> float | None:
    """The reward of a run where its KL first reaches ``budget``: ``trajectory`` is ``[(kl, reward), …]`` in step
    order; between checkpoints ``(k₀, r₀)`` (``k₀ < b``) and ``(k₁, r₁)`` (``k₁ ≥ b``) the value is
    ``r₀ + (b − k₀)/(k₁ − k₀) · (r₁ − r₀)``. None when no checkpoint reaches ``budget``; a checkpoint at exactly
    ``budget`` gives its own reward."""
    for (k0, r0), (k1, r1) in zip(trajectory, trajectory[1:]):
        if k0 < budget <= k1:
            return r0 + (budget - k0) / (k1 - k0) * (r1 - r0)
    if trajectory and trajectory[0][0] >= budget:
        return trajectory[0][1]
    return None


def spent_at(trajectory: Sequence[tuple[float, float, float]], budget: float) -> float | None:
    """What a run had spent (the third entry of ``(kl, reward, cost)``, e.g. CPU seconds) when its KL first reached
    ``budget``, interpolated as :func:`reward_at` interpolates the reward."""
    return reward_at([(kl, cost) for kl, _, cost in trajectory], budget)


@functools.cache  # pure, and asked for the same few (p, df) once per interval
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``p`` in (½, 1)): bisection on its CDF,
    ``½ + ∫₀ˣ f``, with ``f(t) = Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + t²/ν)^(−(ν+1)/2)`` integrated by Simpson's
    rule (2,000 panels: within 1e-4 of the tables for every ``df ≥ 1`` at ``p = 0.975``)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs ½ < p < 1 and df ≥ 1, got p={p}, df={df}")
    nu = float(df)
    log_c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    density = lambda t: math.exp(log_c - (nu + 1) / 2 * math.log1p(t * t / nu))  # noqa: E731

    def cdf(x: float, panels: int = 2000) -> float:
        h = x / panels
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, panels))
        return 0.5 + h / 3 * (density(0.0) + inner + density(x))

    return _inverse(cdf, p, 1.0)


@functools.cache
def chi2_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of χ² with ``df`` degrees of freedom: bisection on its CDF, the regularised lower incomplete
    gamma ``P(k, x) = e^{−x} x^k Σ_{j≥0} x^j / Γ(k + j + 1)`` at ``k = df/2``, ``x = q/2`` (the series converges for
    every ``x``; its terms are summed until they no longer change the total)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"chi2_quantile needs 0 < p < 1 and df ≥ 1, got p={p}, df={df}")
    k = df / 2

    def cdf(q: float) -> float:
        x = q / 2
        if x <= 0:
            return 0.0
        term = math.exp(k * math.log(x) - x - math.lgamma(k + 1))
        total, j = term, 0
        while term > 1e-16 * total:
            j += 1
            term *= x / (k + j)
            total += term
        return min(total, 1.0)

    return _inverse(cdf, p, float(df))


def _inverse(cdf, p: float, guess: float) -> float:
    """The ``x ≥ 0`` where an increasing ``cdf`` reaches ``p``: doubling from ``guess`` to bracket it, then 60
    bisections."""
    low, high = 0.0, guess
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval ``[mean − half, mean + half]`` from ``n`` values (``half`` is infinite for one
    value: one seed says nothing about the spread)."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def __str__(self) -> str:
        return self.shown(3)

    def shown(self, digits: int) -> str:
        """``mean ± half`` to ``digits`` decimals, or ``mean (1 seed)`` where one value gives no interval."""
        if not math.isfinite(self.half):
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student-t interval over independent values (seeds): ``x̄ ± t_{(1+level)/2, n−1} · s/√n``."""
    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.inf, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n), n)


def evaluation_interval(rewards: Sequence[float], group_size: int) -> Interval:
    """One evaluation's mean reward with a 95% interval clustered by prompt: ``rewards`` hold ``group_size`` samples
    per prompt, prompt after prompt; the interval is ``1.96 · s/√P`` over the P per-prompt means (normal: P is in the
    hundreds)."""
    if group_size < 1 or not rewards or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of {group_size}")
    means = [sum(rewards[i : i + group_size]) / group_size for i in range(0, len(rewards), group_size)]
    p = len(means)
    mean = sum(means) / p
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (p - 1)) if p > 1 else math.inf
    return Interval(mean, Z_95 * sd / math.sqrt(p), p)


class Range(NamedTuple):
    """An interval that is not symmetric about its estimate (e.g. a standard deviation's, from χ²)."""

    low: float
    high: float


def separated(a: Interval | Range, b: Interval | Range) -> bool:
    """Whether two values differ at the 95% level as the report calls it: their intervals do not overlap."""
    return a.low > b.high or b.low > a.high


@dataclass(frozen=True)
class Selection:
    """A family's tuned result at one budget: the chosen setting, its test value over seeds, its validation value,
    and how forgiving the sweep was (settings whose validation mean is within the tolerance of the best, of those
    that reach the budget)."""

    setting: str
    test: Interval
    validation: Interval
    forgiving: float
    settings_reaching: int
    settings_total: int

    @property
    def seed_spread(self) -> float:
        """The standard deviation over seeds of the test value at the chosen setting, ``half·√n / t``; 0 for one."""
        if self.test.n < 2:
            return 0.0
        return self.test.half * math.sqrt(self.test.n) / t_quantile(0.975, self.test.n - 1)

    @property
    def spread_interval(self) -> Range:
        """The 95% interval of :attr:`seed_spread` (normal seeds): ``s · √(ν/χ²_{0.975,ν})`` to
        ``s · √(ν/χ²_{0.025,ν})`` with ``ν = n − 1``; ``(0, ∞)`` for one seed. Two methods' stability differs only
        where these intervals do not overlap: at 3 seeds the interval is ``s × [0.52, 6.3]``."""
        df = self.test.n - 1
        if df < 1:
            return Range(0.0, math.inf)
        s = self.seed_spread
        return Range(s * math.sqrt(df / chi2_quantile(0.975, df)), s * math.sqrt(df / chi2_quantile(0.025, df)))


def select(validation: Mapping[str, Sequence[float | None]], test: Mapping[str, Sequence[float | None]],
           tolerance: float = 0.02) -> Selection | None:
    """Choose a family's setting on its validation values and report it on the test values.

    ``validation[setting]`` and ``test[setting]`` are the per-seed values at one budget (None where a seed's run did
    not reach it). A setting counts only where every seed reached the budget; the chosen one has the highest
    validation mean; ``forgiving`` is the fraction of all settings whose validation mean is within ``tolerance`` of
    that best (a setting that does not reach the budget is not forgiving). None when no setting reaches it."""
    reaching = {s: v for s, v in validation.items() if v and all(x is not None for x in v)}
    if not reaching:
        return None
    means = {s: sum(v) / len(v) for s, v in reaching.items()}
    best = max(means, key=means.get)
    close = sum(means[s] >= means[best] - tolerance for s in means)
    chosen = [x for x in test[best] if x is not None]
    if len(chosen) != len(test[best]):
        raise ValueError(f"setting {best} reached the budget on the validation prompts but not on the test prompts "
                         "for every seed: read both splits' rewards along one KL trajectory (the pooled one)")
    return Selection(best, interval(chosen), interval(reaching[best]), close / len(validation), len(reaching),
                     len(validation))
