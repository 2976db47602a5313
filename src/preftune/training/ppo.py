"""PPO for RLHF, the baseline DPO replaces: an algorithm of the run driver on the online pipeline.

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
   RNG, the KL coefficient and the running score moments) are the driver's.

The mathematics are the pure functions of :mod:`preftune.methods.rl`; sampling, judging and evaluation the online
algorithm's (:class:`~preftune.training.online.Online`, which this one extends); the run folder, optimizer steps,
reference, checkpoints, metrics and callbacks the run driver's (:mod:`preftune.training.loop`). Both the policy's
forward and the critic's read the completion positions of one collated batch
(prefix sharing and packing included), so a value is aligned with the token whose log-prob it accompanies.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from preftune import metric_names as names
from preftune.config import Resolved, TrainConfig
from preftune.data.batching import SOURCE_ROW
from preftune.errors import DataError, TrainingError
from preftune.methods import rl
from preftune.methods.registry import get_method
from preftune.modeling import loading
from preftune.modeling.loading import check_same_vocabulary
from preftune.modeling.logprobs import max_positions, model_inputs
from preftune.modeling.value import PolicyAndValue, critic_from_policy, value_head
from preftune.rollout.judges import Judge, RewardModelJudge
from preftune.rollout.record import Rollout
from preftune.training import memory
from preftune.training.algorithm import OptimizerStep, Parts, Update, Work
from preftune.training.objective import NonFiniteLoss
from preftune.training.online import Online, log_samples, logit_scale
from preftune.training.setup import RunInputs
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
                bf16: bool = False) -> tuple[nn.Module | None, nn.Linear | None, str]:
    """The critic ``(model or None, value head or None, what it is)``; see ``value_model`` in the config (``bf16``:
    the run's autocast, the compute dtype of a quantized checkpoint)."""
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
    critic = loading.load_reward_model(choice, cfg, bf16=bf16)
    check_same_vocabulary(policy, critic)
    return critic, None, f"the checkpoint {choice}"


# --------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------


class PPO(Online):
    """PPO as an algorithm of the run driver (see the module docstring): one update per rollout; the rollout and
    judge are the online algorithm's, the optimizer steps the driver's. ``judge`` is the reward: a
    :class:`~preftune.rollout.judges.Judge` (e.g. a ``RewardModelJudge``), a function wrapped as one, or the
    config's ``judge`` / ``reward_model_path``."""

    def __init__(self, cfg: TrainConfig, judge=None, resolved: Resolved | None = None):
        super().__init__(cfg, judge, resolved)
        self.settings = ppo = PPOSettings.from_config(cfg)
        self.seconds = {"generation": 0.0, "scoring": 0.0, "experience": 0.0, "optimisation": 0.0}
        self.controller = rl.KLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        self.moments = rl.RunningMoments() if ppo.use_score_scaling else None
        self.optimizer_steps = 0
        self.rollout_size, self.on_ids, self.critic_label = 0, False, ""

    def prepare(self, inputs: RunInputs, accelerator: Accelerator) -> Parts:
        """Policy and critic (one module, one optimizer) and the loader of whole rollouts of prompts; the reward
        model is frozen (nothing trains it; :func:`make_critic` gives its copy, the critic, trainable parameters)."""
        cfg, ppo = self.cfg, self.settings
        reward_model = getattr(self.load_judge(accelerator), "model", None)
        if isinstance(reward_model, nn.Module):
            reward_model.requires_grad_(False)
        self.on_ids = reward_on_ids(self.judge, inputs.tokenizer)
        critic, head, self.critic_label = make_critic(ppo, cfg, inputs.model, self.judge, inputs.tokenizer,
                                                      inputs.resolved.bf16)
        if critic is not None and cfg.disable_dropout:
            loading.disable_dropout(critic)
        self.rollout_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * ppo.num_mini_batches
        if len(inputs.train) < self.rollout_size * accelerator.num_processes:
            raise DataError(f"{cfg.dataset or 'train_dataset'}: {len(inputs.train)} prompts, but one PPO update "
                            f"samples {self.rollout_size} per process (per_device_train_batch_size × "
                            "gradient_accumulation_steps × num_mini_batches); give more prompts or lower those")
        # Whole rollouts only: every optimizer step then has its gradient_accumulation_steps full micro-batches.
        prompts = DataLoader(inputs.train, batch_size=self.rollout_size, shuffle=True, drop_last=True,
                             collate_fn=list)
        return Parts(PolicyAndValue(inputs.model, critic, head, cfg.logprob_chunk_size), prompts)

    def updates_per_epoch(self, batches: int) -> int:
        return max(1, batches)

    def work(self, epoch: int, skip: int, window: MetricWindow) -> Iterator[Work]:
        """One rollout of prompts per update, with its sampling seed."""
        session = self.session
        session.loader.set_epoch(epoch)
        batches = session.accelerator.skip_first_batches(session.loader, skip) if skip else session.loader
        for index, rows in enumerate(batches, start=skip):
            yield Work((rows, self.sampler.seed(epoch, index)), index + 1,
                       [r[SOURCE_ROW] for r in rows if SOURCE_ROW in r])

    def update(self, work: Work, step: OptimizerStep, window: MetricWindow) -> Update:
        """rollout → score → experience → ``num_ppo_epochs`` passes → the KL controller and the records."""
        (rows, seed), acc, session = work.data, self.session.accelerator, self.session
        began = time.perf_counter()
        # 1. rollout: one completion of each prompt from the current policy
        sampled = self.sampler.sample(rows, session.model, self.sampler.sampling(seed, n=1))
        forward_batches = self._collate(sampled)
        # 2. score: the reward of each completion, as the reward term of the objective adds it
        scored = time.perf_counter()
        scores = self._scores(sampled, forward_batches)
        # 3. experience: π_old, π_ref and V_old of every token (no gradient) → rewards, advantages, returns
        experienced = time.perf_counter()
        experience = self._experience(sampled, forward_batches, scores)
        # 4. optimise: num_ppo_epochs passes in a new order, num_mini_batches optimizer steps each
        optimising = time.perf_counter()
        first = self._optimise(experience, step, window, seed, work.rows)
        done = time.perf_counter()
        # 5. control and record
        sequence_kl = experience.sequence_kl()
        kl_used = acc.gather(sequence_kl.to(acc.device)).mean().item()  # over every process's samples
        self._record(window, sampled, experience, sequence_kl,
                     {"generation": scored - began, "scoring": experienced - scored,
                      "experience": optimising - experienced, "optimisation": done - optimising})
        self.controller.update(kl_used, len(experience) * acc.num_processes)
        return Update(first, len(experience), int(experience.seq_tokens.sum()),
                      {"episode": work.step * self.rollout_size * acc.num_processes,
                       "optimizer_steps": self.optimizer_steps})

    def state(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps, "kl_coef": self.controller.coef,
                "score_moments": asdict(self.moments) if self.moments is not None else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer_steps, self.controller.coef = state["optimizer_steps"], state["kl_coef"]
        if self.moments is not None:
            self.moments = rl.RunningMoments(**state["score_moments"])

    def summary(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps, "online": self.sampler.summary(),
                "ppo": {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                        "rollout_prompts_per_process": self.rollout_size, "kl_coef": self.controller.coef,
                        "reward": self.judge.name + (" (on the policy's ids)" if self.on_ids else " (on decoded text)"),
                        "value_model": self.critic_label}}

    def describe(self) -> list[str]:
        ppo, session = self.settings, self.session
        kl = (f"adaptive to {ppo.target_kl:g} nats (horizon {ppo.kl_horizon})" if ppo.target_kl is not None
              else f"fixed coefficient {ppo.kl_coef:g}")
        return [f"PPO: {session.total_steps} updates of {self.rollout_size} prompts per process "
                f"({session.num_epochs} epoch(s) of the prompts), each {ppo.num_ppo_epochs} pass(es) in "
                f"{ppo.num_mini_batches} optimizer step(s) | reward: {self.judge.name}"
                f"{' on the policy' + chr(39) + 's ids' if self.on_ids else ' on decoded text'} | critic: "
                f"{self.critic_label} | KL: {ppo.kl_estimator}, {kl}"]

    # ------------------------------------------------------------------------------------------------
    def _collate(self, sampled: Rollout) -> list[dict[str, Tensor]]:
        """The rollout as forward batches of ``per_device_train_batch_size`` sequences, in rollout order, scored at
        the sampling temperature (``logit_scale``)."""
        size, device = self.cfg.per_device_train_batch_size, self.session.accelerator.device
        collator = self.session.inputs.collator
        return [{k: v.to(device) for k, v in collator.groups(sampled.prompt_ids[i : i + size],
                                                             sampled.completion_ids[i : i + size], 1).items()}
                | {"logit_scale": logit_scale(self.cfg)} for i in range(0, len(sampled), size)]

    @torch.no_grad()
    def _scores(self, sampled: Rollout, batches: list[dict[str, Tensor]]) -> Tensor:
        """The score of each completion ``[S]``: judged (a reward model on the sampled ids, or the judge on the
        text), minus the missing-EOS penalty (kept in ``sampled.scores``, logged as ``reward``), then scaled."""
        raw, judge, acc = None, self.judge, self.session.accelerator
        # The sampled ids as they are when they fit the reward model's positions, else the text path, which cuts them.
        positions = max_positions(judge.model) if self.on_ids else None
        longest = max(len(p) + len(c) for p, c in zip(sampled.sample_prompt_ids, sampled.completion_ids))
        if self.on_ids and (positions is None or longest <= positions):
            raw = judge.score_batches(batches)
            if not bool(torch.isfinite(raw).all()):
                raise TrainingError(f"the reward model {judge.name} gave non-finite scores to "
                                    f"{int((~torch.isfinite(raw)).sum())} completion(s)")
        self.sampler.judge_rollout(sampled, raw)
        scores = torch.tensor(sampled.scores, dtype=torch.float32)
        if self.moments is not None:  # the same running moments on every process: they see every process's scores
            self.moments.update(acc.gather(scores.to(acc.device)).cpu())
        return rl.scale_scores(scores, self.moments, self.settings.use_score_norm, self.settings.score_clip)

    @torch.no_grad()
    def _experience(self, sampled: Rollout, batches: list[dict[str, Tensor]], scores: Tensor) -> Experience:
        old, ref, values, tokens = [], [], [], []
        for batch in batches:
            out = self.session.policy(**model_inputs(batch))
            old.append(out["token_logps"].float().cpu())
            values.append(out["values"].float().cpu())
            ref.append(self.session.reference.outputs(batch)["token_logps"].float().cpu())
            tokens.append(batch["seq_tokens"].cpu())
        ppo = self.settings
        return make_experience(sampled.prompt_ids, sampled.completion_ids, scores,
                               torch.tensor(sampled.ended_with_eos), torch.cat(tokens), torch.cat(old),
                               torch.cat(ref), torch.cat(values), kl_coef=self.controller.coef,
                               kl_estimator=ppo.kl_estimator, gamma=ppo.gamma, lam=ppo.lam,
                               whiten_rewards=ppo.whiten_rewards)

    def _optimise(self, experience: Experience, step: OptimizerStep, window: MetricWindow, seed: int,
                  rows: list[int]) -> float:
        """``num_ppo_epochs`` passes, ``num_mini_batches`` optimizer steps each; returns the first micro-batch's
        loss. Each micro-batch's loss is weighted by its share of the step's tokens, so a step minimises the mean
        over its tokens (the driver's step divides by ``gradient_accumulation_steps``, the number of micro-batches)."""
        ppo, k = self.settings, self.cfg.gradient_accumulation_steps
        generator = torch.Generator().manual_seed(seed + 1)
        first: list[float] = []

        def weighted_loss(seqs: Tensor, step_tokens: int, parts: int) -> Tensor:
            loss = self._micro_batch_loss(experience, seqs, window)
            if not first:
                first.append(loss.item())
            return loss * (int(experience.seq_tokens[seqs].sum()) * parts / step_tokens)

        for _ in range(ppo.num_ppo_epochs):
            order = torch.randperm(len(experience), generator=generator)
            for minibatch in order.tensor_split(ppo.num_mini_batches):
                micro_batches = minibatch.tensor_split(k)
                step_tokens, parts = int(experience.seq_tokens[minibatch].sum()), len(micro_batches)
                step(micro_batches, lambda seqs, n=step_tokens, parts=parts: weighted_loss(seqs, n, parts), rows)
                self.optimizer_steps += 1
        return first[0]

    def _micro_batch_loss(self, experience: Experience, seqs: Tensor, window: MetricWindow) -> Tensor:
        """Clipped policy loss + vf_coef × clipped value loss (− entropy bonus) of sequences ``seqs``, means over
        their tokens."""
        ppo, device = self.settings, self.session.accelerator.device
        batch = self.session.inputs.collator.groups([experience.prompt_ids[i] for i in seqs],
                                                    [experience.completion_ids[i] for i in seqs], 1)
        batch = {k: v.to(device) for k, v in batch.items()} | {"logit_scale": logit_scale(self.cfg)}
        tokens = experience.token_index(seqs)
        token_seq, seq_tokens = batch["score_seq"], batch["seq_tokens"]
        out = self.session.policy(**model_inputs(batch), with_entropy=ppo.entropy_coef > 0)
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
            raise NonFiniteLoss(f"PPO: policy loss {policy_loss.item()}, value loss {value_loss.item()}")
        window.add("loss/policy_avg", policy_loss.detach().reshape(1))
        window.add("loss/value_avg", value_loss.detach().reshape(1))
        window.add("policy/approxkl_avg", policy_metrics["approx_kl"].reshape(1))
        window.add("policy/clipfrac_avg", policy_metrics["clip_ratio/region"].reshape(1))
        window.add("val/clipfrac_avg", value_metrics["clipfrac"].reshape(1))
        window.add("val/ratio", policy_metrics["ratio"].reshape(1))
        return loss

    def _record(self, window: MetricWindow, sampled: Rollout, experience: Experience, sequence_kl: Tensor,
                seconds: dict[str, float]) -> None:
        """The update's rollout and experience under TRL's PPO names; seconds per update by phase."""
        log_samples(window, sampled)  # reward (judged, penalised), lengths, clipped ratio, sampled entropy
        kl_coef = self.controller.coef
        window.add("completions/eos_rate", experience.ended.float())
        non_score = -kl_coef * sequence_kl
        window.add(names.OBJECTIVE_KL, sequence_kl)
        window.add("objective/kl_coef", torch.tensor([kl_coef]))
        window.add(names.OBJECTIVE_NON_SCORE_REWARD, non_score)
        window.add(names.OBJECTIVE_SCORES, experience.scores)
        window.add(names.OBJECTIVE_RLHF_REWARD, experience.scores + non_score)
        explained = rl.explained_variance(experience.values, experience.returns)
        if bool(torch.isfinite(explained)):
            window.add("val/explained_variance", explained.reshape(1))
        window.add("val/value_mean", experience.values.mean().reshape(1))
        for phase, value in seconds.items():
            self.seconds[phase] += value
            window.add(f"time/{phase}", torch.tensor([value]))

    def memory(self) -> dict:
        """Policy, reference, reward and value: what each holds (see :mod:`preftune.training.memory`)."""
        session, seen, judge = self.session, set(), self.judge
        module = session.accelerator.unwrap_model(session.policy)
        roles = {"policy": memory.model_bytes(module.model, session.optimizer, seen=seen, what="policy (trained)"),
                 "reference": memory.reference_bytes(session.reference, (), seen)}
        reward_model = getattr(judge, "model", None)
        roles["reward"] = (memory.model_bytes(reward_model, seen=seen, what=judge.name)
                           if isinstance(reward_model, nn.Module) else memory.other_bytes("function", judge.name))
        roles["value"] = (memory.model_bytes(module.critic, session.optimizer, seen=seen,
                                             what=f"critic: {self.critic_label}")
                          if module.critic is not None else
                          memory.model_bytes(module.value_head, session.optimizer, seen=seen, kind="head",
                                             what=self.critic_label))
        return memory.account(roles)


__all__ = ["PPO", "Experience", "make_experience", "PPOSettings", "make_critic", "reward_on_ids", "same_tokenizer"]
