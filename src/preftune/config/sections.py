"""The run's common sections of keys: model, data, reference, LoRA, optimisation, speed, output and the Hub; each with
its ranges and the checks of its own keys. The methods' own sections are in :mod:`preftune.methods.params`.

Checks are methods of the sections, called by :meth:`preftune.config.TrainConfig.validate` on the whole config (a
check may read another section's keys). Nothing here imports torch or transformers.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from preftune import schedules
from preftune.errors import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range, config_error, shown


@dataclass(frozen=True)
class Optimizer:
    """An optimizer by transformers' ``optim`` name: ``module.name`` built by training.loop.build_optimizer."""

    module: str
    name: str
    package: str | None = None  # what to pip install when it is not torch
    state: str = ""  # what it keeps per trainable parameter


_ADAMW = Optimizer("torch.optim", "AdamW", state="m and v in fp32: 8 bytes per parameter")
_BNB_8BIT = "m and v in 8 bits with an fp32 scale per 256 values: ≈2.03 bytes per parameter (tensors under 4096 " \
    "values keep fp32 states)"
OPTIMIZERS = {
    "adamw": _ADAMW,
    "adamw_torch": _ADAMW,
    "adamw_torch_fused": _ADAMW,
    "rmsprop": Optimizer("torch.optim", "RMSprop", state="v in fp32: 4 bytes per parameter"),
    # 8-bit states (Dettmers et al. 2022, arXiv 2110.02861). Paged states move to CPU memory under GPU memory
    # pressure; on a CPU they are the plain ones.
    "adamw_bnb_8bit": Optimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", _BNB_8BIT),
    "adamw_8bit": Optimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", _BNB_8BIT),
    "paged_adamw_8bit": Optimizer("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", _BNB_8BIT),
    "paged_adamw_32bit": Optimizer("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes",
                                   "m and v in fp32, paged: 8 bytes per parameter"),
    "adamw_torch_8bit": Optimizer("torchao.optim", "AdamW8bit", "torchao", "m and v in 8 bits (torchao)"),
    "adamw_torch_4bit": Optimizer("torchao.optim", "AdamW4bit", "torchao", "m and v in 4 bits (torchao)"),
}



# report_to names: Accelerate's trackers → (modules, any of which makes it available; the package to install).
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
}

# Schedulers that adapt the learning rate to a metric passed at every step (scheduler.step(metric)).
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")

# transformers' scheduler arguments that preftune's loop sets (a TRL user may know them from get_scheduler).
_SET_BY_THE_LOOP = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")

# lr_scheduler_kwargs counted in optimizer steps (warmup_stable_decay's phases, inverse_sqrt's time scale).
_STEP_COUNT_KWARGS = ("num_decay_steps", "num_stable_steps", "timescale")

# lora_target_modules as module names ("q_proj, v_proj"); any other string is PEFT's regex.
_MODULE_NAMES = re.compile(r"^\s*[\w.]+(\s*,\s*[\w.]+)*\s*,?\s*$")

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_template_text(value: str) -> bool:
    """Whether a ``chat_template`` value is the Jinja template itself rather than the path of a file holding it."""
    return "{%" in value or "{{" in value



@dataclass
class ModelKeys:
    """The model, how it loads, and a quantized base (QLoRA, through bitsandbytes; TRL's ModelConfig names)."""

    model_name_or_path: str | None = None  # None: the embedded tiny Llama (see preftune.modeling.tiny)
    tokenizer_name_or_path: str | None = None
    ref_model_name_or_path: str | None = None  # explicit reference checkpoint
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # weights as loaded
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    # --- quantized base (QLoRA, through bitsandbytes; TRL's ModelConfig names) ------------------------
    load_in_4bit: bool = False  # the base model's linear layers in 4 bits; LoRA adapters train on top
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"  # NormalFloat4 (QLoRA, arXiv 2305.14314) or plain FP4
    use_bnb_nested_quant: bool = False  # quantize the 4-bit blocks' scales too (QLoRA's double quantization)

    RANGES: ClassVar[dict[str, Range]] = {}

    def check_quantization(self) -> None:
        quantized = self.load_in_4bit or self.load_in_8bit
        if self.load_in_4bit and self.load_in_8bit:
            raise config_error(("load_in_4bit", "load_in_8bit"), "load_in_4bit and load_in_8bit are exclusive; "
                               "pick one")
        if not self.load_in_4bit and (self.bnb_4bit_quant_type != "nf4" or self.use_bnb_nested_quant):
            raise config_error(("bnb_4bit_quant_type", "use_bnb_nested_quant"), "bnb_4bit_quant_type and "
                               "use_bnb_nested_quant apply to a 4-bit base: set load_in_4bit: true, or remove them")
        if not quantized:
            return
        key = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
        if not self.use_peft:
            raise config_error((key, "use_peft"), f"{key}: a quantized base cannot be trained itself; QLoRA trains "
                               "LoRA adapters on top of it: set use_peft: true")
        if self.save_merged_model:
            raise config_error((key, "save_merged_model"), f"save_merged_model with {key} would merge the adapters "
                               "into rounded weights; load the base in bf16 with the adapter from final/ and "
                               "merge_and_unload there, or set save_merged_model: false")
        if not _installed("bitsandbytes"):
            raise config_error(key, f"{key} needs bitsandbytes: pip install bitsandbytes (or "
                               "pip install 'preftune[quantization]')")


@dataclass
class DataKeys:
    """The training and evaluation data and the lengths it is cut to."""

    dataset: str | None = None  # file, saved datasets folder or Hub name; None: the built-in pairs
    dataset_split: str = "train"
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_split_size: float = 0.0  # fraction of train held out when no eval_dataset is given
    skip_invalid_rows: bool = False
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    # The longest completion in tokens: training completions are cut to it (keeping their start, counted in the
    # log); online generation stops there. None: completions are bounded by max_length only (online: 256 tokens).
    max_completion_length: int | None = None
    chat_template: str | None = None  # a Jinja file, or the template itself; replaces the tokenizer's own

    RANGES: ClassVar[dict[str, Range]] = {
        "max_completion_length": Range(AT_LEAST_1, hint="; give a number of tokens, or null"),
        "max_length": Range(AT_LEAST_1, hint="; give a number of tokens, or null for no limit"),
        "max_prompt_length": Range(AT_LEAST_1, hint="; give a number of tokens, or null for no limit"),
        "eval_split_size": Range(NON_NEGATIVE, (1, False)),
    }

    @property
    def generation_budget(self) -> int:
        """The longest completion an online method samples: ``max_completion_length``, 256 tokens when unset."""
        return self.max_completion_length or 256

    def check_lengths(self) -> None:
        if self.max_length is not None and self.max_prompt_length is not None:
            if self.max_prompt_length >= self.max_length:
                raise config_error(("max_prompt_length", "max_length"), f"max_prompt_length "
                                   f"({self.max_prompt_length}) must be below max_length ({self.max_length})")

    def check_chat_template(self) -> None:
        if self.chat_template is None or is_template_text(self.chat_template):
            return
        path = Path(self.chat_template).expanduser()
        if not path.is_file():
            raise config_error("chat_template", f"chat_template: {shown(self.chat_template, quote=False)} is neither a "
                               "file nor a Jinja template; give the path of a .jinja file, or the template itself (it "
                               "holds {% … %} or {{ … }})")


@dataclass
class ReferenceKeys:
    """The reference model: precomputed log-probs, or TR-DPO's moving reference."""

    precompute_ref_log_probs: bool | None = None  # None: precompute whenever the reference is fixed
    sync_ref_model: bool = False  # TR-DPO
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # The reference model cast to this dtype, and held in memory (not precomputed): bfloat16 halves its memory and,
    # where bf16 is native, its forward time (log-probs within the tolerance the README states); None: the policy's.
    reference_dtype: Literal["float32", "bfloat16"] | None = None

    RANGES: ClassVar[dict[str, Range]] = {
        "ref_model_sync_steps": Range(AT_LEAST_1),
        "ref_model_mixup_alpha": Range(NON_NEGATIVE, (1, True)),
    }

    def check_reference(self) -> None:
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise config_error(("sync_ref_model", "precompute_ref_log_probs"),
                               "sync_ref_model (TR-DPO) moves the reference; it cannot be precomputed")
        if self.sync_ref_model and self.use_peft and self.ref_model_name_or_path is None:
            raise config_error(("sync_ref_model", "use_peft"),
                               "sync_ref_model needs a reference model; under LoRA set ref_model_name_or_path")
        if self.reference_dtype and self.precompute_ref_log_probs:
            raise config_error(("reference_dtype", "precompute_ref_log_probs"), "reference_dtype casts the reference "
                               "model a run holds; a precomputed reference is freed before training: remove one")
        if self.reference_dtype and self.use_peft and self.ref_model_name_or_path is None:
            raise config_error(("reference_dtype", "use_peft"), "under LoRA the reference is the policy with its "
                               "adapters off, in the policy's dtype: remove reference_dtype, or set "
                               "ref_model_name_or_path to hold a separate reference")


@dataclass
class LoraKeys:
    """LoRA adapters (PEFT) instead of the full weights."""

    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"  # or names ("q_proj,v_proj"), or a regex string (PEFT)
    save_merged_model: bool = False

    RANGES: ClassVar[dict[str, Range]] = {
        "lora_r": Range(AT_LEAST_1),
        "lora_alpha": Range(POSITIVE),
        "lora_dropout": Range(NON_NEGATIVE, (1, False)),
    }


@dataclass
class OptimizationKeys:
    """Optimisation: the length of the run, batches, optimizer, schedule, precision."""

    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    optim: str = "adamw"  # transformers' names: adamw_torch, adamw_8bit, paged_adamw_8bit, … (OPTIMIZERS)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"  # transformers' SchedulerType names
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {min_lr_rate: 0.1} for cosine_with_min_lr
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    # Each parameter steps inside backward as soon as its gradient is summed, which is then freed: the gradients
    # never all exist at once (−4 B/param in fp32). No clipping and no accumulation; one process (OptimizerInBackward).
    optimizer_in_backward: bool = False
    bf16: bool | None = None  # None: bf16 autocast where the hardware has it natively (config.Resolved.bf16)
    fp16: bool = False
    seed: int = 42
    logprob_chunk_size: int = 1024  # LM-head positions per chunk (its logits go through in cache-sized tiles)

    RANGES: ClassVar[dict[str, Range]] = {
        "learning_rate": Range(POSITIVE, hint="; typical values are 1e-7–1e-5 (full fine-tuning), 1e-5–1e-4 (LoRA)"),
        **{key: Range(AT_LEAST_1) for key in (
            "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "logprob_chunk_size")},
        "num_train_epochs": Range(NON_NEGATIVE),
        "warmup_ratio": Range(NON_NEGATIVE, (1, True)),
        "warmup_steps": Range(NON_NEGATIVE),
        "weight_decay": Range(NON_NEGATIVE),
        "adam_beta1": Range(NON_NEGATIVE, (1, False)),
        "adam_beta2": Range(NON_NEGATIVE, (1, False)),
        "adam_epsilon": Range(POSITIVE),
        "max_grad_norm": Range(POSITIVE, hint="; gradients are always clipped to this norm (0 would zero them): use a "
                               "large value such as 1e9 to leave them unclipped"),
        "seed": Range(NON_NEGATIVE, (2**32 - 1, True), " (numpy's seed range)"),
    }

    def check_optimizer_in_backward(self) -> None:
        """What a step inside backward cannot do: clip to a global norm no hook knows yet, sum gradients over
        micro-batches it has already freed, or unscale fp16 gradients before the step."""
        if not self.optimizer_in_backward:
            return
        why = "optimizer_in_backward steps each parameter as soon as backward has its gradient, so "
        if self.gradient_accumulation_steps > 1:
            raise config_error(("optimizer_in_backward", "gradient_accumulation_steps"),
                               why + "there is no accumulation: set gradient_accumulation_steps: 1 and raise "
                               "per_device_train_batch_size, or turn optimizer_in_backward off")
        if self.max_grad_norm != type(self).max_grad_norm:
            raise config_error(("optimizer_in_backward", "max_grad_norm"),
                               why + f"the gradient is not clipped (its global norm is known only after every step); "
                               f"remove max_grad_norm: {shown(self.max_grad_norm)}, or turn optimizer_in_backward off")
        if self.fp16:
            raise config_error(("optimizer_in_backward", "fp16"),
                               why + "fp16's loss scaler cannot unscale and skip a step first: use bf16")

    def check_length_and_precision(self) -> None:
        if self.bf16 and self.fp16:
            raise config_error(("bf16", "fp16"), "bf16 and fp16 are exclusive; pick one")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise config_error(("max_steps", "num_train_epochs"), "set max_steps > 0 or num_train_epochs > 0")

    def scheduler_kwargs(self, num_processes: int = 1) -> dict[str, Any]:
        """``lr_scheduler_kwargs`` for :func:`preftune.schedules.build_scheduler`: counts of steps are scaled like its
        warmup and length, since Accelerate steps a prepared scheduler once per process per optimizer step."""
        return {k: v * num_processes if k in _STEP_COUNT_KWARGS and v is not None else v
                for k, v in self.lr_scheduler_kwargs.items()}

    def check_optimizer(self) -> None:
        spec = OPTIMIZERS.get(self.optim)
        if spec is None:
            close = difflib.get_close_matches(self.optim, OPTIMIZERS, n=2, cutoff=0.5) if isinstance(self.optim, str) \
                else []
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise config_error("optim", f"optim: {shown(self.optim)} is not supported here.{hint} Supported: "
                               f"{', '.join(OPTIMIZERS)}")
        if spec.package and not _installed(spec.package):
            raise config_error("optim", f"optim: {self.optim} needs {spec.package}: pip install {spec.package} (or "
                               "pip install 'preftune[quantization]'), or use optim: adamw")

    def check_scheduler(self) -> None:
        """Catch now what building the schedule would trip over after the model and data are loaded."""
        name, kwargs = self.lr_scheduler_type, self.lr_scheduler_kwargs
        names = [*schedules.SCHEDULES, *METRIC_SCHEDULERS]
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise config_error("lr_scheduler_type", f"unknown lr_scheduler_type {shown(name)}.{hint} "
                               f"Known: {', '.join(names)}")
        if name in METRIC_SCHEDULERS:
            raise config_error("lr_scheduler_type", f"lr_scheduler_type={name} sets the learning rate from a metric "
                               "passed at every step (scheduler.step(metric)), which preftune's loop does not pass; "
                               "choose a schedule of the step number (linear, cosine, cosine_with_min_lr, "
                               "warmup_stable_decay, …)")
        accepted = schedules.keyword_arguments(name)
        for key in kwargs:
            if key in _SET_BY_THE_LOOP:
                raise config_error("lr_scheduler_kwargs", f"lr_scheduler_kwargs: {key!r} is set by preftune (from "
                                   "warmup_steps/warmup_ratio, max_steps/num_train_epochs and the resume point)")
            if key not in accepted:
                takes = f"takes {', '.join(accepted)}" if accepted else "takes no lr_scheduler_kwargs"
                raise config_error("lr_scheduler_kwargs", f"lr_scheduler_kwargs: lr_scheduler_type={name} {takes}, "
                                   f"not {key!r}")
        missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in kwargs]
        if missing:
            raise config_error(("lr_scheduler_kwargs", "lr_scheduler_type"), f"lr_scheduler_type={name} needs "
                               f"lr_scheduler_kwargs {missing}, e.g. lr_scheduler_kwargs={{{missing[0]}: …}}")
        problem = schedules.problems(name, kwargs, self.learning_rate)
        if problem:
            raise config_error(("lr_scheduler_kwargs", "lr_scheduler_type"), problem)


@dataclass
class SpeedKeys:
    """Speed (None: the fastest correct choice for the model, logged at start)."""

    prefix_sharing: bool | None = None  # prompt encoded once, chosen and rejected branch from it
    padding_free: bool | None = None  # several pairs packed per row, no padding between them
    fused_mlp: bool | None = None  # gated MLPs keep 2 of their 4 activations for backward (modeling.fused_mlp)
    group_by_length: bool = False  # batches of similar length (less padding when padding_free is off)
    # Training micro-batches of as many examples as fit in this many tokens (prompt counted once, per device);
    # per_device_train_batch_size is then ignored for training. Steadier memory and step time; the batches are
    # length-grouped already, so group_by_length has no further effect.
    max_tokens_per_batch: int | None = None

    RANGES: ClassVar[dict[str, Range]] = {
        "max_tokens_per_batch": Range(AT_LEAST_1, hint="; or null for batches of per_device_train_batch_size"),
    }


@dataclass
class OutputKeys:
    """Logging and checkpoints."""

    output_dir: str = "runs/preftune"
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only
    save_steps: int | None = None  # None: checkpoint at the end only
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | bool | None = None  # True: the latest checkpoint in output_dir
    # tensorboard, wandb, mlflow, trackio … (Accelerate's trackers); "none": metrics.jsonl only; "all": every
    # tracker installed here, resolved by validate() so config.yaml records the list used
    report_to: list[str] = field(default_factory=list)
    run_name: str | None = None
    disable_tqdm: bool = False
    # the health checks (training.health) watch every logged record: each failure mode (likelihood collapse,
    # verbosity, over-optimisation, …) warns once in the log and the progress bar; summary.json lists them
    health_checks: bool = True
    cache_dir: str | None = None  # tokenization and reference caches; default ~/.cache/preftune

    RANGES: ClassVar[dict[str, Range]] = {
        "logging_steps": Range(AT_LEAST_1),
        "eval_steps": Range(AT_LEAST_1, hint="; or null to evaluate at the end only"),
        "save_steps": Range(AT_LEAST_1, hint="; or null to checkpoint at the end only"),
        "save_total_limit": Range(AT_LEAST_1, hint="; or null to keep every checkpoint"),
    }


@dataclass
class HubKeys:
    """Hugging Face Hub: final/ (with its model card) uploaded at the end of the run."""

    push_to_hub: bool = False
    hub_model_id: str | None = None  # "name" or "org/name"
    hub_private_repo: bool | None = None  # None: the Hub's default for the account or organisation
    hub_token: str | None = None  # None: HF_TOKEN or the token saved by `hf auth login`; never written to disk

    RANGES: ClassVar[dict[str, Range]] = {}

    def check_hub(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise config_error(("push_to_hub", "hub_model_id"), "push_to_hub: true needs hub_model_id, the repository "
                               "to upload final/ to ('name' or 'org/name')")
        if self.hub_model_id is not None and not _HUB_ID.match(self.hub_model_id):
            raise config_error("hub_model_id", f"hub_model_id: {shown(self.hub_model_id)} is not a Hub repository "
                               "id; give 'name' or 'org/name' (letters, digits, '-', '_', '.')")


def _target_modules(value: str | list[str]) -> str | list[str]:
    """``"q_proj, v_proj"`` → ``["q_proj", "v_proj"]``; "all-linear" and regex strings stay (PEFT reads them)."""
    if isinstance(value, str) and value != "all-linear" and _MODULE_NAMES.match(value):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


def _trackers(value: str | list[str]) -> list[str]:
    """report_to as a list of installed trackers: "none" → [], "all" → every tracker installed here."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n and n != "none"]
    if "all" in names:
        installed = [t for t, (modules, _) in TRACKERS.items() if any(_installed(m) for m in modules)]
        names = [*installed, *(n for n in names if n != "all" and n not in installed)]
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise config_error("report_to", f"report_to: unknown tracker {shown(name)}.{hint} Known: "
                               f"{', '.join(TRACKERS)}, all (every installed one), none")
        modules, package = TRACKERS[name]
        if not any(_installed(m) for m in modules):
            raise config_error("report_to", f"report_to: {name} is not installed; `pip install {package}`, or drop it "
                               "from report_to (metrics.jsonl is always written)")
    return list(dict.fromkeys(names))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None

