"""What the run driver (:mod:`preftune.training.loop`) asks of an algorithm, and what it hands one.

The driver owns everything every method shares: the run folder, resume, metrics, callbacks, the evaluation and
checkpoint cadence, the optimizer step and the end of a run. An algorithm owns only what makes it different:

* ``prepare(inputs, accelerator)`` → :class:`Parts`: the module to train and the loader of its data;
* ``updates_per_epoch(batches)``: the updates an epoch of the prepared loader gives (the schedule's length);
* ``start(session)``: once the driver has prepared the parts (models wrapped, reference chosen);
* ``work(epoch, skip, window)`` → one :class:`Work` per update, lazily (an online algorithm samples inside it, from
  the policy of that update, logging into ``window``); ``skip``: loader batches of the epoch a resumed run already
  consumed;
* ``update(work, step, window)`` → :class:`Update`: one update, calling ``step`` (the driver's optimizer step)
  once or more; per-example metrics go into ``window``;
* ``evaluate(rows, window, step)``: held-out metrics of one batch of evaluation rows;
* ``state()`` / ``load_state(state)``: what the algorithm adds to a checkpoint (JSON; read after each update,
  before the next ``work`` item is drawn), ``summary()`` its entries of ``summary.json``, ``memory()`` its memory
  report, ``describe()`` its lines of the run's opening log.

``updates_per_epoch`` sizes the schedule; ``work`` may give fewer updates (DAPO's dynamic sampling reads more prompts
per update): under ``max_steps`` the driver goes on into further epochs until the run's length.

The registry's ``algorithm`` names which one a method uses (:data:`preftune.training.loop.ALGORITHMS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from preftune.training.setup import RunInputs
from preftune.training.tracking import MetricWindow


@dataclass
class Parts:
    """What an algorithm trains, and on what: ``model`` (a module whose forward the losses call; the optimizer
    holds its trainable parameters) and ``loader`` (training batches, prompts or rollouts of prompts)."""

    model: nn.Module
    loader: DataLoader


@dataclass
class Session:
    """What the driver prepared once, shared by ``train``, ``evaluate`` and ``save_model``: the inputs, the
    prepared ``policy`` (the algorithm's model, wrapped by Accelerate), optimizer, schedule and loader, the
    reference, and the run's length in updates and epochs."""

    inputs: RunInputs
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
    reference: Any
    total_steps: int
    num_epochs: int
    accelerator: Accelerator

    @property
    def model(self) -> nn.Module:
        """The trained causal LM (a PEFT model under LoRA) inside the prepared policy."""
        return self.accelerator.unwrap_model(self.policy).model


@dataclass
class Work:
    """The input of one update: ``data`` (the algorithm's: micro-batches, a rollout's prompts), ``consumed`` —
    loader batches of the epoch consumed once this update is done (a checkpoint's resume point) — and ``rows``,
    the source rows it trains on (named when a value turns non-finite)."""

    data: Any
    consumed: int
    rows: list[int] = field(default_factory=list)
    step: int = 0  # the global step this update will be (set by the driver)
    read: int | None = None  # loader batches of the epoch read so far, when more than ``consumed`` (the log's epoch)

    @property
    def progress(self) -> int:
        return self.consumed if self.read is None else self.read


@dataclass
class Update:
    """What one update reports: its first micro-batch's loss, the examples (in the algorithm's ``unit``) and
    input tokens it trained on (throughput), and entries for the next logged record (PPO's ``episode``)."""

    first_loss: float
    examples: int
    tokens: int
    record: dict[str, float] = field(default_factory=dict)


def source_rows(batches: list[dict]) -> list[int]:
    """The source rows of micro-batches that carry them (``source_rows``), for the error that names them."""
    return [row for b in batches if "source_rows" in b for row in b["source_rows"].tolist()]


# The driver's optimizer step: the micro-batches of one step, the function giving each one's loss (what goes to
# backward, which divides it by gradient_accumulation_steps however many micro-batches the step has: an algorithm
# with steps of another size weighs its losses itself, as PPO does), and the source rows (for the error that names
# them). Returns the first micro-batch's loss.
OptimizerStep = Callable[[Sequence[Any], Callable[[Any], Tensor], list[int]], float]


class Algorithm(Protocol):
    unit: str  # what *_per_second counts: pairs, samples, completions

    def prepare(self, inputs: RunInputs, accelerator: Accelerator) -> Parts: ...
    def updates_per_epoch(self, batches: int) -> int: ...
    def start(self, session: Session) -> None: ...
    def work(self, epoch: int, skip: int, window: MetricWindow) -> Iterator[Work]: ...
    def update(self, work: Work, step: OptimizerStep, window: MetricWindow) -> Update: ...
    def evaluate(self, rows: list[dict], window: MetricWindow, step: int) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    def summary(self) -> dict[str, Any]: ...
    def memory(self) -> dict: ...
    def describe(self) -> list[str]: ...
