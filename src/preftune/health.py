"""Health checks of a preference-tuning run: pure functions over its metric streams, and a monitor that runs them live.

A run logs three kinds of records (``metrics.jsonl``): training records (TRL's names: ``loss``, ``rewards/*``,
``logps/*``, ``lengths/*``, ``grad_norm``), ``eval_``-prefixed records from periodic evaluation on held-out pairs,
and sample-evaluation records from step callbacks (``gold_reward``, ``kl_to_ref``, ``length``, ``eos_rate`` and the
reference's ``ref_gold_reward``, ``ref_length``, ``ref_eos_rate``); online methods log their training samples'
``completions/mean_length`` and ``completions/clipped_ratio``, which stand in for the sampled length and EOS rate
(every name in :mod:`preftune.metric_names`). The streams are :data:`Series`: metric name → ``[(step, value)]``. Each
check reads them and answers ok, warning or no data, with its evidence (numbers and steps) and a concrete suggestion:

* ``likelihood`` — the chosen log-likelihood falls with the rejected one: DPO suppressing the responses it should
  prefer (the "3D properties" of Yan et al. 2024, arXiv 2406.07327: drastic drop of the rejected likelihood,
  degradation into response suppression);
* ``dispersion`` — the log-likelihood of held-out responses, which the policy never trained on, falls: mass moves
  to responses in neither set (Yan et al.'s third property);
* ``saturation`` — reward accuracy on training pairs near 1 while the margins keep growing: DPO's optimum is at
  infinite margins for deterministic preferences (Azar et al. 2023, IPO, arXiv 2310.12036);
* ``verbosity`` — sampled responses grow longer than the reference's, and the reward margin follows the length
  difference (Park et al. 2024, arXiv 2403.19159);
* ``over_optimisation`` — the gold reward peaks and falls as KL grows (Gao et al. 2023, arXiv 2210.10760: with
  d = √KL, R(d) = d(α − β·ln d) for RL, d(α − β·d) for best-of-n; :func:`fit_gao`);
* ``eos`` — fewer samples end with EOS (runaway responses), or responses collapse to EOS;
* ``grad_spikes`` — a logged gradient norm far above the median of the ones before it;
* ``non_finite`` — any NaN or infinite value.

The checks read logged records only, so training (live, :class:`preftune.training.health.HealthCallback`) and
evaluation (``preftune report``, :mod:`preftune.evaluation.report`) both run them from here. Live, the trainer feeds
every record it writes to ``metrics.jsonl`` to a :class:`HealthMonitor` (config ``health_checks: true``, the
default); a check that trips warns once, in the log and the progress bar, and the run's ``summary.json`` lists the
warnings under ``health``. By hand::

    monitor = HealthMonitor.from_config(cfg)
    for warning in monitor.update(record):   # after every record written to metrics.jsonl (train, eval_, callback)
        ...                                  # each check warns once; update() has already logged it
    bar.set_postfix({**shown, **monitor.postfix()})
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from preftune.metric_names import (
    COMPLETIONS_CLIPPED_RATIO,
    COMPLETIONS_MEAN_LENGTH,
    EOS_RATE,
    EVAL_PREFIX,
    GOLD_REWARD,
    GRAD_NORM,
    KL_TO_REF,
    LENGTH,
    LENGTHS_CHOSEN,
    LENGTHS_MARGIN_CORR,
    LENGTHS_REJECTED,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    LOSS,
    REF_EOS_RATE,
    REF_GOLD_REWARD,
    REF_LENGTH,
    REWARDS_ACCURACIES,
    REWARDS_CHOSEN,
    REWARDS_MARGINS,
    REWARDS_REJECTED,
    STEP,
)

log = logging.getLogger("preftune")

Series = Mapping[str, Sequence[tuple[int, float]]]

OK, WARNING, NO_DATA = "ok", "warning", "no data"


@dataclass(frozen=True)
class Thresholds:
    """When a check warns. Log-likelihoods are summed over a response's tokens (nats)."""

    likelihood_drop: float = 10.0  # chosen log π/π_ref (or its change since the start) at or below −this
    dispersion_drop: float = 10.0  # held-out responses' mean log π/π_ref at or below −this
    saturated_accuracy: float = 0.95  # training reward accuracy at or above this …
    saturation_records: int = 2  # … on this many consecutive training records
    length_growth: float = 0.15  # sampled length at least this fraction above the reference's
    margin_length_corr: float = 0.5  # (without sampled lengths) correlation of margin and length difference
    hump_drop: float = 0.02  # gold reward below its peak by at least this much …
    hump_fraction: float = 0.1  # … and this fraction of the gain the peak had made …
    hump_evaluations: int = 2  # … at each of the last this many evaluations (one low sample is noise)
    eos_drop: float = 0.2  # EOS rate at least this much below the reference's
    length_collapse: float = 0.5  # sampled length at most this fraction of the reference's
    grad_spike_factor: float = 5.0  # gradient norm this many times the median of the earlier ones …
    grad_spike_history: int = 3  # … once at least this many were logged …
    # … with the median taken as at least this: near a zero loss the norms are ~1e-4 and their ratios are noise
    # (0.0015 against a median of 0.0002 is no spike)
    grad_spike_floor: float = 0.01


# What a run trains decides what a check can say about it and what the run can change: a reward model has no
# β and no samples; GRPO, RLOO and PPO have no pairs and no DPO options, their lever on drift is the KL coefficient.
PREFERENCE = "preference"  # the DPO family, KTO, Online DPO and the rounds methods: a loss over (pairs of) log-probs
REWARD_MODEL = "reward model"  # a Bradley–Terry head scoring pairs
POLICY_GRADIENT = "policy gradient"  # GRPO, RLOO, PPO: sampled completions, a judge's reward, a KL term
SFT = "sft"
# Methods whose loss has a finite optimum in the margin (a target, a hinge, smoothed labels; Azar et al. 2023, arXiv
# 2310.12036): saturated accuracy does not drive their margins on forever.
FINITE_OPTIMUM = frozenset({"ipo", "cdpo", "robust", "hinge", "rso_hinge", "slic", "sppo", "sppo_hard"})


@dataclass(frozen=True)
class RunContext:
    """What checks need to know about the run, and what their suggestions quote.

    ``kind``: what the run trains (:data:`PREFERENCE`, :data:`REWARD_MODEL`, :data:`POLICY_GRADIENT`, :data:`SFT`);
    each check speaks about some kinds and suggests, for each, what that kind of run can change. ``kl_name`` and
    ``kl_coef``: a policy-gradient method's KL coefficient (``beta`` for GRPO and RLOO, ``kl_coef`` for PPO)."""

    beta: float | None = None  # rewards/* = β·log π/π_ref (reference-based methods); None: read logps/* instead
    learning_rate: float | None = None
    methods: tuple[str, ...] = ()
    ld_alpha: float | None = None
    kind: str = PREFERENCE
    kl_name: str | None = None
    kl_coef: float | None = None

    @classmethod
    def from_config(cls, cfg) -> RunContext:
        """From a :class:`preftune.config.TrainConfig`: β only when the first method's logged rewards are β times
        the summed log-ratio (every reference-based preference method)."""
        from preftune.methods.registry import get_method

        first = get_method(cfg.methods[0])
        kind = (REWARD_MODEL if first.model == "reward" else POLICY_GRADIENT if first.data in ("groups", "experience")
                else SFT if first.data == "sft" else PREFERENCE)
        beta = kl_name = kl_coef = None
        if kind == PREFERENCE and first.needs_reference and "beta" in first.defaults:
            beta = cfg.beta if cfg.beta is not None else first.defaults["beta"]
        if kind == POLICY_GRADIENT:
            kl_name = first.reference_weight or "kl_coef"
            value = getattr(cfg, kl_name, None)
            kl_coef = value if value is not None else first.defaults.get(kl_name)
        return cls(beta=beta, learning_rate=cfg.learning_rate, methods=tuple(cfg.methods), ld_alpha=cfg.ld_alpha,
                   kind=kind, kl_name=kl_name, kl_coef=kl_coef)

    @property
    def method(self) -> str:
        return self.methods[0] if self.methods else "DPO"


@dataclass
class CheckResult:
    """One check's verdict: ``status`` ok / warning / no data; ``step`` where a warning applies (where it tripped,
    or where to stop); ``values`` the numbers behind the evidence (for reports and tests)."""

    name: str
    title: str
    status: str
    evidence: str
    suggestion: str = ""
    step: int | None = None
    values: dict[str, float] = field(default_factory=dict)

    @property
    def warning(self) -> bool:
        return self.status == WARNING

    def __str__(self) -> str:
        where = f" at step {self.step}" if self.step is not None and self.warning else ""
        advice = f" Suggestion: {self.suggestion}" if self.warning and self.suggestion else ""
        return f"[{self.name}] {self.status}{where}: {self.evidence}{advice}"


# ------------------------------------------------------------------------------------ series helpers


def series_from_records(records: Iterable[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """Metric name → ``[(step, value)]`` from records (a record without ``step`` takes its position)."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, record in enumerate(records):
        _append(out, record, i)
    return out


def _append(out: dict[str, list[tuple[int, float]]], record: Mapping, position: int) -> None:
    step = int(record.get(STEP, position))
    for key, value in record.items():
        if key != STEP and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key].append((step, float(value)))


def _finite(series: Series, key: str) -> list[tuple[int, float]]:
    return [(s, v) for s, v in series.get(key, ()) if math.isfinite(v)]


def _last(series: Series, key: str) -> float | None:
    points = _finite(series, key)
    return points[-1][1] if points else None


_SIDES = {"chosen": (REWARDS_CHOSEN, LOGPS_CHOSEN), "rejected": (REWARDS_REJECTED, LOGPS_REJECTED)}


def _log_ratio(series: Series, side: str, ctx: RunContext, prefix: str = "") -> tuple[list[tuple[int, float]], str]:
    """``log π(y)/π_ref(y)`` of the ``side`` responses over steps: ``rewards/side / β`` when β is known, else the
    change of ``logps/side`` since the start (mean of the first two records); and how it was obtained."""
    rewards_name, logps_name = (prefix + name for name in _SIDES[side])
    rewards = _finite(series, rewards_name)
    if ctx.beta and rewards:
        return [(s, v / ctx.beta) for s, v in rewards], "log π/π_ref"
    logps = _finite(series, logps_name)
    if not logps:
        return [], ""
    start = statistics.fmean(v for _, v in logps[:2])
    return [(s, v - start) for s, v in logps], "change of log π since the first logs"


def _sampled_lengths(series: Series) -> list[tuple[int, float]]:
    """Mean length of the policy's samples: a sample evaluation's ``length``, else (online methods) the training
    samples' ``completions/mean_length`` (TRL's name; its EOS rate is 1 − ``completions/clipped_ratio``)."""
    return _finite(series, LENGTH) or _finite(series, COMPLETIONS_MEAN_LENGTH)


def _first_step(points: Sequence[tuple[int, float]], condition: Callable[[float], bool]) -> int | None:
    return next((s for s, v in points if condition(v)), None)


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:+.{digits}f}"


def _beta_advice(ctx: RunContext) -> str:
    """How to hold the policy nearer the reference: β for a preference loss, the KL coefficient for policy
    gradients (GRPO's default β = 0 has no KL term at all: 0.04 was TRL's default before)."""
    if ctx.kind == POLICY_GRADIENT:
        name = ctx.kl_name or "the KL coefficient"
        if not ctx.kl_coef:
            return f"add a KL penalty ({name}=0.04)" if ctx.kl_name else "add a KL penalty"
        return f"raise {name} ({ctx.kl_coef:g} → {2 * ctx.kl_coef:g})"
    return f"raise beta ({ctx.beta:g} → {2 * ctx.beta:g})" if ctx.beta else "raise beta"


def _not_about(name: str, title: str, ctx: RunContext, what: str) -> CheckResult:
    return CheckResult(name, title, NO_DATA, f"not a check for a {ctx.kind} run ({ctx.method}): it reads {what}")


def _lr_advice(ctx: RunContext) -> str:
    lr = ctx.learning_rate
    return f"lower the learning rate ({lr:g} → {lr / 3:.2g})" if lr else "lower the learning rate"


# ------------------------------------------------------------------------------------ checks


def check_likelihood(series: Series, ctx: RunContext, th: Thresholds) -> CheckResult:
    """Chosen (and rejected) log-likelihood on training pairs, relative to the reference."""
    name, title = "likelihood", "Chosen and rejected likelihoods (3D properties)"
    if ctx.kind != PREFERENCE:
        return _not_about(name, title, ctx, "a preference loss's chosen and rejected log-likelihoods")
    chosen, how = _log_ratio(series, "chosen", ctx)
    rejected, _ = _log_ratio(series, "rejected", ctx)
    if not chosen:
        return CheckResult(name, title, NO_DATA, "no logps/chosen or rewards/chosen records (a reward model or an "
                           "unpaired run without chosen responses)")
    last_step, last = chosen[-1]
    rej = rejected[-1][1] if rejected else math.nan
    values = {"chosen": last, "rejected": rej, "threshold": -th.likelihood_drop}
    of_rejected = f", of the rejected {_fmt(rej)} nats" if rejected else ""
    evidence = (f"{how} of the chosen responses {_fmt(last)} nats at step {last_step}{of_rejected} (warns at "
                f"{_fmt(-th.likelihood_drop)})")
    if last > -th.likelihood_drop:
        return CheckResult(name, title, OK, evidence, values=values)
    tripped = _first_step(chosen, lambda v: v <= -th.likelihood_drop)
    both = f" and the rejected even more ({_fmt(rej)})" if rejected and rej < last else of_rejected
    evidence = (f"{how} of the chosen responses fell to {_fmt(last)} nats by step {last_step}{both}: training "
                "lowers the likelihood of the responses it should prefer (response suppression)")
    suggestion = ("add an NLL term on the chosen responses (method=rpo, rpo_alpha=1.0), or "
                  f"{_beta_advice(ctx)}, or train on on-policy pairs (`preftune pairs` from the current policy)")
    return CheckResult(name, title, WARNING, evidence, suggestion, tripped, values)


def check_dispersion(series: Series, ctx: RunContext, th: Thresholds) -> CheckResult:
    """Log-likelihood of held-out (unseen) responses at each evaluation, relative to the reference."""
    name, title = "dispersion", "Held-out responses' likelihood (dispersion)"
    if ctx.kind != PREFERENCE:
        return _not_about(name, title, ctx, "a preference loss's log-likelihoods of held-out responses")
    chosen, how = _log_ratio(series, "chosen", ctx, EVAL_PREFIX)
    rejected, _ = _log_ratio(series, "rejected", ctx, EVAL_PREFIX)
    if not chosen or not rejected:
        return CheckResult(name, title, NO_DATA, "no evaluation records: set eval_steps and give an eval_dataset "
                           "(or eval_split_size) to follow held-out responses")
    rejected_at = dict(rejected)
    unseen = [(s, (v + rejected_at[s]) / 2) for s, v in chosen if s in rejected_at]
    last_step, last = unseen[-1]
    accuracy = _last(series, EVAL_PREFIX + REWARDS_ACCURACIES)
    acc = f"; held-out accuracy {accuracy:.2f}" if accuracy is not None else ""
    values = {"unseen": last, "chosen": chosen[-1][1], "rejected": rejected[-1][1], "threshold": -th.dispersion_drop}
    evidence = (f"{how} of held-out responses {_fmt(last)} nats at step {last_step} (chosen {_fmt(chosen[-1][1])}, "
                f"rejected {_fmt(rejected[-1][1])}){acc}")
    if last > -th.dispersion_drop:
        return CheckResult(name, title, OK, evidence + f" (warns at {_fmt(-th.dispersion_drop)})", values=values)
    tripped = _first_step(unseen, lambda v: v <= -th.dispersion_drop)
    best = _best_eval_step(series)
    stop = f", or stop earlier at step {best} (lowest eval_loss; max_steps={best})" if best is not None else ""
    evidence += ": probability has moved away from responses the policy was not trained on, to responses in neither set"
    suggestion = (f"train on on-policy pairs (`preftune pairs` from the current policy), add an NLL term "
                  f"(method=rpo), or {_beta_advice(ctx)}{stop}")
    return CheckResult(name, title, WARNING, evidence, suggestion, tripped, values)


def _best_eval_step(series: Series) -> int | None:
    points = _finite(series, EVAL_PREFIX + LOSS)
    return min(points, key=lambda p: p[1])[0] if points else None


def check_saturation(series: Series, ctx: RunContext, th: Thresholds) -> CheckResult:
    """Reward accuracy on training pairs: near 1 on consecutive records means the margins only grow from there."""
    name, title = "saturation", "Reward accuracy on training pairs (saturation)"
    if ctx.kind not in (PREFERENCE, REWARD_MODEL):
        return _not_about(name, title, ctx, "the reward accuracy on training pairs")
    accuracy = _finite(series, REWARDS_ACCURACIES)
    if not accuracy:
        return CheckResult(name, title, NO_DATA, "no rewards/accuracies records (unpaired or SFT run)")
    run, start = 0, None
    for i, (_, value) in enumerate(accuracy):
        run = run + 1 if value >= th.saturated_accuracy else 0
        if run >= th.saturation_records:
            start = accuracy[i - run + 1][0]
            break
    margins = dict(_finite(series, REWARDS_MARGINS))
    last_step, last = accuracy[-1]
    values = {"accuracy": last, "margin": margins.get(last_step, math.nan)}
    held_out = _last(series, EVAL_PREFIX + REWARDS_ACCURACIES)
    held = f"; held-out accuracy {held_out:.2f}" if held_out is not None else ""
    if start is None:
        return CheckResult(name, title, OK, f"training accuracy {last:.2f} at step {last_step}{held} (warns at "
                           f"{th.saturated_accuracy:.2f} on {th.saturation_records} consecutive logs)", values=values)
    margin_growth = ""
    if start in margins and last_step in margins:
        first_margin, last_margin = margins[start], margins[last_step]
        grew = "kept growing" if last_margin > first_margin else "did not grow"
        margin_growth = f"; the margin {grew}, {first_margin:.2f} → {last_margin:.2f}"
    best = _best_eval_step(series)
    stop = best if best is not None else start
    why = "lowest eval_loss" if best is not None else "where accuracy saturated"
    stop_earlier = f"stop earlier at step {stop} ({why}; max_steps={stop})"
    if ctx.kind == REWARD_MODEL:
        # Ouyang et al. 2022 (arXiv 2203.02155) train the reward model one epoch: it overfits after that.
        loss = "the Bradley–Terry loss"
        suggestion = (f"{stop_earlier}, train one epoch (num_train_epochs=1: reward models overfit past it), or "
                      f"{_lr_advice(ctx)}; judge the reward model by its held-out accuracy (eval_split_size)")
    else:
        # A loss with a target margin (IPO, hinge, smoothed labels) stops pushing once it is met; DPO's never does.
        loss = None if set(ctx.methods) & FINITE_OPTIMUM else f"the {ctx.method} loss"
        finite = [] if loss is None else ["method=ipo", "cdpo with label_smoothing=0.1"]
        suggestion = f"{stop_earlier}, {_beta_advice(ctx)}" + (
            f", or use a loss with a finite optimum ({', or '.join(finite)})" if finite else "")
    evidence = (f"training accuracy ≥ {th.saturated_accuracy:.2f} since step {start} ({last:.2f} at step "
                f"{last_step}){margin_growth}{held}: the pairs are separated"
                + (f", and {loss} only pushes the margins further" if loss else ""))
    return CheckResult(name, title, WARNING, evidence, suggestion, stop, values)


def check_verbosity(series: Series, ctx: RunContext, th: Thresholds) -> CheckResult:
    """Sampled length against the reference's; the training pairs' lengths; margin–length correlation."""
    name, title = "verbosity", "Response length (verbosity)"
    sampled = _sampled_lengths(series)
    chosen_len, rejected_len = _finite(series, LENGTHS_CHOSEN), _finite(series, LENGTHS_REJECTED)
    correlation = _last(series, LENGTHS_MARGIN_CORR)
    context = []
    values: dict[str, float] = {}
    if chosen_len and rejected_len:
        c, r = statistics.fmean(v for _, v in chosen_len), statistics.fmean(v for _, v in rejected_len)
        values.update(data_chosen=c, data_rejected=r)
        context.append(f"training pairs: chosen {c:.1f} tokens, rejected {r:.1f} ({_fmt(c - r)})")
    if correlation is not None:
        values["margin_corr"] = correlation
        context.append(f"correlation of the reward margin with the length difference r = {correlation:+.2f}")
    detail = ("; " + "; ".join(context)) if context else ""
    suggestion = _verbosity_advice(ctx)
    if sampled:
        reference = _last(series, REF_LENGTH)
        base, base_name = (reference, "π_ref") if reference else (sampled[0][1], f"step {sampled[0][0]}")
        last_step, last = sampled[-1]
        growth = last / base - 1 if base else 0.0
        values.update(length=last, reference_length=base, growth=growth)
        evidence = (f"sampled responses {base:.1f} tokens ({base_name}) → {last:.1f} at step {last_step} "
                    f"({growth:+.0%}){detail}")
        if growth < th.length_growth:
            return CheckResult(name, title, OK, evidence + f" (warns at {th.length_growth:+.0%})", values=values)
        tripped = _first_step(sampled, lambda v: base and v / base - 1 >= th.length_growth)
        return CheckResult(name, title, WARNING, evidence + ": the policy is learning to write longer", suggestion,
                           tripped, values)
    if correlation is None:
        return CheckResult(name, title, NO_DATA, "no sampled lengths (a generation callback logs `length`) and no "
                           "lengths/margin_corr records" + detail)
    if correlation < th.margin_length_corr:
        return CheckResult(name, title, OK, f"no sampled lengths{detail} (warns at r ≥ {th.margin_length_corr})",
                           values=values)
    tripped = _first_step(_finite(series, LENGTHS_MARGIN_CORR), lambda v: v >= th.margin_length_corr)
    return CheckResult(name, title, WARNING, f"the implicit reward follows length{detail}", suggestion, tripped, values)


def _verbosity_advice(ctx: RunContext) -> str:
    """What each kind of run can do about a length bias."""
    if ctx.kind == REWARD_MODEL:
        # A reward model that pays for length teaches the policy to ramble (Singhal et al. 2023, arXiv 2310.03716).
        return ("check whether your chosen responses are simply longer and balance the pairs' lengths: a policy "
                "trained on this reward model will learn to write longer")
    if ctx.kind == POLICY_GRADIENT:
        return (f"check whether your judge rewards length (add a length penalty to its reward), {_beta_advice(ctx)}, "
                "or lower max_completion_length")
    if ctx.kind == SFT:
        return "check whether your SFT targets are longer than the responses you want"
    return ("use LD-DPO (ld_alpha=0.5: tokens past the shorter response count less) or a length-normalised "
            f"method (ipo, simpo), {_beta_advice(ctx)}, and check whether your chosen responses are simply longer")


@dataclass
class GaoFit:
    """Gao et al.'s gold-reward curve against d = √KL: ``rl`` R = R₀ + d(α − β·ln d), ``bon`` R = R₀ + d(α − β·d);
    ``peak_d`` is where it peaks (None when β ≤ 0: no peak)."""

    form: str
    alpha: float
    beta: float
    r0: float
    rmse: float

    @property
    def peak_d(self) -> float | None:
        if self.beta <= 0:
            return None
        return math.exp(self.alpha / self.beta - 1) if self.form == "rl" else self.alpha / (2 * self.beta)

    def __call__(self, d: np.ndarray) -> np.ndarray:
        d = np.asarray(d, dtype=float)
        return self.r0 + d * (self.alpha - self.beta * (_safe_log(d) if self.form == "rl" else d))


def _safe_log(d: np.ndarray) -> np.ndarray:
    return np.log(np.where(d > 0, d, 1.0))  # d·ln d → 0 as d → 0


def fit_gao(d: Sequence[float], reward: Sequence[float], r0: float | None = None) -> dict[str, GaoFit]:
    """Least-squares fits of both forms (linear in α, β; R₀ fixed when given, else fitted). Needs 2 points with
    d > 0 when R₀ is given, 3 otherwise; returns ``{}`` when there are fewer."""
    d, reward = np.asarray(d, dtype=float), np.asarray(reward, dtype=float)
    if len(d) < (2 if r0 is not None else 3) or not np.any(d > 0):
        return {}
    fits = {}
    for form, second in (("rl", -d * _safe_log(d)), ("bon", -d * d)):
        columns = [d, second] + ([] if r0 is not None else [np.ones_like(d)])
        target = reward - (r0 if r0 is not None else 0.0)
        coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), target, rcond=None)
        fit = GaoFit(form, float(coef[0]), float(coef[1]), float(r0 if r0 is not None else coef[2]), 0.0)
        fit.rmse = float(np.sqrt(np.mean((fit(d) - reward) ** 2)))
        fits[form] = fit
    return fits


def gold_points(series: Series) -> list[tuple[int, float, float]]:
    """``(step, √KL, gold reward)`` of every sample evaluation that logged both."""
    kl = dict(_finite(series, KL_TO_REF))
    return [(s, math.sqrt(max(kl[s], 0.0)), r) for s, r in _finite(series, GOLD_REWARD) if s in kl]


def check_over_optimisation(series: Series, ctx: RunContext, th: Thresholds) -> CheckResult:
    """Gold reward against √KL: a peak followed by a lasting fall is Gao et al.'s over-optimisation hump."""
    name, title = "over_optimisation", "Gold reward against √KL (over-optimisation)"
    if ctx.kind == REWARD_MODEL:
        return _not_about(name, title, ctx, "a policy's samples, scored by a gold reward")
    points = gold_points(series)
    if len(points) < 2:
        return CheckResult(name, title, NO_DATA, "fewer than 2 sample evaluations with gold_reward and kl_to_ref "
                           "(a step callback with a gold judge logs them, as in `preftune demo`)")
    r0 = _last(series, REF_GOLD_REWARD)
    fits = fit_gao([p[1] for p in points], [p[2] for p in points], r0)
    peak_step, peak_d, peak_r = max(points, key=lambda p: p[2])
    last_step, last_d, last_r = points[-1]
    start = r0 if r0 is not None else points[0][2]
    values = {"peak_step": peak_step, "peak_reward": peak_r, "peak_sqrt_kl": peak_d, "last_reward": last_r,
              "last_sqrt_kl": last_d}
    fitted = ""
    if "rl" in fits:
        rl = fits["rl"]
        values.update(alpha=rl.alpha, beta=rl.beta)
        largest = max(p[1] for p in points)
        if rl.peak_d is None:
            where = "no fitted peak"
        elif rl.peak_d > 3 * largest:  # an extrapolation, not a located peak
            where = f"fitted peak beyond √KL {3 * largest:.1f}, far past the evaluations"
        else:
            where = f"fitted peak at √KL {rl.peak_d:.2f}"
        fitted = f"; fit R = R₀ + d(α − β·ln d): α = {rl.alpha:.3f}, β = {rl.beta:.3f}, {where}"
    tolerance = max(th.hump_drop, th.hump_fraction * (peak_r - start))
    after_peak = [r for s, _, r in points if s > peak_step]
    fell = len(after_peak) >= th.hump_evaluations and all(r <= peak_r - tolerance
                                                          for r in after_peak[-th.hump_evaluations:])
    if not fell:
        evidence = (f"gold reward {start:.3f} → {last_r:.3f} at step {last_step} (√KL {last_d:.2f}); best "
                    f"{peak_r:.3f} at step {peak_step}{fitted}")
        return CheckResult(name, title, OK, evidence, values=values)
    margins = dict(_finite(series, REWARDS_MARGINS))
    proxy = ""
    if margins:
        near = lambda step: margins[min(margins, key=lambda s: abs(s - step))]  # noqa: E731
        if near(last_step) > near(peak_step):
            proxy = f" while the training reward margin kept rising ({near(peak_step):.2f} → {near(last_step):.2f})"
    evidence = (f"gold reward peaked at {peak_r:.3f} at step {peak_step} (√KL {peak_d:.2f}) and fell to {last_r:.3f} "
                f"by step {last_step} (√KL {last_d:.2f}){proxy}{fitted}")
    suggestion = (f"stop earlier at step {peak_step} (max_steps={peak_step}), or {_beta_advice(ctx)} to spend less KL "
                  "for the same reward")
    return CheckResult(name, title, WARNING, evidence, suggestion, peak_step, values)


def check_eos(series: Series, ctx: RunContext, th: Thresholds) -> CheckResult:
    """EOS rate of samples against the reference's, and responses collapsing to (almost) nothing."""
    name, title = "eos", "EOS rate (responses that end)"
    if ctx.kind == REWARD_MODEL:
        return _not_about(name, title, ctx, "a policy's samples")
    eos = _finite(series, EOS_RATE) or [(s, 1.0 - v) for s, v in _finite(series, COMPLETIONS_CLIPPED_RATIO)]
    if not eos:
        return CheckResult(name, title, NO_DATA, "no eos_rate records (a step callback that samples logs them, as in "
                           "`preftune demo`)")
    reference = _last(series, REF_EOS_RATE)
    base, base_name = (reference, "π_ref") if reference is not None else (eos[0][1], f"step {eos[0][0]}")
    last_step, last = eos[-1]
    values = {"eos_rate": last, "reference_eos_rate": base}
    evidence = f"EOS rate {base:.2f} ({base_name}) → {last:.2f} at step {last_step}"
    if ctx.kind == POLICY_GRADIENT:
        suggestion = (f"{_lr_advice(ctx)}, {_beta_advice(ctx)}, or stop earlier; check whether your judge rewards "
                      "responses that never end, and whether max_completion_length leaves room to finish")
    else:
        beta = "" if ctx.kind == SFT else f", {_beta_advice(ctx)}"  # SFT has no reference to hold it
        suggestion = (f"{_lr_advice(ctx)}{beta}, or stop earlier; check that training completions end with EOS "
                      "(preftune appends one to every completion)")
    if last <= base - th.eos_drop:
        tripped = _first_step(eos, lambda v: v <= base - th.eos_drop)
        return CheckResult(name, title, WARNING, evidence + f": {1 - last:.0%} of samples run to max_new_tokens",
                           suggestion, tripped, values)
    length, ref_length = _sampled_lengths(series), _last(series, REF_LENGTH)
    if length and ref_length and length[-1][1] <= th.length_collapse * ref_length:
        values["length"] = length[-1][1]
        evidence += (f"; responses collapsed from {ref_length:.1f} to {length[-1][1]:.1f} tokens: the policy ends "
                     "them at once")
        tripped = _first_step(length, lambda v: v <= th.length_collapse * ref_length)
        return CheckResult(name, title, WARNING, evidence, suggestion, tripped, values)
    return CheckResult(name, title, OK, evidence + f" (warns {th.eos_drop:.2f} below)", values=values)


def grad_spikes(points: Sequence[tuple[int, float]], th: Thresholds) -> list[tuple[int, float, float]]:
    """``(step, norm, median before)`` of every logged norm above ``grad_spike_factor`` × the median before it (the
    median taken as at least ``grad_spike_floor``)."""
    spikes, before = [], []  # before: the earlier norms, sorted (one insertion per point, not a sort per point)
    for i, (step, value) in enumerate(points):
        if i >= th.grad_spike_history:
            median = _sorted_median(before)
            if value > th.grad_spike_factor * max(median, th.grad_spike_floor):
                spikes.append((step, value, median))
        bisect.insort(before, value)
    return spikes


def _sorted_median(values: Sequence[float]) -> float:
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def check_grad_spikes(series: Series, ctx: RunContext, th: Thresholds) -> CheckResult:
    name, title = "grad_spikes", "Gradient-norm spikes"
    norms = _finite(series, GRAD_NORM)
    if len(norms) <= th.grad_spike_history:
        return CheckResult(name, title, NO_DATA, f"{len(norms)} grad_norm records; spikes are judged against the "
                           f"median of at least {th.grad_spike_history} earlier ones")
    spikes = grad_spikes(norms, th)
    median = statistics.median(v for _, v in norms)
    if not spikes:
        return CheckResult(name, title, OK, f"largest gradient norm {max(v for _, v in norms):.3g}, median "
                           f"{median:.3g} (warns at {th.grad_spike_factor:g}× the median before, never below "
                           f"{th.grad_spike_factor * th.grad_spike_floor:g})",
                           values={"spikes": 0.0, "median": median})
    step, value, before = spikes[0]
    more = f" ({len(spikes)} spikes, at steps {', '.join(str(s) for s, _, _ in spikes[:6])})" if len(spikes) > 1 else ""
    ratio = f"{value / before:.0f}× " if before > 0 else ""
    evidence = f"gradient norm {value:.3g} at step {step}, {ratio}the median {before:.3g} before it{more}"
    suggestion = (f"{_lr_advice(ctx)} or lengthen the warm-up (warmup_ratio); max_grad_norm clips the update, the "
                  "logged norm is before clipping; look at the rows trained at those steps")
    return CheckResult(name, title, WARNING, evidence, suggestion, step, {"spikes": float(len(spikes)),
                                                                          "median": median})


def check_non_finite(series: Series, ctx: RunContext, th: Thresholds) -> CheckResult:
    name, title = "non_finite", "Non-finite values"
    bad = sorted(((s, key) for key, points in series.items() for s, v in points if not math.isfinite(v)))
    if not bad:
        return CheckResult(name, title, OK, f"every logged value is finite ({sum(map(len, series.values()))} values)")
    step = bad[0][0]
    keys = sorted({key for s, key in bad if s == step})
    evidence = f"{', '.join(keys)} not finite at step {step} ({len(bad)} non-finite values in all)"
    suggestion = (f"{_lr_advice(ctx)}; prefer bf16 to fp16; check the rows of that step (a run stopped by a "
                  "non-finite loss names them)")
    return CheckResult(name, title, WARNING, evidence, suggestion, step, {"count": float(len(bad))})


Check = Callable[[Series, RunContext, Thresholds], CheckResult]
CHECKS: tuple[Check, ...] = (check_likelihood, check_dispersion, check_saturation, check_verbosity,
                             check_over_optimisation, check_eos, check_grad_spikes, check_non_finite)


def run_checks(records_or_series: Iterable[Mapping] | Series, ctx: RunContext = RunContext(),
               thresholds: Thresholds = Thresholds(), checks: Sequence[Check] = CHECKS) -> list[CheckResult]:
    """Every check on a whole run: ``records`` (as in ``metrics.jsonl``) or their :data:`Series`."""
    series = records_or_series if isinstance(records_or_series, Mapping) else series_from_records(records_or_series)
    return [check(series, ctx, thresholds) for check in checks]


# The metrics whose arrival can turn each check to a warning: the live monitor reruns a check only on a record
# holding one of them (and never once it has warned), so a long run does not pay every check on every record.
# Non-finite values and gradient spikes are judged on the new value alone (HealthMonitor._may_trip).
TRIGGERS: dict[str, tuple[str, ...]] = {
    "likelihood": (REWARDS_CHOSEN, LOGPS_CHOSEN),
    "dispersion": tuple(EVAL_PREFIX + n for n in (REWARDS_CHOSEN, REWARDS_REJECTED, LOGPS_CHOSEN, LOGPS_REJECTED)),
    "saturation": (REWARDS_ACCURACIES,),
    "verbosity": (LENGTH, REF_LENGTH, LENGTHS_MARGIN_CORR, COMPLETIONS_MEAN_LENGTH),
    "over_optimisation": (GOLD_REWARD, KL_TO_REF, REF_GOLD_REWARD),
    "eos": (EOS_RATE, REF_EOS_RATE, LENGTH, REF_LENGTH, COMPLETIONS_CLIPPED_RATIO, COMPLETIONS_MEAN_LENGTH),
}


class HealthMonitor:
    """The checks, live: feed it every record the run writes; each check warns once.

    ``update(record)`` returns the checks that turned to a warning with this record (each is also logged as a
    warning on the ``preftune`` logger); ``postfix()`` is a short dict for the progress bar; ``results()`` every
    check's current verdict. A check is rerun only when the record could change its verdict (:data:`TRIGGERS`), so
    the cost per record stays linear in the run's length (a whole 5,000-record run in seconds).
    """

    def __init__(self, context: RunContext = RunContext(), thresholds: Thresholds = Thresholds(),
                 checks: Sequence[Check] = CHECKS, log_warnings: bool = True):
        self.context, self.thresholds, self.checks = context, thresholds, tuple(checks)
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.warned: dict[str, CheckResult] = {}
        self.log_warnings = log_warnings
        self.records = 0  # records seen
        self._norms: list[float] = []

    @classmethod
    def from_config(cls, cfg, thresholds: Thresholds = Thresholds()) -> HealthMonitor:
        return cls(RunContext.from_config(cfg), thresholds)

    def update(self, record: Mapping) -> list[CheckResult]:
        may_trip = self._may_trip(record)
        _append(self.series, record, self.records)
        self.records += 1
        new = []
        for check in self.checks:
            name = check.__name__.removeprefix("check_")
            if name in self.warned or not may_trip(name):
                continue
            result = check(self.series, self.context, self.thresholds)
            if result.warning and result.name not in self.warned:
                self.warned[result.name] = result
                new.append(result)
                if self.log_warnings:
                    log.warning("health: %s", result)
        return new

    def _may_trip(self, record: Mapping) -> Callable[[str], bool]:
        """Which checks this record (not yet appended) could turn to a warning."""
        values = {k: v for k, v in record.items() if k != STEP and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        non_finite = any(not math.isfinite(v) for v in values.values())
        spike, norm = False, values.get(GRAD_NORM)
        if norm is not None and math.isfinite(norm):
            before = self._norms  # the finite gradient norms logged so far, sorted
            th = self.thresholds
            spike = (len(before) >= th.grad_spike_history
                     and norm > th.grad_spike_factor * max(_sorted_median(before), th.grad_spike_floor))
            bisect.insort(before, norm)

        th, beta = self.thresholds, self.context.beta

        def may_trip(name: str) -> bool:
            # Checks that judge the last value: a new value on the safe side of the threshold changes nothing.
            if name == "non_finite":
                return non_finite
            if name == "grad_spikes":
                return spike
            if name == "likelihood" and beta and REWARDS_CHOSEN in values:
                return values[REWARDS_CHOSEN] / beta <= -th.likelihood_drop
            if name == "saturation":
                return values.get(REWARDS_ACCURACIES, -math.inf) >= th.saturated_accuracy
            if name == "verbosity" and not {LENGTH, REF_LENGTH, COMPLETIONS_MEAN_LENGTH} & values.keys():
                # sampled lengths decide once there are any; without them, the margin–length correlation
                sampled = self.series.get(LENGTH) or self.series.get(COMPLETIONS_MEAN_LENGTH)
                return not sampled and values.get(LENGTHS_MARGIN_CORR, -math.inf) >= th.margin_length_corr
            return any(key in values for key in TRIGGERS.get(name, values))  # a user's check: every record

        return may_trip

    def results(self) -> list[CheckResult]:
        return run_checks(self.series, self.context, self.thresholds, self.checks)

    def postfix(self) -> dict[str, str]:
        """``{"health": "⚠ verbosity,saturation"}`` once any check warned, else ``{}``."""
        return {"health": "⚠ " + ",".join(self.warned)} if self.warned else {}
