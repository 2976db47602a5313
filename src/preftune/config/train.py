"""The run's config: the common sections (:mod:`preftune.config.sections`) and the methods' own
(:mod:`preftune.methods.params`) as one flat set of keys, TRL's names, validated once."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from preftune.config.compat import ALIASES, from_trl_loss_type
from preftune.config.sections import (
    DataKeys,
    HubKeys,
    LoraKeys,
    ModelKeys,
    OptimizationKeys,
    OutputKeys,
    ReferenceKeys,
    SpeedKeys,
    _target_modules,
    _trackers,
)
from preftune.errors import config_error
from preftune.methods import params
from preftune.methods.params import GenerationBatchKeys, LossKeys, PPOKeys, RoundsKeys, SamplingKeys

# The sections in the order of their keys (`preftune config`, config.yaml); dataclasses take the fields of the bases
# last to first.
SECTIONS = (ModelKeys, DataKeys, LossKeys, SamplingKeys, GenerationBatchKeys, PPOKeys, RoundsKeys, ReferenceKeys,
            LoraKeys, OptimizationKeys, SpeedKeys, OutputKeys, HubKeys)


@dataclass
class TrainConfig(*reversed(SECTIONS)):
    """Every key of a run. A loss hyper-parameter left at ``None`` takes the chosen method's default from the
    registry; a speed or precision choice left at ``None`` is made by the run for the model and the machine
    (:class:`preftune.config.Resolved`) and never written back here."""

    def validate(self) -> TrainConfig:
        """Check every value and combination; normalise ``report_to`` and ``lora_target_modules`` in place."""
        self.check_methods()
        self.check_loss_weights()
        for key, limits in {**_common_ranges(), **params.method_ranges(self)}.items():
            limits.check(key, getattr(self, key))
        self.check_length_and_precision()
        self.check_lengths()
        self.check_reference()
        self.check_unused_hparams()
        self.check_quantization()
        self.check_optimizer()
        self.check_optimizer_in_backward()
        self.check_chat_template()
        self.check_hub()
        params.check_method_keys(self)
        self.lora_target_modules = _target_modules(self.lora_target_modules)
        self.report_to = _trackers(self.report_to)
        self.check_scheduler()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every key and value, except ``hub_token`` (a secret: config.yaml, fingerprints and trackers never see it)."""
        values = dataclasses.asdict(self)
        values["hub_token"] = None
        return values

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _common_ranges() -> dict:
    return {key: limits for section in SECTIONS if section.__module__ == ModelKeys.__module__
            for key, limits in section.RANGES.items()}


def _accept_aliases(init: Callable[..., None]) -> Callable[..., None]:
    """``TrainConfig(loss_type="ipo", model=...)`` as the CLI and YAML accept them (constructor only: the
    fields keep one name each, so ``dataclasses.replace`` and ``config.yaml`` see ``method``)."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for alias, name in ALIASES.items():
            if alias not in kwargs:
                continue
            if name in kwargs and kwargs[name] != kwargs[alias]:
                raise config_error((alias, name), f"both {alias}={kwargs[alias]!r} and {name}={kwargs[name]!r} are "
                                   f"given; {alias} is another name for {name}: give one")
            kwargs[name] = kwargs.pop(alias) if alias != "loss_type" else from_trl_loss_type(kwargs.pop(alias))
        init(self, *args, **kwargs)

    return __init__


TrainConfig.__init__ = _accept_aliases(TrainConfig.__init__)
