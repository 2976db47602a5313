"""Evaluation of a policy against its reference: reward, KL, win rate, length, EOS rate, implicit-reward accuracy.

The KL is the x-axis of the DPO paper's Fig. 2 (Rafailov et al. 2023, arXiv 2305.18290, §6.1): the
sequence-level KL(π‖π_ref) on the policy's own samples, Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)) with the exact
per-token KL over the whole vocabulary, summed over the completion's tokens (the EOS step included when the
sample produced one). Its average over y ~ π estimates the true KL(π(·|x) ‖ π_ref(·|x)) with lower variance
than Σ_t log π/π_ref.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from preftune.data.batching import pad_sequences
from preftune.evaluation.generate import Samples, generate
from preftune.evaluation.judges import ImplicitRewardJudge, Judge, compare, length_sorted_batches
from preftune.modeling.lm_head import head_logits
from preftune.modeling.logprobs import flat_hidden_states, unwrap_causal_lm

# ------------------------------------------------------------------------------------ sequence KL


def _completion_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Hidden states ``[M, H]`` at the M positions that predict a completion token (``batch["score_index"]``)."""
    lm = unwrap_causal_lm(model)
    device = next(lm.parameters()).device
    hidden = flat_hidden_states(lm, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                batch["position_ids"].to(device), lm.get_output_embeddings().weight.dtype)
    return hidden[batch["score_index"].to(device)]


def _log_softmax_head(model: nn.Module, hidden: Tensor) -> Tensor:
    """``log π(·|context)`` ``[k, V]`` from hidden states ``[k, H]``, in fp32 (fp64 for fp64 models)."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    return head_logits(hidden, head.weight, getattr(head, "bias", None),
                       getattr(lm.config, "final_logit_softcapping", None)).log_softmax(-1)


@torch.no_grad()
def sequence_kl(
    policy: nn.Module, reference: nn.Module, samples: Samples, *, batch_size: int = 32, chunk_size: int = 1024
) -> Tensor:
    """Sequence-level KL(π‖π_ref) of each sample, fp32 ``[n]``: Σ_t Σ_v π_t(v) (log π_t(v) − log π_ref,t(v)).

    ``t`` runs over the completion's tokens (``samples.completion_ids``, EOS step included). The model
    bodies run once per length-sorted batch; only the completion positions are projected to the
    vocabulary, ``chunk_size`` at a time, so ``[batch, seq, vocab]`` logits never exist. Sequences are
    laid out by :func:`preftune.data.batching.pad_sequences` (right padding, explicit positions).
    """
    out = torch.zeros(len(samples))
    models = (policy, reference)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        lengths = [len(p) + len(c) for p, c in zip(samples.prompt_ids, samples.completion_ids)]
        for idx in length_sorted_batches(lengths, batch_size):
            batch = pad_sequences([samples.prompt_ids[i] for i in idx],
                                  [samples.completion_ids[i] for i in idx], pad_id=0)
            h_policy, h_reference = _completion_hidden(policy, batch), _completion_hidden(reference, batch)
            per_token = []
            for start in range(0, h_policy.shape[0], chunk_size):
                logp = _log_softmax_head(policy, h_policy[start : start + chunk_size])
                logq = _log_softmax_head(reference, h_reference[start : start + chunk_size]).to(logp.device)
                per_token.append((logp.exp() * (logp - logq)).sum(-1))
            kl = torch.cat(per_token).float().cpu()
            out[idx] = torch.zeros(len(idx)).index_add(0, batch["score_seq"], kl)
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    return out


# ------------------------------------------------------------------------------------ policy evaluation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def evaluate_policy(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    judge: Judge,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    reference_samples: Samples | None = None,
    return_per_sample: bool = False,
) -> dict:
    """Sample the policy on held-out ``prompts`` and measure it against the reference.

    Returns (all floats except ``n``): ``reward`` and ``reward_std`` (judge scores of the policy's
    samples), ``kl`` and ``kl_std`` (:func:`sequence_kl`, nats), ``win_rate`` (the judge prefers the
    policy's sample over the reference's sample of the same prompt and index; ties ½),
    ``reference_reward`` (mean judge score of those reference samples), ``length`` (mean completion
    tokens, EOS included), ``eos_rate`` (fraction of samples that ended with EOS) and ``n`` (samples).
    Reference samples are drawn with the same seed when not given (pass them to reuse across
    checkpoints); the same seed makes a policy equal to its reference win exactly ½.
    With ``return_per_sample`` the dict also holds ``per_sample``: ``{"rewards", "kls", "samples"}``.
    """
    sampling = dict(max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
                    top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size)
    samples = generate(policy, tokenizer, prompts, **sampling)
    if reference_samples is None:
        reference_samples = generate(reference, tokenizer, prompts, **sampling)
    if reference_samples.prompts != samples.prompts:
        raise ValueError("reference_samples must hold the same prompts, in the same order and number of samples")
    rewards = judge.score(samples.prompts, samples.completions)
    reference_rewards = judge.score(reference_samples.prompts, reference_samples.completions)
    kls = sequence_kl(policy, reference, samples)
    reward, reward_std = _mean_std(rewards)
    kl, kl_std = _mean_std(kls.tolist())
    metrics = {
        "reward": reward,
        "reward_std": reward_std,
        "kl": kl,
        "kl_std": kl_std,
        "win_rate": compare(rewards, reference_rewards),
        "reference_reward": statistics.fmean(reference_rewards),
        "length": statistics.fmean(samples.lengths),
        "eos_rate": sum(samples.ended_with_eos) / len(samples),
        "n": len(samples),
    }
    if return_per_sample:
        metrics["per_sample"] = {"rewards": rewards, "kls": kls.tolist(), "samples": samples}
    return metrics


def implicit_reward_accuracy(
    policy: nn.Module, reference: nn.Module, tokenizer, pairs: Sequence[Mapping[str, str]], beta: float,
    *, batch_size: int = 32,
) -> float:
    """Fraction of held-out ``{prompt, chosen, rejected}`` rows with r̂(chosen) > r̂(rejected), strictly.

    r̂ = β·log π/π_ref is DPO's implicit reward; a tie counts as wrong (RewardBench's rule), so a policy
    equal to its reference scores 0, not ½.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    judge = ImplicitRewardJudge(policy, reference, tokenizer, beta, batch_size=batch_size)
    prompts = [row["prompt"] for row in pairs]
    scores = judge.score(prompts * 2, [row["chosen"] for row in pairs] + [row["rejected"] for row in pairs])
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


# ------------------------------------------------------------------------------------ table


def _cell(value) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"
    return "—" if value is None else str(value)


def format_table(rows: Mapping[str, Mapping]) -> str:
    """An aligned text table: one column per entry of ``rows`` (e.g. ``{"SFT": m1, "DPO": m2}``), one row
    per metric (union of keys, first-seen order; non-scalar values such as ``per_sample`` are skipped)."""
    columns = list(rows)
    metrics: list[str] = []
    for values in rows.values():
        scalars = (k for k, v in values.items() if v is None or isinstance(v, (int, float, str)))
        metrics += [k for k in scalars if k not in metrics]
    table = [["metric", *columns]] + [[m, *(_cell(rows[c].get(m)) for c in columns)] for m in metrics]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
