"""The online algorithm of GRPO, GSPO, RLOO and Online DPO: rollout → judge → experience → ``num_iterations``
passes of minibatch updates, as the field runs it (TRL's ``num_iterations`` and ``steps_per_generation``,
OpenRLHF's rollout → experience → trainer).

The driver's prompt loader (sharded over processes by Accelerate, resumed by skipping batches like any other)
yields micro-batches of rows ``{prompt, prompt_ids, source_row}``. One *generation batch* is
``steps_per_generation`` of them on every process (default ``gradient_accumulation_steps``: one optimizer step's
worth; or ``generation_batch_size`` prompts over all processes):

1. **rollout** — ``num_generations`` completions of each prompt from the current policy, in one call
   (:func:`preftune.rollout.sampling.generate`, the prompt ids as the data layer encoded them), each prompt from a
   generator of its own seeded by (run seed, epoch, its source row) — never by the process or the step
   (:meth:`Sampler.prompt_seeds`): a resumed run samples what the uninterrupted one did, and P processes of batch
   B sample what one process of batch P·B does;
2. **judge** — the judge's scores; a completion that never ended loses ``missing_eos_penalty``. With
   ``dynamic_sampling`` (DAPO, Yu et al. 2025, arXiv 2503.14476, §3.2) groups whose completions all scored the
   same carry no signal: they are dropped and more prompts sampled until the batch is full (at most
   ``max_num_gen_batches`` generation batches; then it is filled with dropped groups), counted in the log;
3. **experience** — from the sampled ids themselves (never re-tokenised text), one micro-batch per prompt
   micro-batch: groups (GRPO, RLOO: all completions of a prompt together, the prompt encoded once with prefix
   sharing) with ``rewards [S]`` and ``group [S]``; or pairs (Online DPO, Guo et al. 2024, arXiv 2402.04792: of a
   prompt's two completions the higher-scored is chosen; a tie is kept with weight 0). The generation batch's
   statistics (the std of its rewards, its completion and token counts, the weight of its untied pairs) are taken
   over all its micro-batches and processes — never per micro-batch (DAPO's token mean is over the whole batch,
   Eq. 8) — and attached to each micro-batch, so its loss is its share of the generation batch's. Groups get their
   reference per-token log-probs once, and the old policy's (π_old, at sampling time) when the policy will have
   moved before they are trained on (``num_iterations`` > 1 or ``steps_per_generation`` >
   ``gradient_accumulation_steps``, as TRL does; otherwise π_old = π and the ratio is exactly 1);
4. **updates** — ``num_iterations`` passes over the generation batch in the same order, one driver update per
   optimizer step of ``gradient_accumulation_steps`` micro-batches.

Every online batch carries ``logit_scale`` = 1/``temperature``: the policy, the reference and the old policy
score the completions under softmax(z/T), the distribution they were drawn from (as TRL does), so the ratio and
the KL are on-policy at any temperature. ``top_p``/``top_k`` are not applied when scoring (nor by TRL).

A checkpoint taken inside a generation batch (μ > 1 or more than one step per generation) records how many of its
updates were done; a resumed run samples that generation batch again from the same prompts and seeds — with the
policy as it is then — and skips those updates: exact at generation boundaries, which every step is by default.

Logged under TRL's names: ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``completions/mean_length``,
``completions/clipped_ratio``, ``entropy`` (−mean log-prob of the sampled tokens, a Monte-Carlo estimate of the
per-token entropy); ``dynamic_sampling/dropped_groups``, ``dynamic_sampling/generation_batches`` and
``dynamic_sampling/filled_groups``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from preftune import metric_names as names
from preftune.config import Resolved, TrainConfig
from preftune.data.batching import SOURCE_ROW, PreferenceCollator
from preftune.errors import ConfigError
from preftune.methods import rl
from preftune.methods.registry import get_method
from preftune.modeling.logprobs import LogProbModel, model_inputs
from preftune.rollout.judges import Judge, PairPreferenceJudge, judge_scores, resolve_judge
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate, sampling_precision
from preftune.training import memory
from preftune.training.algorithm import OptimizerStep, Parts, Session, Update, Work, source_rows
from preftune.training.objective import LossSpec
from preftune.training.offline import loss_update
from preftune.training.setup import RunInputs, judge_role
from preftune.training.tracking import MetricWindow


def logit_scale(cfg: TrainConfig) -> Tensor:
    """The ``logit_scale`` an online batch carries: 1/T, so that every log-prob of its completions is scored at the
    sampling temperature T. A 0-dim host tensor: the LM head reads it as a number (no device sync)."""
    return torch.tensor(1.0 / cfg.temperature, dtype=torch.float64)


def num_generations(cfg: TrainConfig) -> int:
    """Completions per prompt: the config's, else the method's default (Online DPO: 2)."""
    return cfg.num_generations or get_method(cfg.methods[0]).num_generations or 2


class Sampler:
    """The rollout side of an online run: sampling parameters and seeds, sampling, judging, and the time they take."""

    def __init__(self, cfg: TrainConfig, tokenizer, judge: Judge, accelerator: Accelerator):
        self.cfg, self.tokenizer, self.judge, self.accelerator = cfg, tokenizer, judge, accelerator
        self.group_size = num_generations(cfg)
        self.seconds = {"generation": 0.0, "judging": 0.0}
        self.generated_tokens = 0

    def sampling(self, seed: int | None, n: int | None = None,
                 prompt_seeds: Sequence[int] | None = None) -> SamplingParams:
        return SamplingParams.from_config(self.cfg, n=self.group_size if n is None else n, seed=seed,
                                          prompt_seeds=prompt_seeds)

    def prompt_seeds(self, rows: Sequence[dict], *stage: int | str) -> tuple[int, ...]:
        """The sampling seed of each prompt row: a hash of (run seed, ``stage`` — the epoch, or ("eval", step) —,
        the row's ``source_row``), so a prompt's samples depend on neither the process that samples it nor the
        prompts beside it: the same global batch samples the same completions on any number of processes."""
        if any(SOURCE_ROW not in row for row in rows):
            raise ValueError(f"online prompt rows carry their {SOURCE_ROW!r} (it seeds their samples)")
        return tuple(_seed_of(self.cfg.seed, *stage, row[SOURCE_ROW]) for row in rows)

    def seed(self, epoch: int, batch_index: int) -> int:
        """A seed of its own for every rollout of every process, fixed by the run's seed (PPO's rollouts and
        minibatch order)."""
        acc = self.accelerator
        return (self.cfg.seed * 1_000_003 + epoch * 10_007 * acc.num_processes
                + batch_index * acc.num_processes + acc.process_index) % 2**31

    def rollout(self, rows: Sequence[dict], model: nn.Module, params: SamplingParams, training: bool = True,
                ) -> Rollout:
        """Sample and judge; the judged scores, minus the missing-EOS penalty, are the rollout's ``scores``."""
        return self.judge_rollout(self.sample(rows, model, params, training))

    def sample(self, rows: Sequence[dict], model: nn.Module, params: SamplingParams, training: bool = True,
               ) -> Rollout:
        """Completions of the rows' prompts (their ``prompt_ids`` as the data layer encoded them), not yet judged;
        samples to train on are drawn in ``generation_dtype``, held-out ones (``training=False``) in the run's
        precision, so evaluations compare across that choice."""
        started = time.perf_counter()
        dtype = self.cfg.generation_dtype if training else None
        with sampling_precision(dtype, self.accelerator.device, self.accelerator.autocast):
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

    def summary(self) -> dict[str, float]:
        """Where an online run's time went, and how much it generated."""
        return {"generation_s": round(self.seconds["generation"], 3), "judging_s": round(self.seconds["judging"], 3),
                "generated_tokens": self.generated_tokens}


class Online:
    """Rollout → judge → experience → ``num_iterations`` passes; see the module docstring."""

    def __init__(self, cfg: TrainConfig, judge=None, resolved: Resolved | None = None):
        # the trainer's judge=, else the run's judge spec (the config's, or the embedded world's gold); prepare loads it
        self.cfg, self.given_judge = cfg, judge
        self.judge_spec = cfg.judge if resolved is None else resolved.judge
        self.judge: Judge | None = None
        self.spec = LossSpec.from_config(cfg)
        self.unit = self.spec.unit
        self.session: Session | None = None
        self.sampler: Sampler | None = None
        self.steps_per_generation = cfg.steps_per_generation or cfg.gradient_accumulation_steps
        self.done_in_generation = 0  # updates of the current generation batch already taken (a checkpoint's)
        self.resume_offset = 0
        self.dynamic = {"dropped_groups": 0, "filled_groups": 0, "generation_batches": 0}

    # ---- the protocol ------------------------------------------------------------------------------------
    def load_judge(self, accelerator: Accelerator) -> Judge:
        """The run's judge, loaded once (:func:`preftune.rollout.judges.resolve_judge`)."""
        if self.judge is None:
            self.judge = resolve_judge(self.given_judge, self.judge_spec, **judge_role(self.cfg),
                                       device=accelerator.device)
        return self.judge

    def prepare(self, inputs: RunInputs, accelerator: Accelerator) -> Parts:
        cfg = self.cfg
        if isinstance(self.load_judge(accelerator), PairPreferenceJudge) and inputs.eval is not None:
            raise ConfigError(f"judge {self.judge.name!r} is pairwise, and held-out evaluation judges one sample of "
                              "each held-out prompt alone: set eval_split_size to 0 and leave out eval_dataset, or "
                              "give a scalar judge")
        if cfg.generation_batch_size is not None:
            self.steps_per_generation = _steps_per_generation(cfg, accelerator.num_processes)
        prompts = DataLoader(inputs.train, batch_size=cfg.per_device_train_batch_size, shuffle=True, collate_fn=list)
        return Parts(LogProbModel(inputs.model, cfg.logprob_chunk_size), prompts)

    def updates_per_epoch(self, batches: int) -> int:
        """μ passes of (steps_per_generation / gradient_accumulation_steps) optimizer steps per generation batch."""
        k, s = self.cfg.gradient_accumulation_steps, self.steps_per_generation
        full, rest = divmod(batches, s)
        return max(1, self.cfg.num_iterations * (full * (s // k) + math.ceil(rest / k)))

    def start(self, session: Session) -> None:
        self.session = session
        self.sampler = Sampler(self.cfg, session.inputs.tokenizer, self.judge, session.accelerator)

    def work(self, epoch: int, skip: int, window: MetricWindow) -> Iterator[Work]:
        """Generation batch after generation batch, lazily (each is sampled from the policy of its first update);
        ``num_iterations`` passes over each, one :class:`Work` per optimizer step."""
        session, k = self.session, self.cfg.gradient_accumulation_steps
        session.loader.set_epoch(epoch)
        prompts = iter(session.accelerator.skip_first_batches(session.loader, skip) if skip else session.loader)
        consumed = skip
        while True:
            micro_batches, pulled = self.generation_batch(prompts, epoch, window)
            if not micro_batches:
                return
            start, consumed = consumed, consumed + pulled
            steps = [micro_batches[i : i + k] for i in range(0, len(micro_batches), k)] * self.cfg.num_iterations
            offset, self.resume_offset = self.resume_offset, 0
            for index in range(offset, len(steps)):
                self.done_in_generation = (index + 1) % len(steps)
                # A checkpoint inside the generation batch resumes from its start (and skips the updates done).
                yield Work(steps[index], start if self.done_in_generation else consumed, source_rows(steps[index]),
                           read=consumed)

    def update(self, work: Work, step: OptimizerStep, window: MetricWindow) -> Update:
        return loss_update(self.session, self.spec, work, step, window)

    @torch.no_grad()
    def evaluate(self, rows: list[dict], window: MetricWindow, step: int) -> None:
        """One sample of each held-out prompt (seeded by the step and its row), judged: its reward, length and
        ending."""
        params = self.sampler.sampling(None, n=1, prompt_seeds=self.sampler.prompt_seeds(rows, "eval", step))
        log_samples(window, self.sampler.rollout(rows, self.session.model, params, training=False))

    def state(self) -> dict[str, Any]:
        return {"generation_offset": self.done_in_generation}

    def load_state(self, state: dict[str, Any]) -> None:
        self.resume_offset = state.get("generation_offset", 0)

    def summary(self) -> dict[str, Any]:
        extra = {"dynamic_sampling": dict(self.dynamic)} if self.cfg.dynamic_sampling else {}
        return {"online": self.sampler.summary() | extra}

    def memory(self) -> dict:
        s = self.session
        return memory.one_loop(s.model, s.optimizer, s.reference, (s.inputs.train, s.inputs.eval))

    def describe(self) -> list[str]:
        cfg = self.cfg
        return [f"online: {self.sampler.group_size} completion(s) of each of {cfg.per_device_train_batch_size} "
                f"prompts per micro-batch | generation batch: {self.steps_per_generation} micro-batch(es) per "
                f"process, {cfg.num_iterations} pass(es) | judge: {self.judge.name}"
                + (f" | dynamic sampling (at most {cfg.max_num_gen_batches or 'any'} generation batches; the "
                   "schedule counts none of the top-ups, so an epoch may give fewer updates)"
                   if cfg.dynamic_sampling else "")]

    # ---- rollout → judge → experience --------------------------------------------------------------------
    def generation_batch(self, prompts: Iterator[list[dict]], epoch: int, window: MetricWindow,
                         ) -> tuple[list[dict[str, Tensor]], int]:
        """The training micro-batches of the next generation batch of ``epoch`` on the accelerator's device, and how
        many prompt micro-batches it took from the loader; sampled and judged once, its statistics over all its
        micro-batches and processes."""
        parts = _take(prompts, self.steps_per_generation)
        if not parts:
            return [], 0
        rows = [r for part in parts for r in part]
        out = self._rollout(rows, epoch, window)
        pulled = len(parts)
        if self.cfg.dynamic_sampling:
            out, rows, more = self._dynamic_sampling(out, rows, prompts, epoch, window)
            pulled += more
        micro_batches, start = [], 0
        for part in parts:
            end = start + len(part)
            micro_batches.append(self._micro_batch(out.select(range(start, end)), rows[start:end], window))
            start = end
        return self._with_experience(micro_batches), pulled

    def _rollout(self, rows: list[dict], epoch: int, window: MetricWindow) -> Rollout:
        params = self.sampler.sampling(None, prompt_seeds=self.sampler.prompt_seeds(rows, epoch))
        out = self.sampler.rollout(rows, self.session.model, params)
        log_samples(window, out)
        return out

    def _dynamic_sampling(self, out: Rollout, rows: list[dict], prompts: Iterator[list[dict]], epoch: int,
                          window: MetricWindow) -> tuple[Rollout, list[dict], int]:
        """DAPO's dynamic sampling: the batch's groups with reward spread, topped up from more generation batches
        while any process is short (every process pulls the same number, so they stay in step), at most
        ``max_num_gen_batches`` in all; a batch still short is filled with dropped groups. Returns the rollout of
        ``out.num_prompts`` prompts, their rows, and the prompt micro-batches pulled beyond the first generation
        batch."""
        acc, cap, need = self.session.accelerator, self.cfg.max_num_gen_batches, out.num_prompts
        sampled, spread, pulled = [out], _spread(out).tolist(), 0
        while cap == 0 or len(sampled) < cap:
            short = torch.tensor(float(sum(spread) < need), device=acc.device)
            if not (acc.reduce(short, "max") if acc.num_processes > 1 else short):
                break
            parts = _take(prompts, self.steps_per_generation)
            if not parts:  # the epoch's prompts are used up (on every process at once: the shards are equal)
                break
            more = [r for part in parts for r in part]
            sampled.append(self._rollout(more, epoch, window))
            spread += _spread(sampled[-1]).tolist()
            rows, pulled = rows + more, pulled + len(parts)
        everything, batches = Rollout.concat(sampled), len(sampled)
        kept = [i for i, signal in enumerate(spread) if signal][:need]
        filled = [i for i, signal in enumerate(spread) if not signal][: need - len(kept)]
        counts = torch.tensor([everything.num_prompts - len(kept), len(filled), batches], dtype=torch.float64,
                              device=acc.device)
        counts = acc.reduce(counts, "sum") if acc.num_processes > 1 else counts
        dropped, filled_n, generated = counts.tolist()
        generated /= acc.num_processes
        for name, value in (("dropped_groups", dropped), ("filled_groups", filled_n),
                            ("generation_batches", generated)):
            self.dynamic[name] += int(value)
            window.add(f"dynamic_sampling/{name}", torch.tensor([value]))
        chosen = sorted(kept + filled)
        return everything.select(chosen), [rows[i] for i in chosen], pulled

    def _micro_batch(self, out: Rollout, rows: list[dict], window: MetricWindow) -> dict[str, Tensor]:
        """One micro-batch of prompts with their samples, collated from the sampled ids (on the host)."""
        g, collator = out.group_size, self.session.inputs.collator
        rewards = torch.tensor(out.scores, dtype=torch.float32)
        group = torch.arange(len(out)) // g
        window.add(names.REWARD_STD, rewards.std(unbiased=False).reshape(1))
        window.add("frac_reward_zero_std", (~_spread(out)).float())
        if self.spec.kind == "groups":
            batch = collator.groups(out.prompt_ids, out.completion_ids, g) | {"rewards": rewards, "group": group}
        else:
            batch = online_pairs(collator, out, rewards)
        if rows and SOURCE_ROW in rows[0]:  # the prompts' rows, for reports that name them
            batch["source_rows"] = torch.tensor([r[SOURCE_ROW] for r in rows], dtype=torch.long)
        return batch

    @torch.no_grad()
    def _with_experience(self, micro_batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """The micro-batches on the device with the generation batch's statistics, the sampling temperature, and
        for groups the reference's and (when the policy moves before they are trained on) the old policy's per-token
        log-probs.

        Each optimizer step weighs the same: a micro-batch of a step of n of the generation batch's m micro-batches
        normalises by n/(m·k·P) of the generation batch's counts (Accelerate divides each micro-batch's loss by k,
        ``gradient_accumulation_steps``, and DDP averages over the P processes), so a step's loss is the mean over
        the generation batch's tokens scaled to its share n/m of them — TRL's normaliser (``num_items_in_batch``
        × k / ``steps_per_generation``) for full steps, and the whole batch's mean for a short last one."""
        session, cfg = self.session, self.cfg
        acc, device, k = session.accelerator, session.accelerator.device, cfg.gradient_accumulation_steps
        m = len(micro_batches)
        shares = [m * k * acc.num_processes / min(k, m - i // k * k) for i in range(m)]  # n = the step's micro-batches
        batches = [{key: v.to(device) for key, v in b.items()} for b in micro_batches]
        if self.spec.kind == "groups":
            counts = torch.stack([sum(b["seq_tokens"].sum() for b in batches).double(),
                                  torch.tensor(float(sum(len(b["rewards"]) for b in batches)), dtype=torch.float64,
                                               device=device)])
            rewards = torch.cat([b["rewards"] for b in batches])
            counts = acc.reduce(counts, "sum") if acc.num_processes > 1 else counts
            all_rewards = acc.gather(rewards) if acc.num_processes > 1 else rewards
            stats = [{"batch_reward_std": all_rewards.std(), "loss_num_tokens": (counts[0] / share).float(),
                      "loss_num_sequences": (counts[1] / share).float()} for share in shares]
        else:  # pairs: the weighted mean over all the generation batch's pairs (a tie weighs 0), wherever they are
            weight = sum(b["example_weights"].sum() for b in batches).double()
            weight = acc.reduce(weight, "sum") if acc.num_processes > 1 else weight
            stats = [{"loss_weight_sum": (weight.clamp(min=1) / share).float()} for share in shares]
        batches = [b | stat | {"logit_scale": logit_scale(cfg)} for b, stat in zip(batches, stats)]
        if self.spec.kind == "groups":
            stale = cfg.num_iterations > 1 or self.steps_per_generation > k
            for batch in batches:
                # Once per generation batch; TR-DPO's reference moves between its steps, so it is scored in the loss.
                reference = None if cfg.sync_ref_model else session.reference.outputs(batch)
                if reference is not None:
                    batch["ref_token_logps"] = reference["token_logps"]
                if stale:  # π_old: the policy that sampled them, before the first update on them
                    batch["old_token_logps"] = session.policy(**model_inputs(batch))["token_logps"].detach()
        return batches


def _steps_per_generation(cfg: TrainConfig, processes: int) -> int:
    """``generation_batch_size`` prompts over all processes, in micro-batches of ``per_device_train_batch_size``."""
    per_step = cfg.per_device_train_batch_size * processes
    steps, rest = divmod(cfg.generation_batch_size, per_step)
    if rest or steps % cfg.gradient_accumulation_steps:
        raise ConfigError(f"generation_batch_size ({cfg.generation_batch_size} prompts) must be a multiple of "
                          f"per_device_train_batch_size × processes × gradient_accumulation_steps ({per_step} × "
                          f"{cfg.gradient_accumulation_steps})")
    return steps


def _take(prompts: Iterator[list[dict]], n: int) -> list[list[dict]]:
    """Up to ``n`` more prompt micro-batches."""
    parts = []
    for part in prompts:
        parts.append(part)
        if len(parts) == n:
            break
    return parts


def _spread(out: Rollout) -> Tensor:
    """Per prompt ``[P]``: whether its completions' scores differ (a group with signal)."""
    rewards = torch.tensor(out.scores, dtype=torch.float32)
    group = torch.arange(len(out)) // out.group_size
    return ~rl.zero_spread(rewards, group)[:: out.group_size]


def online_pairs(collator: PreferenceCollator, out: Rollout, rewards: Tensor) -> dict[str, Tensor]:
    """Online DPO's pairs: of each prompt's two samples the higher-scored is chosen; a tie weighs 0."""
    rows, weights, order = [], [], []
    for i, prompt_ids in enumerate(out.prompt_ids):
        a, b = 2 * i, 2 * i + 1
        chosen, rejected = (a, b) if rewards[a] >= rewards[b] else (b, a)
        rows.append({"prompt_ids": prompt_ids, "chosen_ids": out.completion_ids[chosen],
                     "rejected_ids": out.completion_ids[rejected]})
        weights.append(0.0 if rewards[a] == rewards[b] else 1.0)
        order.append((chosen, rejected))
    scores = rewards[[c for c, _ in order] + [r for _, r in order]]  # [chosen; rejected], for the KL metrics
    return collator(rows) | {"example_weights": torch.tensor(weights), "scores": scores}


def _seed_of(*parts: int | str) -> int:
    """A 63-bit seed from the parts (a hash: nearby parts give unrelated seeds, and no two tuples share one in
    practice, where a linear mix like ``seed·a + epoch·b + row`` collides)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def log_samples(window: MetricWindow, out: Rollout) -> None:
    """Reward, length, ending and entropy of a judged rollout, per sample (per token for the entropy)."""
    window.add(names.REWARD, torch.tensor(out.scores, dtype=torch.float32))
    window.add(names.COMPLETIONS_MEAN_LENGTH, torch.tensor(out.lengths, dtype=torch.float32))
    window.add(names.COMPLETIONS_CLIPPED_RATIO, 1 - torch.tensor(out.ended_with_eos, dtype=torch.float32))
    logprobs = [lp for sample in out.logprobs for lp in sample]
    if logprobs:
        window.add("entropy", -torch.tensor(logprobs, dtype=torch.float32))
