"""Learning-rate schedules by name: the factor the base learning rate is multiplied by at each scheduler step.

The names and keyword arguments are transformers' ``SchedulerType`` schedules (``lr_scheduler_type`` and
``lr_scheduler_kwargs`` as a TRL user writes them) and the factors equal theirs step by step (the tests compare
every name). They live here so that a training process never imports ``transformers.trainer_utils``, which brings
PEFT, bitsandbytes and part of torch's compiler with it: 52 MiB of resident memory and ≈ 3.6 s of start-up on a
2-core machine.

Every schedule is ``factor(step, *, warmup, total, base_lr, **kwargs) -> float``, ``step`` counting from 0 and
``warmup``, ``total`` in scheduler steps. All but ``constant`` and ``cosine_warmup_with_min_lr`` warm up linearly,
``step / max(1, warmup)``; after the warm-up ``p = (step − warmup) / max(1, total − warmup)`` is the progress.

This module imports torch only to build a scheduler (the config validates names and keywords without it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

# The schedules' own arguments: set by the loop, never by lr_scheduler_kwargs.
OWN_ARGUMENTS = ("step", "warmup", "total", "base_lr")


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _progress(step: int, warmup: int, total: int) -> float:
    return (step - warmup) / max(1, total - warmup)


def _half_cosine(progress: float, num_cycles: float) -> float:
    """``½ (1 + cos(2π · num_cycles · p))``: from 1 down to 0 over ``p ∈ [0, 1]`` at the default half cycle."""
    return 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))


def _min_rate(base_lr: float, min_lr: float | None, min_lr_rate: float | None) -> float:
    return min_lr / base_lr if min_lr is not None else min_lr_rate


def linear(step: int, *, warmup: int, total: int, base_lr: float) -> float:
    """Linear warm-up, then linear decay to 0 at ``total``."""
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine(step: int, *, warmup: int, total: int, base_lr: float, num_cycles: float = 0.5) -> float:
    """Linear warm-up, then ``½ (1 + cos(2π · num_cycles · p))``."""
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, _half_cosine(_progress(step, warmup, total), num_cycles))


def cosine_with_restarts(step: int, *, warmup: int, total: int, base_lr: float, num_cycles: int = 1) -> float:
    """Linear warm-up, then ``num_cycles`` hard restarts of ``½ (1 + cos(π · (num_cycles · p mod 1)))``; 0 from
    ``total`` on."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = _progress(step, warmup, total)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def polynomial(step: int, *, warmup: int, total: int, base_lr: float, lr_end: float = 1e-7,
               power: float = 1.0) -> float:
    """Linear warm-up, then ``((lr − lr_end) · (1 − p)^power + lr_end) / lr``; ``lr_end / lr`` after ``total``."""
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / base_lr
    return ((base_lr - lr_end) * (1 - _progress(step, warmup, total)) ** power + lr_end) / base_lr


def constant(step: int, *, warmup: int, total: int, base_lr: float) -> float:
    """1 from the first step (no warm-up, as in transformers: use ``constant_with_warmup`` for one)."""
    return 1.0


def constant_with_warmup(step: int, *, warmup: int, total: int, base_lr: float) -> float:
    """Linear warm-up, then 1."""
    return _warmup(step, warmup) if step < warmup else 1.0


def inverse_sqrt(step: int, *, warmup: int, total: int, base_lr: float, timescale: int | None = None) -> float:
    """Linear warm-up, then ``1 / √((step + timescale − warmup) / timescale)`` (``timescale``: the warm-up length,
    or 10 000 without one)."""
    if step < warmup:
        return _warmup(step, warmup)
    if timescale is None:
        timescale = warmup or 10_000
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def cosine_with_min_lr(step: int, *, warmup: int, total: int, base_lr: float, num_cycles: float = 0.5,
                       min_lr: float | None = None, min_lr_rate: float | None = None) -> float:
    """``cosine`` decaying to ``m = min_lr_rate`` (or ``min_lr / lr``) instead of 0: ``c · (1 − m) + m``."""
    if step < warmup:
        return _warmup(step, warmup)
    rate = _min_rate(base_lr, min_lr, min_lr_rate)
    return max(0.0, _half_cosine(_progress(step, warmup, total), num_cycles) * (1 - rate) + rate)


def cosine_warmup_with_min_lr(step: int, *, warmup: int, total: int, base_lr: float, num_cycles: float = 0.5,
                              min_lr: float | None = None, min_lr_rate: float | None = None,
                              warmup_lr_rate: float | None = None) -> float:
    """``cosine_with_min_lr`` whose warm-up starts at ``warmup_lr_rate`` (``w + (1 − w) · step / (warmup − 1)``;
    without one, ``(step + 1) / warmup``) and whose decay counts ``p`` from one step later."""
    if step < warmup:
        if warmup_lr_rate is None:
            return (step + 1.0) / max(1, warmup)
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * step / max(1, warmup - 1)
    rate = _min_rate(base_lr, min_lr, min_lr_rate)
    progress = (step - warmup + 1.0) / max(1, total - warmup)
    return max(0.0, _half_cosine(progress, num_cycles) * (1 - rate) + rate)


_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_stable_decay(step: int, *, warmup: int, total: int, base_lr: float, num_decay_steps: int,
                        num_stable_steps: int | None = None, warmup_type: str = "linear", decay_type: str = "cosine",
                        min_lr_ratio: float = 0.0, num_cycles: float = 0.5) -> float:
    """Warm up from ``m = min_lr_ratio`` to 1, hold, decay back to ``m`` over ``num_decay_steps``, then stay at
    ``m``. The hold lasts ``num_stable_steps``, or what ``total`` leaves of it. Warm-up shapes of its progress
    ``q``: linear ``q``, cosine ``½ (1 − cos πq)``, 1-sqrt ``1 − √(1 − q)``; decay shapes: linear ``1 − q``, cosine
    ``½ (1 + cos(2π · num_cycles · q))``, 1-sqrt ``1 − √q``; each scaled to ``f · (1 − m) + m``."""
    m = min_lr_ratio
    stable = num_stable_steps if num_stable_steps is not None else total - warmup - num_decay_steps
    if step < warmup:
        q = step / max(1, warmup)
        shaped = {"linear": q, "cosine": 0.5 * (1.0 - math.cos(math.pi * q)), "1-sqrt": 1.0 - math.sqrt(1.0 - q)}
        return max(0.0, shaped[warmup_type] * (1.0 - m) + m)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + num_decay_steps:
        q = (step - warmup - stable) / max(1, num_decay_steps)
        shaped = {"linear": 1.0 - q, "cosine": _half_cosine(q, num_cycles), "1-sqrt": 1.0 - math.sqrt(q)}
        return max(0.0, shaped[decay_type] * (1.0 - m) + m)
    return m


SCHEDULES: dict[str, Callable[..., float]] = {f.__name__: f for f in (
    linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt,
    cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay)}


def keyword_arguments(name: str) -> dict[str, inspect.Parameter]:
    """The ``lr_scheduler_kwargs`` schedule ``name`` takes, by name (a default of ``Parameter.empty``: required)."""
    parameters = inspect.signature(SCHEDULES[name]).parameters
    return {k: p for k, p in parameters.items() if k not in OWN_ARGUMENTS}


def problems(name: str, kwargs: dict[str, Any], base_lr: float) -> str | None:
    """What building schedule ``name`` with ``kwargs`` would trip over, beyond unknown or missing keywords (which
    the config names itself); ``None`` when it would build."""
    if {"min_lr", "min_lr_rate"} <= set(keyword_arguments(name)) and ("min_lr" in kwargs) == ("min_lr_rate" in kwargs):
        return (f"lr_scheduler_type={name} needs exactly one of min_lr (an absolute learning rate) or min_lr_rate "
                "(a fraction of learning_rate) in lr_scheduler_kwargs, e.g. lr_scheduler_kwargs={min_lr_rate: 0.1}")
    given = {k: p.default for k, p in keyword_arguments(name).items()} | kwargs  # the defaults, then the user's
    for key in ("warmup_type", "decay_type") if name == "warmup_stable_decay" else ():
        if given[key] not in _SHAPES:
            return f"lr_scheduler_kwargs: {key} must be one of {', '.join(_SHAPES)}, got {given[key]!r}"
    if name == "polynomial" and not given["lr_end"] < base_lr:
        return f"lr_scheduler_kwargs: lr_end ({given['lr_end']}) must be below learning_rate ({base_lr})"
    return None


def build_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, kwargs: dict[str, Any] | None = None):
    """A ``torch.optim.lr_scheduler.LambdaLR`` over ``optimizer`` following schedule ``name``; ``base_lr`` is the
    optimizer's default learning rate."""
    from torch.optim.lr_scheduler import LambdaLR

    base_lr = optimizer.defaults["lr"]
    factor = partial(SCHEDULES[name], warmup=warmup_steps, total=total_steps, base_lr=base_lr, **(kwargs or {}))
    return LambdaLR(optimizer, factor)
