"""Batches sampled from the current policy: the data source of Online DPO, RLOO and GRPO.

The loop's prompt loader (sharded over processes by Accelerate, resumed by skipping batches like any other)
yields rows ``{prompt, prompt_ids, source_row}``; :meth:`OnlineBatches.batch` turns one micro-batch of them into
a training batch:

1. sample ``num_generations`` completions of each prompt from the current policy
   (:func:`preftune.rollout.sampling.generate`, the prompt ids as the data layer encoded and truncated them),
   seeded by (seed, epoch, batch, process): a resumed run samples exactly what the uninterrupted one did;
2. score them with the judge; a completion that never ended loses ``missing_eos_penalty``;
3. build the experience, from the sampled ids themselves (never re-tokenised text):
   * groups (RLOO, GRPO): all completions of a prompt form one unit — with prefix sharing the prompt is encoded
     once for its group — with ``rewards [S]`` and ``group [S]`` for the loss;
   * pairs (Online DPO, Guo et al. 2024, arXiv 2402.04792): of each prompt's two completions the higher-scored is
     chosen; a tie carries no preference, so its pair is kept with weight 0 (``example_weights``) and counted.

What a user needs to trust an online run goes into the metric window under TRL's names: ``reward``,
``reward_std``, ``frac_reward_zero_std`` (groups whose completions all scored the same: no signal),
``completions/mean_length``, ``completions/clipped_ratio`` (completions that hit the length budget without
ending), ``entropy`` (−mean log-prob of the sampled tokens under the sampling distribution, a Monte-Carlo
estimate of the per-token entropy; for Online DPO ``frac_reward_zero_std`` is the fraction of tied pairs).
Time spent sampling and judging is kept apart from the rest, for the summary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from preftune.config import TrainConfig
from preftune.data.batching import SOURCE_ROW, PreferenceCollator
from preftune.methods import rl
from preftune.methods.registry import get_method
from preftune.rollout.judges import Judge, judge_scores
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate
from preftune.training.tracking import MetricWindow


def num_generations(cfg: TrainConfig) -> int:
    """Completions per prompt: the config's, else the method's default (Online DPO: 2)."""
    return cfg.num_generations or get_method(cfg.methods[0]).num_generations or 2


class OnlineBatches:
    """Sample → judge → experience → collated batch, for one micro-batch of prompt rows; see the module docstring."""

    def __init__(self, cfg: TrainConfig, kind: str, tokenizer, collator: PreferenceCollator, judge: Judge,
                 accelerator: Accelerator):
        self.cfg, self.kind, self.tokenizer, self.collator = cfg, kind, tokenizer, collator
        self.judge, self.accelerator = judge, accelerator
        self.group_size = num_generations(cfg)
        self.seconds = {"generation": 0.0, "judging": 0.0}
        self.generated_tokens = 0

    def sampling(self, seed: int, n: int | None = None) -> SamplingParams:
        cfg = self.cfg
        n = self.group_size if n is None else n
        return SamplingParams(max_new_tokens=cfg.generation_budget, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, n=n, seed=seed, batch_size=max(64, n))

    def seed(self, epoch: int, batch_index: int) -> int:
        """A sampling seed of its own for every micro-batch of every process, fixed by the run's seed."""
        acc = self.accelerator
        return (self.cfg.seed * 1_000_003 + epoch * 10_007 * acc.num_processes
                + batch_index * acc.num_processes + acc.process_index) % 2**31

    def rollout(self, rows: Sequence[dict], model: nn.Module, params: SamplingParams) -> Rollout:
        """Sample and judge; the judged scores, minus the missing-EOS penalty, are the rollout's ``scores``."""
        started = time.perf_counter()
        with self.accelerator.autocast():
            out = generate(model, self.tokenizer, [r["prompt"] for r in rows], params,
                           prompt_ids=[r["prompt_ids"] for r in rows], source="the training prompts")
        judged = time.perf_counter()
        self.seconds["generation"] += judged - started
        self.generated_tokens += sum(out.lengths)
        scores = torch.tensor(judge_scores(self.judge, out.sample_prompts, out.completions), dtype=torch.float32)
        if self.cfg.missing_eos_penalty:
            scores = rl.missing_eos_penalty(scores, torch.tensor(out.ended_with_eos), self.cfg.missing_eos_penalty)
        out.scores, out.judge = scores.tolist(), self.judge.name
        self.seconds["judging"] += time.perf_counter() - judged
        return out

    def batch(self, rows: Sequence[dict], model: nn.Module, window: MetricWindow, seed: int) -> dict[str, Tensor]:
        """The training batch of one micro-batch of prompt rows, on the accelerator's device."""
        out = self.rollout(rows, model, self.sampling(seed))
        rewards = torch.tensor(out.scores, dtype=torch.float32)
        group = torch.arange(len(out)) // self.group_size
        log_samples(window, out)
        window.add("reward_std", rewards.std(unbiased=False).reshape(1))
        window.add("frac_reward_zero_std", rl.zero_spread(rewards, group)[:: self.group_size].float())
        if self.kind == "groups":
            batch = self.collator.groups(out.prompt_ids, out.completion_ids, self.group_size)
            batch |= {"rewards": rewards, "group": group}
        else:
            batch = self._pairs(out, rewards)
        if SOURCE_ROW in rows[0]:  # the prompts' rows, for reports that name them
            batch["source_rows"] = torch.tensor([r[SOURCE_ROW] for r in rows], dtype=torch.long)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _pairs(self, out: Rollout, rewards: Tensor) -> dict[str, Tensor]:
        rows, weights = [], []
        for i, prompt_ids in enumerate(out.prompt_ids):
            a, b = 2 * i, 2 * i + 1
            first_wins = rewards[a] >= rewards[b]
            chosen, rejected = (a, b) if first_wins else (b, a)
            rows.append({"prompt_ids": prompt_ids, "chosen_ids": out.completion_ids[chosen],
                         "rejected_ids": out.completion_ids[rejected]})
            weights.append(0.0 if rewards[a] == rewards[b] else 1.0)
        return self.collator(rows) | {"example_weights": torch.tensor(weights)}

    @torch.no_grad()
    def evaluate(self, rows: Sequence[dict], model: nn.Module, window: MetricWindow, seed: int) -> None:
        """One sample of each held-out prompt, judged: its reward, length and ending go into ``window``."""
        log_samples(window, self.rollout(rows, model, self.sampling(seed, n=1)))


def log_samples(window: MetricWindow, out: Rollout) -> None:
    """Reward, length, ending and entropy of a judged rollout, per sample (per token for the entropy)."""
    window.add("reward", torch.tensor(out.scores, dtype=torch.float32))
    window.add("completions/mean_length", torch.tensor(out.lengths, dtype=torch.float32))
    window.add("completions/clipped_ratio", 1 - torch.tensor(out.ended_with_eos, dtype=torch.float32))
    logprobs = [lp for sample in out.logprobs for lp in sample]
    if logprobs:
        window.add("entropy", -torch.tensor(logprobs, dtype=torch.float32))


def summary(source: OnlineBatches | None) -> dict[str, float]:
    """Where an online run's time went, and how much it generated."""
    if source is None:
        return {}
    return {"generation_s": round(source.seconds["generation"], 3), "judging_s": round(source.seconds["judging"], 3),
            "generated_tokens": source.generated_tokens}

