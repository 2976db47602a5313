"""``transformers.TrainerCallback`` objects on preftune's loop.

A TRL or transformers user's callback expects ``on_step_end(args, state, control, **kwargs)``; the loop's hooks are
``on_step_end(step, model)``, ``on_log(record)``, ``on_evaluate(record)`` and ``on_train_end(result)``.
:class:`TrainerCallbackAdapter` holds one such callback with the ``args`` (the run's config under its TRL names too), a
``transformers.TrainerState`` (``global_step``, ``epoch``, ``max_steps``, ``log_history``) and a
``transformers.TrainerControl``, and calls it with the keyword arguments the Trainer passes (``model=``, ``logs=``,
``metrics=``). ``control.should_training_stop`` set by the callback ends the run after the current step, as in the
Trainer (the loop reads :attr:`TrainerCallbackAdapter.should_training_stop`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from torch import nn

from preftune.config import ALIASES, TrainConfig
from preftune.metric_names import STEP


def trainer_args(cfg: TrainConfig) -> types.SimpleNamespace:
    """The run's config as the ``args`` a TrainerCallback reads: every key, under TRL's names too
    (``torch_dtype``, ``dataset_name``, ``loss_type`` …)."""
    values = cfg.to_dict()
    values |= {alias: values[name] for alias, name in ALIASES.items() if name in values}
    values["loss_type"] = cfg.method
    return types.SimpleNamespace(**values)


class TrainerCallbackAdapter:
    """One ``transformers.TrainerCallback`` behind the loop's hooks."""

    def __init__(self, callback: Any, cfg: TrainConfig, is_main_process: bool = True):
        from transformers import TrainerControl, TrainerState

        self.callback = callback
        self.args = trainer_args(cfg)
        self.state = TrainerState(max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
                                  eval_steps=cfg.eval_steps, save_steps=cfg.save_steps,
                                  train_batch_size=cfg.per_device_train_batch_size,
                                  num_train_epochs=cfg.num_train_epochs, is_local_process_zero=is_main_process,
                                  is_world_process_zero=is_main_process)
        self.control = TrainerControl()
        self.model: nn.Module | None = None
        self.began = False

    @property
    def should_training_stop(self) -> bool:
        return bool(self.control.should_training_stop)

    def _call(self, event: str, **kwargs: Any) -> None:
        returned = getattr(self.callback, event)(self.args, self.state, self.control, **kwargs)
        if isinstance(returned, type(self.control)):  # the Trainer keeps the control a callback returns
            self.control = returned

    def on_train_begin(self, max_steps: int, model: nn.Module) -> None:
        """Before the first step: ``max_steps`` is the run's length in optimizer steps (from epochs if need be)."""
        self.state.max_steps, self.model, self.began = max_steps, model, True
        self._call("on_train_begin", model=model)

    def on_step_end(self, step: int, model: nn.Module) -> None:
        if not self.began:  # a loop that announces no start (PPO's): the first step starts the run
            self.on_train_begin(self.state.max_steps, model)
        self.state.global_step, self.model = step, model
        self._call("on_step_end", model=model)

    def on_log(self, record: dict) -> None:
        logs = {k: v for k, v in record.items() if k != STEP}
        if isinstance(logs.get("epoch"), (int, float)):
            self.state.epoch = logs["epoch"]
        self.state.log_history.append({**logs, "step": record.get(STEP, self.state.global_step)})
        self._call("on_log", model=self.model, logs=logs)

    def on_evaluate(self, record: dict) -> None:
        self._call("on_evaluate", model=self.model, metrics={k: v for k, v in record.items() if k != STEP})

    def on_train_end(self, result: Any) -> None:
        self.state.global_step = result.global_step
        self._call("on_train_end", model=self.model)


def adapt_callbacks(callbacks: list, cfg: TrainConfig, is_main_process: bool = True) -> list:
    """The trainer's callbacks with every ``TrainerCallback`` (an instance, or a class as transformers accepts)
    adapted; preftune's own callbacks and plain functions as they are."""
    # A TrainerCallback exists only once its module was imported: a run without one never imports it (nor, through
    # it, transformers' trainer utilities, PEFT and bitsandbytes: 52 MiB and seconds of start-up).
    module = sys.modules.get("transformers.trainer_callback")
    if module is None:
        return list(callbacks)
    base = module.TrainerCallback
    adapted = []
    for callback in callbacks:
        if isinstance(callback, type) and issubclass(callback, base):
            callback = callback()
        if isinstance(callback, base):
            callback = TrainerCallbackAdapter(callback, cfg, is_main_process)
        adapted.append(callback)
    return adapted
