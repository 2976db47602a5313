"""Evaluation of a policy against its reference: reward, KL, win rate, length, EOS rate, implicit-reward accuracy.

The KL (:func:`preftune.rollout.kl.sequence_kl`, the one estimator of every report's ``kl`` of samples) is the
x-axis of the DPO paper's Fig. 2 (Rafailov et al. 2023, arXiv 2305.18290, §6.1): the
sequence-level KL(π‖π_ref) on the policy's own samples, Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)) with the exact
per-token KL over the whole vocabulary, summed over the completion's tokens (the EOS step included when the
sample produced one). Its average over y ~ π estimates the true KL(π(·|x) ‖ π_ref(·|x)) with lower variance
than Σ_t log π/π_ref.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from torch import nn

from preftune.errors import ModelError
from preftune.evaluation.table import format_table  # noqa: F401  (evaluation/commands.py imports it from here)
from preftune.metric_names import EOS_RATE, KL, LENGTH, REFERENCE_REWARD, REWARD, REWARD_STD, WIN_RATE
from preftune.modeling.logprobs import max_positions
from preftune.rollout.encoding import Prompt
from preftune.rollout.judges import Judge, compare, judge_scores
from preftune.rollout.kl import sequence_kl
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate

# ------------------------------------------------------------------------------------ policy evaluation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _check_reference_reads(reference: nn.Module, rollout: Rollout) -> None:
    """The KL reads the policy's samples with the reference: refuse, by sample, one longer than its positions."""
    positions = max_positions(reference)
    if positions is None:
        return
    for k, (prompt_ids, completion_ids) in enumerate(zip(rollout.sample_prompt_ids, rollout.completion_ids)):
        if len(prompt_ids) + len(completion_ids) > positions:
            raise ModelError(f"the reference reads at most {positions} positions but the policy's sample {k} (prompt "
                             f"{k // rollout.group_size}) takes {len(prompt_ids) + len(completion_ids)}; evaluate with "
                             "a smaller max_new_tokens or a reference with as many positions as the policy")


def evaluate_policy(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    judge: Judge,
    params: SamplingParams,
    *,
    reference_rollout: Rollout | None = None,
    return_per_sample: bool = False,
) -> dict:
    """Sample the policy on held-out ``prompts`` (strings or conversations) and measure it against the reference.

    Returns ``judge`` (the judge's name) and (all floats except ``n``): ``reward`` and ``reward_std`` (judge
    scores of the policy's samples), ``kl`` and ``kl_std`` (:func:`sequence_kl`, nats), ``win_rate`` (the
    judge prefers the policy's sample over the reference's sample of the same prompt and index; ties ½),
    ``reference_reward`` (mean judge score of those reference samples), ``length`` (mean completion
    tokens, EOS included), ``eos_rate`` (fraction of samples that ended with a stop token) and ``n`` (samples).
    Reference samples are drawn with the same ``params`` when not given (pass them to reuse across
    checkpoints); with a seed, a policy equal to its reference wins exactly ½.
    With ``return_per_sample`` the dict also holds ``per_sample``: ``{"rewards", "kls", "rollout",
    "reference_rewards", "reference_rollout"}`` (sample k of both rollouts answers the same prompt).
    """
    rollout = generate(policy, tokenizer, prompts, params)
    if reference_rollout is None:
        reference_rollout = generate(reference, tokenizer, prompts, params)
    if reference_rollout.prompts != rollout.prompts or reference_rollout.group_size != rollout.group_size:
        raise ValueError("reference_rollout must hold the same prompts, in the same order and number of samples")
    rewards = judge_scores(judge, rollout.sample_prompts, rollout.completions)
    reference_rewards = judge_scores(judge, reference_rollout.sample_prompts, reference_rollout.completions)
    rollout.scores, rollout.judge = rewards, judge.name
    _check_reference_reads(reference, rollout)
    kls = sequence_kl(policy, reference, rollout)
    reward, reward_std = _mean_std(rewards)
    kl, kl_std = _mean_std(kls.tolist())
    metrics = {
        "judge": judge.name,
        REWARD: reward,
        REWARD_STD: reward_std,
        KL: kl,
        "kl_std": kl_std,
        WIN_RATE: compare(rewards, reference_rewards),
        REFERENCE_REWARD: statistics.fmean(reference_rewards),
        LENGTH: statistics.fmean(rollout.lengths),
        EOS_RATE: sum(rollout.ended_with_eos) / len(rollout),
        "n": len(rollout),
    }
    if return_per_sample:
        metrics["per_sample"] = {"rewards": rewards, "kls": kls.tolist(), "rollout": rollout,
                                 "reference_rewards": reference_rewards, "reference_rollout": reference_rollout}
    return metrics


def implicit_reward_accuracy(
    policy: nn.Module, reference: nn.Module, tokenizer, pairs: Sequence[Mapping], beta: float = 1.0,
    *, batch_size: int = 32,
) -> float:
    """Fraction of held-out ``{prompt, chosen, rejected}`` rows with r̂(chosen) > r̂(rejected), strictly.

    Rows in any paired format the data layer reads (text, or conversational with the completions as assistant
    messages, as :func:`preftune.rollout.pairs.pair_row` writes them). r̂ = β·log π/π_ref is DPO's implicit
    reward, summed over the completion's tokens; β does not change the ranking. A tie counts as wrong
    (RewardBench's rule), so a policy equal to its reference scores 0, not ½. Computed by
    :func:`preftune.evaluation.scoring.score_data` (variant ``sum``), which also gives per-token, reference-free
    and per-subset numbers.
    """
    from preftune.evaluation.scoring import score_data

    if not pairs:
        raise ValueError("no pairs to evaluate")
    result = score_data(policy, tokenizer, list(pairs), reference, beta=beta, variants=["sum"], batch_size=batch_size)
    if result.kind != "pairs":
        raise ValueError("implicit-reward accuracy needs paired rows (prompt, chosen, rejected)")
    return result.accuracy()["sum"]

