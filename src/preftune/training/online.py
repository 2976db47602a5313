"""Batches sampled from the current policy: the data source of Online DPO, RLOO and GRPO.

The loop's prompt loader (sharded over processes by Accelerate, resumed by skipping batches like any other)
yields micro-batches of rows ``{prompt, prompt_ids, source_row}``; :meth:`OnlineBatches.batches` turns them into
training micro-batches, one *generation batch* at a time: the ``gradient_accumulation_steps`` micro-batches of
prompts of one optimizer step (TRL's ``steps_per_generation``), on every process:

1. sample ``num_generations`` completions of each of its prompts from the current policy, in one call
   (:func:`preftune.rollout.sampling.generate`, the prompt ids as the data layer encoded and truncated them),
   each prompt from a generator of its own seeded by (run seed, epoch, its source row) — never by the process or
   the step (:meth:`OnlineBatches.prompt_seeds`): a resumed run samples exactly what the uninterrupted one did,
   accumulation k × batch B samples what accumulation 1 × batch k·B does, and P processes of batch B sample what
   one process of batch P·B does;
2. score them with the judge; a completion that never ended loses ``missing_eos_penalty``;
3. take the generation batch's statistics over all its micro-batches and processes (the std of its rewards, its
   completion and token counts; for Online DPO the weight of its untied pairs) — group statistics are never per
   micro-batch (DAPO's token mean is over the whole batch, Yu et al. 2025, arXiv 2503.14476, Eq. 8) — and attach
   them to each micro-batch so that its loss is its share of the generation batch's loss
   (:class:`preftune.methods.losses.GroupLogps`; ``loss_weight_sum`` for pairs);
4. build the experience, from the sampled ids themselves (never re-tokenised text):
   * groups (RLOO, GRPO): all completions of a prompt form one unit — with prefix sharing the prompt is encoded
     once for its group — with ``rewards [S]`` and ``group [S]`` for the loss;
   * pairs (Online DPO, Guo et al. 2024, arXiv 2402.04792): of each prompt's two completions the higher-scored is
     chosen; a tie carries no preference, so its pair is kept with weight 0 (``example_weights``) and counted.

Every online batch carries ``logit_scale`` = 1/``temperature``: the policy, the reference and the old policy
score the completions under softmax(z/T), the distribution they were drawn from (as TRL does), so the ratio and
the KL are on-policy at any temperature. ``top_p``/``top_k`` are not applied when scoring (nor by TRL): with them
the ratio and the KL refer to the tempered, untruncated policy, not to the truncated sampler.

What a user needs to trust an online run goes into the metric window under TRL's names: ``reward``,
``reward_std``, ``frac_reward_zero_std`` (groups whose completions all scored the same: no signal),
``completions/mean_length``, ``completions/clipped_ratio`` (completions that hit the length budget without
ending), ``entropy`` (−mean log-prob of the sampled tokens under the sampling distribution, a Monte-Carlo
estimate of the per-token entropy; for Online DPO ``frac_reward_zero_std`` is the fraction of tied pairs).
Time spent sampling and judging is kept apart from the rest, for the summary.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Sequence

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


def logit_scale(cfg: TrainConfig) -> Tensor:
    """The ``logit_scale`` an online batch carries: 1/T, so that every log-prob of its completions is scored at the
    sampling temperature T. A 0-dim host tensor: the LM head reads it as a number (no device sync)."""
    return torch.tensor(1.0 / cfg.temperature, dtype=torch.float64)


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

    def sampling(self, seed: int | None, n: int | None = None,
                 prompt_seeds: Sequence[int] | None = None) -> SamplingParams:
        cfg = self.cfg
        n = self.group_size if n is None else n
        return SamplingParams(max_new_tokens=cfg.generation_budget, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, n=n, seed=seed, batch_size=max(64, n),
                              prompt_seeds=None if prompt_seeds is None else tuple(prompt_seeds))

    def prompt_seeds(self, rows: Sequence[dict], *stage: int | str) -> tuple[int, ...]:
        """The sampling seed of each prompt row: a hash of (run seed, ``stage`` — the epoch, or ("eval", step) —,
        the row's ``source_row``), so a prompt's samples depend on neither the process that samples it nor the
        prompts beside it: the same global batch samples the same completions on any number of processes."""
        if any(SOURCE_ROW not in row for row in rows):
            raise ValueError(f"online prompt rows carry their {SOURCE_ROW!r} (it seeds their samples)")
        return tuple(_seed_of(self.cfg.seed, *stage, row[SOURCE_ROW]) for row in rows)

    def seed(self, epoch: int, batch_index: int) -> int:
        """A seed of its own for every micro-batch of every process, fixed by the run's seed (PPO's rollouts and
        minibatch order)."""
        acc = self.accelerator
        return (self.cfg.seed * 1_000_003 + epoch * 10_007 * acc.num_processes
                + batch_index * acc.num_processes + acc.process_index) % 2**31

    def rollout(self, rows: Sequence[dict], model: nn.Module, params: SamplingParams) -> Rollout:
        """Sample and judge; the judged scores, minus the missing-EOS penalty, are the rollout's ``scores``."""
        return self.judge_rollout(self.sample(rows, model, params))

    def sample(self, rows: Sequence[dict], model: nn.Module, params: SamplingParams) -> Rollout:
        """Completions of the rows' prompts (their ``prompt_ids`` as the data layer encoded them), not yet judged."""
        started = time.perf_counter()
        with self.accelerator.autocast():
            out = generate(model, self.tokenizer, [r["prompt"] for r in rows], params,
                           prompt_ids=[r["prompt_ids"] for r in rows], source="the training prompts")
        self.seconds["generation"] += time.perf_counter() - started
        self.generated_tokens += sum(out.lengths)
        return out

    def judge_rollout(self, out: Rollout, scores: Tensor | None = None) -> Rollout:
        """The judge's scores of ``out`` — or ``scores [N]`` computed otherwise (a reward model on the sampled ids) —
        minus the missing-EOS penalty, into ``out.scores``."""
        started = time.perf_counter()
        if scores is None:
            scores = torch.tensor(judge_scores(self.judge, out.sample_prompts, out.completions), dtype=torch.float32)
        if self.cfg.missing_eos_penalty:
            scores = rl.missing_eos_penalty(scores, torch.tensor(out.ended_with_eos), self.cfg.missing_eos_penalty)
        out.scores, out.judge = scores.float().cpu().tolist(), self.judge.name
        self.seconds["judging"] += time.perf_counter() - started
        return out

    def batches(self, prompt_batches: Iterable[Sequence[dict]], model: nn.Module, window: MetricWindow,
                epoch: int) -> Iterator[dict[str, Tensor]]:
        """The training micro-batches of an epoch's prompt micro-batches, sampled one generation batch of
        ``gradient_accumulation_steps`` micro-batches at a time: lazily, so each generation batch is sampled from
        the policy of its step."""
        k, state = self.cfg.gradient_accumulation_steps, self.accelerator.gradient_state
        prompts = iter(prompt_batches)
        while True:
            parts: list[Sequence[dict]] = []
            # Stop pulling at the loader's last batch: pulling past it would close the loader, and Accelerate would
            # no longer see the end of the epoch (where it takes the optimizer step of a short last step).
            while len(parts) < k and not (parts and state.end_of_dataloader):
                try:
                    parts.append(next(prompts))
                except StopIteration:
                    break
            if not parts:
                return
            at_end = state.end_of_dataloader
            micro_batches = self.generation_batch(parts, model, window, epoch)
            for i, batch in enumerate(micro_batches):
                if at_end:  # the loader already says "end" while the step's earlier micro-batches are trained: only
                    # the last one may end it (Accelerate steps the optimizer at the end of the loader)
                    state.active_dataloader.end_of_dataloader = i == len(micro_batches) - 1
                yield batch

    def generation_batch(self, parts: Sequence[Sequence[dict]], model: nn.Module, window: MetricWindow,
                         epoch: int) -> list[dict[str, Tensor]]:
        """The training micro-batches of one generation batch of ``epoch`` (``parts``: its micro-batches of prompt
        rows), on the accelerator's device; sampled and judged once, its statistics over all micro-batches and
        processes."""
        acc, g = self.accelerator, self.group_size
        rows = [r for part in parts for r in part]
        out = self.rollout(rows, model, self.sampling(None, prompt_seeds=self.prompt_seeds(rows, epoch)))
        rewards = torch.tensor(out.scores, dtype=torch.float32)
        log_samples(window, out)
        micro_batches, start = [], 0
        for part in parts:
            end = start + len(part)
            sub = _prompts(out, start, end)
            sub_rewards = rewards[start * g : end * g]
            window.add("reward_std", sub_rewards.std(unbiased=False).reshape(1))
            group = torch.arange(len(sub)) // g
            window.add("frac_reward_zero_std", rl.zero_spread(sub_rewards, group)[::g].float())
            if self.kind == "groups":
                batch = self.collator.groups(sub.prompt_ids, sub.completion_ids, g)
                batch |= {"rewards": sub_rewards, "group": group}
            else:
                batch = self._pairs(sub, sub_rewards)
            if SOURCE_ROW in part[0]:  # the prompts' rows, for reports that name them
                batch["source_rows"] = torch.tensor([r[SOURCE_ROW] for r in part], dtype=torch.long)
            micro_batches.append({k: v.to(acc.device) for k, v in batch.items()})
            start = end
        # Accelerate divides each micro-batch's loss by gradient_accumulation_steps and DDP averages over the
        # processes, so a micro-batch normalises by 1/(k·P) of the generation batch's counts.
        shares = self.cfg.gradient_accumulation_steps * acc.num_processes
        if self.kind == "groups":
            counts = torch.stack([sum(b["seq_tokens"].sum() for b in micro_batches).double(),
                                  torch.tensor(float(len(out)), dtype=torch.float64, device=acc.device)])
            counts = acc.reduce(counts, "sum") if acc.num_processes > 1 else counts
            all_rewards = acc.gather(rewards.to(acc.device)) if acc.num_processes > 1 else rewards.to(acc.device)
            stats = {"batch_reward_std": all_rewards.std(), "loss_num_tokens": (counts[0] / shares).float(),
                     "loss_num_sequences": (counts[1] / shares).float()}
        else:  # pairs: the weighted mean over all the generation batch's pairs (a tie weighs 0), wherever they are
            weight = sum(b["example_weights"].sum() for b in micro_batches).double()
            weight = acc.reduce(weight, "sum") if acc.num_processes > 1 else weight
            stats = {"loss_weight_sum": (weight.clamp(min=1) / shares).float()}
        return [b | stats | {"logit_scale": logit_scale(self.cfg)} for b in micro_batches]

    def _pairs(self, out: Rollout, rewards: Tensor) -> dict[str, Tensor]:
        rows, weights, order = [], [], []
        for i, prompt_ids in enumerate(out.prompt_ids):
            a, b = 2 * i, 2 * i + 1
            first_wins = rewards[a] >= rewards[b]
            chosen, rejected = (a, b) if first_wins else (b, a)
            rows.append({"prompt_ids": prompt_ids, "chosen_ids": out.completion_ids[chosen],
                         "rejected_ids": out.completion_ids[rejected]})
            weights.append(0.0 if rewards[a] == rewards[b] else 1.0)
            order.append((chosen, rejected))
        scores = rewards[[c for c, _ in order] + [r for _, r in order]]  # [chosen; rejected], for the KL metrics
        return self.collator(rows) | {"example_weights": torch.tensor(weights), "scores": scores}

    @torch.no_grad()
    def evaluate(self, rows: Sequence[dict], model: nn.Module, window: MetricWindow, step: int) -> None:
        """One sample of each held-out prompt (seeded by the step and its row), judged: its reward, length and
        ending go into ``window``."""
        params = self.sampling(None, n=1, prompt_seeds=self.prompt_seeds(rows, "eval", step))
        log_samples(window, self.rollout(rows, model, params))


def _seed_of(*parts: int | str) -> int:
    """A 63-bit seed from the parts (a hash: nearby parts give unrelated seeds, and no two tuples share one in
    practice, where a linear mix like ``seed·a + epoch·b + row`` collides)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _prompts(out: Rollout, start: int, end: int) -> Rollout:
    """Prompts ``start:end`` of a rollout with their samples (sample k of prompt i sits at i·n + k)."""
    a, b = start * out.group_size, end * out.group_size
    return Rollout(out.prompts[start:end], out.prompt_ids[start:end], out.group_size, out.completion_ids[a:b],
                   out.logprobs[a:b], out.ended_with_eos[a:b], out.completions[a:b],
                   None if out.scores is None else out.scores[a:b], out.judge)


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

