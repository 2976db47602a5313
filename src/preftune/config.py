"""One typed configuration for a run: YAML file + ``key=value`` overrides, validated once.

Names follow TRL's ``DPOConfig`` / ``TrainingArguments`` where a user would know them. A loss
hyper-parameter left at ``None`` takes the chosen method's default from the registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from preftune.errors import ConfigError
from preftune.methods.registry import METHODS, get_method, run_data

# Accepted for familiarity; mapped onto our own names.
ALIASES = {"loss_type": "method", "model": "model_name_or_path", "ref_model": "ref_model_name_or_path"}


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------
    model_name_or_path: str | None = None  # None: the embedded tiny Llama (see preftune.modeling.tiny)
    tokenizer_name_or_path: str | None = None
    ref_model_name_or_path: str | None = None  # explicit reference checkpoint
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # weights as loaded
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    # --- data --------------------------------------------------------------------------------------
    dataset: str | None = None  # file, saved datasets folder or Hub name; None: the built-in pairs
    dataset_split: str = "train"
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_split_size: float = 0.0  # fraction of train held out when no eval_dataset is given
    skip_invalid_rows: bool = False
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    # --- method ------------------------------------------------------------------------------------
    method: str | list[str] = "dpo"
    loss_weights: list[float] | None = None
    beta: float | None = None
    label_smoothing: float | None = None
    simpo_gamma: float | None = None
    cpo_alpha: float | None = None
    rpo_alpha: float | None = None
    dpop_lambda: float | None = None
    slic_lambda: float | None = None
    center_rewards_coefficient: float | None = None  # reward modelling
    unlikelihood_alpha: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    ld_alpha: float | None = None  # LD-DPO: weight of tokens past the shorter completion
    use_weighting: bool = False  # WPO
    # --- reference ---------------------------------------------------------------------------------
    precompute_ref_log_probs: bool | None = None  # None: precompute whenever the reference is fixed
    sync_ref_model: bool = False  # TR-DPO
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # --- LoRA --------------------------------------------------------------------------------------
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    save_merged_model: bool = False
    # --- optimisation ------------------------------------------------------------------------------
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    optim: Literal["adamw", "rmsprop"] = "adamw"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # None: bf16 autocast where the hardware has it natively (training.loop.resolve_precision)
    fp16: bool = False
    seed: int = 42
    logprob_chunk_size: int = 256  # LM-head positions per chunk: 256 was fastest and lightest on CPU
    # --- speed (None: the fastest correct choice for the model, logged at start) -----------------------
    prefix_sharing: bool | None = None  # prompt encoded once, chosen and rejected branch from it
    padding_free: bool | None = None  # several pairs packed per row, no padding between them
    fused_mlp: bool | None = None  # gated MLPs keep 2 of their 4 activations for backward (modeling.fused_mlp)
    group_by_length: bool = False  # batches of similar length (less padding when padding_free is off)
    # Training micro-batches of as many examples as fit in this many tokens (prompt counted once, per device);
    # per_device_train_batch_size is then ignored for training. Steadier memory and step time; the batches are
    # length-grouped already, so group_by_length has no further effect.
    max_tokens_per_batch: int | None = None
    # --- logging and checkpoints -------------------------------------------------------------------
    output_dir: str = "runs/preftune"
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only
    save_steps: int | None = None  # None: checkpoint at the end only
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | bool | None = None  # True: the latest checkpoint in output_dir
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb, mlflow, trackio …
    run_name: str | None = None
    disable_tqdm: bool = False
    cache_dir: str | None = None  # tokenization and reference caches; default ~/.cache/preftune

    # ------------------------------------------------------------------------------------------------
    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def loss_hparams(self) -> dict[str, float]:
        """Hyper-parameters given by the user (method defaults fill the rest in the registry)."""
        names = {n for m in self.methods for n in get_method(m).hparams}
        return {n: getattr(self, n) for n in sorted(names) if getattr(self, n) is not None}

    def validate(self) -> TrainConfig:
        for name in self.methods:
            get_method(name)
        try:
            run_data(self.methods)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if len({get_method(m).model for m in self.methods}) > 1:
            raise ConfigError(f"methods {self.methods} train different models (a reward head and a causal LM)")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.methods):
            raise ConfigError(
                f"loss_weights has {len(self.loss_weights)} entries but method lists {len(self.methods)}"
            )
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are exclusive; pick one")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")
        if not 0.0 <= self.eval_split_size < 1.0:
            raise ConfigError(f"eval_split_size must be in [0, 1), got {self.eval_split_size}")
        if self.max_length is not None and self.max_prompt_length is not None:
            if self.max_prompt_length >= self.max_length:
                raise ConfigError(
                    f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
                )
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ConfigError("sync_ref_model (TR-DPO) moves the reference; it cannot be precomputed")
        if self.sync_ref_model and self.use_peft and self.ref_model_name_or_path is None:
            raise ConfigError("sync_ref_model needs a reference model; under LoRA set ref_model_name_or_path")
        for n in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                  "logging_steps", "logprob_chunk_size"):
            if getattr(self, n) < 1:
                raise ConfigError(f"{n} must be >= 1, got {getattr(self, n)}")
        unpaired = any(get_method(m).data == "unpaired" for m in self.methods)
        if unpaired and self.per_device_train_batch_size < 2:
            raise ConfigError("KTO estimates its KL term from mismatched pairs: per_device_train_batch_size >= 2")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ConfigError(f"max_tokens_per_batch must be >= 1, got {self.max_tokens_per_batch}")
        if unpaired and self.max_tokens_per_batch is not None:
            raise ConfigError("KTO estimates its KL term from mismatched pairs and needs >= 2 examples per batch, "
                              "which a token budget cannot guarantee: unset max_tokens_per_batch")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _union_members(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _as(option: Any, value: Any) -> tuple[bool, Any]:
    """Try to read ``value`` as type ``option``; ``(ok, converted)``."""
    if option is type(None):
        return value is None, None
    if option is bool:
        return isinstance(value, bool), value
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if option is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value or 0)
    if option is str:
        return isinstance(value, str), value
    if typing.get_origin(option) is Literal:
        return value in typing.get_args(option), value
    if typing.get_origin(option) is list and isinstance(value, list):
        (item,) = typing.get_args(option)
        converted = [_as(item, v) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    return False, None


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or say what was expected."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if name == "report_to" and isinstance(value, str):
        value = [] if value in ("none", "") else [v.strip() for v in value.split(",")]
    for option in _union_members(hint):
        ok, converted = _as(option, value)
        if ok:
            return converted
    raise ConfigError(f"config key '{name}': expected {hint}, got {value!r} ({type(value).__name__})")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Validate a mapping of keys to values into a :class:`TrainConfig` (unknown keys suggest the closest)."""
    kwargs = {}
    for key, value in values.items():
        key = ALIASES.get(key, key)
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'.{hint}")
        kwargs[key] = _coerce(key, value)
    return TrainConfig(**kwargs).validate()


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (optional), apply ``key=value`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    for text in overrides:
        key, value = _parse_override(text)
        values[key] = value
    return build_config(values)


__all__ = ["TrainConfig", "ConfigError", "build_config", "load_config", "METHODS"]
