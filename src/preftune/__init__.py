"""preftune: align causal language models with preference data (DPO and its family) on Accelerate.

The names below load on first use, so ``import preftune`` (and ``preftune --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "preftune.config",
    "build_config": "preftune.config",
    "load_config": "preftune.config",
    "PreferenceTrainer": "preftune.training.loop",
    "RunResult": "preftune.training.loop",
    "train": "preftune.training.loop",
    # TRL's trainer signatures onto the one trainer (``from trl import`` → ``from preftune import``)
    "DPOConfig": "preftune.trl",
    "DPOTrainer": "preftune.trl",
    "GRPOConfig": "preftune.trl",
    "GRPOTrainer": "preftune.trl",
    "KTOConfig": "preftune.trl",
    "KTOTrainer": "preftune.trl",
    "RLOOConfig": "preftune.trl",
    "RLOOTrainer": "preftune.trl",
    "RewardConfig": "preftune.trl",
    "RewardTrainer": "preftune.trl",
}
__all__ = ["TrainConfig", "build_config", "load_config", "PreferenceTrainer", "RunResult", "train", "DPOConfig",
           "DPOTrainer", "GRPOConfig", "GRPOTrainer", "KTOConfig", "KTOTrainer", "RLOOConfig", "RLOOTrainer",
           "RewardConfig", "RewardTrainer"]

if TYPE_CHECKING:
    from preftune.config import TrainConfig, build_config, load_config
    from preftune.training.loop import PreferenceTrainer, RunResult, train
    from preftune.trl import (
        DPOConfig,
        DPOTrainer,
        GRPOConfig,
        GRPOTrainer,
        KTOConfig,
        KTOTrainer,
        RewardConfig,
        RewardTrainer,
        RLOOConfig,
        RLOOTrainer,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'preftune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
