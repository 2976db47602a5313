"""The offline algorithm: a fixed dataset of pairs (or unpaired examples, or SFT rows), one optimizer step of
``gradient_accumulation_steps`` micro-batches per update — DPO and its family, SFT, the reward model."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader

from preftune.config import Resolved, TrainConfig
from preftune.data.batching import LengthGroupedSampler, TokenBudgetBatchSampler, example_lengths
from preftune.modeling.logprobs import LogProbModel
from preftune.modeling.reward import RewardModel
from preftune.training import memory
from preftune.training.algorithm import OptimizerStep, Parts, Session, Update, Work, source_rows
from preftune.training.objective import LossSpec, batch_loss
from preftune.training.setup import RunInputs
from preftune.training.tracking import MetricWindow

log = logging.getLogger("preftune")


def build_train_loader(cfg: TrainConfig, dataset, collate: Callable[[list[dict]], dict[str, Tensor]],
                       ) -> tuple[DataLoader, TokenBudgetBatchSampler | None]:
    """Training batches of ``per_device_train_batch_size`` examples (shuffled or grouped by length), or of as many
    examples as fit in ``max_tokens_per_batch`` tokens; the token-budget sampler is returned too (or None).

    A micro-batch's loss is the mean over its examples, so under a budget — where the number of examples varies —
    every micro-batch still counts equally under gradient accumulation (and across processes)."""
    if cfg.max_tokens_per_batch is not None:
        budget = TokenBudgetBatchSampler(example_lengths(dataset), cfg.max_tokens_per_batch, cfg.seed)
        return DataLoader(dataset, batch_sampler=budget, collate_fn=collate), budget
    sampler = (LengthGroupedSampler(example_lengths(dataset), cfg.per_device_train_batch_size, cfg.seed)
               if cfg.group_by_length else None)
    return DataLoader(dataset, batch_size=cfg.per_device_train_batch_size, shuffle=sampler is None, sampler=sampler,
                      collate_fn=collate), None


class Offline:
    """fetch k micro-batches → policy and reference log-probs → loss → one optimizer step."""

    def __init__(self, cfg: TrainConfig, judge: None = None, resolved: Resolved | None = None):  # no judge read
        self.cfg = cfg
        self.spec = LossSpec.from_config(cfg)
        self.unit = self.spec.unit
        self.budget: TokenBudgetBatchSampler | None = None
        self.session: Session | None = None

    def prepare(self, inputs: RunInputs, accelerator: Accelerator) -> Parts:
        head = RewardModel if self.spec.model == "reward" else LogProbModel
        model = head(inputs.model, self.cfg.logprob_chunk_size)
        loader, self.budget = build_train_loader(self.cfg, inputs.train, inputs.collator)
        return Parts(model, loader)

    def updates_per_epoch(self, batches: int) -> int:
        return max(1, math.ceil(batches / self.cfg.gradient_accumulation_steps))

    def start(self, session: Session) -> None:
        self.session = session

    def work(self, epoch: int, skip: int, window: MetricWindow) -> Iterator[Work]:
        """The epoch's micro-batches, ``gradient_accumulation_steps`` per update (the last update of an epoch may
        have fewer: its loss is still divided by k, as Accelerate's accumulation does)."""
        session, k = self.session, self.cfg.gradient_accumulation_steps
        session.loader.set_epoch(epoch)
        if self.budget is not None:  # under several processes Accelerate's shard does not pass set_epoch on to it
            self.budget.set_epoch(epoch)
        batches = session.accelerator.skip_first_batches(session.loader, skip) if skip else session.loader
        group, consumed = [], skip
        for batch in batches:
            group.append(batch)
            consumed += 1
            if len(group) == k:
                yield Work(group, consumed, source_rows(group))
                group = []
        if group:
            yield Work(group, consumed, source_rows(group))

    def update(self, work: Work, step: OptimizerStep, window: MetricWindow) -> Update:
        return loss_update(self.session, self.spec, work, step, window)

    def evaluate(self, rows: list[dict], window: MetricWindow, step: int) -> None:
        session = self.session
        batch = {k: v.to(session.accelerator.device) for k, v in session.inputs.collator(rows).items()}
        batch_loss(session.policy, session.reference, batch, self.spec, window)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}

    def memory(self) -> dict:
        s = self.session
        return memory.one_loop(s.model, s.optimizer, s.reference, (s.inputs.train, s.inputs.eval))

    def describe(self) -> list[str]:
        cfg, budget = self.cfg, self.budget
        if budget is not None:
            return [f"batches: up to {budget.max_tokens} tokens each, {len(budget)} per epoch; {budget.over_budget} "
                    "example(s) longer than that train alone"]
        return [f"batches: {cfg.per_device_train_batch_size} examples each"
                + (", grouped by length" if cfg.group_by_length else "")]


def loss_update(session: Session, spec: LossSpec, work: Work, step: OptimizerStep, window: MetricWindow) -> Update:
    """One optimizer step on the micro-batches of ``work``, each one's loss :func:`batch_loss` (offline batches and
    online groups and pairs alike); its examples in the spec's unit and its input tokens."""
    loss = step(work.data, lambda batch: batch_loss(session.policy, session.reference, batch, spec, window), work.rows)
    return Update(loss, sum(spec.examples(b) for b in work.data),
                  sum(int(b["num_input_tokens"].sum()) for b in work.data))
