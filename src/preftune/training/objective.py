"""What one micro-batch's loss is: the methods, weights and hyper-parameters of a run (:class:`LossSpec`) and
:func:`batch_loss` — policy log-probs, reference log-probs, per-example losses, their mean, TRL-named metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from preftune import metric_names as names
from preftune.config import TrainConfig
from preftune.errors import TrainingError
from preftune.methods import losses, rl
from preftune.methods.registry import compute_loss, get_method, run_data, run_extras
from preftune.modeling.logprobs import model_inputs
from preftune.training.tracking import MetricWindow


@dataclass
class LossSpec:
    """What the loop needs to turn log-probs into a loss — read once from the registry and config."""

    methods: list[str]
    weights: list[float]
    hparams: dict[str, float]
    kind: str  # paired | unpaired | sft | groups
    ld_alpha: float | None
    use_weighting: bool
    model: str = "causal_lm"  # or "reward": the batch's "logps" are then a scoring head's rewards
    max_completion_length: int | None = None  # online generation budget (Dr. GRPO's normaliser)
    extras: tuple[str, ...] = ()  # per-example batch columns the losses read (PairLogps.extras)

    @property
    def paired(self) -> bool:
        return self.kind == "paired"

    @property
    def unit(self) -> str:
        return {"paired": "pairs", "groups": "completions"}.get(self.kind, "samples")

    def examples(self, batch: dict[str, Tensor]) -> int:
        """Pairs, unpaired examples, SFT rows or sampled completions in a batch (the unit of ``*_per_second``)."""
        sequences = batch["seq_tokens"].shape[0]
        return sequences if self.kind in ("sft", "groups") else sequences // 2

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LossSpec:
        return cls(
            methods=cfg.methods,
            weights=cfg.loss_weights or [1.0] * len(cfg.methods),
            hparams=cfg.loss_hparams(),
            kind=run_data(cfg.methods),
            model=get_method(cfg.methods[0]).model,
            ld_alpha=cfg.ld_alpha,
            use_weighting=cfg.use_weighting,
            max_completion_length=cfg.generation_budget if cfg.is_online else None,
            extras=() if cfg.is_online else run_extras(cfg.methods),
        )

    def token_weights(self, batch: dict[str, Tensor]) -> Tensor | None:
        if self.ld_alpha is None or not self.paired:
            return None
        return losses.ld_token_weights(batch["score_seq"], batch["seq_tokens"], self.ld_alpha)


class NonFiniteLoss(TrainingError):
    """A micro-batch's loss is not finite; the message says which part (the loop adds the step and the rows)."""


def _non_finite_parts(policy_logps: Tensor, ref_logps: Tensor | None, terms: dict[str, Tensor]) -> str:
    def state(t: Tensor) -> str:
        return "finite" if bool(torch.isfinite(t).all()) else f"{int((~torch.isfinite(t)).sum())} non-finite"

    parts = [f"loss term '{name}': {state(values)}" for name, values in terms.items()]
    parts.append(f"policy log-probs: {state(policy_logps)}")
    if ref_logps is not None:
        parts.append(f"reference log-probs: {state(ref_logps)}")
    return "; ".join(parts)


def _log_online_kl(window: MetricWindow, token_logps: Tensor, ref_token_logps: Tensor, batch: dict[str, Tensor],
                   tokens: Tensor, spec: LossSpec) -> None:
    """Online DPO's samples, every one of them (tied pairs too), under TRL's Online DPO names: ``kl`` and
    ``objective/kl`` (:func:`preftune.methods.rl.kl_to_reference`), ``objective/scores`` (the judge's, ``scores
    [2B]`` in the batch's order), ``objective/non_score_reward`` = −β·objective/kl and ``objective/rlhf_reward`` =
    score − β·objective/kl, per completion."""
    kls = rl.kl_to_reference(token_logps, ref_token_logps, batch["score_seq"], tokens)
    beta = spec.hparams.get("beta", get_method(spec.methods[0]).defaults.get("beta", 0.0))
    non_score = -beta * kls[names.OBJECTIVE_KL]
    window.add(names.KL, kls["kl"].reshape(1))
    window.add(names.OBJECTIVE_KL, kls[names.OBJECTIVE_KL])
    window.add(names.OBJECTIVE_SCORES, batch["scores"])
    window.add(names.OBJECTIVE_NON_SCORE_REWARD, non_score)
    window.add(names.OBJECTIVE_RLHF_REWARD, batch["scores"] + non_score)


def batch_loss(
    policy: nn.Module, reference, batch: dict[str, Tensor], spec: LossSpec, window: MetricWindow
) -> Tensor:
    """Mean loss of one micro-batch; per-example metrics go into ``window`` (TRL's names).

    An online batch's ``logit_scale`` (1/temperature) reaches the policy's and the reference's forward with the
    other model inputs: both score the completions under the distribution they were sampled from. An online
    generation batch's experience may carry the reference's per-token log-probs (``ref_token_logps``), computed
    once for all its passes, and the sampler's (``old_token_logps``).

    A batch may weigh its examples (``example_weights [B]``: Online DPO gives tied pairs weight 0); the loss is
    then Σ w·ℓ / max(Σ w, 1) and only examples of positive weight are logged. Online DPO's micro-batches carry their
    generation batch's share of that sum (``loss_weight_sum``, over all its micro-batches and processes), so the
    step's loss is the weighted mean over the whole generation batch however it is split."""
    token_weights = spec.token_weights(batch)
    out = policy(**model_inputs(batch), token_weights=token_weights, with_wpo=spec.use_weighting)
    ref_out = ({"token_logps": batch["ref_token_logps"], "logps": None} if "ref_token_logps" in batch
               else reference.outputs(batch, token_weights))
    result = compute_loss(spec.methods, spec.weights, _loss_inputs(spec, batch, out, ref_out), spec.hparams)
    per_example = result.losses
    if spec.use_weighting and spec.paired:
        n = out["wpo"].shape[0] // 2
        per_example = per_example * losses.wpo_weights(out["wpo"][:n], out["wpo"][n:])
    weights = batch.get("example_weights")
    if weights is None:
        loss = per_example.mean()
    else:
        total = batch.get("loss_weight_sum")
        loss = (per_example * weights).sum() / (weights.sum().clamp(min=1) if total is None else total)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(_non_finite_parts(out["logps"], None if ref_out is None else ref_out["logps"],
                                              result.terms))
    keep = slice(None) if weights is None else weights > 0
    window.add(names.LOSS, per_example[keep])
    if len(result.terms) > 1:  # a weighted combination: each method's own (unweighted) loss
        for name, values in result.terms.items():
            window.add(f"loss/{name}", values[keep] if values.dim() else values.reshape(1))
    for name, value in result.metrics.items():
        window.add(name, value.reshape(1))
    if spec.kind != "groups":  # a group's rewards, lengths and KL are logged by the online algorithm
        _log_rewards(window, spec, batch, out, ref_out, result, keep)
    return loss


def _loss_inputs(spec: LossSpec, batch: dict[str, Tensor], out: dict[str, Tensor], ref_out: dict | None):
    """The loss function's view of the forward: pairs, unpaired examples, groups or SFT rows."""
    ref = None if ref_out is None else ref_out["logps"]
    n = out["logps"].shape[0] // 2
    split = lambda t: (None, None) if t is None else (t[:n], t[n:])  # noqa: E731
    (s_a, s_b), (t_a, t_b), (r_a, r_b) = split(out["logps"]), split(out["tokens"]), split(ref)
    if spec.kind == "paired":
        return losses.PairLogps(s_a, s_b, t_a, t_b, r_a, r_b, {name: batch[name] for name in spec.extras})
    if spec.kind == "unpaired":
        return losses.UnpairedLogps(s_a, t_a, batch["desirable"], r_a, s_b.detach(), r_b)
    if spec.kind == "groups":  # completions sampled together, in groups of one prompt (RLOO, GRPO, GSPO)
        # the generation batch's statistics (over every micro-batch of the step, every process) come with it
        return losses.GroupLogps(out["token_logps"], batch["score_seq"], out["tokens"], batch["rewards"],
                                 batch["group"], None if ref_out is None else ref_out["token_logps"],
                                 spec.max_completion_length, batch.get("batch_reward_std"),
                                 batch.get("loss_num_tokens"), batch.get("loss_num_sequences"),
                                 batch.get("old_token_logps"))
    # SFT rows: one sequence per row, every one a target
    return losses.UnpairedLogps(out["logps"], out["tokens"], torch.ones_like(out["tokens"], dtype=torch.bool), ref)


def _log_rewards(window: MetricWindow, spec: LossSpec, batch: dict[str, Tensor], out: dict[str, Tensor],
                 ref_out: dict | None, result, keep) -> None:
    """The implicit rewards, log-probs, logits and lengths of pairs, unpaired examples or SFT rows."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    window.add(names.REWARDS_CHOSEN, chosen[keep] if spec.paired else chosen)
    window.add(names.REWARDS_REJECTED, rejected[keep] if spec.paired else rejected)
    if spec.paired:
        window.add(names.REWARDS_MARGINS, (chosen - rejected)[keep])
        window.add(names.REWARDS_ACCURACIES, (chosen > rejected).float()[keep])
    if "scores" in batch and ref_out is not None:  # Online DPO's samples: the KL to the reference, TRL's objective/*
        _log_online_kl(window, out["token_logps"], ref_out["token_logps"], batch, out["tokens"], spec)
    if spec.model == "reward":  # a reward head's "logps" are its scores, already logged as rewards
        return
    n = out["logps"].shape[0] // 2
    (s_a, s_b), (t_a, t_b) = (out["logps"][:n], out["logps"][n:]), (out["tokens"][:n], out["tokens"][n:])
    logits_a, logits_b = out["mean_logits"][:n], out["mean_logits"][n:]
    if spec.kind == "paired":
        window.add(names.LOGPS_CHOSEN, s_a[keep])
        window.add(names.LOGPS_REJECTED, s_b[keep])
        window.add(names.LOGITS_CHOSEN, logits_a[keep])
        window.add(names.LOGITS_REJECTED, logits_b[keep])
        # What the verbosity check reads (preftune.health): lengths, and whether the margin follows them.
        window.add(names.LENGTHS_CHOSEN, t_a[keep])
        window.add(names.LENGTHS_REJECTED, t_b[keep])
        window.add_correlation(names.LENGTHS_MARGIN_CORR, (chosen - rejected)[keep], (t_a - t_b)[keep])
    elif spec.kind == "unpaired":
        desirable = batch["desirable"]
        window.add(names.LOGPS_CHOSEN, s_a[desirable])
        window.add(names.LOGPS_REJECTED, s_a[~desirable])
        window.add(names.LOGITS_CHOSEN, logits_a[desirable])
        window.add(names.LOGITS_REJECTED, logits_a[~desirable])
    else:
        window.add(names.LOGPS_CHOSEN, out["logps"])
        window.add("mean_token_accuracy", out["token_accuracy"])  # TRL's SFT metric: argmax = target
