"""Preference losses as pure functions over per-sequence log-probs.

Notation (the DPO paper's, arXiv 2305.18290): for a batch of B pairs,
``s_w = log π_θ(y_w|x)`` and ``s_l = log π_θ(y_l|x)`` are *summed* completion log-probs, shape ``[B]``;
``r_w``, ``r_l`` the same under the frozen reference; ``ρ = s − r`` the log-ratio; ``h = ρ_w − ρ_l``;
``|y|`` the completion token count; ``avg(y) = s/|y|``. Every loss returns per-example losses (the caller
averages them) and the implicit rewards it logs, detached.

Conventions shared by every loss:

* Log-probs always arrive **summed**; a loss that needs averaged log-probs divides by the token counts
  itself, so the caller never has to know which one it is feeding.
* A missing reference (``ref_chosen is None``) means a uniform reference: ``ρ = s`` (``PairLogps.ratios``).
* Hyper-parameters are keyword arguments after the log-probs; the registry holds their defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.methods import rl


@dataclass
class PairLogps:
    """Per-sequence log-probs for B preference pairs. All tensors are fp32, shape ``[B]``.

    ``extras`` carries per-example targets a loss needs besides log-probs, by column name, each ``[B]``
    (SPPO's ``chosen_win_prob`` / ``rejected_win_prob``); a loss reads them with :meth:`extra`.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def extra(self, name: str) -> Tensor:
        """The per-example column ``name`` ``[B]``; a clear error when the batch does not carry it."""
        if name not in self.extras:
            have = ", ".join(sorted(self.extras)) or "none"
            raise ValueError(f"this loss needs the per-example column '{name}' (batch extras: {have}); "
                             f"give every row a '{name}' value")
        return self.extras[name]

    def ratios(self) -> tuple[Tensor, Tensor]:
        """Log-ratios ``(ρ_w, ρ_l)``; a reference-free pair uses a uniform reference (ρ = s)."""
        if self.ref_chosen is None or self.ref_rejected is None:
            return self.chosen, self.rejected
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def averages(self) -> tuple[Tensor, Tensor]:
        """Length-normalised policy log-probs ``(avg(y_w), avg(y_l))`` = ``s / |y|``."""
        return self.chosen / _count(self.chosen_tokens), self.rejected / _count(self.rejected_tokens)

    def chosen_nll(self) -> Tensor:
        """Per-token NLL of the chosen completion, ``−s_w/|y_w|``, shape ``[B]``."""
        return -self.chosen / _count(self.chosen_tokens)


@dataclass
class UnpairedLogps:
    """Per-sequence log-probs for B unpaired examples (KTO), shape ``[B]``.

    ``kl`` / ``ref_kl`` hold log-probs of *mismatched* pairs (x_i, y_j): prompt i with the completion of
    another row j, fixed per row when the data is prepared (``kl_completion_ids``), so that ``kl[i]`` and
    ``ref_kl[i]`` score the same pair whether the reference is live or precomputed. They serve only to
    estimate the KL reference point; only their mean is used, so the caller may pass them gathered over
    processes (any length).
    """

    logps: Tensor
    tokens: Tensor
    desirable: Tensor  # bool
    ref_logps: Tensor | None = None
    kl: Tensor | None = None
    ref_kl: Tensor | None = None


@dataclass
class LossOutput:
    """``losses [B]`` (with grad); ``chosen_rewards`` / ``rejected_rewards`` detached implicit rewards; for a
    weighted combination, ``terms`` maps each method to its own unweighted per-example losses ``[B]``."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # batch-level diagnostics to log (0-dim, detached)


def _count(tokens: Tensor) -> Tensor:
    # An empty completion (fully truncated) would divide by zero; its summed log-prob is 0 anyway.
    return tokens.clamp(min=1)


def _rewards(beta: float, chosen_ratio: Tensor, rejected_ratio: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − eˣ)`` for ``x < 0`` without cancellation (Mächler 2012, Rmpfr vignette).

    Near 0 ``1 − eˣ`` cancels, so use ``log(−expm1(x))``; far from 0 ``expm1`` loses nothing but
    ``log1p(−eˣ)`` is the accurate one. Each branch gets a harmless input where it is not selected so its
    gradient cannot turn into ``0·∞ = NaN`` through ``torch.where``.
    """
    near_zero = x > -math.log(2)
    near = torch.log(-torch.expm1(torch.where(near_zero, x, -1.0)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x)))
    return torch.where(near_zero, near, far)


# --------------------------------------------------------------------------------------------------
# Reference-based paired losses
# --------------------------------------------------------------------------------------------------


def dpo(lp: PairLogps, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), with cDPO label smoothing ε (Mitchell 2023).

    ℓ = −(1−ε)·log σ(β h) − ε·log σ(−β h). At π_θ = π_ref: h = 0, ℓ = ln 2, ∂ℓ/∂s_w = −β/2.
    With ε > 0 (cDPO) the optimum is finite: h* = (1/β)·ln((1−ε)/ε). Shapes: ``[B]`` in, ``[B]`` out.
    """
    rho_w, rho_l = lp.ratios()
    h = rho_w - rho_l
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def robust(lp: PairLogps, beta: float, label_smoothing: float) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), ε = ``label_smoothing`` ∈ [0, ½).

    ℓ = [−(1−ε)·log σ(β h) + ε·log σ(−β h)] / (1 − 2ε): an unbiased estimate of the clean-label DPO loss
    under random flips with rate ε. Unlike cDPO (note the sign of the ε-term) ∂ℓ/∂h < 0 everywhere, so
    the margin is never capped. Shapes: ``[B]`` in, ``[B]`` out.
    """
    rho_w, rho_l = lp.ratios()
    h = rho_w - rho_l
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def ipo(lp: PairLogps, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), β playing the role of τ.

    ℓ = (h̄ − 1/(2β))² with **length-normalised** log-ratios h̄ = ρ_w/|y_w| − ρ_l/|y_l|, as TRL does (the
    paper is silent; TRL reports the IPO authors confirmed it). The target 1/(2β) is therefore in nats
    per token. At π_θ = π_ref: ℓ = 1/(4β²). Logged rewards stay β·ρ (summed). Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    h_avg = rho_w / _count(lp.chosen_tokens) - rho_l / _count(lp.rejected_tokens)
    losses = (h_avg - 1 / (2 * beta)) ** 2
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def hinge(lp: PairLogps, beta: float) -> LossOutput:
    """Hinge-norm (RSO, Liu et al. 2023, arXiv 2309.06657, Eq. 10; TRL ``hinge``): ℓ = max(0, 1 − β h).

    Uses the reference (unlike SLiC's calibration loss, see :func:`slic`); 1/β is the margin in nats of
    the summed log-ratio gap. Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    losses = F.relu(1 - beta * (rho_w - rho_l))
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def dpop(lp: PairLogps, beta: float, dpop_lambda: float) -> LossOutput:
    """DPO-Positive (Smaug, Pal et al. 2024, arXiv 2402.13228).

    ℓ = −log σ(β·[h − λ·max(0, r_w − s_w)]): the penalty sits inside the sigmoid, scaled by β, and is
    active only while the chosen log-prob is below the reference's. r_w − s_w = −ρ_w, so with no
    reference it penalises any s_w < 0 (uniform-reference convention). Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    penalty = F.relu(-rho_w)
    losses = -F.logsigmoid(beta * (rho_w - rho_l - dpop_lambda * penalty))
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def rpo(lp: PairLogps, beta: float, rpo_alpha: float) -> LossOutput:
    """RPO / DPO + NLL (Pang et al. 2024, arXiv 2404.19733): ℓ = ℓ_DPO − α·s_w/|y_w|.

    The NLL is length-normalised **per sequence** (the paper's form); TRL's ``sft`` term instead takes
    one token-mean over the whole batch, which weights long chosen completions more. Shapes: ``[B]``.
    """
    out = dpo(lp, beta)
    return LossOutput(out.losses + rpo_alpha * lp.chosen_nll(), out.chosen_rewards, out.rejected_rewards)


def nca_pair(lp: PairLogps, beta: float) -> LossOutput:
    """NCA, pairwise form (Chen et al. 2024, arXiv 2402.05369; TRL ``nca_pair``).

    ℓ = −log σ(β ρ_w) − ½·log σ(−β ρ_w) − ½·log σ(−β ρ_l): absolute log-ratios, not only their gap, so
    it can push the chosen likelihood up. Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    losses = (
        -F.logsigmoid(beta * rho_w) - 0.5 * F.logsigmoid(-beta * rho_w) - 0.5 * F.logsigmoid(-beta * rho_l)
    )
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def bco_pair(lp: PairLogps, beta: float) -> LossOutput:
    """BCO, pairwise form (Jung et al. 2024, arXiv 2404.04656) as in TRL ≥ 0.29 (no running-mean shift).

    ℓ = −log σ(β ρ_w) − log σ(−β ρ_l): a binary classifier with chosen = 1, rejected = 0. The paper's
    reward shift δ (a running mean of the rewards) is left out, as TRL's current code does. Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    losses = -F.logsigmoid(beta * rho_w) - F.logsigmoid(-beta * rho_l)
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def sppo_hard(lp: PairLogps, beta: float) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675; TRL ``sppo_hard``).

    ℓ = (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²: regresses each summed log-ratio to ±η/2 with η = 1/β
    (P̂(y_w ≻ π) = 1, P̂(y_l ≻ π) = 0). Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    losses = (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def sppo(lp: PairLogps, beta: float) -> LossOutput:
    """SPPO with soft targets (Wu et al. 2024, arXiv 2405.00675, Alg. 1; their ``sppo`` loss), η = 1/β.

    ℓ = ½·[(ρ_w − η(P̂_w − ½))² + (ρ_l − η(P̂_l − ½))²], P̂ = ``lp.extra("chosen_win_prob")`` /
    ``"rejected_win_prob"`` the estimated P(y ≻ π_t) (``preftune.methods.rl.sppo_win_probs``); the reference is
    the previous iterate π_t. At π = π_t: ℓ = ½η²[(P̂_w − ½)² + (P̂_l − ½)²]; with P̂ = (1, 0) it is half of
    :func:`sppo_hard`. Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    eta = 1 / beta
    p_w, p_l = lp.extra("chosen_win_prob"), lp.extra("rejected_win_prob")
    losses = 0.5 * ((rho_w - eta * (p_w - 0.5)) ** 2 + (rho_l - eta * (p_l - 0.5)) ** 2)
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def apo_zero(lp: PairLogps, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7): ℓ = (1 − σ(β ρ_w)) + σ(β ρ_l).

    Raises the chosen and lowers the rejected likelihood independently (for when y_w is better than the
    policy's own outputs). Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    losses = (1 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


def apo_down(lp: PairLogps, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8): ℓ = σ(β ρ_w) + (1 − σ(β h)).

    Lowers the chosen likelihood while keeping the gap (for when y_w is worse than the policy's own
    outputs). Shapes: ``[B]``.
    """
    rho_w, rho_l = lp.ratios()
    losses = torch.sigmoid(beta * rho_w) + (1 - torch.sigmoid(beta * (rho_w - rho_l)))
    return LossOutput(losses, *_rewards(beta, rho_w, rho_l))


# --------------------------------------------------------------------------------------------------
# Reference-free paired losses
# --------------------------------------------------------------------------------------------------


def slic(lp: PairLogps, beta: float, slic_lambda: float) -> LossOutput:
    """SLiC-HF calibration loss (Zhao et al. 2023, arXiv 2305.10425), δ = ``beta``, λ = ``slic_lambda``.

    ℓ = max(0, δ − s_w + s_l) + λ·NLL(y_w), with summed log-probs in the rank term and no reference
    (HALOs ``SLiCTrainer``). Choice: the regulariser uses y_w as the SFT target and is the per-token NLL
    −s_w/|y_w|, so λ does not scale with length. Rewards β·s. Shapes: ``[B]``.
    """
    s_w, s_l = lp.chosen, lp.rejected
    losses = F.relu(beta - s_w + s_l) + slic_lambda * lp.chosen_nll()
    return LossOutput(losses, *_rewards(beta, s_w, s_l))


def simpo(lp: PairLogps, beta: float, simpo_gamma: float, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734), no reference.

    x = β·avg(y_w) − β·avg(y_l) − γ;  ℓ = −(1−ε)·log σ(x) − ε·log σ(−x).
    ``simpo_gamma`` is the **absolute** margin γ (TRL's convention), not the SimPO repo's ratio γ/β.
    ∂ℓ/∂avg(y_w) = −β·σ(−x) for ε = 0. Rewards β·avg(y). Shapes: ``[B]``.
    """
    avg_w, avg_l = lp.averages()
    x = beta * avg_w - beta * avg_l - simpo_gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    return LossOutput(losses, *_rewards(beta, avg_w, avg_l))


def orpo(lp: PairLogps, beta: float) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691), no reference, λ = ``beta`` (TRL's name).

    With P(y) = exp(avg(y)): log OR = [avg_w − avg_l] − [log(1 − e^{avg_w}) − log(1 − e^{avg_l})],
    ℓ = NLL(y_w) − β·log σ(log OR), NLL(y_w) = −avg_w. ``log(1 − eˣ)`` is computed by a stable log1mexp,
    and averages are clamped to ≤ −1e-12 so a saturated token distribution (avg exactly 0, P = 1) gives a
    large finite log-odds instead of ∞/NaN. Rewards β·avg(y), as TRL logs them. Shapes: ``[B]``.
    """
    avg_w, avg_l = lp.averages()
    odds_w, odds_l = avg_w.clamp(max=-1e-12), avg_l.clamp(max=-1e-12)
    log_odds = (odds_w - odds_l) - (_log1mexp(odds_w) - _log1mexp(odds_l))
    ratio_term = F.logsigmoid(log_odds)
    losses = -avg_w - beta * ratio_term
    metrics = {"nll_loss": -avg_w.detach().mean(), "log_odds_ratio": ratio_term.detach().mean(),
               "log_odds_chosen": log_odds.detach().mean()}  # TRL's ORPO metrics
    return LossOutput(losses, *_rewards(beta, avg_w, avg_l), metrics=metrics)


def cpo(lp: PairLogps, beta: float, cpo_alpha: float) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv 2401.08417): ℓ = −log σ(β(s_w − s_l)) + α·NLL(y_w), no reference.

    DPO with a uniform reference plus behaviour cloning on y_w; summed log-probs in the sigmoid term,
    per-token NLL −s_w/|y_w| per sequence (TRL averages over the batch's tokens instead). Rewards β·s.
    Shapes: ``[B]``.
    """
    s_w, s_l = lp.chosen, lp.rejected
    losses = -F.logsigmoid(beta * (s_w - s_l)) + cpo_alpha * lp.chosen_nll()
    return LossOutput(losses, *_rewards(beta, s_w, s_l))


def sft(lp: PairLogps | UnpairedLogps, beta: float) -> LossOutput:
    """Supervised fine-tuning on the chosen completion: ℓ = −s_w/|y_w| (per-token NLL of each sequence).

    As a term in a weighted sum it gives RPO / MPO recipes (``["dpo", "sft"]``, weights ``[1, α]``).
    On SFT rows (:class:`UnpairedLogps`, every completion a target) ℓ = −s/|y| per row.
    Choice: per-sequence token mean, averaged over the batch by the caller (TRL takes one token mean
    over the batch). ``beta`` only scales the logged rewards β·ρ (β·s when there is no reference), so
    an SFT run still shows how the chosen and rejected log-probs move. Shapes: ``[B]``.
    """
    if isinstance(lp, UnpairedLogps):
        rho = lp.logps if lp.ref_logps is None else lp.logps - lp.ref_logps
        return LossOutput(-lp.logps / _count(lp.tokens), (beta * rho).detach(), rho.new_zeros(0))
    rho_w, rho_l = lp.ratios()
    return LossOutput(lp.chosen_nll(), *_rewards(beta, rho_w, rho_l))


def unlikelihood(lp: PairLogps, unlikelihood_alpha: float) -> LossOutput:
    """Unlikelihood, the DPO paper's baseline (Rafailov et al. 2023 §6; Welleck et al. 2019, arXiv 1908.04319).

    ℓ = −avg(y_w) − α·log(1 − exp(avg(y_l))): raise the chosen likelihood, push the rejected one down with a
    bounded penalty. The paper prints no formula; this is Welleck's −log(1 − p) applied to the geometric-mean
    token probability exp(avg(y_l)) of the rejected completion, so it needs only per-sequence log-probs.
    No reference; rewards are avg(y). Shapes: ``[B]``.
    """
    avg_w, avg_l = lp.averages()
    losses = -avg_w - unlikelihood_alpha * _log1mexp(avg_l.clamp(max=-1e-12))
    return LossOutput(losses, avg_w.detach(), avg_l.detach())


def bradley_terry(lp: PairLogps, center_rewards_coefficient: float) -> LossOutput:
    """Reward modelling under Bradley–Terry (Ouyang et al. 2022, arXiv 2203.02155, Eq. 1).

    Here ``lp.chosen`` / ``lp.rejected`` hold the scalar rewards r_w, r_l of a scoring head, not log-probs:
    ℓ = −log σ(r_w − r_l) + c·(r_w + r_l)², the second term (TRL's ``center_rewards_coefficient``, Eisenstein
    et al. 2023) keeps rewards centred on 0. Rewards logged are r itself. Shapes: ``[B]``.
    """
    r_w, r_l = lp.chosen, lp.rejected
    losses = -F.logsigmoid(r_w - r_l) + center_rewards_coefficient * (r_w + r_l) ** 2
    return LossOutput(losses, r_w.detach(), r_l.detach())


# --------------------------------------------------------------------------------------------------
# Unpaired
# --------------------------------------------------------------------------------------------------


def kto(lp: UnpairedLogps, beta: float, desirable_weight: float, undesirable_weight: float) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired examples.

    ρ = s − r (summed); reference point z₀ = max(0, mean(kl − ref_kl)) over the given mismatched pairs,
    **detached** (its gradient destabilises training); z₀ = 0 when ``kl`` is None.
      desirable:   ℓ = λ_D·(1 − σ(β(ρ − z₀)))
      undesirable: ℓ = λ_U·(1 − σ(β(z₀ − ρ)))
    At π_θ = π_ref: ℓ = λ/2. Shapes: ``[B]`` in, losses ``[B]``; rewards β·ρ of the desirable examples
    (``chosen_rewards``, ``[n_D]``) and of the undesirable ones (``rejected_rewards``, ``[n_U]``).
    """
    rho = lp.logps if lp.ref_logps is None else lp.logps - lp.ref_logps
    if lp.kl is None:
        z0 = torch.zeros((), dtype=rho.dtype, device=rho.device)
    else:
        kl = lp.kl if lp.ref_kl is None else lp.kl - lp.ref_kl
        z0 = kl.mean().clamp(min=0).detach()
    desirable = lp.desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (rho - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rho))),
    )
    rewards = (beta * rho).detach()
    return LossOutput(losses, rewards[desirable], rewards[~desirable], metrics={"kl": z0})


# --------------------------------------------------------------------------------------------------
# Online groups: G completions of each prompt sampled from the current policy (RLOO, GRPO)
# --------------------------------------------------------------------------------------------------


@dataclass
class GroupLogps:
    """S completions sampled from the current policy, in groups (the completions of one prompt).

    Per token ``[M]`` (grouped by sequence, in token order, as ``completion_logps`` lays them out):
    ``token_logps`` = log π(y_t | x, y_<t) with gradient, ``token_seq`` its sequence, ``ref_token_logps`` under
    the reference (None: no reference). Per sequence ``[S]``: ``tokens`` = |y|, ``rewards`` the judge's
    scores (missing-EOS penalty applied), ``group`` the prompt each completion answers.
    ``max_completion_length`` is the generation budget (Dr. GRPO's normaliser). ``old_token_logps [M]`` =
    log π_old(y_t), the sampler's, when the policy has moved since it sampled them (``num_iterations`` > 1, several
    steps per generation); None: π_old = π (one gradient step per generation), the ratio is 1, its gradient ∇log π.
    When these S completions are one of n micro-batches of a generation batch (gradient accumulation, several
    processes), the batch's statistics come with them as 0-dim tensors: ``batch_reward_std`` (std of all its
    rewards), ``num_tokens`` and ``num_sequences`` (its completion tokens and completions divided by n), so
    that the mean of the n micro-batch losses is the generation batch's loss; None: these S are the batch.
    """

    token_logps: Tensor
    token_seq: Tensor
    tokens: Tensor
    rewards: Tensor
    group: Tensor
    ref_token_logps: Tensor | None = None
    max_completion_length: int | None = None
    batch_reward_std: Tensor | None = None
    num_tokens: Tensor | None = None
    num_sequences: Tensor | None = None
    old_token_logps: Tensor | None = None

    @property
    def old(self) -> Tensor:
        """log π_old per token ``[M]``, without gradient: the sampler's, or the policy's own when they are one."""
        return (self.token_logps if self.old_token_logps is None else self.old_token_logps).detach()


def _per_sequence(loss: Tensor, lp: GroupLogps) -> Tensor:
    """``[S]`` values whose mean is ``loss``, so the loop's per-example mean and logs stay one convention."""
    return loss.expand(lp.tokens.shape[0])


def grpo(lp: GroupLogps, beta: float, epsilon: float, epsilon_high: float, scale_rewards: str,
         grpo_loss_type: str, use_bias_correction_kl: bool) -> LossOutput:
    """GRPO (Shao et al. 2024, arXiv 2402.03300, Eq. 3): group-normalised advantages
    A_i = (r_i − mean_group r)/(std_group r + 1e-4) (``scale_rewards``: group | batch | none — Dr. GRPO's
    mean-centring, arXiv 2503.20783), the clipped surrogate per token with β·k3 KL to the reference in the loss,
    aggregated by ``grpo_loss_type`` (grpo: per-sequence token mean; dr_grpo: Σ/(max_completion_length·S);
    dapo: Σ/total tokens, arXiv 2503.14476, Eq. 8), each over the whole generation batch (``lp.num_tokens``,
    ``lp.num_sequences``, ``lp.batch_reward_std``). ``epsilon_high`` ≤ 0 means ε_high = ε.
    ``use_bias_correction_kl``: the KL term is ρ·k3 (DeepSeek-V3.2, arXiv 2512.02556; TRL's default), whose
    gradient is the unbiased reverse-KL gradient (:func:`preftune.methods.rl.policy_loss`). At π = π_ref with
    one step per generation: loss −agg(A) (0 under grpo/dapo up to length effects), KL 0.
    Rewards logged: mean score of the group's completions; ``metrics`` holds the clip fractions and the KL.
    """
    advantages = rl.grpo_advantages(lp.rewards, lp.group, scale=scale_rewards, batch_std=lp.batch_reward_std)
    loss, metrics = rl.policy_loss(
        lp.token_logps, lp.old, advantages[lp.token_seq], lp.token_seq, lp.tokens, eps_low=epsilon,
        eps_high=epsilon_high if epsilon_high > 0 else None, ref_logp=lp.ref_token_logps if beta else None,
        beta=beta, loss_type=grpo_loss_type, max_completion_length=lp.max_completion_length,
        num_tokens=lp.num_tokens, num_sequences=lp.num_sequences, kl_importance_weight=bool(use_bias_correction_kl))
    metrics["advantage_std"] = advantages.std(unbiased=False) if advantages.numel() > 1 else advantages.sum() * 0
    return LossOutput(_per_sequence(loss, lp), lp.rewards, lp.rewards[:0], metrics=metrics)


def gspo(lp: GroupLogps, beta: float, epsilon: float, epsilon_high: float, scale_rewards: str) -> LossOutput:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071, Eq. 5–7): GRPO's group-normalised advantages with the importance
    ratio of whole sequences, length-normalised, s_i = (π(y_i|x)/π_old(y_i|x))^{1/|y_i|} = exp(mean_t (log π −
    log π_old)(y_i,t)), clipped per sequence: ℓ = −(1/S)·Σ_i min(s_i·A_i, clip(s_i, 1−ε, 1+ε_high)·A_i)
    (+ β·s_i·mean_t k3_i,t with a reference, as GRPO's bias-corrected KL), S the generation batch's completions
    (``lp.num_sequences``). ``epsilon_high`` ≤ 0 means ε_high = ε. At π_old = π: s = 1, value −mean(A), gradient
    −mean_i A_i·mean_t ∇log π(y_i,t). Shapes as :class:`GroupLogps`."""
    advantages = rl.grpo_advantages(lp.rewards, lp.group, scale=scale_rewards, batch_std=lp.batch_reward_std)
    eps_high = epsilon_high if epsilon_high > 0 else epsilon
    ratio = torch.exp(rl.seq_mean(lp.token_logps - lp.old, lp.token_seq, lp.tokens))  # s_i [S]
    per_sequence = -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + eps_high) * advantages)
    metrics = rl._clip_metrics(ratio.detach(), advantages, epsilon, eps_high)  # fractions of sequences
    if lp.ref_token_logps is not None and beta:
        kl = rl.seq_mean(rl.token_kl(lp.token_logps, lp.ref_token_logps.detach(), "k3"), lp.token_seq, lp.tokens)
        per_sequence = per_sequence + beta * ratio * kl
        metrics["kl"] = kl.detach().mean()
    loss = per_sequence.sum() / (lp.tokens.shape[0] if lp.num_sequences is None else lp.num_sequences)
    return LossOutput(_per_sequence(loss, lp), lp.rewards, lp.rewards[:0], metrics=metrics)


def rloo(lp: GroupLogps, beta: float, epsilon: float) -> LossOutput:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740; TRL's RLOOTrainer): the KL enters the reward,
    r̃_i = r_i − β·Σ_t (log π − log π_ref)(y_t) (k1 summed, detached), the baseline is the mean of the
    other completions of the prompt, A_i = r̃_i − mean_{j≠i} r̃_j, and the loss is the sequence-level clipped
    surrogate with ratio exp(Σ log π − Σ log π_old) (1 with one step per generation: ∇ℓ = −mean_i A_i ∇log π(y_i)),
    the KL in the reward that of π_old, the sampler.
    Rewards logged: the KL-penalised rewards r̃; ``metrics`` the KL to the reference under the names every online
    method logs (:func:`preftune.methods.rl.kl_to_reference`): ``kl`` per token, and ``objective/kl`` the
    per-completion Σ_t (log π − log π_ref) that enters r̃.
    """
    seq_logps = rl.seq_sum(lp.token_logps, lp.token_seq, lp.tokens)
    old_seq_logps = rl.seq_sum(lp.old, lp.token_seq, lp.tokens)
    if lp.ref_token_logps is None or not beta:
        shaped = lp.rewards
    else:  # the KL of the sampler, as at generation time, whichever pass this is
        ref = rl.seq_sum(lp.ref_token_logps, lp.token_seq, lp.tokens)
        shaped = rl.kl_penalised_rewards(lp.rewards, old_seq_logps, ref, beta)
    advantages = rl.rloo_advantages(shaped, lp.group)
    loss, metrics = rl.sequence_policy_loss(seq_logps, old_seq_logps, advantages, eps_low=epsilon)
    if lp.ref_token_logps is not None:
        kls = rl.kl_to_reference(lp.token_logps, lp.ref_token_logps, lp.token_seq, lp.tokens)
        metrics |= {"kl": kls["kl"], "objective/kl": kls["objective/kl"].mean()}
    return LossOutput(_per_sequence(loss, lp), shaped.detach(), shaped[:0].detach(), metrics=metrics)


# --------------------------------------------------------------------------------------------------
# Combining losses and per-pair / per-token weights
# --------------------------------------------------------------------------------------------------


def combine(terms: list[tuple[LossOutput, float]]) -> LossOutput:
    """Weighted sum ``Σ_k w_k·ℓ_k`` of per-example losses; the rewards are those of the first term."""
    if not terms:
        raise ValueError("combine() needs at least one (LossOutput, weight) term")
    losses = sum(weight * out.losses for out, weight in terms)
    first = terms[0][0]
    return LossOutput(losses, first.chosen_rewards, first.rejected_rewards)


def wpo_weights(chosen_log_weight: Tensor, rejected_log_weight: Tensor) -> Tensor:
    """WPO pair weights (Zhou et al. 2024, arXiv 2406.11827): w = exp(w_c + w_r), detached, shape ``[B]``.

    Each log-weight is the per-sequence mean over completion tokens of ``log p(y_t) − log Σ_v p_v²``
    (computed with the log-probs). The weight only re-weights pairs; no gradient flows through it. Not
    clamped (TRL ≥ 0.29; older TRL clamped at 1).
    """
    return torch.exp(chosen_log_weight + rejected_log_weight).detach()


def ld_token_weights(score_seq: Tensor, seq_tokens: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO token weights (Liu et al. 2024, arXiv 2409.06411).

    With l_p = min(|y_w|, |y_l|) per pair, a sequence's log-prob becomes Σ_{t≤l_p} log p + α·Σ_{t>l_p} log p;
    apply the returned weights to the per-token log-probs of the policy **and** the reference.
    ``seq_tokens [2B]`` holds |y| for chosen sequences ``0..B-1`` and rejected ``B..2B-1``; ``score_seq [M]``
    names the sequence of each scored token, grouped by sequence in token order. Returns fp32 ``[M]``:
    1 on the first l_p tokens of each sequence, α after them.
    """
    half = seq_tokens.shape[0] // 2
    public = torch.minimum(seq_tokens[:half], seq_tokens[half:]).repeat(2)
    starts = torch.cumsum(seq_tokens, 0) - seq_tokens
    rank = torch.arange(score_seq.shape[0], device=score_seq.device) - starts[score_seq]  # 0-based within sequence
    one = torch.ones((), dtype=torch.float32, device=score_seq.device)
    return torch.where(rank < public[score_seq], one, one * ld_alpha)


__all__ = [
    "PairLogps",
    "UnpairedLogps",
    "LossOutput",
    "dpo",
    "robust",
    "ipo",
    "hinge",
    "dpop",
    "rpo",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "sppo",
    "apo_zero",
    "apo_down",
    "slic",
    "simpo",
    "orpo",
    "cpo",
    "sft",
    "bradley_terry",
    "unlikelihood",
    "kto",
    "GroupLogps",
    "grpo",
    "rloo",
    "combine",
    "wpo_weights",
    "ld_token_weights",
]
