"""The mathematics of online and RL preference tuning as pure functions: tensors in, tensors out.

Layout (``preftune.data.batching``'s, as ``preftune.modeling.logprobs.completion_logps`` scores it), for S
sequences holding M scored completion tokens in all:

* per-token tensors are flat ``[M]``, grouped by sequence, in token order; ``token_seq [M]`` (the batch's
  ``score_seq``) is the sequence of each token and ``seq_tokens [S]`` the token count of each sequence;
* per-sequence tensors are ``[S]``;
* ``group [S]`` (int64) names the prompt each sequence was sampled for, ids ``0..P-1`` in any order: with the
  G completions of a prompt contiguous it is ``arange(S) // G``, numbered branch-major (completion k of prompt i
  at k·P + i, as paired batches are) it is ``arange(S) % P``.

Log-probs are natural logs in fp32. Anything that is a *target* (advantages, returns, shaped rewards, baselines)
is computed from detached inputs: no gradient flows through a baseline or a value target. Losses return
``(loss, metrics)``: a scalar with grad, and detached 0-dim tensors (no host sync; the loop decides when to read).

Papers: PPO (Schulman et al. 2017, arXiv 1707.06347), GAE (Schulman et al. 2015, arXiv 1506.02438), RLHF with
an adaptive KL (Ziegler et al. 2019, arXiv 1909.08593), GRPO (Shao et al. 2024, arXiv 2402.03300), Dr. GRPO
(Liu et al. 2025, arXiv 2503.20783), DAPO (Yu et al. 2025, arXiv 2503.14476), RLOO (Ahmadian et al. 2024,
arXiv 2402.14740), RSO (Liu et al. 2023, arXiv 2309.06657), SPPO (Wu et al. 2024, arXiv 2405.00675), and the
PPO-for-RLHF details of Huang et al. 2024 (arXiv 2403.17031).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from preftune.metric_names import KL, OBJECTIVE_KL

KLEstimator = Literal["k1", "k2", "k3"]
LossType = Literal["grpo", "dr_grpo", "dapo"]
RewardScale = Literal["group", "batch", "none"]
Metrics = dict[str, Tensor]

# --------------------------------------------------------------------------------------------------
# The flat layout
# --------------------------------------------------------------------------------------------------


def seq_sum(values: Tensor, token_seq: Tensor, seq_tokens: Tensor) -> Tensor:
    """Σ over each sequence's tokens: ``[M]`` → ``[S]`` (0 for an empty sequence)."""
    return values.new_zeros(seq_tokens.shape[0]).index_add(0, token_seq, values)


def seq_mean(values: Tensor, token_seq: Tensor, seq_tokens: Tensor) -> Tensor:
    """Mean over each sequence's tokens: ``[M]`` → ``[S]`` (0 for an empty sequence)."""
    return seq_sum(values, token_seq, seq_tokens) / seq_tokens.clamp(min=1).to(values.dtype)


def token_positions(token_seq: Tensor, seq_tokens: Tensor) -> Tensor:
    """0-based position of each token within its sequence, ``[M]`` (tokens grouped by sequence, in order)."""
    starts = torch.cumsum(seq_tokens, 0) - seq_tokens
    return torch.arange(token_seq.shape[0], device=token_seq.device) - starts[token_seq]


def last_token_index(seq_tokens: Tensor) -> Tensor:
    """Flat index ``[S]`` of each sequence's last token; raises if a sequence has no token to hold it."""
    if bool((seq_tokens < 1).any()):
        empty = (seq_tokens < 1).nonzero().flatten().tolist()
        raise ValueError(f"sequences {empty} have no completion tokens: a per-sequence score has no token to go to")
    return torch.cumsum(seq_tokens, 0) - 1


# --------------------------------------------------------------------------------------------------
# KL to the reference
# --------------------------------------------------------------------------------------------------


def token_kl(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k1", clamp: float | None = None) -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from a sample y_t ~ π (Schulman 2020, "Approximating KL Divergence").

    With log-ratio u = log π(y_t) − log π_ref(y_t): k1 = u (unbiased, can be negative); k2 = u²/2 (biased, ≥ 0);
    k3 = e^{−u} − 1 + u (unbiased, ≥ 0; GRPO's, arXiv 2402.03300 Eq. 4). Gradients flow through both inputs.
    ``clamp`` bounds the estimate to [−clamp, clamp] (OpenRLHF uses 10). At π = π_ref all three are 0.
    Shapes: ``[M]`` in, ``[M]`` out.
    """
    u = logp - ref_logp
    if estimator == "k1":
        kl = u
    elif estimator == "k2":
        kl = u.square() / 2
    elif estimator == "k3":
        kl = torch.exp(-u) - 1 + u
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1', 'k2' or 'k3'")
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def kl_to_reference(logp: Tensor, ref_logp: Tensor, token_seq: Tensor, seq_tokens: Tensor) -> dict[str, Tensor]:
    """The KL to the reference every online method logs on its samples y ~ π (detached), one definition each:

    * ``kl`` — per token: mean over the completion tokens of k3 = e^{−u} − 1 + u, u = log π(y_t) − log π_ref(y_t)
      (:func:`token_kl`; TRL's GRPO ``kl``), 0-dim;
    * ``objective/kl`` — per completion: Σ_t u_t, the sequence-level k1 (TRL's Online DPO, RLOO and PPO
      ``objective/kl``), ``[S]``.

    Both estimate KL(π‖π_ref) without bias, one per token, the other per completion; both are 0 at π = π_ref.
    Shapes: ``logp``, ``ref_logp``, ``token_seq`` ``[M]``, ``seq_tokens`` ``[S]``.
    """
    logp, ref_logp = logp.detach(), ref_logp.detach()
    return {KL: token_kl(logp, ref_logp, "k3").mean(), OBJECTIVE_KL: seq_sum(logp - ref_logp, token_seq, seq_tokens)}


def best_of_n_kl(n: int) -> float:
    """KL(π_bon‖π) = log n − (n−1)/n of best-of-n sampling (Gao et al. 2022, arXiv 2210.10760, §2).

    Exact for continuous rewards with no ties; an upper bound otherwise (Beirami et al. 2024, arXiv 2401.01879).
    n = 1 → 0; n = 2 → ln 2 − ½ ≈ 0.193; n = 64 → ≈ 3.17 nats.
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n ≥ 1, got {n}")
    return math.log(n) - (n - 1) / n


# --------------------------------------------------------------------------------------------------
# Scores and critic-free advantages
# --------------------------------------------------------------------------------------------------


def missing_eos_penalty(scores: Tensor, ended_with_eos: Tensor, penalty: float) -> Tensor:
    """``score − penalty`` for each completion that did not end with EOS (cut at the length limit), ``[S]``."""
    return scores - penalty * (~ended_with_eos.bool()).to(scores.dtype)


def kl_penalised_rewards(scores: Tensor, old_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """RLOO's reward with the KL inside (as TRL's RLOO): r = score − β·(Σ_t log π_old − Σ_t log π_ref), ``[S]``.

    Summed k1 on the sampling policy's log-probs, detached; apply before the baseline. ``old_logps`` and
    ``ref_logps`` are summed per sequence, ``[S]``. Also Online DPO's logged "rlhf_reward".
    """
    return scores - beta * (old_logps - ref_logps).detach()


def _group_sums(values: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group Σ and count, each ``[P]``, P = max(group) + 1."""
    n_groups = int(group.max()) + 1
    total = values.new_zeros(n_groups).index_add(0, group, values)
    count = values.new_zeros(n_groups).index_add(0, group, torch.ones_like(values))
    if bool((count < 2).any()):
        raise ValueError("every group needs at least 2 completions (group ids must be 0..P-1 with no gaps)")
    return total, count


def _group_range(rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group max and min, each ``[P]``."""
    n_groups = int(group.max()) + 1
    hi = rewards.new_full((n_groups,), -math.inf).scatter_reduce(0, group, rewards, "amax")
    lo = rewards.new_full((n_groups,), math.inf).scatter_reduce(0, group, rewards, "amin")
    return hi, lo


def zero_spread(rewards: Tensor, group: Tensor) -> Tensor:
    """Per-sequence bool ``[S]``: True where every completion of its group has the same reward (no signal)."""
    hi, lo = _group_range(rewards.detach(), group)
    return (hi == lo)[group]


def zero_spread_fraction(rewards: Tensor, group: Tensor) -> Tensor:
    """Fraction of groups whose rewards are all equal (TRL's ``frac_reward_zero_std``), a 0-dim tensor.

    Such a group has advantage 0 everywhere and teaches nothing; a fraction near 1 means the task is too easy
    or too hard for the sampler. Shapes: ``rewards``, ``group`` ``[S]``.
    """
    hi, lo = _group_range(rewards.detach(), group)
    return (hi == lo).to(rewards.dtype).mean()


def grpo_advantages(rewards: Tensor, group: Tensor, scale: RewardScale = "group", eps: float = 1e-4,
                    batch_std: Tensor | float | None = None) -> Tensor:
    """Group-normalised advantages (GRPO, Shao et al. 2024, arXiv 2402.03300, §4.1.2), ``[S]`` → ``[S]``.

    A_i = (r_i − mean_g r) / (σ + eps), σ the **unbiased** std of the group (``scale="group"``, TRL's default) or
    of the whole batch (``"batch"``); ``"none"`` keeps A_i = r_i − mean_g r (Dr. GRPO, arXiv 2503.20783, §3.1).
    A group with zero spread gets exactly 0 (no NaN, no rounding residue). Σ_g A = 0 within each group. Pass
    whole groups; for ``"batch"``, ``batch_std`` is the std of the whole generation batch's rewards (all
    micro-batches, gathered over processes, as TRL computes it) when ``rewards`` are only part of it.
    """
    r = rewards.detach()
    total, count = _group_sums(r, group)
    centred = r - (total / count)[group]
    if scale == "group":
        var = r.new_zeros(count.shape[0]).index_add(0, group, centred.square()) / (count - 1)
        centred = centred / (var.sqrt()[group] + eps)
    elif scale == "batch":
        centred = centred / ((r.std() if batch_std is None else batch_std) + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scale {scale!r}; use 'group', 'batch' or 'none'")
    return torch.where(zero_spread(r, group), torch.zeros_like(centred), centred)


def rloo_advantages(rewards: Tensor, group: Tensor) -> Tensor:
    """Leave-one-out baseline (RLOO, Ahmadian et al. 2024, arXiv 2402.14740): A_i = r_i − mean_{j≠i, j∈g} r_j.

    Equals k/(k−1)·(r_i − mean_g r) for a group of k, so Σ_g A = 0; with k = 2, A = ±(r_1 − r_2). A group with
    zero spread gets exactly 0. Shapes: ``[S]`` → ``[S]``.
    """
    r = rewards.detach()
    total, count = _group_sums(r, group)
    advantages = r - (total[group] - r) / (count[group] - 1)
    return torch.where(zero_spread(r, group), torch.zeros_like(advantages), advantages)


# --------------------------------------------------------------------------------------------------
# Clipped policy losses (GRPO family, PPO; RLOO's sequence-level form)
# --------------------------------------------------------------------------------------------------


def aggregate(
    per_token: Tensor,
    token_seq: Tensor,
    seq_tokens: Tensor,
    loss_type: LossType,
    max_completion_length: int | None = None,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[M]`` to a scalar.

    ``grpo``: mean over each sequence's tokens, then over sequences (arXiv 2402.03300, Eq. 3) — a long
    completion's tokens weigh less. ``dr_grpo``: Σ / (max_completion_length·S) (arXiv 2503.20783, §3.1) — no
    length bias. ``dapo``: Σ / total tokens (arXiv 2503.14476, Eq. 8; PPO's token mean). ``num_tokens`` and
    ``num_sequences`` override the token count T and the sequence count S: a micro-batch that is one of n equal
    shares of a generation batch passes T_gen/n and S_gen/n, so that the mean of the n shares is the generation
    batch's loss (DAPO's token mean is over the whole batch, Eq. 8).
    """
    sequences = seq_tokens.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        return seq_mean(per_token, token_seq, seq_tokens).sum() / sequences
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' divides by max_completion_length: pass it")
        return per_token.sum() / (max_completion_length * sequences)
    if loss_type == "dapo":
        return per_token.sum() / (max(per_token.shape[0], 1) if num_tokens is None else num_tokens)
    raise ValueError(f"unknown loss_type {loss_type!r}; use 'grpo', 'dr_grpo' or 'dapo'")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    token_seq: Tensor,
    seq_tokens: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    loss_type: LossType = "dapo",
    max_completion_length: int | None = None,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    kl_importance_weight: bool = False,
) -> tuple[Tensor, Metrics]:
    """Clipped surrogate per token (PPO, arXiv 1707.06347, Eq. 7; GRPO, arXiv 2402.03300, Eq. 3).

    ρ_t = exp(log π(y_t) − log π_old(y_t));  ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1−ε_low, 1+ε_high)·A_t) + β·k3_t,
    k3 against ``ref_logp`` when given (GRPO's KL in the loss); with ``kl_importance_weight`` the k3 term is
    ρ_t·k3_t (the DeepSeek-V3.2 correction, arXiv 2512.02556; TRL's ``use_bias_correction_kl``): on-policy
    its value is unchanged but its gradient gains k3_t·∇log π, the score-function term that makes it the unbiased
    gradient of the reverse KL(π‖π_ref); without it, E_π[∇k3] = −Σ_y π_ref(y)∇log π(y), the gradient of the
    forward KL(π_ref‖π). Aggregated by :func:`aggregate`. ε_high defaults
    to ε_low (DAPO's clip-higher sets it larger, arXiv 2503.14476, §3.1). Where the clip is active (ρ > 1+ε_high
    with A > 0, ρ < 1−ε_low with A < 0) the token's gradient is 0. With π_old = π (``old_logp = logp.detach()``,
    one step per generation) ρ = 1: value −agg(A), gradient −agg(A·∇log π), the plain policy gradient.
    PPO uses ``loss_type="dapo"`` (token mean). Shapes: ``logp``, ``old_logp``, ``advantages`` (per token; for
    per-sequence advantages pass ``adv[token_seq]``), ``ref_logp`` ``[M]``.
    Metrics: ``clip_ratio/low|high|region`` (fraction of tokens), ``ratio``, ``approx_kl`` = ½·mean(Δlog π)²,
    and ``kl`` (mean k3) with a reference.
    """
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages must be per token like logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
                         " (broadcast per-sequence advantages with advantages[token_seq])")
    eps_high = eps_low if eps_high is None else eps_high
    adv = advantages.detach()
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    metrics = _clip_metrics(ratio.detach(), adv, eps_low, eps_high)
    metrics["approx_kl"] = 0.5 * log_ratio.detach().square().mean()
    if ref_logp is not None:
        kl = token_kl(logp, ref_logp.detach(), "k3")
        per_token = per_token + beta * (kl * ratio if kl_importance_weight else kl)
        metrics[KL] = kl.detach().mean()
    loss = aggregate(per_token, token_seq, seq_tokens, loss_type, max_completion_length, num_tokens, num_sequences)
    return loss, metrics


def sequence_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, *, eps_low: float = 0.2, eps_high: float | None = None
) -> tuple[Tensor, Metrics]:
    """RLOO's sequence-level clipped loss (TRL's RLOOTrainer): ρ = exp(Σ_t log π − Σ_t log π_old),
    ℓ = mean_s −min(ρ_s·A_s, clip(ρ_s, 1−ε_low, 1+ε_high)·A_s); the KL is already in the reward
    (:func:`kl_penalised_rewards`). With π_old = π: value −mean(A), gradient −mean(A·∇Σlog π) (REINFORCE with
    the leave-one-out baseline). Shapes: summed ``logps``, ``old_logps``, ``advantages`` ``[S]``.
    """
    eps_high = eps_low if eps_high is None else eps_high
    adv = advantages.detach()
    ratio = torch.exp(logps - old_logps.detach())
    losses = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return losses.mean(), _clip_metrics(ratio.detach(), adv, eps_low, eps_high)


def _clip_metrics(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Metrics:
    # Where the clipped branch is the minimum, i.e. the gradient is cut (TRL's clip_ratio definitions).
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(ratio.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(ratio.dtype)
    return {"clip_ratio/low": low.mean(), "clip_ratio/high": high.mean(),
            "clip_ratio/region": torch.maximum(low, high).mean(), "ratio": ratio.mean()}


# --------------------------------------------------------------------------------------------------
# PPO with a value model
# --------------------------------------------------------------------------------------------------


def shaped_rewards(scores: Tensor, kl: Tensor, seq_tokens: Tensor, kl_coef: float) -> Tensor:
    """Per-token RLHF reward (Ziegler et al. 2019, arXiv 1909.08593, §2.2): r_t = −c·KL_t, plus the score at
    each sequence's last token (OpenRLHF's placement; TRL's experimental PPO puts it one past the end).

    The last token is EOS when the completion ended; when it was cut at the length limit the score still lands
    on its last generated token and GAE treats that token as terminal (no bootstrap from V beyond the cut), so
    a truncated completion is credited as if it had ended — apply :func:`missing_eos_penalty` to the scores
    first to discourage it. Shapes: ``scores [S]``, ``kl [M]`` (e.g. :func:`token_kl`), ``seq_tokens [S]`` →
    ``[M]``, detached.
    """
    rewards = -kl_coef * kl.detach()
    return rewards.index_add(0, last_token_index(seq_tokens), scores.detach().to(rewards.dtype))


def gae(
    rewards: Tensor, values: Tensor, token_seq: Tensor, seq_tokens: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438, Eq. 16) per sequence.

    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 after a sequence's last token; A_t = Σ_l (γλ)^l δ_{t+l}, computed
    backwards as A_t = δ_t + γλ·A_{t+1}; returns R_t = A_t + V_t (the value target). λ = 1: A_t = Σ_k γ^k r_{t+k}
    − V_t; λ = 0: A_t = δ_t. Returns ``(advantages [M], returns [M])``, detached; ``rewards``, ``values`` ``[M]``.
    """
    rewards, values = rewards.detach(), values.detach()
    pos = token_positions(token_seq, seq_tokens)
    length = int(seq_tokens.max()) if seq_tokens.numel() else 0
    # Padded [S, T+1]: zeros past each end make δ and A vanish there and V_{T} = 0 terminal.
    r = rewards.new_zeros(seq_tokens.shape[0], length + 1).index_put_((token_seq, pos), rewards)
    v = values.new_zeros(seq_tokens.shape[0], length + 1).index_put_((token_seq, pos), values)
    adv = torch.zeros_like(r)
    for t in range(length - 1, -1, -1):
        adv[:, t] = r[:, t] + gamma * v[:, t + 1] - v[:, t] + gamma * lam * adv[:, t + 1]
    advantages = adv[token_seq, pos]
    return advantages, advantages + values


def whiten(values: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean)/√(var + eps) over all valid tokens, var **unbiased** (TRL's ``masked_whiten``; arXiv 2403.17031).

    ``shift_mean=False`` adds the mean back (reward whitening keeps the reward's sign). Every entry of the flat
    layout is a valid token, so no mask is needed. Shapes: ``[M]`` → ``[M]``, detached.
    """
    if values.numel() < 2:
        raise ValueError(f"whitening needs at least 2 tokens, got {values.numel()}")
    x = values.detach()
    mean, var = x.mean(), x.var(unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float | None = 0.2
) -> tuple[Tensor, Metrics]:
    """Clipped value loss (arXiv 2403.17031; TRL, OpenRLHF): ½·mean_t max((V − R)², (V_clip − R)²) with
    V_clip = V_old + clip(V − V_old, −ε_v, ε_v); ``clip_range=None`` gives ½·mean (V − R)². Where the clipped
    term is the larger the gradient is 0. Shapes: ``[M]``. Metrics: ``clipfrac`` (tokens where it is),
    ``error`` = mean (V − R)².
    """
    returns, old_values = returns.detach(), old_values.detach()
    unclipped = (values - returns).square()
    if clip_range is None:
        return 0.5 * unclipped.mean(), {"clipfrac": unclipped.new_zeros(()), "error": unclipped.detach().mean()}
    clipped = (old_values + (values - old_values).clamp(-clip_range, clip_range) - returns).square()
    loss = 0.5 * torch.maximum(unclipped, clipped).mean()
    return loss, {"clipfrac": (clipped > unclipped).to(clipped.dtype).mean(), "error": unclipped.detach().mean()}


def entropy_bonus(entropy: Tensor, coef: float) -> Tensor:
    """The entropy term of PPO's objective (arXiv 1707.06347, Eq. 9) as a loss: −c·mean_t H_t (token mean).
    Add it to the loss; c = 0 (TRL's and OpenRLHF's default) turns it off. Shapes: ``entropy [M]`` → scalar."""
    return -coef * entropy.mean()


def explained_variance(values: Tensor, returns: Tensor) -> Tensor:
    """1 − Var(R − V)/Var(R) over tokens, 0-dim: 1 for a perfect critic, 0 for a constant one, < 0 worse.
    NaN when the returns do not vary (undefined). Shapes: ``[M]``."""
    v, r = values.detach(), returns.detach()
    return 1 - (r - v).var() / r.var()


def adaptive_kl_coef(coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """The adaptive KL controller (Ziegler et al. 2019, arXiv 1909.08593, §2.2), as TRL and OpenRLHF write it:
    e = clip(KL/target − 1, −0.2, 0.2);  coef ← coef·(1 + e·n_steps/horizon).

    The paper's K_β is n_steps/horizon: the coefficient moves by at most ±0.2·n_steps/horizon per update.
    """
    error = min(max(kl / target - 1, -0.2), 0.2)
    return coef * (1 + error * n_steps / horizon)


@dataclass
class KLController:
    """A KL coefficient: fixed (``target=None``) or adaptive toward ``target`` nats per sequence over ``horizon``
    samples (:func:`adaptive_kl_coef`). ``update`` once per rollout batch with its mean sequence KL and size;
    the dataclass fields are the whole state to checkpoint."""

    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            self.coef = adaptive_kl_coef(self.coef, kl, self.target, n_steps, self.horizon)
        return self.coef


@dataclass
class RunningMoments:
    """Mean and variance of every score seen so far, merged batch by batch (Chan et al.'s parallel update, as
    TRL's ``RunningMoments``): with n seen, a batch of m with mean μ_b and (biased) variance σ²_b, δ = μ_b − μ,
    μ ← μ + δ·m/(n+m), σ² ← (n·σ² + m·σ²_b + δ²·n·m/(n+m)) / (n+m). The fields are the whole state to checkpoint."""

    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def update(self, values: Tensor) -> None:
        x = values.detach().double().flatten()
        m = x.numel()
        if m == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + m
        delta = batch_mean - self.mean
        self.var = (self.count * self.var + m * batch_var + delta**2 * self.count * m / total) / total
        self.mean += delta * m / total
        self.count = total

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen (0 with fewer than two values)."""
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 0.0


def scale_scores(scores: Tensor, moments: RunningMoments | None, shift_mean: bool = False,
                 clip: float | None = None, eps: float = 1e-8) -> Tensor:
    """Score scaling, normalisation and clipping of old TRL's PPO (``use_score_scaling``, ``use_score_norm``,
    ``score_clip``): with ``moments`` (already updated with this batch) s/(σ + eps), or (s − μ)/(σ + eps) with
    ``shift_mean``; then clip to [−clip, clip]. Neither: the scores unchanged. Shapes: ``[S]`` → ``[S]``."""
    out = scores.detach().float()
    if moments is not None:
        out = ((out - moments.mean) if shift_mean else out) / (moments.std + eps)
    return out if clip is None else out.clamp(-clip, clip)


# --------------------------------------------------------------------------------------------------
# Rejection sampling (RSO) and self-play win probabilities (SPPO)
# --------------------------------------------------------------------------------------------------


def rso_accept(rewards: Tensor, beta: float, generator: torch.Generator | None = None) -> Tensor:
    """One round of RSO's acceptance test (Liu et al. 2023, arXiv 2309.06657, Alg. 1): candidate i is accepted
    when u_i < exp((r_i − r_max)/β), u_i ~ U[0, 1), r_max the best reward present. The best is always accepted;
    the expected acceptance rate is mean_i exp((r_i − r_max)/β) (Thm. 1). β = 0 accepts only the best, β = ∞
    everything. Shapes: ``[K]`` → bool ``[K]``.
    """
    r = rewards.detach().double()
    gap = r - r.max()
    prob = torch.where(gap == 0, torch.ones_like(r), torch.exp(gap / beta) if beta > 0 else torch.zeros_like(r))
    u = torch.rand(r.shape, generator=generator, dtype=torch.float64, device=r.device)
    return u < prob


def rso_sample(rewards: Tensor, n: int, beta: float, generator: torch.Generator | None = None) -> Tensor:
    """Statistical rejection sampling (RSO, arXiv 2309.06657, Alg. 1): draw n of K candidates from
    π_r ∝ π_sft·exp(r/β) (Eq. 4), the candidates being π_sft samples.

    Repeat until n are accepted: test the remaining candidates (:func:`rso_accept`, r_max recomputed over the
    remaining ones), accept in a random order until n are reached, remove them. β → 0 gives the top n by
    reward (best-of-K); β → ∞ a uniform random n of K. Returns the accepted indices, int64 ``[n]``, in
    acceptance order, on the CPU; ``rewards [K]``; a CPU ``generator`` makes it reproducible.
    """
    rewards = rewards.detach().cpu()  # K scalars: the loop is cheaper on the host, and the generator is a CPU one
    if not 1 <= n <= rewards.shape[0]:
        raise ValueError(f"cannot accept n={n} of {rewards.shape[0]} candidates")
    if beta < 0:
        raise ValueError(f"RSO's β must be ≥ 0, got {beta}")
    remaining = torch.arange(rewards.shape[0])
    accepted: list[Tensor] = []
    while (taken := sum(a.numel() for a in accepted)) < n:
        order = remaining[torch.randperm(remaining.numel(), generator=generator)]
        keep = rso_accept(rewards[order], beta, generator)
        accepted.append(order[keep][: n - taken])
        remaining = remaining[~torch.isin(remaining, accepted[-1])]
    return torch.cat(accepted)


def sppo_win_probs(scores: Tensor, group: Tensor) -> Tensor:
    """SPPO's estimate of P(y_i ≻ π_t | x) (Wu et al. 2024, arXiv 2405.00675, Alg. 1; their PairRM recipe):
    P_ij = σ(s_i − s_j) and P̂_i = mean_{j in i's group} P_ij, the mean **including** j = i (which adds ½).

    Σ_i P̂_i = K/2 over a group of K (P_ij + P_ji = 1). Shapes: ``scores [S]``, ``group [S]`` → ``[S]``, detached.
    """
    s = scores.detach()
    same = (group[:, None] == group[None, :]).to(s.dtype)
    return (torch.sigmoid(s[:, None] - s[None, :]) * same).sum(1) / same.sum(1)


__all__ = [
    "seq_sum",
    "seq_mean",
    "token_positions",
    "last_token_index",
    "token_kl",
    "kl_to_reference",
    "best_of_n_kl",
    "missing_eos_penalty",
    "kl_penalised_rewards",
    "zero_spread",
    "zero_spread_fraction",
    "grpo_advantages",
    "rloo_advantages",
    "aggregate",
    "policy_loss",
    "sequence_policy_loss",
    "shaped_rewards",
    "gae",
    "whiten",
    "value_loss",
    "entropy_bonus",
    "explained_variance",
    "adaptive_kl_coef",
    "KLController",
    "RunningMoments",
    "scale_scores",
    "rso_accept",
    "rso_sample",
    "sppo_win_probs",
]
