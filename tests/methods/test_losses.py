"""Facts about every loss: hand-computed values, finite-difference gradients, closed-form identities."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.methods import losses
from preftune.methods.losses import LossOutput, PairLogps, UnpairedLogps
from preftune.methods.registry import METHODS, Method, compute_loss, describe, get_method, register

PAIRED = sorted(name for name, m in METHODS.items() if m.data in ("paired", "sft"))  # sft also takes pairs

# Four pairs chosen away from every kink (hinge, SLiC's max, DPOP's max) so finite differences are valid.
S_W = [-12.3, -8.1, -20.5, -5.2]
S_L = [-14.0, -7.7, -19.0, -9.9]
R_W = [-12.0, -9.0, -20.0, -6.0]
R_L = [-13.5, -8.0, -19.6, -9.0]
N_W = [5, 3, 9, 2]
N_L = [7, 4, 8, 4]
# Per-example columns of the methods that declare them (``Method.extras``): SPPO's estimated win probabilities.
EXTRAS = {"chosen_win_prob": [0.9, 0.6, 0.55, 0.7], "rejected_win_prob": [0.1, 0.3, 0.5, 0.2]}


def pair_logps(method: Method, chosen=None, rejected=None, dtype=torch.float64) -> PairLogps:
    t = lambda xs: torch.tensor(xs, dtype=dtype)
    ref = method.needs_reference
    return PairLogps(
        chosen=t(S_W) if chosen is None else chosen,
        rejected=t(S_L) if rejected is None else rejected,
        chosen_tokens=torch.tensor(N_W),
        rejected_tokens=torch.tensor(N_L),
        ref_chosen=t(R_W) if ref else None,
        ref_rejected=t(R_L) if ref else None,
        extras={name: t(EXTRAS[name]) for name in method.extras},
    )


# ---- hand computations in plain floats -------------------------------------------------------------


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _dpo(s_w, s_l, r_w, r_l, n_w, n_l, beta, label_smoothing):
    h = (s_w - r_w) - (s_l - r_l)
    return -(1 - label_smoothing) * logsig(beta * h) - label_smoothing * logsig(-beta * h)


def _robust(s_w, s_l, r_w, r_l, n_w, n_l, beta, label_smoothing):
    h, e = (s_w - r_w) - (s_l - r_l), label_smoothing
    return (-(1 - e) * logsig(beta * h) + e * logsig(-beta * h)) / (1 - 2 * e)


def _ipo(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    return ((s_w - r_w) / n_w - (s_l - r_l) / n_l - 1 / (2 * beta)) ** 2


def _hinge(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    return max(0.0, 1 - beta * ((s_w - r_w) - (s_l - r_l)))


def _dpop(s_w, s_l, r_w, r_l, n_w, n_l, beta, dpop_lambda):
    h = (s_w - r_w) - (s_l - r_l)
    return -logsig(beta * (h - dpop_lambda * max(0.0, r_w - s_w)))


def _rpo(s_w, s_l, r_w, r_l, n_w, n_l, beta, rpo_alpha):
    return _dpo(s_w, s_l, r_w, r_l, n_w, n_l, beta, 0.0) + rpo_alpha * (-s_w / n_w)


def _nca_pair(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    a, b = beta * (s_w - r_w), beta * (s_l - r_l)
    return -logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b)


def _bco_pair(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    return -logsig(beta * (s_w - r_w)) - logsig(-beta * (s_l - r_l))


def _sppo_hard(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    return ((s_w - r_w) - 1 / (2 * beta)) ** 2 + ((s_l - r_l) + 1 / (2 * beta)) ** 2


def _sppo(s_w, s_l, r_w, r_l, n_w, n_l, beta, chosen_win_prob, rejected_win_prob):
    eta = 1 / beta
    target_w, target_l = eta * (chosen_win_prob - 0.5), eta * (rejected_win_prob - 0.5)
    return 0.5 * (((s_w - r_w) - target_w) ** 2 + ((s_l - r_l) - target_l) ** 2)


def _apo_zero(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    return (1 - sig(beta * (s_w - r_w))) + sig(beta * (s_l - r_l))


def _apo_down(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    return sig(beta * (s_w - r_w)) + (1 - sig(beta * ((s_w - r_w) - (s_l - r_l))))


def _slic(s_w, s_l, r_w, r_l, n_w, n_l, beta, slic_lambda):
    return max(0.0, beta - s_w + s_l) + slic_lambda * (-s_w / n_w)


def _simpo(s_w, s_l, r_w, r_l, n_w, n_l, beta, simpo_gamma, label_smoothing):
    x = beta * s_w / n_w - beta * s_l / n_l - simpo_gamma
    return -(1 - label_smoothing) * logsig(x) - label_smoothing * logsig(-x)


def _orpo(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    a_w, a_l = s_w / n_w, s_l / n_l
    log_odds = (a_w - a_l) - (math.log(1 - math.exp(a_w)) - math.log(1 - math.exp(a_l)))
    return -a_w - beta * logsig(log_odds)


def _cpo(s_w, s_l, r_w, r_l, n_w, n_l, beta, cpo_alpha):
    return -logsig(beta * (s_w - s_l)) + cpo_alpha * (-s_w / n_w)


def _sft(s_w, s_l, r_w, r_l, n_w, n_l, beta):
    return -s_w / n_w


def _reward(s_w, s_l, r_w, r_l, n_w, n_l, center_rewards_coefficient):
    # s_w, s_l stand for the reward head's scores here.
    return -logsig(s_w - s_l) + center_rewards_coefficient * (s_w + s_l) ** 2


def _unlikelihood(s_w, s_l, r_w, r_l, n_w, n_l, unlikelihood_alpha):
    return -s_w / n_w - unlikelihood_alpha * math.log(1 - math.exp(s_l / n_l))


HAND = {
    "dpo": _dpo, "cdpo": _dpo, "online_dpo": _dpo, "robust": _robust, "ipo": _ipo, "hinge": _hinge, "dpop": _dpop,
    "rpo": _rpo,
    "nca_pair": _nca_pair, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "apo_zero": _apo_zero,
    "apo_down": _apo_down, "slic": _slic, "simpo": _simpo, "orpo": _orpo, "cpo": _cpo, "sft": _sft,
    "reward": _reward, "unlikelihood": _unlikelihood, "sppo": _sppo,
    # The methods trained in rounds use the losses above (RSO's sigmoid-norm is DPO's, its hinge-norm the hinge).
    "rso": _dpo, "rso_hinge": _hinge, "iterative_dpo": _dpo,
}


def hand_rewards(name: str, beta: float, i: int) -> tuple[float, float]:
    if name == "unlikelihood":
        return S_W[i] / N_W[i], S_L[i] / N_L[i]
    if name == "reward":
        return S_W[i], S_L[i]
    if name in ("simpo", "orpo"):
        return beta * S_W[i] / N_W[i], beta * S_L[i] / N_L[i]
    if get_method(name).needs_reference:
        return beta * (S_W[i] - R_W[i]), beta * (S_L[i] - R_L[i])
    return beta * S_W[i], beta * S_L[i]


CASES = [(name, {}) for name in PAIRED] + [
    ("simpo", {"label_smoothing": 0.2}),
    ("hinge", {"beta": 1.0}),  # the fourth pair's margin 1.7 > 1: hinge inactive, ℓ = 0
    ("dpop", {"dpop_lambda": 5.0}),
    ("slic", {"beta": 0.5, "slic_lambda": 1.0}),
    ("reward", {"center_rewards_coefficient": 0.01}),
]


def test_every_paired_method_has_a_hand_computation():
    assert set(PAIRED) == set(HAND)


@pytest.mark.parametrize("name,override", CASES)
def test_loss_matches_hand_computation(name, override):
    method = get_method(name)
    hp = {**method.defaults, **override}
    out = method.loss(pair_logps(method), **hp)
    for i in range(len(S_W)):
        extras = {extra: EXTRAS[extra][i] for extra in method.extras}
        expected = HAND[name](S_W[i], S_L[i], R_W[i], R_L[i], N_W[i], N_L[i], **hp, **extras)
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        chosen_reward, rejected_reward = hand_rewards(name, hp.get("beta", 1.0), i)
        assert out.chosen_rewards[i].item() == pytest.approx(chosen_reward, rel=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(rejected_reward, rel=1e-12)


@pytest.mark.parametrize("name", PAIRED)
def test_gradient_matches_finite_differences(name):
    method = get_method(name)
    chosen = torch.tensor(S_W, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(S_L, dtype=torch.float64, requires_grad=True)
    f = lambda c, r: method.loss(pair_logps(method, c, r), **method.defaults).losses
    assert torch.autograd.gradcheck(f, (chosen, rejected), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", PAIRED)
def test_losses_are_per_example_and_rewards_detached(name):
    method = get_method(name)
    chosen = torch.tensor(S_W, dtype=torch.float64, requires_grad=True)
    out = method.loss(pair_logps(method, chosen), **method.defaults)
    assert out.losses.shape == (4,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    # Example i's loss depends on example i only: the Jacobian is diagonal.
    jac = torch.autograd.functional.jacobian(
        lambda c: method.loss(pair_logps(method, c), **method.defaults).losses, chosen.detach()
    )
    assert torch.equal(jac, torch.diag(torch.diagonal(jac)))


# ---- DPO family ------------------------------------------------------------------------------------


def at_init(beta_like_ref: float = -7.0, n: int = 3) -> tuple[PairLogps, torch.Tensor, torch.Tensor]:
    s_w = torch.tensor([beta_like_ref], dtype=torch.float64, requires_grad=True)
    s_l = torch.tensor([beta_like_ref - 2.5], dtype=torch.float64, requires_grad=True)
    n_w, n_l = torch.tensor([n]), torch.tensor([n + 2])
    lp = PairLogps(s_w, s_l, n_w, n_l, ref_chosen=s_w.detach().clone(), ref_rejected=s_l.detach().clone())
    return lp, s_w, s_l


def test_dpo_at_init_is_ln2_with_gradient_minus_half_beta():
    lp, s_w, s_l = at_init()
    out = losses.dpo(lp, beta=0.1)
    assert out.losses.item() == math.log(2)
    out.losses.sum().backward()
    assert s_w.grad.item() == pytest.approx(-0.05, abs=1e-15)
    assert s_l.grad.item() == pytest.approx(+0.05, abs=1e-15)


def test_cdpo_has_zero_gradient_at_its_finite_optimum():
    beta, eps = 0.1, 0.1
    h_star = math.log((1 - eps) / eps) / beta  # ≈ 21.97
    grads = []
    for h in (h_star - 1, h_star, h_star + 1):
        s_w = torch.tensor([h], dtype=torch.float64, requires_grad=True)
        zeros = torch.zeros(1, dtype=torch.float64)
        lp = PairLogps(s_w, zeros, torch.tensor([4]), torch.tensor([4]), zeros, zeros)
        get_method("cdpo").loss(lp, beta=beta, label_smoothing=eps).losses.sum().backward()
        grads.append(s_w.grad.item())
    assert grads[1] == pytest.approx(0.0, abs=1e-15)
    assert grads[0] < 0 < grads[2]  # a minimum: pushes h up below h*, down above it


def test_robust_dpo_gradient_never_changes_sign():
    h = torch.linspace(-200, 200, 801, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(h)
    n = torch.full_like(h, 4)
    lp = PairLogps(h, zeros, n, n, zeros, zeros)
    losses.robust(lp, beta=0.1, label_smoothing=0.1).losses.sum().backward()
    assert (h.grad < 0).all()
    # ... whereas cDPO's does (above its optimum it pushes the margin back down).
    h.grad = None
    losses.dpo(lp, beta=0.1, label_smoothing=0.1).losses.sum().backward()
    assert (h.grad > 0).any()


def test_robust_gradient_matches_closed_form():
    beta, eps, h0 = 0.1, 0.1, 3.0
    lp, s_w, _ = at_init()
    lp.chosen = lp.chosen + h0
    losses.robust(lp, beta=beta, label_smoothing=eps).losses.sum().backward()
    expected = -beta * ((1 - eps) * sig(-beta * h0) + eps * sig(beta * h0)) / (1 - 2 * eps)
    assert s_w.grad.item() == pytest.approx(expected, rel=1e-12)


def test_ipo_at_init_is_quarter_over_beta_squared():
    beta = 0.1
    lp, s_w, s_l = at_init(n=3)
    out = losses.ipo(lp, beta=beta)
    assert out.losses.item() == pytest.approx(1 / (4 * beta**2), rel=1e-15)
    out.losses.sum().backward()
    # ∂ℓ/∂h̄ = 2(h̄ − 1/(2β)) and h̄ holds s_w/|y_w|: ∂ℓ/∂s_w = −1/(β·|y_w|).
    assert s_w.grad.item() == pytest.approx(-1 / (beta * 3), rel=1e-12)
    assert s_l.grad.item() == pytest.approx(+1 / (beta * 5), rel=1e-12)


def test_swapping_chosen_and_rejected_flips_the_dpo_gradient():
    beta = 0.1
    a = torch.tensor([-10.0, -4.0, -30.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-12.0, -3.0, -25.0], dtype=torch.float64, requires_grad=True)
    ref_a = torch.tensor([-11.0, -4.5, -28.0], dtype=torch.float64)
    ref_b = torch.tensor([-11.5, -3.5, -27.0], dtype=torch.float64)
    n = torch.tensor([5, 5, 5])
    grad_a = torch.autograd.grad(losses.dpo(PairLogps(a, b, n, n, ref_a, ref_b), beta).losses.sum(), a)[0]
    grad_a_swapped = torch.autograd.grad(
        losses.dpo(PairLogps(b, a, n, n, ref_b, ref_a), beta).losses.sum(), a
    )[0]
    assert (grad_a < 0).all() and (grad_a_swapped > 0).all()
    # β·σ(−βh) + β·σ(βh) = β: the two magnitudes are complementary.
    torch.testing.assert_close(grad_a_swapped - grad_a, torch.full_like(a, beta), rtol=0, atol=1e-15)


def test_reference_based_loss_without_reference_uses_uniform_reference():
    method = get_method("dpo")
    lp = pair_logps(method)
    free = PairLogps(lp.chosen, lp.rejected, lp.chosen_tokens, lp.rejected_tokens)
    zero_ref = PairLogps(lp.chosen, lp.rejected, lp.chosen_tokens, lp.rejected_tokens,
                         torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(losses.dpo(free, 0.1).losses, losses.dpo(zero_ref, 0.1).losses)


# ---- reference-free --------------------------------------------------------------------------------


def test_simpo_gradient_matches_the_paper():
    beta, gamma = 2.0, 1.0
    method = get_method("simpo")
    chosen = torch.tensor(S_W, dtype=torch.float64, requires_grad=True)
    losses.simpo(pair_logps(method, chosen), beta=beta, simpo_gamma=gamma).losses.sum().backward()
    for i in range(4):
        x = beta * S_W[i] / N_W[i] - beta * S_L[i] / N_L[i] - gamma
        # ∂ℓ/∂avg_w = −β σ(−x), and avg_w = s_w/|y_w|.
        assert chosen.grad[i].item() == pytest.approx(-beta * sig(-x) / N_W[i], rel=1e-12)


@pytest.mark.parametrize("avg", [-1e-6, -1e-9, 0.0])
def test_orpo_is_finite_for_average_logps_near_zero(avg):
    n = torch.tensor([4, 6])
    chosen = (torch.tensor([avg, -0.7]) * n).requires_grad_()
    rejected = (torch.tensor([-1.5, avg]) * n).requires_grad_()
    out = losses.orpo(PairLogps(chosen, rejected, n, n), beta=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_log1mexp_is_accurate_in_float32_at_both_ends():
    xs = [-1e-9, -1e-6, -0.1, -math.log(2), -2.0, -30.0]
    got = losses._log1mexp(torch.tensor(xs, dtype=torch.float32))
    for value, x in zip(got.tolist(), xs, strict=True):
        assert value == pytest.approx(math.log(-math.expm1(x)), rel=1e-6, abs=1e-12)


# ---- KTO -------------------------------------------------------------------------------------------

KTO_LOGPS = [-5.0, -7.0, -3.0, -9.0]
KTO_REF = [-5.5, -6.0, -3.2, -8.0]
KTO_DESIRABLE = [True, False, True, False]
KTO_KL = [-6.0, -4.0, -8.0, -5.0]
KTO_REF_KL = [-6.3, -4.5, -8.2, -5.0]  # mean(kl − ref_kl) = 0.25


def kto_logps(logps=None, kl=None, ref_kl=KTO_REF_KL) -> UnpairedLogps:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    return UnpairedLogps(
        logps=t(KTO_LOGPS) if logps is None else logps, tokens=torch.tensor([3, 4, 5, 6]),
        desirable=torch.tensor(KTO_DESIRABLE), ref_logps=t(KTO_REF),
        kl=t(KTO_KL) if kl is None else kl, ref_kl=t(ref_kl),
    )


def test_kto_matches_hand_computation():
    beta, lam_d, lam_u = 0.1, 1.0, 1.5
    out = losses.kto(kto_logps(), beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    z0 = max(0.0, sum(k - r for k, r in zip(KTO_KL, KTO_REF_KL, strict=True)) / 4)
    for i, desirable in enumerate(KTO_DESIRABLE):
        rho = KTO_LOGPS[i] - KTO_REF[i]
        expected = lam_d * (1 - sig(beta * (rho - z0))) if desirable else lam_u * (1 - sig(beta * (z0 - rho)))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * 0.5, beta * 0.2], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([beta * -1.0, beta * -1.0], rel=1e-12)


def test_kto_reference_point_is_not_backpropagated():
    kl = torch.tensor(KTO_KL, dtype=torch.float64, requires_grad=True)
    logps = torch.tensor(KTO_LOGPS, dtype=torch.float64, requires_grad=True)
    out = losses.kto(kto_logps(logps=logps, kl=kl), beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    out.losses.sum().backward()
    assert logps.grad is not None
    assert kl.grad is None or torch.all(kl.grad == 0)


def test_kto_reference_point_is_clamped_at_zero_and_zero_without_kl():
    kw = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    negative_kl = kto_logps(ref_kl=[k + 1.0 for k in KTO_KL])  # mean(kl − ref_kl) = −1 → z0 = 0
    no_kl = kto_logps()
    no_kl.kl = no_kl.ref_kl = None
    torch.testing.assert_close(losses.kto(negative_kl, **kw).losses, losses.kto(no_kl, **kw).losses)


def test_kto_at_init_is_half_lambda():
    lp = kto_logps()
    lp.ref_logps, lp.ref_kl = lp.logps.clone(), lp.kl.clone()
    out = losses.kto(lp, beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    assert out.losses.tolist() == [0.5, 0.665, 0.5, 0.665]


def test_kto_gradient_matches_finite_differences():
    defaults = get_method("kto").defaults
    logps = torch.tensor(KTO_LOGPS, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: losses.kto(kto_logps(logps=x), **defaults).losses, (logps,))


# ---- weights for WPO and LD-DPO --------------------------------------------------------------------


def test_wpo_weights_are_exp_of_summed_log_weights_and_detached():
    w_c = torch.tensor([-0.5, -1.0, 0.0], requires_grad=True)
    w_r = torch.tensor([-0.25, 0.0, 0.0])
    w = losses.wpo_weights(w_c, w_r)
    assert w.tolist() == pytest.approx([math.exp(-0.75), math.exp(-1.0), 1.0], rel=1e-6)
    assert not w.requires_grad


def test_ld_token_weights_on_a_hand_example():
    # Two pairs: |y_w| = 3, 2 (sequences 0, 1) and |y_l| = 5, 3 (sequences 2, 3) → l_p = 3, 2.
    seq_tokens = torch.tensor([3, 2, 5, 3])
    score_seq = torch.repeat_interleave(torch.arange(4), seq_tokens)
    weights = losses.ld_token_weights(score_seq, seq_tokens, ld_alpha=0.5)
    assert weights.tolist() == [1, 1, 1] + [1, 1] + [1, 1, 1, 0.5, 0.5] + [1, 1, 0.5]
    # α = 1 is plain DPO: every completion token counts fully.
    assert torch.equal(losses.ld_token_weights(score_seq, seq_tokens, ld_alpha=1.0), torch.ones(13))


# ---- the registry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_entry_has_a_default_for_every_hparam(name):
    method = METHODS[name]
    assert set(method.hparams) == set(method.defaults)
    assert "beta" in method.hparams or name in ("reward", "unlikelihood", "ppo")  # no β (PPO: kl_coef)


def test_register_rejects_missing_defaults():
    with pytest.raises(ValueError, match="missing"):
        register(Method("broken", losses.simpo, defaults={"beta": 1.0}))
    assert "broken" not in METHODS


def test_reference_free_methods_ignore_a_reference():
    for name in ("slic", "simpo", "orpo", "cpo", "sft"):
        method = get_method(name)
        assert not method.needs_reference
        lp = pair_logps(method)
        with_ref = PairLogps(lp.chosen, lp.rejected, lp.chosen_tokens, lp.rejected_tokens,
                             lp.chosen - 1.0, lp.rejected + 1.0)
        assert torch.equal(method.loss(lp, **method.defaults).losses,
                           method.loss(with_ref, **method.defaults).losses)


def test_unknown_method_suggests_the_close_name():
    with pytest.raises(ValueError, match="'dpo'"):
        get_method("dpp")


def test_compute_loss_is_a_weighted_sum_with_first_rewards():
    lp = pair_logps(get_method("dpo"))
    out = compute_loss(["dpo", "sft"], [1.0, 0.5], lp, {"beta": None})
    dpo, sft = losses.dpo(lp, beta=0.1), losses.sft(lp, beta=0.1)
    torch.testing.assert_close(out.losses, dpo.losses + 0.5 * sft.losses, rtol=0, atol=1e-15)
    assert torch.equal(out.chosen_rewards, dpo.chosen_rewards)
    # An explicit value overrides the default for every method that takes it.
    out = compute_loss(["dpo"], [1.0], lp, {"beta": 0.5, "unused": 3})
    torch.testing.assert_close(out.losses, losses.dpo(lp, beta=0.5).losses)


def test_compute_loss_rejects_mixed_data_and_mismatched_weights():
    lp = pair_logps(get_method("dpo"))
    with pytest.raises(ValueError):
        compute_loss(["dpo", "kto"], [1.0, 1.0], lp, {})
    with pytest.raises(ValueError):
        compute_loss(["dpo", "sft"], [1.0], lp, {})


def test_combine_sums_weighted_losses():
    a = LossOutput(torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4]))
    b = LossOutput(torch.tensor([10.0, 20.0]), torch.zeros(2), torch.zeros(2))
    out = losses.combine([(a, 2.0), (b, 0.1)])
    assert out.losses.tolist() == pytest.approx([3.0, 6.0])
    assert out.rejected_rewards is a.rejected_rewards


def test_describe_lists_every_method():
    table = describe()
    assert table.count("\n") == len(METHODS) + 1
    for name in METHODS:
        assert f"| `{name}` |" in table
