"""PPO for RLHF, the baseline DPO replaces, in a loop of its own made of the one loop's pieces.

Ziegler et al. 2019 (arXiv 1909.08593, §2.2) and Ouyang et al. 2022 (arXiv 2203.02155, §3.5): sample from the
policy, score with a reward, put the per-token KL to the reference inside the reward, and optimise it with PPO
(Schulman et al. 2017, arXiv 1707.06347) against a learned value (GAE, Schulman et al. 2015, arXiv 1506.02438),
with the implementation details of Huang et al. 2024 (arXiv 2403.17031). One *update* — ``global_step`` counts
updates, as TRL's PPO does; ``max_steps``, ``logging_steps``, ``save_steps`` and ``eval_steps`` are in updates:

1. rollout — B = per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches prompts per process,
   one completion each, sampled from the current policy (seeded per update; stops at every EOS id);
2. score — the judge: a reward model reads the sampled ids themselves when it shares the policy's tokenizer (else
   the decoded text, re-encoded with its own), a user's function, or the gold judge; minus ``missing_eos_penalty``
   for completions that never ended; then optional running scaling / normalisation and clipping;
3. experience — with no gradient, in micro-batches of the rollout: log π_old, log π_ref and V_old of every
   completion token (log-probs at the sampling temperature, as every later log π: the logits divided by T);
   KL_t by ``kl_estimator``, r_t = −c·KL_t with the score added at the last token, GAE advantages (whitened over
   the rollout) and returns — one :class:`Experience`;
4. optimise — ``num_ppo_epochs`` passes over the experience in a new random order, ``num_mini_batches`` optimizer
   steps each, a step being ``gradient_accumulation_steps`` micro-batches: clipped policy loss + ``vf_coef`` ×
   clipped value loss (− ``entropy_coef`` × entropy), a mean over the step's completion tokens;
5. control and record — the KL controller reads the update's mean sequence KL (the KL of the reward); the learning
   rate schedule steps; metrics, callbacks, evaluation and checkpoints (policy and critic, optimizer, scheduler,
   RNG, the KL coefficient and the running score moments) as in the one loop.

The mathematics are the pure functions of :mod:`preftune.methods.rl`; sampling and judging the rollout layer's (through
:class:`~preftune.training.online.OnlineBatches`); the run folder, accelerator, optimizer, reference, checkpoints,
metrics, evaluation and callbacks the one loop's (:class:`~preftune.training.loop.PreferenceTrainer`, which this
trainer extends). Both the policy's forward and the critic's read the completion positions of one collated batch
(prefix sharing and packing included), so a value is aligned with the token whose log-prob it accompanies.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from preftune.config import TrainConfig
from preftune.data.batching import SOURCE_ROW, PreferenceCollator
from preftune.errors import ConfigError, DataError, TrainingError
from preftune.methods import rl
from preftune.methods.registry import get_method
from preftune.modeling import loading
from preftune.modeling.logprobs import max_positions, model_inputs
from preftune.modeling.value import PolicyAndValue, critic_from_policy, value_head
from preftune.rollout.judges import Judge, RewardModelJudge
from preftune.rollout.record import Rollout
from preftune.training import checkpoint, memory
from preftune.training.health import HealthCallback
from preftune.training.loop import (
    PreferenceTrainer,
    RunResult,
    Session,
    build_optimizer,
    default_judge,
    effective_config,
    make_scheduler,
    open_metrics,
)
from preftune.training.objective import LossSpec
from preftune.training.online import OnlineBatches, log_samples, logit_scale
from preftune.training.online import summary as online_summary
from preftune.training.setup import RunInputs, check_same_vocabulary, prepare_inputs, uses_embedded_model
from preftune.training.tracking import MetricWindow

log = logging.getLogger("preftune")


@dataclass
class PPOSettings:
    """The PPO hyper-parameters of a run: the config's values, the registry's defaults where it leaves them unset."""

    num_ppo_epochs: int
    num_mini_batches: int
    cliprange: float
    cliprange_value: float
    vf_coef: float
    gamma: float
    lam: float
    kl_coef: float
    target_kl: float | None
    kl_horizon: int
    kl_estimator: str
    whiten_rewards: bool
    entropy_coef: float
    use_score_scaling: bool
    use_score_norm: bool
    score_clip: float | None
    value_model: str | None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PPOSettings:
        defaults = get_method(cfg.methods[0]).defaults
        return cls(**{name: defaults[name] if getattr(cfg, name) is None else getattr(cfg, name) for name in defaults})


# --------------------------------------------------------------------------------------------------
# The experience record
# --------------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One rollout made ready for PPO: S sequences (a completion of each prompt), M completion tokens, laid out flat
    as :mod:`preftune.methods.rl` reads them (tokens grouped by sequence, in order).

    Per sequence: ``prompt_ids``, ``completion_ids`` — the sampled ids, never re-tokenised (lists of S);
    ``scores [S]`` — the score the reward adds (judged, penalised, scaled); ``ended [S]`` — ended with a stop id;
    ``seq_tokens [S]`` — completion tokens of each sequence.

    Per token ``[M]``: ``old_logps`` — log π_old(y_t | x, y_<t) at rollout time; ``ref_logps`` — log π_ref;
    ``values`` — V_old(x, y_<t), the critic before this update; ``kl`` — the per-token KL estimate of the reward;
    ``rewards`` — −c·kl_t, plus the score at the sequence's last token (its EOS when it ended);
    ``advantages`` — GAE, whitened over the rollout; ``returns`` — GAE + V_old, the value target.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    scores: Tensor
    ended: Tensor
    seq_tokens: Tensor
    old_logps: Tensor
    ref_logps: Tensor
    values: Tensor
    kl: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def token_seq(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(len(self)), self.seq_tokens)

    def token_index(self, seqs: Tensor) -> Tensor:
        """Flat indices ``[m]`` of the tokens of sequences ``seqs`` (in that order, each in token order)."""
        starts = torch.cumsum(self.seq_tokens, 0) - self.seq_tokens
        counts = self.seq_tokens[seqs]
        local_seq = torch.repeat_interleave(torch.arange(len(seqs)), counts)
        return torch.repeat_interleave(starts[seqs], counts) + rl.token_positions(local_seq, counts)

    def sequence_kl(self) -> Tensor:
        """Σ_t KL_t of each sequence ``[S]``: the KL the reward penalised (TRL's ``objective/kl`` averages it)."""
        return rl.seq_sum(self.kl, self.token_seq, self.seq_tokens)


def make_experience(prompt_ids: list[list[int]], completion_ids: list[list[int]], scores: Tensor, ended: Tensor,
                    seq_tokens: Tensor, old_logps: Tensor, ref_logps: Tensor, values: Tensor, *, kl_coef: float,
                    kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                    whiten_rewards: bool = False) -> Experience:
    """Per-token KL (:func:`~preftune.methods.rl.token_kl`) → shaped rewards
    (:func:`~preftune.methods.rl.shaped_rewards`: −c·KL_t, the score at the last token) → optionally whitened
    rewards, mean kept → GAE (γ, λ) → whitened advantages (always, as TRL and OpenRLHF do).
    Shapes: ``scores``, ``ended``, ``seq_tokens`` ``[S]``; ``old_logps``, ``ref_logps``, ``values`` ``[M]``."""
    token_seq = torch.repeat_interleave(torch.arange(seq_tokens.shape[0]), seq_tokens)
    kl = rl.token_kl(old_logps, ref_logps, kl_estimator)
    rewards = rl.shaped_rewards(scores, kl, seq_tokens, kl_coef)
    if whiten_rewards:
        rewards = rl.whiten(rewards, shift_mean=False)
    advantages, returns = rl.gae(rewards, values, token_seq, seq_tokens, gamma, lam)
    return Experience(prompt_ids, completion_ids, scores.float(), ended.bool(), seq_tokens, old_logps.detach(),
                      ref_logps.detach(), values.detach(), kl.detach(), rewards, rl.whiten(advantages), returns)


# --------------------------------------------------------------------------------------------------
# Reward and critic
# --------------------------------------------------------------------------------------------------


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn text into the same ids: same vocabulary, BOS, EOS, chat template, and the same
    ids for a probe text (the special tokens a post-processor adds included)."""
    if a is b:
        return True
    probe = "The plot was good, 42 times!"
    return (a.get_vocab() == b.get_vocab() and a.bos_token_id == b.bos_token_id and a.eos_token_id == b.eos_token_id
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
            and a(probe)["input_ids"] == b(probe)["input_ids"])


def reward_on_ids(judge: Judge, tokenizer) -> bool:
    """A reward model with a last-token head and the policy's tokenizer scores the sampled ids themselves (no
    decoding and re-encoding); any other judge reads text."""
    return (isinstance(judge, RewardModelJudge) and judge.last_token_head
            and same_tokenizer(judge.tokenizer, tokenizer))


def make_critic(settings: PPOSettings, cfg: TrainConfig, policy: nn.Module, judge: Judge, tokenizer,
                ) -> tuple[nn.Module | None, nn.Linear | None, str]:
    """The critic ``(model or None, value head or None, what it is)``; see ``value_model`` in the config."""
    choice = settings.value_model
    if choice == "shared":
        return None, value_head(policy), "a value head on the policy's trunk"
    if choice is None and isinstance(judge, RewardModelJudge):
        if judge.last_token_head and same_tokenizer(judge.tokenizer, tokenizer):
            critic = copy.deepcopy(judge.model).train().requires_grad_(True)
            return critic, None, f"a copy of the reward model ({judge.name})"
        log.warning("value_model: the reward model %s reads another tokenizer than the policy's, so the critic "
                    "starts from the policy's body instead (set value_model to silence this)", judge.name)
    if choice in (None, "policy"):
        return critic_from_policy(policy), None, "a copy of the policy's body with a new score head"
    critic = loading.load_reward_model(choice, cfg)
    check_same_vocabulary(policy, critic)
    return critic, None, f"the checkpoint {choice}"


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class PPOSession(Session):
    """The one loop's :class:`~preftune.training.loop.Session` for PPO: ``policy`` is the prepared
    :class:`~preftune.modeling.value.PolicyAndValue`, ``train_dl`` the loader of whole rollouts of prompts,
    ``total_steps`` counts updates; and what the critic is, whether the reward reads the sampled ids, and the
    prompts per rollout and process."""

    critic_label: str = ""
    on_ids: bool = False
    rollout_size: int = 0


class Trainer(PreferenceTrainer):
    """PPO; see the module docstring. Made by ``PreferenceTrainer(config, ...)`` for ``method: ppo``, with the same
    arguments; ``judge`` is the reward: a :class:`~preftune.rollout.judges.Judge` (e.g. a ``RewardModelJudge``), a
    function ``(prompts, completions) -> scores``, or unset for the config's ``judge`` / ``reward_model_path``."""

    def __init__(self, config: TrainConfig, model=None, ref_model=None, tokenizer=None, train_dataset=None,
                 eval_dataset=None, callbacks=(), judge=None):
        embedded_world = uses_embedded_model(config, model) and train_dataset is None and config.dataset is None
        if default_judge(config, judge, embedded_world, needs_judge=True):
            config = copy.deepcopy(config)
            config.judge = "gold"  # written into config.yaml, so the run records what judged it
        if judge is None and not config.judge:
            raise ConfigError("PPO optimises a reward: set reward_model_path (or judge) to a reward-model folder, "
                              "judge to 'module:function' or 'gold' (the demo world), or pass judge= to the trainer")
        super().__init__(config, model=model, ref_model=ref_model, tokenizer=tokenizer, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, judge=judge)
        self.settings = PPOSettings.from_config(self.cfg)
        self.seconds = {"generation": 0.0, "scoring": 0.0, "experience": 0.0, "optimisation": 0.0}

    # ------------------------------------------------------------------------------------------------
    def _prepare(self) -> PPOSession:
        """Data, policy and critic (one module, one optimizer), reference, reward, prompt loader, schedule: once,
        on first use (``train``, ``evaluate``, ``save_model`` and ``model`` share it, as in the one loop)."""
        if self.session is not None:
            return self.session
        cfg, acc, ppo = self.cfg, self.accelerator, self.settings
        set_seed(cfg.seed)
        inputs: RunInputs = prepare_inputs(cfg, acc, **self.given)
        spec = LossSpec.from_config(cfg)
        # The four roles: policy and critic (trained, one module, one optimizer), reference, reward (the judge).
        online = self._online_source(inputs, spec)
        reward_model = getattr(online.judge, "model", None)
        if isinstance(reward_model, nn.Module):  # frozen: nothing trains it, so it holds no gradients (make_critic
            reward_model.requires_grad_(False)  # gives its copy, the critic, trainable parameters of its own)
        on_ids = reward_on_ids(online.judge, inputs.tokenizer)
        critic, head, critic_label = make_critic(ppo, cfg, inputs.model, online.judge, inputs.tokenizer)
        if critic is not None and cfg.disable_dropout:
            loading.disable_dropout(critic)
        model = PolicyAndValue(inputs.model, critic, head, cfg.logprob_chunk_size)
        optimizer = build_optimizer(cfg, model)

        rollout_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * ppo.num_mini_batches
        if len(inputs.train) < rollout_size * acc.num_processes:
            raise DataError(f"{cfg.dataset or 'train_dataset'}: {len(inputs.train)} prompts, but one PPO update "
                            f"samples {rollout_size} per process (per_device_train_batch_size × "
                            "gradient_accumulation_steps × num_mini_batches); give more prompts or lower those")
        # Whole rollouts only: every optimizer step then has its gradient_accumulation_steps full micro-batches.
        prompts = DataLoader(inputs.train, batch_size=rollout_size, shuffle=True, drop_last=True, collate_fn=list)
        model, optimizer, prompts, scheduler = self._prepare_parts(model, optimizer, prompts)
        total_updates, num_epochs = self._total_updates(len(prompts))
        self.session = PPOSession(inputs, spec, model, optimizer, scheduler, prompts, None,
                                  inputs.make_reference(model, acc), online, total_updates, num_epochs,
                                  critic_label=critic_label, on_ids=on_ids, rollout_size=rollout_size)
        return self.session

    def _train(self, out: Path, resume: Path | None) -> RunResult:
        cfg, acc, ppo = self.cfg, self.accelerator, self.settings
        saved = checkpoint.read_state(resume) if resume is not None else None
        session = self._prepare()
        inputs, online, reference = session.inputs, session.online, session.reference
        model, optimizer, scheduler, prompts = session.policy, session.optimizer, session.scheduler, session.train_dl
        total_updates, num_epochs, rollout_size = session.total_steps, session.num_epochs, session.rollout_size
        judge, on_ids, critic_label = online.judge, session.on_ids, session.critic_label
        fingerprint = checkpoint.run_fingerprint(effective_config(cfg), inputs.data_fingerprints)
        if saved is not None:
            checkpoint.check_same_run(resume, saved, fingerprint)
        elif acc.is_main_process:  # a resumed run keeps the config.yaml it started with
            cfg.save(out / "config.yaml")

        controller = rl.KLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        moments = rl.RunningMoments() if ppo.use_score_scaling else None
        state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "optimizer_steps": 0}
        if resume is not None:
            state = checkpoint.load_checkpoint(acc, resume)
            controller.coef = state["kl_coef"]
            if moments is not None:
                moments = rl.RunningMoments(**state["score_moments"])
            log.info("resumed from %s at update %d", resume, state["global_step"])
        # The built-in health checks, as in the one loop (length, EOS and non-finite checks read PPO's records).
        self.health = HealthCallback.from_config(cfg) if cfg.health_checks else None
        metrics_log = open_metrics(cfg, acc, out, state["global_step"], resumed=resume is not None,
                                   callbacks=[*self.callbacks, *([self.health] if self.health else [])])
        if resume is not None and self.health is not None:
            self.health.replay(metrics_log.records())

        held = lambda: self._memory(model, optimizer, reference, judge, critic_label)  # noqa: E731
        if acc.is_main_process:
            log.info("PPO: %d updates of %d prompts per process (%d epoch(s) of the prompts), each %d pass(es) in %d "
                     "optimizer step(s) | reward: %s%s | critic: %s | KL: %s, %s | reference: %s", total_updates,
                     rollout_size, num_epochs, ppo.num_ppo_epochs, ppo.num_mini_batches, judge.name,
                     " on the policy's ids" if on_ids else " on decoded text", critic_label,
                     ppo.kl_estimator, f"adaptive to {ppo.target_kl:g} nats (horizon {ppo.kl_horizon})"
                     if ppo.target_kl is not None else f"fixed coefficient {ppo.kl_coef:g}", reference.name)
            log.info("memory: %s", memory.describe(held()))

        window = MetricWindow()
        result = RunResult(out, None, state["global_step"])
        step, optimizer_steps = state["global_step"], state["optimizer_steps"]
        bar = tqdm(total=total_updates, initial=step, desc="ppo",
                   disable=not acc.is_local_main_process or cfg.disable_tqdm, dynamic_ncols=True)
        model.train()
        started = time.perf_counter()
        for epoch in range(state["epoch"], num_epochs):
            prompts.set_epoch(epoch)
            skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
            batches = acc.skip_first_batches(prompts, skip) if skip else prompts
            for batch_index, rows in enumerate(batches, start=skip):
                seed = online.seed(epoch, batch_index)
                # 1. rollout: one completion of each prompt from the current policy
                began = time.perf_counter()
                sampled = online.sample(rows, acc.unwrap_model(model).model, online.sampling(seed, n=1))
                forward_batches = self._collate(inputs.collator, sampled)
                # 2. score: the reward of each completion, as the reward term of the objective adds it
                scored = time.perf_counter()
                scores = self._scores(online, sampled, forward_batches, on_ids, moments)
                # 3. experience: π_old, π_ref and V_old of every token (no gradient) → rewards, advantages, returns
                experienced = time.perf_counter()
                experience = self._experience(model, reference, sampled, forward_batches, scores, controller.coef)
                # 4. optimise: num_ppo_epochs passes in a new order, num_mini_batches steps each
                optimising = time.perf_counter()
                first = self._optimise(model, optimizer, experience, inputs.collator, window, seed,
                                       (step + 1, epoch, [r[SOURCE_ROW] for r in rows if SOURCE_ROW in r]))
                optimizer_steps += ppo.num_ppo_epochs * ppo.num_mini_batches
                scheduler.step()
                done = time.perf_counter()
                if result.first_loss is None:
                    result.first_loss = first
                # 5. control and record
                sequence_kl = experience.sequence_kl()
                kl_used = acc.gather(sequence_kl.to(acc.device)).mean().item()  # over every process's samples
                self._record(window, sampled, experience, sequence_kl, controller.coef,
                             {"generation": scored - began, "scoring": experienced - scored,
                              "experience": optimising - experienced, "optimisation": done - optimising})
                controller.update(kl_used, len(experience) * acc.num_processes)
                step += 1
                bar.update(1)
                state = {"global_step": step, "epoch": epoch, "batches_in_epoch": batch_index + 1, "run": fingerprint,
                         "optimizer_steps": optimizer_steps, "kl_coef": controller.coef,
                         "score_moments": asdict(moments) if moments is not None else None}
                self._run_callbacks(step, acc.unwrap_model(model).model, metrics_log)
                if step % cfg.logging_steps == 0 or step == total_updates:
                    record = {"step": step, "epoch": round(epoch + (batch_index + 1) / len(prompts), 4),
                              "episode": step * rollout_size * acc.num_processes, "optimizer_steps": optimizer_steps,
                              "learning_rate": scheduler.get_last_lr()[0], **window.values(acc)}
                    metrics_log.write(record)
                    result.train_metrics = record
                    bar.set_postfix({"score": f"{record['objective/scores']:.3f}",
                                     "kl": f"{record['objective/kl']:.2f}"})
                if inputs.eval is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
                    result.eval_metrics = self._evaluate(session, step, metrics_log)
                if cfg.save_steps and step % cfg.save_steps == 0 and step < total_updates:
                    checkpoint.save_checkpoint(acc, out, step, state, cfg.save_total_limit)
                if step >= total_updates:
                    break
            if step >= total_updates:
                break
        bar.close()
        train_seconds = time.perf_counter() - started

        return self._finish(session, out, step, state, result, train_seconds, metrics_log, held(), extra={
            "optimizer_steps": optimizer_steps, "online": online_summary(online),
            "ppo": {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                    "rollout_prompts_per_process": rollout_size, "kl_coef": controller.coef,
                    "reward": judge.name + (" (on the policy's ids)" if on_ids else " (on decoded text)"),
                    "value_model": critic_label}})

    # ------------------------------------------------------------------------------------------------
    def _prepare_parts(self, model: nn.Module, optimizer, prompts: DataLoader):
        """Accelerate's wrappers, and a learning-rate schedule in updates (it steps once per update, as TRL's), sized
        by the prepared prompt loader (this process's share of the rollouts)."""
        cfg, acc = self.cfg, self.accelerator
        model, optimizer, prompts = acc.prepare(model, optimizer, prompts)
        updates, _ = self._total_updates(len(prompts))
        scheduler = make_scheduler(cfg, optimizer.optimizer, updates, acc.num_processes)
        return model, optimizer, prompts, acc.prepare(scheduler)

    def _total_updates(self, rollouts_per_epoch: int) -> tuple[int, int]:
        cfg, per_epoch = self.cfg, max(1, rollouts_per_epoch)
        if cfg.max_steps > 0:
            return cfg.max_steps, math.ceil(cfg.max_steps / per_epoch)
        return math.ceil(per_epoch * cfg.num_train_epochs), math.ceil(cfg.num_train_epochs)

    def _collate(self, collator: PreferenceCollator, sampled: Rollout) -> list[dict[str, Tensor]]:
        """The rollout as forward batches of ``per_device_train_batch_size`` sequences, in rollout order, scored at
        the sampling temperature (``logit_scale``)."""
        size, device = self.cfg.per_device_train_batch_size, self.accelerator.device
        return [{k: v.to(device) for k, v in collator.groups(sampled.prompt_ids[i : i + size],
                                                             sampled.completion_ids[i : i + size], 1).items()}
                | {"logit_scale": logit_scale(self.cfg)} for i in range(0, len(sampled), size)]

    @torch.no_grad()
    def _scores(self, online: OnlineBatches, sampled: Rollout, batches: list[dict[str, Tensor]], on_ids: bool,
                moments: rl.RunningMoments | None) -> Tensor:
        """The score of each completion ``[S]``: judged (a reward model on the sampled ids, or the judge on the
        text), minus the missing-EOS penalty (kept in ``sampled.scores``, logged as ``reward``), then scaled."""
        raw = None
        # The sampled ids as they are when they fit the reward model's positions, else the text path, which cuts them.
        positions = max_positions(online.judge.model) if on_ids else None
        longest = max(len(p) + len(c) for p, c in zip(sampled.sample_prompt_ids, sampled.completion_ids))
        if on_ids and (positions is None or longest <= positions):
            raw = online.judge.score_batches(batches)
            if not bool(torch.isfinite(raw).all()):
                raise TrainingError(f"the reward model {online.judge.name} gave non-finite scores to "
                                    f"{int((~torch.isfinite(raw)).sum())} completion(s)")
        online.judge_rollout(sampled, raw)
        scores = torch.tensor(sampled.scores, dtype=torch.float32)
        if moments is not None:  # the same running moments on every process: they see every process's scores
            moments.update(self.accelerator.gather(scores.to(self.accelerator.device)).cpu())
        ppo = self.settings
        return rl.scale_scores(scores, moments, ppo.use_score_norm, ppo.score_clip)

    @torch.no_grad()
    def _experience(self, model: nn.Module, reference, sampled: Rollout, batches: list[dict[str, Tensor]],
                    scores: Tensor, kl_coef: float) -> Experience:
        old, ref, values, tokens = [], [], [], []
        for batch in batches:
            out = model(**model_inputs(batch))
            old.append(out["token_logps"].float().cpu())
            values.append(out["values"].float().cpu())
            ref.append(reference.outputs(batch)["token_logps"].float().cpu())
            tokens.append(batch["seq_tokens"].cpu())
        ppo = self.settings
        return make_experience(sampled.prompt_ids, sampled.completion_ids, scores,
                               torch.tensor(sampled.ended_with_eos), torch.cat(tokens), torch.cat(old),
                               torch.cat(ref), torch.cat(values), kl_coef=kl_coef, kl_estimator=ppo.kl_estimator,
                               gamma=ppo.gamma, lam=ppo.lam, whiten_rewards=ppo.whiten_rewards)

    def _optimise(self, model: nn.Module, optimizer, experience: Experience, collator: PreferenceCollator,
                  window: MetricWindow, seed: int, where: tuple[int, int, list[int]]) -> float:
        """``num_ppo_epochs`` passes; returns the first micro-batch's loss. Gradient accumulation is explicit: DDP
        all-reduces on a step's last micro-batch only, and each micro-batch's loss is weighted by its share of the
        step's tokens, so a step minimises the mean over its tokens (Accelerate's ``backward`` divides by
        ``gradient_accumulation_steps``, the number of micro-batches)."""
        cfg, acc, ppo = self.cfg, self.accelerator, self.settings
        generator = torch.Generator().manual_seed(seed + 1)
        first = None
        for _ in range(ppo.num_ppo_epochs):
            order = torch.randperm(len(experience), generator=generator)
            for minibatch in order.tensor_split(ppo.num_mini_batches):
                micro_batches = minibatch.tensor_split(cfg.gradient_accumulation_steps)
                step_tokens = int(experience.seq_tokens[minibatch].sum())
                for k, seqs in enumerate(micro_batches):
                    last = k == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else acc.no_sync(model):
                        loss, share = self._micro_batch_loss(model, experience, collator, seqs, window, where)
                        acc.backward(loss * (share * len(micro_batches) / step_tokens))
                    first = loss.item() if first is None else first
                grad_norm = torch.as_tensor(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm),
                                            dtype=torch.float32).reshape(1)
                if not cfg.fp16 and not bool(torch.isfinite(grad_norm).all()):
                    raise self._stopped(*where, f"the gradient norm is {grad_norm.item()}")
                window.add("grad_norm", grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        return first

    def _micro_batch_loss(self, model: nn.Module, experience: Experience, collator: PreferenceCollator,
                          seqs: Tensor, window: MetricWindow, where: tuple[int, int, list[int]]) -> tuple[Tensor, int]:
        """Clipped policy loss + vf_coef × clipped value loss (− entropy bonus) of sequences ``seqs``, means over
        their tokens; and their token count (the micro-batch's weight in its step, see :meth:`_optimise`)."""
        ppo, device = self.settings, self.accelerator.device
        batch = collator.groups([experience.prompt_ids[i] for i in seqs],
                                [experience.completion_ids[i] for i in seqs], 1)
        batch = {k: v.to(device) for k, v in batch.items()} | {"logit_scale": logit_scale(self.cfg)}
        tokens = experience.token_index(seqs)
        token_seq, seq_tokens = batch["score_seq"], batch["seq_tokens"]
        out = model(**model_inputs(batch), with_entropy=ppo.entropy_coef > 0)
        policy_loss, policy_metrics = rl.policy_loss(
            out["token_logps"], experience.old_logps[tokens].to(device), experience.advantages[tokens].to(device),
            token_seq, seq_tokens, eps_low=ppo.cliprange, loss_type="dapo")
        value_loss, value_metrics = rl.value_loss(out["values"], experience.values[tokens].to(device),
                                                  experience.returns[tokens].to(device), ppo.cliprange_value)
        loss = policy_loss + ppo.vf_coef * value_loss
        if ppo.entropy_coef > 0:
            loss = loss + rl.entropy_bonus(out["entropy"], ppo.entropy_coef)
            window.add("policy/entropy_avg", out["entropy"].detach().mean().reshape(1))
        if not torch.isfinite(loss):
            raise self._stopped(*where, f"the PPO loss is not finite (policy loss {policy_loss.item()}, value loss "
                                f"{value_loss.item()})")
        window.add("loss/policy_avg", policy_loss.detach().reshape(1))
        window.add("loss/value_avg", value_loss.detach().reshape(1))
        window.add("policy/approxkl_avg", policy_metrics["approx_kl"].reshape(1))
        window.add("policy/clipfrac_avg", policy_metrics["clip_ratio/region"].reshape(1))
        window.add("val/clipfrac_avg", value_metrics["clipfrac"].reshape(1))
        window.add("val/ratio", policy_metrics["ratio"].reshape(1))
        return loss, tokens.numel()

    def _record(self, window: MetricWindow, sampled: Rollout, experience: Experience, sequence_kl: Tensor,
                kl_coef: float, seconds: dict[str, float]) -> None:
        """The update's rollout and experience under TRL's PPO names; seconds per update by phase."""
        log_samples(window, sampled)  # reward (judged, penalised), lengths, clipped ratio, sampled entropy
        window.add("completions/eos_rate", experience.ended.float())
        non_score = -kl_coef * sequence_kl
        window.add("objective/kl", sequence_kl)
        window.add("objective/kl_coef", torch.tensor([kl_coef]))
        window.add("objective/non_score_reward", non_score)
        window.add("objective/scores", experience.scores)
        window.add("objective/rlhf_reward", experience.scores + non_score)
        explained = rl.explained_variance(experience.values, experience.returns)
        if bool(torch.isfinite(explained)):
            window.add("val/explained_variance", explained.reshape(1))
        window.add("val/value_mean", experience.values.mean().reshape(1))
        for phase, value in seconds.items():
            self.seconds[phase] += value
            window.add(f"time/{phase}", torch.tensor([value]))

    def _memory(self, model: nn.Module, optimizer, reference, judge: Judge, critic_label: str) -> dict:
        """Policy, reference, reward and value: what each holds (see :mod:`preftune.training.memory`)."""
        module, seen = self.accelerator.unwrap_model(model), set()
        roles = {"policy": memory.model_bytes(module.model, optimizer, seen=seen, what="policy (trained)"),
                 "reference": memory.reference_bytes(reference, (), seen)}
        reward_model = getattr(judge, "model", None)
        roles["reward"] = (memory.model_bytes(reward_model, seen=seen, what=judge.name)
                           if isinstance(reward_model, nn.Module) else memory.other_bytes("function", judge.name))
        roles["value"] = (memory.model_bytes(module.critic, optimizer, seen=seen, what=f"critic: {critic_label}")
                          if module.critic is not None else
                          memory.model_bytes(module.value_head, optimizer, seen=seen, kind="head", what=critic_label))
        return memory.account(roles)


__all__ = ["Trainer", "Experience", "make_experience", "PPOSettings", "make_critic", "reward_on_ids",
           "same_tokenizer"]
