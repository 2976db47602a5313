"""One typed configuration for a run: YAML file + ``key=value`` overrides, validated once.

Names follow TRL's ``DPOConfig`` / ``TrainingArguments`` where a user would know them. The keys come in sections: the
run's common ones (:mod:`preftune.config.sections`: model, data, reference, LoRA, optimisation, speed, output, Hub)
and each method family's own, with their defaults, ranges and checks beside the registry
(:mod:`preftune.methods.params`); :class:`TrainConfig` holds them all as one flat set of keys. A loss hyper-parameter
left at ``None`` takes the chosen method's default from the registry; a choice the run makes for the model and the
machine is a :class:`Resolved`, never written back into the config.

Every value that cannot work is refused by :meth:`TrainConfig.validate` with a :class:`ConfigError` that names the key;
:func:`load_config` (:mod:`preftune.config.reading`) adds the YAML file and line the value came from. A YAML file that
gives a key twice is refused too (PyYAML would keep the last value without a word). TRL's and transformers' names are
mapped or answered in :mod:`preftune.config.compat`.

This package imports neither torch nor transformers (``preftune config`` lists the keys quickly).
"""

from preftune.config.compat import ALIASES, TRL_KEYS, TRL_LOSS_TYPES, TrlKey, from_trl_loss_type
from preftune.config.reading import build_config, load_config
from preftune.config.resolved import Resolved
from preftune.config.sections import METRIC_SCHEDULERS, OPTIMIZERS, TRACKERS, Optimizer, is_template_text
from preftune.config.train import FIELDS, SECTIONS, TrainConfig
from preftune.errors import ConfigError, shown
from preftune.methods.registry import METHODS

__all__ = ["ALIASES", "FIELDS", "METHODS", "METRIC_SCHEDULERS", "OPTIMIZERS", "SECTIONS", "TRACKERS", "TRL_KEYS",
           "TRL_LOSS_TYPES", "ConfigError", "Optimizer", "Resolved", "TrainConfig", "TrlKey", "build_config",
           "from_trl_loss_type", "is_template_text", "load_config", "shown"]
