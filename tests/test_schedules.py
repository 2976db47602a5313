"""preftune's learning-rate schedules equal transformers' step by step, for every name, and the config refuses what
would not build."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from preftune import schedules
from preftune.config import build_config
from preftune.errors import ConfigError

# (name, lr_scheduler_kwargs): every schedule at its defaults and with each keyword moved off its default.
CASES = [
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}),
    ("polynomial", {"lr_end": 1e-4, "power": 2.0}),
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 2e-4, "num_cycles": 0.75}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-4, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 8}),
    ("warmup_stable_decay", {"num_decay_steps": 6, "num_stable_steps": 10, "warmup_type": "cosine",
                             "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 5, "warmup_type": "1-sqrt", "decay_type": "linear",
                             "min_lr_ratio": 0.05, "num_cycles": 1.0}),
]


def _learning_rates(make, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = make(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(("warmup", "total"), [(0, 30), (5, 30), (1, 7)])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_every_schedule_equals_transformers_at_every_step(name, kwargs, warmup, total):
    wsd = name == "warmup_stable_decay"
    if wsd and "num_stable_steps" not in kwargs and warmup + kwargs["num_decay_steps"] > total:
        pytest.skip("transformers would hold for a negative number of steps")
    # transformers warns that num_stable_steps wins over num_training_steps (it does in both)
    with pytest.warns(UserWarning) if wsd and "num_stable_steps" in kwargs else _nothing():
        theirs = _learning_rates(lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup,
                                                           num_training_steps=total,
                                                           scheduler_specific_kwargs=dict(kwargs)), total + 3)
    ours = _learning_rates(lambda opt: schedules.build_scheduler(name, opt, warmup, total, dict(kwargs)), total + 3)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-18)
    assert len(set(ours)) > 1 or name.startswith("constant")  # the rate moves: a flat line would prove little


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_config_knows_every_schedule_transformers_knows():
    from transformers.trainer_utils import SchedulerType

    from preftune.config import METRIC_SCHEDULERS

    assert {t.value for t in SchedulerType} == {*schedules.SCHEDULES, *METRIC_SCHEDULERS}
    assert {name for name, _ in CASES} == set(schedules.SCHEDULES)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 4, "decay_type": "exp"}},
     "decay_type must be one of linear, cosine, 1-sqrt, got 'exp'"),
    ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"lr_end": 1e-3}, "learning_rate": 1e-4},
     r"lr_end \(0.001\) must be below learning_rate \(0.0001\)"),
    ({"lr_scheduler_type": "polynomial", "learning_rate": 1e-8},  # the default lr_end, 1e-7, is above it
     r"lr_end \(1e-07\) must be below learning_rate \(1e-08\)"),
    ({"lr_scheduler_type": "cosine_warmup_with_min_lr", "lr_scheduler_kwargs": {"warmup_lr_rate": 0.1}},
     "exactly one of min_lr"),
])
def test_values_transformers_would_refuse_when_building_are_refused_by_the_config(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config(kwargs)
    assert "lr_scheduler_kwargs" in info.value.config_keys


def test_a_training_process_does_not_import_transformers_trainer_utils():
    import subprocess
    import sys

    code = ("import sys, preftune.training.loop, preftune.training.ppo; "
            "print(sorted(m for m in ('transformers.trainer_utils', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
