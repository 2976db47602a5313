"""What one micro-batch's loss is: the methods, weights and hyper-parameters of a run (:class:`LossSpec`) and
:func:`batch_loss` — policy log-probs, reference log-probs, per-example losses, their mean, TRL-named metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from preftune.config import TrainConfig
from preftune.errors import TrainingError
from preftune.methods import losses
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


def batch_loss(
    policy: nn.Module, reference, batch: dict[str, Tensor], spec: LossSpec, window: MetricWindow
) -> Tensor:
    """Mean loss of one micro-batch; per-example metrics go into ``window`` (TRL's names).

    A batch may weigh its examples (``example_weights [B]``: Online DPO gives tied pairs weight 0); the loss is
    then Σ w·ℓ / max(Σ w, 1) and only examples of positive weight are logged."""
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
        logps = losses.GroupLogps(out["token_logps"], batch["score_seq"], out["tokens"], batch["rewards"],
                                  batch["group"], None if ref_out is None else ref_out["token_logps"],
                                  spec.max_completion_length)
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
        loss = (per_example * weights).sum() / weights.sum().clamp(min=1)
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
