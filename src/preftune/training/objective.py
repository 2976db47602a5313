"""What one micro-batch's loss is: the methods, weights and hyper-parameters of a run (:class:`LossSpec`) and
:func:`batch_loss` — policy log-probs, reference log-probs, per-example losses, their mean, TRL-named metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
    non_score = -beta * kls["objective/kl"]
    window.add("kl", kls["kl"].reshape(1))
    window.add("objective/kl", kls["objective/kl"])
    window.add("objective/scores", batch["scores"])
    window.add("objective/non_score_reward", non_score)
    window.add("objective/rlhf_reward", batch["scores"] + non_score)


def batch_loss(
    policy: nn.Module, reference, batch: dict[str, Tensor], spec: LossSpec, window: MetricWindow
) -> Tensor:
    """Mean loss of one micro-batch; per-example metrics go into ``window`` (TRL's names).

    An online batch's ``logit_scale`` (1/temperature) reaches the policy's and the reference's forward with the
    other model inputs: both score the completions under the distribution they were sampled from.

    A batch may weigh its examples (``example_weights [B]``: Online DPO gives tied pairs weight 0); the loss is
    then Σ w·ℓ / max(Σ w, 1) and only examples of positive weight are logged. Online DPO's micro-batches carry their
    generation batch's share of that sum (``loss_weight_sum``, over all its micro-batches and processes), so the
    step's loss is the weighted mean over the whole generation batch however it is split."""
    token_weights = spec.token_weights(batch)
    out = policy(**model_inputs(batch), token_weights=token_weights, with_wpo=spec.use_weighting)
    ref_out = reference.outputs(batch, token_weights)
    ref = None if ref_out is None else ref_out["logps"]
    n = out["logps"].shape[0] // 2
    split = lambda t: (None, None) if t is None else (t[:n], t[n:])
    (s_a, s_b), (t_a, t_b), (r_a, r_b) = split(out["logps"]), split(out["tokens"]), split(ref)
    if spec.kind == "paired":
        logps = losses.PairLogps(s_a, s_b, t_a, t_b, r_a, r_b, {name: batch[name] for name in spec.extras})
    elif spec.kind == "unpaired":
        logps = losses.UnpairedLogps(s_a, t_a, batch["desirable"], r_a, s_b.detach(), r_b)
    elif spec.kind == "groups":  # completions sampled together, in groups of one prompt (RLOO, GRPO)
        # the generation batch's statistics (over every micro-batch of the step, every process) come with it
        logps = losses.GroupLogps(out["token_logps"], batch["score_seq"], out["tokens"], batch["rewards"],
                                  batch["group"], None if ref_out is None else ref_out["token_logps"],
                                  spec.max_completion_length, batch.get("batch_reward_std"),
                                  batch.get("loss_num_tokens"), batch.get("loss_num_sequences"))
    else:  # SFT rows: one sequence per row, every one a target
        logps = losses.UnpairedLogps(out["logps"], out["tokens"], torch.ones_like(out["tokens"], dtype=torch.bool),
                                     ref)
    result = compute_loss(spec.methods, spec.weights, logps, spec.hparams)
    per_example = result.losses
    if spec.use_weighting and spec.paired:
        per_example = per_example * losses.wpo_weights(out["wpo"][:n], out["wpo"][n:])
    weights = batch.get("example_weights")
    if weights is None:
        loss = per_example.mean()
    else:
        total = batch.get("loss_weight_sum")
        loss = (per_example * weights).sum() / (weights.sum().clamp(min=1) if total is None else total)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(_non_finite_parts(out["logps"], ref, result.terms))

    keep = slice(None) if weights is None else weights > 0
    window.add("loss", per_example[keep])
    if len(result.terms) > 1:  # a weighted combination: each method's own (unweighted) loss
        for name, values in result.terms.items():
            window.add(f"loss/{name}", values[keep] if values.dim() else values.reshape(1))
    for name, value in result.metrics.items():
        window.add(name, value.reshape(1))
    if spec.kind == "groups":  # rewards, lengths and KL of the samples are logged by the online source
        return loss
    window.add("rewards/chosen", result.chosen_rewards[keep] if spec.paired else result.chosen_rewards)
    window.add("rewards/rejected", result.rejected_rewards[keep] if spec.paired else result.rejected_rewards)
    if spec.paired:
        window.add("rewards/margins", (result.chosen_rewards - result.rejected_rewards)[keep])
        window.add("rewards/accuracies", (result.chosen_rewards > result.rejected_rewards).float()[keep])
    if "scores" in batch and ref_out is not None:  # Online DPO's samples: the KL to the reference, TRL's objective/*
        _log_online_kl(window, out["token_logps"], ref_out["token_logps"], batch, out["tokens"], spec)
    if spec.model == "reward":  # a reward head's "logps" are its scores, already logged as rewards
        return loss
    logits_a, logits_b = split(out["mean_logits"])
    if spec.kind == "paired":
        window.add("logps/chosen", s_a[keep])
        window.add("logps/rejected", s_b[keep])
        window.add("logits/chosen", logits_a[keep])
        window.add("logits/rejected", logits_b[keep])
        # What the verbosity check reads (preftune.training.health): lengths, and whether the margin follows them.
        window.add("lengths/chosen", t_a[keep])
        window.add("lengths/rejected", t_b[keep])
        window.add_correlation("lengths/margin_corr", (result.chosen_rewards - result.rejected_rewards)[keep],
                               (t_a - t_b)[keep])
    elif spec.kind == "unpaired":
        desirable = batch["desirable"]
        window.add("logps/chosen", s_a[desirable])
        window.add("logps/rejected", s_a[~desirable])
        window.add("logits/chosen", logits_a[desirable])
        window.add("logits/rejected", logits_a[~desirable])
    else:
        window.add("logps/chosen", out["logps"])
        window.add("mean_token_accuracy", out["token_accuracy"])  # TRL's SFT metric: argmax = target
    return loss
