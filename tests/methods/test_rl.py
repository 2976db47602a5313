"""Facts about the online / RL mathematics, each checked against a hand computation in plain Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.methods import losses, rl
from preftune.methods.losses import PairLogps

f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)
long = lambda xs: torch.tensor(xs, dtype=torch.long)


def layout(*lengths: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_seq [M], seq_tokens [S])`` for sequences of the given token counts, grouped in order."""
    seq_tokens = long(list(lengths))
    return torch.repeat_interleave(torch.arange(len(lengths)), seq_tokens), seq_tokens


def close(actual: torch.Tensor, expected, tol: float = 1e-9) -> None:
    expected = [expected] if isinstance(expected, (int, float)) else expected
    assert actual.flatten().tolist() == pytest.approx(expected, abs=tol), (actual.tolist(), expected)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- layout ------------------------------------------------------------------------------------------


def test_per_sequence_sums_means_and_positions_follow_the_flat_layout():
    token_seq, seq_tokens = layout(3, 2, 0)
    values = f64([1.0, 2.0, 4.0, -1.0, 0.5])
    close(rl.seq_sum(values, token_seq, seq_tokens), [7.0, -0.5, 0.0])
    close(rl.seq_mean(values, token_seq, seq_tokens), [7.0 / 3, -0.25, 0.0])
    close(rl.token_positions(token_seq, seq_tokens), [0, 1, 2, 0, 1])
    close(rl.last_token_index(long([3, 2])), [2, 4])
    with pytest.raises(ValueError, match=r"sequences \[2\] have no completion tokens"):
        rl.last_token_index(seq_tokens)


# ---- KL estimators -----------------------------------------------------------------------------------


def test_kl_estimators_per_token():
    logp, ref = f64([-1.0, -2.0, -0.5]), f64([-1.5, -1.0, -0.5])  # log-ratio u = 0.5, −1, 0
    close(rl.token_kl(logp, ref, "k1"), [0.5, -1.0, 0.0])
    close(rl.token_kl(logp, ref, "k2"), [0.125, 0.5, 0.0])
    close(rl.token_kl(logp, ref, "k3"), [0.10653065971263342, 0.7182818284590451, 0.0])  # e^{−u} − 1 + u
    with pytest.raises(ValueError, match="unknown KL estimator"):
        rl.token_kl(logp, ref, "k4")


def test_kl_clamp_bounds_the_estimate_like_openrlhf():
    logp, ref = f64([5.0, -20.0, 20.0]), f64([0.0, 0.0, 0.0])  # u = 5, −20, 20
    close(rl.token_kl(logp, ref, "k1", clamp=10.0), [5.0, -10.0, 10.0])
    # k3 = e^{−u} − 1 + u: 4.0067 stays, e^{20} − 21 and 19 + e^{−20} are clamped
    close(rl.token_kl(logp, ref, "k3", clamp=10.0), [math.exp(-5) + 4, 10.0, 10.0])
    close(rl.token_kl(logp, ref, "k3"), [math.exp(-5) + 4, math.exp(20) - 21, 19 + math.exp(-20)], tol=1e-3)


def test_k1_and_k3_are_unbiased_and_k2_is_not():
    """Under y ~ π exactly (a weighted sum over a categorical), E[k1] = E[k3] = KL(π‖π_ref); E[k2] differs."""
    p, q = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # 0.2748872...
    logp, ref = f64([math.log(x) for x in p]), f64([math.log(x) for x in q])
    expect = {k: sum(pi * v for pi, v in zip(p, rl.token_kl(logp, ref, k).tolist())) for k in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(kl, abs=1e-12)
    assert expect["k3"] == pytest.approx(kl, abs=1e-12)
    assert abs(expect["k2"] - kl) > 0.01


def test_best_of_n_kl():
    assert rl.best_of_n_kl(1) == 0.0
    assert rl.best_of_n_kl(2) == pytest.approx(0.19314718055994530, abs=1e-15)
    assert rl.best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)


@pytest.mark.parametrize("n", [4, 16])
def test_best_of_n_kl_is_the_kl_of_the_maximum_of_n_draws(n):
    """With a continuous reward the best of n has CDF F^n: in the quantile u = F(r) its density is n·u^{n−1}
    on [0, 1], so KL = ∫ n u^{n−1} log(n u^{n−1}) du (midpoint rule here)."""
    steps = 100_000
    integral = sum(n * u ** (n - 1) * math.log(n * u ** (n - 1)) for u in ((i + 0.5) / steps for i in range(steps)))
    assert rl.best_of_n_kl(n) == pytest.approx(integral / steps, abs=1e-4)


# ---- scores and critic-free advantages -----------------------------------------------------------------


def test_missing_eos_penalty_and_kl_penalised_rewards():
    close(rl.missing_eos_penalty(f64([1.0, 2.0, 3.0]), torch.tensor([True, False, True]), 1.0), [1.0, 1.0, 3.0])
    # RLOO: r − β·(Σ log π_old − Σ log π_ref); the KL term may be negative (k1)
    close(rl.kl_penalised_rewards(f64([1.0, 2.0]), f64([-3.0, -4.0]), f64([-3.5, -3.0]), 0.1), [0.95, 2.1])


REWARDS = [1.0, 2.0, 3.0, 0.1, 0.1, 0.1]  # the second group has no spread
GROUPS = [0, 0, 0, 1, 1, 1]


def test_grpo_advantages_with_group_scaling_and_a_zero_spread_group():
    adv = rl.grpo_advantages(f64(REWARDS), long(GROUPS))
    # group 0: mean 2, unbiased std 1; group 1: exactly 0 (0.1·3/3 ≠ 0.1 in floating point), no NaN
    close(adv, [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0], tol=1e-12)
    assert adv[3:].eq(0).all()
    assert rl.zero_spread_fraction(f64(REWARDS), long(GROUPS)).item() == 0.5


def test_grpo_advantages_with_batch_scaling_and_without_scaling():
    batch_std = math.sqrt((0.05**2 + 0.95**2 + 1.95**2 + 3 * 0.95**2) / 5)  # mean 1.05 over the six rewards
    close(rl.grpo_advantages(f64(REWARDS), long(GROUPS), scale="batch"),
          [-1 / (batch_std + 1e-4), 0.0, 1 / (batch_std + 1e-4), 0.0, 0.0, 0.0])
    close(rl.grpo_advantages(f64(REWARDS), long(GROUPS), scale="none"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="unknown reward scale"):
        rl.grpo_advantages(f64(REWARDS), long(GROUPS), scale="max")


def test_group_index_allows_any_layout():
    """Branch-major numbering (completion k of prompt i at k·P + i) gives the same advantages, reordered."""
    order = [0, 3, 1, 4, 2, 5]  # sequence s of the interleaved batch is sequence order[s] of the contiguous one
    interleaved = f64([REWARDS[i] for i in order])
    group = torch.arange(6) % 2
    contiguous = rl.grpo_advantages(f64(REWARDS), long(GROUPS)).tolist()
    close(rl.grpo_advantages(interleaved, group), [contiguous[i] for i in order])
    rloo = rl.rloo_advantages(f64(REWARDS), long(GROUPS)).tolist()
    close(rl.rloo_advantages(interleaved, group), [rloo[i] for i in order])


def test_groups_need_two_completions():
    with pytest.raises(ValueError, match="at least 2 completions"):
        rl.grpo_advantages(f64([1.0, 2.0, 3.0]), long([0, 0, 1]))


def test_rloo_leave_one_out_baseline():
    adv = rl.rloo_advantages(f64([1.0, 2.0, 4.0, 3.0, 5.0, 0.1, 0.1]), long([0, 0, 0, 1, 1, 2, 2]))
    # group 0: 1 − (2+4)/2, 2 − (1+4)/2, 4 − (1+2)/2; group 1 (k = 2): ±(3 − 5); group 2: no spread
    close(adv, [-2.0, -0.5, 2.5, -2.0, 2.0, 0.0, 0.0])
    assert adv[5:].eq(0).all()


# ---- the clipped policy loss ---------------------------------------------------------------------------

# Six tokens in sequences of 3, 2 and 1 tokens; ε = 0.2.
#   t  ratio  A    −min(ρA, clip(ρ)A)            ∂/∂log π (= −A·ρ where unclipped)
#   0  1.1   +1   −1.1   inside the range         −1.1
#   1  1.5   +1   −1.2   clipped at 1.2            0
#   2  0.5   +1   −0.5   below but A > 0: ρA       −0.5
#   3  0.5   −2   +1.6   clipped at 0.8            0
#   4  1.5   −2   +3.0   above but A < 0: ρA       +3.0
#   5  0.9   −1   +0.9   inside the range          +0.9
LOGP = [-1.0, -2.0, -0.5, -1.5, -3.0, -0.7]
RATIO = [1.1, 1.5, 0.5, 0.5, 1.5, 0.9]
ADV = [1.0, 1.0, 1.0, -2.0, -2.0, -1.0]
SURROGATE = [-1.1, -1.2, -0.5, 1.6, 3.0, 0.9]
SURROGATE_GRAD = [-1.1, 0.0, -0.5, 0.0, 3.0, 0.9]
LENGTHS = (3, 2, 1)


def toy_policy_loss(**kwargs):
    token_seq, seq_tokens = layout(*LENGTHS)
    logp = f64(LOGP).requires_grad_()
    old = f64([lp - math.log(r) for lp, r in zip(LOGP, RATIO)])
    loss, metrics = rl.policy_loss(logp, old, f64(ADV), token_seq, seq_tokens, eps_low=0.2, **kwargs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad, metrics


def test_clipped_objective_value_and_gradient_per_aggregation():
    seq_of = [0, 0, 0, 1, 1, 2]
    loss, grad, _ = toy_policy_loss(loss_type="grpo")
    per_seq = [sum(SURROGATE[:3]) / 3, sum(SURROGATE[3:5]) / 2, SURROGATE[5]]
    close(loss, sum(per_seq) / 3)
    close(grad, [g / (LENGTHS[s] * 3) for g, s in zip(SURROGATE_GRAD, seq_of)])

    loss, grad, _ = toy_policy_loss(loss_type="dr_grpo", max_completion_length=4)
    close(loss, sum(SURROGATE) / (4 * 3))
    close(grad, [g / 12 for g in SURROGATE_GRAD])

    loss, grad, _ = toy_policy_loss(loss_type="dapo")
    close(loss, sum(SURROGATE) / 6)
    close(grad, [g / 6 for g in SURROGATE_GRAD])

    loss, _, _ = toy_policy_loss(loss_type="dapo", num_tokens=10)  # a global token count over micro-batches
    close(loss, sum(SURROGATE) / 10)


def test_clipped_objective_metrics():
    _, _, metrics = toy_policy_loss()
    close(metrics["clip_ratio/low"], 1 / 6)  # token 3
    close(metrics["clip_ratio/high"], 1 / 6)  # token 1
    close(metrics["clip_ratio/region"], 2 / 6)
    close(metrics["ratio"], sum(RATIO) / 6)
    close(metrics["approx_kl"], 0.5 * sum(math.log(r) ** 2 for r in RATIO) / 6)
    assert "kl" not in metrics


def test_clip_higher_widens_only_the_upper_bound():
    token_seq, seq_tokens = layout(1)
    logp = f64([math.log(1.25)]).requires_grad_()
    old = f64([0.0])
    for eps_high, value, grad in [(None, -1.2, 0.0), (0.28, -1.25, -1.25)]:
        loss, _ = rl.policy_loss(logp, old, f64([1.0]), token_seq, seq_tokens, eps_low=0.2, eps_high=eps_high)
        close(loss, value)
        close(torch.autograd.grad(loss, logp)[0], grad)


def test_k3_penalty_in_the_loss():
    """At π_old = π with zero advantages only β·k3 remains: value β·mean(e^{−u} − 1 + u), gradient β(1 − e^{−u})."""
    token_seq, seq_tokens = layout(*LENGTHS)
    u = [0.5, -1.0, 0.0, 0.2, -0.3, 1.0]
    logp = f64(LOGP).requires_grad_()
    ref = f64([lp - x for lp, x in zip(LOGP, u)])
    loss, metrics = rl.policy_loss(logp, logp.detach(), torch.zeros(6, dtype=torch.float64), token_seq, seq_tokens,
                                   ref_logp=ref, beta=0.1)
    k3 = [math.exp(-x) - 1 + x for x in u]
    close(loss, 0.1 * sum(k3) / 6)
    close(metrics["kl"], sum(k3) / 6)
    close(torch.autograd.grad(loss, logp)[0], [0.1 * (1 - math.exp(-x)) / 6 for x in u])


def test_the_bias_corrected_k3_keeps_its_value_and_adds_the_score_function_term():
    """ρ·k3 (DeepSeek-V3.2, arXiv 2512.02556; TRL's use_bias_correction_kl) at π_old = π: the value is β·mean(k3)
    as without it, the gradient β(1 − e^{−u} + k3)/M — the extra k3·∇log π of the reverse-KL gradient."""
    token_seq, seq_tokens = layout(*LENGTHS)
    u = [0.5, -1.0, 0.0, 0.2, -0.3, 1.0]
    logp = f64(LOGP).requires_grad_()
    ref = f64([lp - x for lp, x in zip(LOGP, u)])
    loss, metrics = rl.policy_loss(logp, logp.detach(), torch.zeros(6, dtype=torch.float64), token_seq, seq_tokens,
                                   ref_logp=ref, beta=0.1, kl_importance_weight=True)
    k3 = [math.exp(-x) - 1 + x for x in u]
    close(loss, 0.1 * sum(k3) / 6)
    close(metrics["kl"], sum(k3) / 6)
    close(torch.autograd.grad(loss, logp)[0], [0.1 * (1 - math.exp(-x) + k) / 6 for x, k in zip(u, k3)])


def test_micro_batch_shares_of_a_generation_batch_sum_to_its_loss():
    """Split into shares with the generation batch's counts / n (num_tokens, num_sequences, batch_std), the mean of
    the n micro-batch losses is the whole batch's loss for every aggregation, and the advantages are the batch's."""
    lengths, per_token = (3, 1, 2, 4), f64([0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 3.0, 1.0, -2.0, 0.75])
    token_seq, seq_tokens = layout(*lengths)
    halves = [(layout(3, 1), per_token[:4]), (layout(2, 4), per_token[4:])]
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        whole = rl.aggregate(per_token, token_seq, seq_tokens, loss_type, max_completion_length=5)
        shares = [rl.aggregate(values, ts, st, loss_type, max_completion_length=5, num_tokens=10 / 2,
                               num_sequences=4 / 2) for (ts, st), values in halves]
        close(sum(shares) / 2, whole.item())
    rewards, group = f64([1.0, 3.0, 0.0, 4.0]), long([0, 0, 1, 1])
    whole = rl.grpo_advantages(rewards, group, scale="batch")
    first = rl.grpo_advantages(rewards[:2], long([0, 0]), scale="batch", batch_std=rewards.std())
    close(first, whole[:2].tolist())


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_one_step_per_generation_is_the_plain_policy_gradient(loss_type):
    """With π_old = π (``old_logp = logp.detach()``) ρ = 1: the loss is −agg(A) and its gradient −agg(A·∇log π)."""
    token_seq, seq_tokens = layout(*LENGTHS)
    seq_adv = [0.7, -1.3, 0.4]
    adv = [seq_adv[s] for s in token_seq.tolist()]
    logp = f64(LOGP).requires_grad_()
    loss, metrics = rl.policy_loss(logp, logp.detach(), f64(adv), token_seq, seq_tokens, loss_type=loss_type,
                                   max_completion_length=4)
    (grad,) = torch.autograd.grad(loss, logp)
    divisor = {"grpo": [LENGTHS[s] * 3 for s in token_seq.tolist()], "dr_grpo": [12] * 6, "dapo": [6] * 6}[loss_type]
    close(loss, sum(-a / d for a, d in zip(adv, divisor)))
    close(grad, [-a / d for a, d in zip(adv, divisor)])
    # the REINFORCE surrogate −A·log π, aggregated the same way, has the same gradient
    reinforce = rl.aggregate(-f64(adv) * logp, token_seq, seq_tokens, loss_type, max_completion_length=4)
    close(torch.autograd.grad(reinforce, logp)[0], grad.tolist())
    close(metrics["clip_ratio/region"], 0.0)


def test_policy_loss_rejects_per_sequence_advantages_and_unknown_loss_types():
    token_seq, seq_tokens = layout(*LENGTHS)
    logp = f64(LOGP)
    with pytest.raises(ValueError, match=r"advantages\[token_seq\]"):
        rl.policy_loss(logp, logp, f64([1.0, 2.0, 3.0]), token_seq, seq_tokens)
    with pytest.raises(ValueError, match="unknown loss_type"):
        rl.policy_loss(logp, logp, f64(ADV), token_seq, seq_tokens, loss_type="bnpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        rl.policy_loss(logp, logp, f64(ADV), token_seq, seq_tokens, loss_type="dr_grpo")


def test_sequence_level_clipped_loss_of_rloo():
    logps = f64([-5.0, -3.0, -8.0, -2.0]).requires_grad_()
    ratio = [1.1, 1.5, 0.5, 0.5]
    old = f64([s - math.log(r) for s, r in zip([-5.0, -3.0, -8.0, -2.0], ratio)])
    loss, metrics = rl.sequence_policy_loss(logps, old, f64([1.0, 1.0, 1.0, -2.0]))
    close(loss, (-1.1 - 1.2 - 0.5 + 1.6) / 4)
    close(torch.autograd.grad(loss, logps)[0], [-1.1 / 4, 0.0, -0.5 / 4, 0.0])
    close(metrics["clip_ratio/region"], 0.5)

    adv = [1.0, -1.0, 2.0, 0.5]  # one step per generation: REINFORCE with the baseline
    loss, _ = rl.sequence_policy_loss(logps, logps.detach(), f64(adv))
    close(loss, -sum(adv) / 4)
    close(torch.autograd.grad(loss, logps)[0], [-a / 4 for a in adv])


# ---- PPO ------------------------------------------------------------------------------------------------


def test_reward_shaping_puts_the_score_on_the_last_token():
    kl = f64([0.1, 0.2, 0.3, 0.4, 0.5])
    _, seq_tokens = layout(3, 2)
    close(rl.shaped_rewards(f64([2.0, -1.0]), kl, seq_tokens, kl_coef=0.5), [-0.05, -0.1, 1.85, -0.2, -1.25])
    # the second completion was cut at the length limit (no EOS): its score, less the penalty, still lands on
    # its last generated token
    scores = rl.missing_eos_penalty(f64([2.0, -1.0]), torch.tensor([True, False]), 1.0)
    close(rl.shaped_rewards(scores, kl, seq_tokens, kl_coef=0.5), [-0.05, -0.1, 1.85, -0.2, -2.25])
    with pytest.raises(ValueError, match="no completion tokens"):
        rl.shaped_rewards(f64([2.0, -1.0]), kl, long([5, 0]), kl_coef=0.5)


# Two ragged sequences: 3 tokens then 2.
GAE_REWARDS = [[0.0, 0.0, 1.0], [0.5, -1.0]]
GAE_VALUES = [[0.5, 0.2, 0.8], [0.1, 0.4]]


def gae_by_definition(gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """A_t = Σ_l (γλ)^l δ_{t+l} (the paper's sum, not the recursion), V = 0 after the last token."""
    advantages, returns = [], []
    for r, v in zip(GAE_REWARDS, GAE_VALUES):
        n = len(r)
        delta = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
        adv = [sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, n)) for t in range(n)]
        advantages += adv
        returns += [a + x for a, x in zip(adv, v)]
    return advantages, returns


@pytest.mark.parametrize("gamma", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_the_sum_over_future_td_errors(gamma, lam):
    token_seq, seq_tokens = layout(3, 2)
    rewards, values = f64(sum(GAE_REWARDS, [])), f64(sum(GAE_VALUES, []))
    advantages, returns = rl.gae(rewards, values, token_seq, seq_tokens, gamma, lam)
    expected_adv, expected_ret = gae_by_definition(gamma, lam)
    close(advantages, expected_adv, tol=1e-12)
    close(returns, expected_ret, tol=1e-12)


def test_gae_special_cases_by_hand():
    token_seq, seq_tokens = layout(3, 2)
    rewards, values = f64([0.0, 0.0, 1.0, 0.5, -1.0]), f64([0.5, 0.2, 0.8, 0.1, 0.4])
    adv, ret = rl.gae(rewards, values, token_seq, seq_tokens, gamma=1.0, lam=1.0)
    close(ret, [1.0, 1.0, 1.0, -0.5, -1.0])  # undiscounted return-to-go; no leak from sequence 1 into 0
    close(adv, [0.5, 0.8, 0.2, -0.6, -1.4])
    adv, ret = rl.gae(rewards, values, token_seq, seq_tokens, gamma=0.0, lam=0.95)
    close(adv, [-0.5, -0.2, 0.2, 0.4, -1.4])  # r − V
    close(ret, [0.0, 0.0, 1.0, 0.5, -1.0])
    adv, _ = rl.gae(rewards, values, token_seq, seq_tokens, gamma=0.95, lam=0.0)
    close(adv, [0.0 + 0.95 * 0.2 - 0.5, 0.95 * 0.8 - 0.2, 1.0 - 0.8, 0.5 + 0.95 * 0.4 - 0.1, -1.0 - 0.4])


def test_whitening_uses_the_unbiased_variance():
    values = f64([1.0, 2.0, 3.0, 4.0])  # mean 2.5, unbiased variance 5/3
    scale = 1 / math.sqrt(5 / 3 + 1e-8)
    close(rl.whiten(values), [-1.5 * scale, -0.5 * scale, 0.5 * scale, 1.5 * scale])
    close(rl.whiten(values, shift_mean=False), [2.5 - 1.5 * scale, 2.5 - 0.5 * scale, 2.5 + 0.5 * scale,
                                                2.5 + 1.5 * scale])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        rl.whiten(f64([1.0]))


def test_clipped_value_loss_value_and_gradient():
    # ε_v = 0.5.  t0: V − V_old inside the range, (V − R)² = 1 both ways;  t1: V_clip = 1.5, (1.5 − 3)² = 2.25 >
    # (2 − 3)² = 1, clipped, no gradient;  t2: 1 both ways;  t3: V_clip = 1.5 but (3 − 0)² = 9 > 2.25, unclipped.
    values = f64([1.0, 2.0, 0.0, 3.0]).requires_grad_()
    loss, metrics = rl.value_loss(values, f64([1.2, 1.0, 0.0, 1.0]), f64([0.0, 3.0, 1.0, 0.0]), clip_range=0.5)
    close(loss, 0.5 * (1 + 2.25 + 1 + 9) / 4)
    close(torch.autograd.grad(loss, values)[0], [1 / 4, 0.0, -1 / 4, 3 / 4])  # (V − R)/4 where unclipped
    close(metrics["clipfrac"], 0.25)
    close(metrics["error"], (1 + 1 + 1 + 9) / 4)
    loss, _ = rl.value_loss(values, f64([1.2, 1.0, 0.0, 1.0]), f64([0.0, 3.0, 1.0, 0.0]), clip_range=None)
    close(loss, 0.5 * (1 + 1 + 1 + 9) / 4)


def test_entropy_bonus_and_explained_variance():
    close(rl.entropy_bonus(f64([1.0, 2.0, 3.0]), 0.01), -0.02)
    returns = f64([1.0, 2.0, 4.0])
    close(rl.explained_variance(f64([1.0, 2.0, 3.0]), returns), 6 / 7)  # Var(0, 0, 1) / Var(1, 2, 4) = 1/7
    close(rl.explained_variance(returns, returns), 1.0)
    close(rl.explained_variance(f64([7 / 3] * 3), returns), 0.0)


def test_adaptive_kl_controller_update_rule():
    """coef·(1 + e·n/horizon), e = clip(KL/target − 1, ±0.2): n = 128, horizon 10000, target 6."""
    ctl = rl.KLController(coef=0.2, target=6.0, horizon=10000)
    expected = 0.2
    for kl, error in [(12.0, 0.2), (6.0, 0.0), (3.0, -0.2), (6.6, 0.1), (0.0, -0.2)]:  # 1.0 and −0.5 are clipped
        expected *= 1 + error * 128 / 10000
        assert ctl.update(kl, n_steps=128) == pytest.approx(expected, rel=1e-12)
    assert ctl.coef == pytest.approx(0.2 * 1.00256 * 0.99744 * 1.00128 * 0.99744, rel=1e-12)
    fixed = rl.KLController(coef=0.05)
    assert [fixed.update(kl, 128) for kl in (0.0, 100.0)] == [0.05, 0.05]



def test_running_moments_merged_batch_by_batch_equal_one_pass():
    """Scores 1, 2, 3 then 4, 5: mean 3, biased variance 2, unbiased standard deviation √2.5 — as over all five."""
    moments = rl.RunningMoments()
    moments.update(f64([1.0, 2.0, 3.0]))
    moments.update(f64([4.0, 5.0]))
    moments.update(f64([]))  # an empty batch changes nothing
    assert (moments.mean, moments.var, moments.count) == (pytest.approx(3.0), pytest.approx(2.0), 5)
    assert moments.std == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert rl.RunningMoments(mean=1.0, var=0.0, count=1).std == 0.0


def test_score_scaling_normalisation_and_clipping():
    moments = rl.RunningMoments()
    moments.update(f64([1.0, 2.0, 3.0, 4.0, 5.0]))  # mean 3, σ = √2.5
    sigma = math.sqrt(2.5)
    scores = f64([4.0, 5.0])
    close(rl.scale_scores(scores, moments), [4 / sigma, 5 / sigma], tol=1e-7)  # use_score_scaling
    close(rl.scale_scores(scores, moments, shift_mean=True), [1 / sigma, 2 / sigma], tol=1e-7)  # + use_score_norm
    close(rl.scale_scores(scores, moments, shift_mean=True, clip=1.0), [1 / sigma, 1.0], tol=1e-7)  # 1.26 → 1
    close(rl.scale_scores(f64([-4.0, 0.5]), None, clip=2.0), [-2.0, 0.5])  # clipping alone
    close(rl.scale_scores(scores, None), [4.0, 5.0])  # neither: unchanged

# ---- RSO ------------------------------------------------------------------------------------------------

RSO_REWARDS = [0.3, 0.9, 0.1, 0.7, 0.5]


@pytest.mark.parametrize("beta", [0.0, 1e-6])
def test_rso_with_beta_to_zero_is_best_of_n(beta):
    for seed in range(20):
        picked = rl.rso_sample(f64(RSO_REWARDS), 3, beta, torch.Generator().manual_seed(seed))
        assert picked.tolist() == [1, 3, 4]  # the top 3 by reward, best first: one acceptance per round


def test_rso_with_beta_to_infinity_accepts_uniformly():
    draws, n = 2000, 2
    counts, first = [0] * 5, [0] * 5
    for seed in range(draws):
        picked = rl.rso_sample(f64(RSO_REWARDS), n, math.inf, torch.Generator().manual_seed(seed)).tolist()
        assert len(set(picked)) == n
        first[picked[0]] += 1
        for i in picked:
            counts[i] += 1
    # each candidate is in the sample with probability n/K = 0.4 (σ ≈ 0.011) and first with 1/K = 0.2
    assert [c / draws for c in counts] == pytest.approx([0.4] * 5, abs=0.05)
    assert [c / draws for c in first] == pytest.approx([0.2] * 5, abs=0.05)


def test_rso_first_round_acceptance_rate_matches_its_expectation():
    rewards, beta, rounds = [1.0, 0.5, 0.0, -1.0], 0.5, 4000
    p = [math.exp((r - 1.0) / beta) for r in rewards]  # 1, e^{−1}, e^{−2}, e^{−4}
    gen = torch.Generator().manual_seed(0)
    accepted = torch.stack([rl.rso_accept(f64(rewards), beta, gen) for _ in range(rounds)]).double()
    # the rate's σ is √(Σ p(1−p))/K/√rounds ≈ 0.0024
    assert accepted.mean().item() == pytest.approx(sum(p) / 4, abs=0.01)
    assert accepted.mean(0).tolist() == pytest.approx(p, abs=0.03)


def test_rso_is_reproducible_and_checks_its_arguments():
    draw = lambda seed: rl.rso_sample(f64(RSO_REWARDS), 4, 0.5, torch.Generator().manual_seed(seed)).tolist()
    assert draw(7) == draw(7)
    assert sorted(draw(7)) == sorted(set(draw(7)))
    with pytest.raises(ValueError, match="cannot accept n=6 of 5"):
        rl.rso_sample(f64(RSO_REWARDS), 6, 0.5)


# ---- SPPO ----------------------------------------------------------------------------------------------


def test_sppo_win_probabilities():
    probs = rl.sppo_win_probs(f64([0.0, 1.0, 2.0, 5.0, 5.0]), long([0, 0, 0, 1, 1]))
    expected = [
        (0.5 + sig(-1) + sig(-2)) / 3,  # 0.29605
        (sig(1) + 0.5 + sig(-1)) / 3,  # ½
        (sig(2) + sig(1) + 0.5) / 3,  # 0.70395
        0.5,
        0.5,
    ]
    close(probs, expected, tol=1e-12)
    assert probs[:3].sum().item() == pytest.approx(1.5, abs=1e-12)  # K/2


def sppo_pair(p_w: float, p_l: float) -> PairLogps:
    # ρ_w = −10 − (−10.5) = 0.5, ρ_l = −12 − (−11) = −1
    extras = {"chosen_win_prob": f64([p_w]), "rejected_win_prob": f64([p_l])}
    return PairLogps(f64([-10.0]).requires_grad_(), f64([-12.0]).requires_grad_(), long([4]), long([5]),
                     f64([-10.5]), f64([-11.0]), extras=extras)


def test_sppo_loss_regresses_log_ratios_to_win_probability_targets():
    lp = sppo_pair(0.7, 0.3)
    out = losses.sppo(lp, beta=0.5)  # η = 2: targets 2·(0.7 − ½) = 0.4 and −0.4
    close(out.losses, 0.5 * ((0.5 - 0.4) ** 2 + (-1.0 + 0.4) ** 2))  # 0.185
    grad_w, grad_l = torch.autograd.grad(out.losses.sum(), [lp.chosen, lp.rejected])
    close(grad_w, 0.1)
    close(grad_l, -0.6)
    close(out.chosen_rewards, 0.25)
    hard = sppo_pair(1.0, 0.0)
    close(losses.sppo(hard, beta=0.5).losses, 0.5 * losses.sppo_hard(hard, beta=0.5).losses.item())


def test_pair_extras_are_optional_and_named_when_missing():
    lp = PairLogps(f64([-10.0]), f64([-12.0]), long([4]), long([5]), f64([-10.5]), f64([-11.0]))
    with pytest.raises(ValueError, match="'chosen_win_prob'"):
        losses.sppo(lp, beta=0.5)
    close(losses.dpo(lp, beta=0.1).losses, losses.dpo(sppo_pair(0.7, 0.3), beta=0.1).losses.item())
