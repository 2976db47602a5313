"""preftune: align causal language models with preference data (DPO and its family) on Accelerate."""

from preftune.config import TrainConfig, build_config, load_config
from preftune.training.loop import PreferenceTrainer, RunResult, train

__all__ = ["TrainConfig", "build_config", "load_config", "PreferenceTrainer", "RunResult", "train"]
__version__ = "0.1.0"
