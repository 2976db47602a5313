"""TRL's trainer signatures as entry points onto preftune's one trainer.

A TRL script runs with its import line changed (``from trl import DPOConfig, DPOTrainer`` → ``from preftune import
DPOConfig, DPOTrainer``)::

    training_args = DPOConfig(output_dir="Qwen2-0.5B-DPO")
    trainer = DPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
    trainer.train()

* ``DPOConfig``, ``GRPOConfig``, ``RLOOConfig``, ``KTOConfig`` and ``RewardConfig`` are :class:`TrainConfig` with the
  method set; they accept TRL's and transformers' field names through the same mapping as YAML
  (:data:`preftune.config.ALIASES`, :data:`preftune.config.TRL_KEYS`) and refuse a field preftune cannot honour with
  what to write instead (``use_vllm=True``, ``fsdp="full_shard"``, ``deepspeed="ds.json"`` …).
* ``DPOTrainer``, ``GRPOTrainer``, ``RLOOTrainer``, ``KTOTrainer`` and ``RewardTrainer`` are
  :class:`PreferenceTrainer` with TRL's arguments: ``model`` (a model or its name / folder), ``ref_model``,
  ``args``, ``train_dataset``, ``eval_dataset``, ``processing_class`` (the tokenizer), ``peft_config`` (a
  ``peft.LoraConfig``), ``callbacks`` (``transformers.TrainerCallback`` objects work), and for GRPO / RLOO
  ``reward_funcs``.

Where TRL's meaning differs, the config records preftune's: GRPO's and RLOO's ``per_device_train_batch_size``
(and ``generation_batch_size``) count completions in TRL (a multiple of ``num_generations``) and prompts in preftune,
so ``GRPOConfig`` divides them.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from preftune.config import FIELDS, TrainConfig, build_config
from preftune.errors import ConfigError
from preftune.methods.registry import get_method
from preftune.training.loop import PreferenceTrainer

RewardFunc = Callable[..., Sequence[float | None]]


class _TrlConfig(TrainConfig):
    """A :class:`TrainConfig` built from TRL's keyword arguments for one trainer's method."""

    method_name = "dpo"

    def __init__(self, output_dir: str | None = None, **kwargs: Any):
        if output_dir is not None:  # TRL's configs take it first, positionally too
            kwargs["output_dir"] = output_dir
        values = self._translate(dict(kwargs))
        if "method" not in values and "loss_type" not in values:
            values["method"] = self.method_name
        try:
            built = build_config(values)
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: {err}") from None
        self.__dict__.update(built.__dict__)

    def _translate(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """TRL's fields whose meaning differs for this trainer, as preftune's (the YAML mapping does the rest)."""
        return kwargs


class DPOConfig(_TrlConfig):
    """TRL's ``DPOConfig``: ``loss_type`` names the method (``sigmoid`` → dpo, ``ipo``, ``hinge`` …)."""

    method_name = "dpo"


class KTOConfig(_TrlConfig):
    """TRL's ``KTOConfig`` (``loss_type="kto"``)."""

    method_name = "kto"


class RewardConfig(_TrlConfig):
    """TRL's ``RewardConfig``: a Bradley–Terry reward model on a sequence-classification head."""

    method_name = "reward"


class GRPOConfig(_TrlConfig):
    """TRL's ``GRPOConfig``. ``loss_type`` is GRPO's token averaging (``grpo``, ``dr_grpo``, ``dapo``: preftune's
    ``grpo_loss_type``); ``reward_weights`` weigh ``GRPOTrainer``'s reward functions; ``per_device_train_batch_size``
    counts completions as in TRL (a multiple of ``num_generations``) and is stored as prompts."""

    method_name = "grpo"
    reward_weights: list[float] | None = None

    def _translate(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        weights = kwargs.pop("reward_weights", None)
        if "loss_type" in kwargs:
            loss_type = kwargs.pop("loss_type")
            if loss_type not in ("grpo", "dr_grpo", "dapo"):
                raise ConfigError(f"{type(self).__name__}: loss_type={loss_type!r} is not implemented; preftune "
                                  "averages GRPO's token losses as 'grpo', 'dr_grpo' or 'dapo'")
            kwargs["grpo_loss_type"] = loss_type
        self._prompts_per_batch(kwargs)
        self.reward_weights = None if weights is None else [float(w) for w in weights]
        return kwargs

    def _prompts_per_batch(self, kwargs: dict[str, Any]) -> None:
        """TRL's batch sizes count completions; preftune's count prompts (each with its num_generations samples)."""
        generations = kwargs.get("num_generations") or get_method(self.method_name).num_generations
        for key in ("per_device_train_batch_size", "generation_batch_size"):
            completions = kwargs.get(key, FIELDS[key].default)
            if not isinstance(completions, int) or isinstance(completions, bool):
                continue  # unset, or a type error build_config names
            if completions % generations:
                raise ConfigError(f"{type(self).__name__}: {key}={completions} counts completions (TRL's meaning) "
                                  f"and preftune samples num_generations={generations} completions of each prompt "
                                  "within one micro-batch: give a multiple of num_generations")
            kwargs[key] = completions // generations


class RLOOConfig(GRPOConfig):
    """TRL's ``RLOOConfig``: as :class:`GRPOConfig`, with RLOO's leave-one-out baseline."""

    method_name = "rloo"


# Trainer arguments of TRL / transformers that preftune has no use for: what to do instead.
_UNSUPPORTED = {
    "data_collator": "preftune builds its own batches (padded, prefix-shared or packed); remove data_collator",
    "compute_metrics": "preftune logs TRL's metrics (rewards/*, logps/*, eval_*); add your own with a callback's "
                       "on_evaluate, or score a run with `preftune eval`",
    "optimizers": "set optim, learning_rate, lr_scheduler_type and warmup_ratio in the config",
    "optimizer_cls_and_kwargs": "set optim (transformers' names, e.g. adamw_torch, paged_adamw_8bit) in the config",
    "preprocess_logits_for_metrics": "log-probs are computed without materialising logits; remove it",
    "model_init": "pass the model itself, or its name as model=",
    "reward_processing_classes": "reward models score with their own tokenizer: pass the reward model's folder in "
                                 "reward_funcs",
    "model_adapter_name": "preftune trains one adapter; remove it",
    "ref_adapter_name": "under LoRA the reference is the policy with its adapters disabled; remove it",
}


def _refuse_unsupported(trainer: str, given: dict[str, Any]) -> None:
    for name, value in given.items():
        if name not in _UNSUPPORTED:
            raise ConfigError(f"{trainer}: unexpected argument {name!r}; TRL's arguments are model, ref_model, args, "
                              "train_dataset, eval_dataset, processing_class, peft_config, callbacks (and "
                              "reward_funcs for GRPO / RLOO)")
        if value is None or (name == "optimizers" and tuple(value) == (None, None)):
            continue
        raise ConfigError(f"{trainer}: {name}= has no preftune equivalent: {_UNSUPPORTED[name]}")


def lora_keys(peft_config: Any) -> dict[str, Any]:
    """A ``peft.LoraConfig`` as config keys: ``use_peft``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules``; its options preftune lacks (rsLoRA, DoRA, modules_to_save, a trained bias) are
    refused by name."""
    if type(peft_config).__name__ != "LoraConfig":
        raise ConfigError(f"peft_config: preftune trains LoRA adapters; give a peft.LoraConfig, not "
                          f"{type(peft_config).__name__}")
    keys: dict[str, Any] = {"use_peft": True, "lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
                            "lora_dropout": peft_config.lora_dropout}
    targets = peft_config.target_modules
    if targets is not None:  # None: PEFT's default per architecture; preftune's is every linear layer
        keys["lora_target_modules"] = targets if isinstance(targets, str) else sorted(targets)
    # Options preftune does not implement: passed under TRL's key names, which say what to do instead.
    for option, key in (("use_rslora", "use_rslora"), ("use_dora", "use_dora"),
                        ("modules_to_save", "lora_modules_to_save")):
        if getattr(peft_config, option, None):
            keys[key] = getattr(peft_config, option)
    if getattr(peft_config, "bias", "none") != "none":
        raise ConfigError(f"peft_config: bias={peft_config.bias!r} is not supported (LoRA matrices only); use "
                          "bias='none'")
    return keys


def reward_judge(reward_funcs: RewardFunc | Sequence[RewardFunc], weights: Sequence[float] | None
                 ) -> Callable[[list, list], list[float]]:
    """TRL's reward functions as one judge: ``Σ_i w_i · f_i(prompts=…, completions=…)`` per completion, a ``None``
    score of one function (not applicable to that completion) left out of the sum, as TRL's nansum does; the
    weights default to 1."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ConfigError(f"reward_weights has {len(weights)} weights for {len(funcs)} reward functions: give one "
                          "weight per function")

    for func in funcs:  # refused now rather than at the first sample: TRL passes dataset columns, preftune does not
        try:
            inspect.signature(func).bind(prompts=[], completions=[])
        except TypeError as err:
            raise ConfigError(f"reward function {_name(func)}: {err}; preftune calls it with prompts= and "
                              "completions= only (dataset columns are not passed): give the others defaults, or "
                              "take **kwargs") from None

    def judge(prompts: list, completions: list) -> list[float]:
        total = [0.0] * len(completions)
        for func, weight in zip(funcs, weights):
            scores = list(func(prompts=prompts, completions=completions))
            if len(scores) != len(completions):
                raise ConfigError(f"reward function {_name(func)} returned {len(scores)} scores for "
                                  f"{len(completions)} completions: return one per completion")
            total = [t + weight * s if s is not None and not math.isnan(s) else t for t, s in zip(total, scores)]
        return total

    judge.__qualname__ = "+".join(_name(f) for f in funcs)
    return judge


class _TrlTrainer(PreferenceTrainer):
    """TRL's trainer arguments onto :class:`PreferenceTrainer`; ``args`` is the config as the user gave it."""

    config_class: type[_TrlConfig] = DPOConfig

    def _setup(self, model: Any, ref_model: Any, args: TrainConfig | None, train_dataset: Any, eval_dataset: Any,
               processing_class: Any, peft_config: Any, callbacks: list | None, judge: Any = None,
               **unsupported: Any) -> None:
        trainer = type(self).__name__
        _refuse_unsupported(trainer, unsupported)
        if args is None:
            args = self.config_class()
        if isinstance(args, _TrlConfig) and type(args) is not self.config_class:
            raise ConfigError(f"{trainer}: args is a {type(args).__name__}; give a {self.config_class.__name__}")
        if not isinstance(args, TrainConfig):
            raise ConfigError(f"{trainer}: args must be a {self.config_class.__name__} (TRL's field names), got "
                              f"{type(args).__name__}")
        self.args = args
        # A plain TrainConfig holding the user's values (and whatever they set on args after building it).
        values = {name: getattr(args, name) for name in FIELDS}
        if isinstance(model, str):
            values["model_name_or_path"], model = model, None
        if isinstance(ref_model, str):
            values["ref_model_name_or_path"], ref_model = ref_model, None
        if model is not None and processing_class is None and not values["tokenizer_name_or_path"]:
            name = getattr(model, "name_or_path", "")  # TRL loads the model's own tokenizer
            if not name:
                raise ConfigError(f"{trainer}: the model was given without processing_class and has no name to load "
                                  "its tokenizer from; pass processing_class=tokenizer")
            values["tokenizer_name_or_path"] = name
        if peft_config is not None:
            try:  # validated as config keys: the options preftune lacks are refused with TRL's key names
                lora = build_config(lora_keys(peft_config))
            except ConfigError as err:
                raise ConfigError(f"{trainer}: peft_config: {err}") from None
            values |= {k: getattr(lora, k) for k in ("use_peft", "lora_r", "lora_alpha", "lora_dropout",
                                                     "lora_target_modules")}
        self.processing_class = processing_class
        super().__init__(TrainConfig(**values), model=model, ref_model=ref_model, tokenizer=processing_class,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=list(callbacks or ()),
                         judge=judge)


class DPOTrainer(_TrlTrainer):
    """TRL's ``DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset, eval_dataset,
    processing_class, peft_config, callbacks)`` on preftune's trainer."""

    config_class = DPOConfig

    def __init__(self, model: Any = None, ref_model: Any = None, args: TrainConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_metrics: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), optimizer_cls_and_kwargs: Any = None,
                 preprocess_logits_for_metrics: Any = None, peft_config: Any = None, **kwargs: Any):
        self._setup(model, ref_model, args, train_dataset, eval_dataset, processing_class, peft_config, callbacks,
                    data_collator=data_collator, compute_metrics=compute_metrics, optimizers=optimizers,
                    optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                    preprocess_logits_for_metrics=preprocess_logits_for_metrics, **kwargs)


class KTOTrainer(DPOTrainer):
    """TRL's ``KTOTrainer``: DPOTrainer's arguments, unpaired data (``prompt``, ``completion``, ``label``)."""

    config_class = KTOConfig


class RewardTrainer(_TrlTrainer):
    """TRL's ``RewardTrainer(model, args=RewardConfig(...), train_dataset, eval_dataset, processing_class,
    peft_config, callbacks)``: a reward model trained on preference pairs."""

    config_class = RewardConfig

    def __init__(self, model: Any = None, args: TrainConfig | None = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 compute_metrics: Any = None, callbacks: list | None = None, optimizers: tuple = (None, None),
                 preprocess_logits_for_metrics: Any = None, peft_config: Any = None, **kwargs: Any):
        self._setup(model, None, args, train_dataset, eval_dataset, processing_class, peft_config, callbacks,
                    data_collator=data_collator, compute_metrics=compute_metrics, optimizers=optimizers,
                    preprocess_logits_for_metrics=preprocess_logits_for_metrics, **kwargs)


class GRPOTrainer(_TrlTrainer):
    """TRL's ``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset, eval_dataset, processing_class,
    callbacks, peft_config)``. ``reward_funcs``: a function ``f(prompts, completions, **kwargs) -> list[float]``, a
    list of them (summed with ``args.reward_weights``), or one reward model's folder."""

    config_class = GRPOConfig

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: TrainConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), peft_config: Any = None, **kwargs: Any):
        args = self.config_class() if args is None else args
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        judge = None
        if reward_funcs is None or not funcs:
            raise ConfigError(f"{type(self).__name__}: give reward_funcs: a function (prompts, completions, **kwargs) "
                              "-> list[float], a list of them, or a reward model's folder")
        if any(isinstance(f, nn.Module) for f in funcs):
            raise ConfigError(f"{type(self).__name__}: reward_funcs holds a model object; save it with its tokenizer "
                              "(model.save_pretrained(folder), tokenizer.save_pretrained(folder)) and pass the folder")
        if len(funcs) == 1 and isinstance(funcs[0], str):
            args = _with(args, judge=funcs[0])  # a reward model's folder (or name) is one kind of judge
        elif all(callable(f) for f in funcs):
            judge = reward_judge(funcs, getattr(args, "reward_weights", None))
        else:
            raise ConfigError(f"{type(self).__name__}: reward_funcs gives reward models among functions (or several "
                              "models); give one reward model's folder, or functions only (a function may call a "
                              "reward model itself)")
        self._setup(model, None, args, train_dataset, eval_dataset, processing_class, peft_config, callbacks,
                    judge=judge, reward_processing_classes=reward_processing_classes, optimizers=optimizers, **kwargs)


class RLOOTrainer(GRPOTrainer):
    """TRL's ``RLOOTrainer``: GRPOTrainer's arguments, RLOO's leave-one-out baseline."""

    config_class = RLOOConfig


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or repr(func)


def _with(args: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``args`` with ``changes`` (the user's object is left as given)."""
    copied = copy.copy(args)
    copied.__dict__.update(changes)
    return copied


__all__ = ["DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "KTOConfig", "KTOTrainer", "RLOOConfig",
           "RLOOTrainer", "RewardConfig", "RewardTrainer", "lora_keys", "reward_judge"]
