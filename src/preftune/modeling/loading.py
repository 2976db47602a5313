"""Load the policy, the tokenizer and (optionally) LoRA adapters, as Hugging Face objects."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from preftune.config import TrainConfig
from preftune.errors import ModelError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


# What a local folder must hold to be loaded as each kind (a PEFT adapter folder loads as a model too).
_MARKERS = {"model": ("config.json", "adapter_config.json"),
            "tokenizer": ("tokenizer_config.json", "tokenizer.json", "config.json")}


def _looks_local(path: str) -> bool:
    """A path, not a Hub id (``name`` or ``org/name``): transformers would otherwise say "Repo id must use …"."""
    if path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1:
        return True
    return "/" in path and Path(path).parent.is_dir()  # `models/x` where ./models exists


@contextlib.contextmanager
def _loading(path: str, kind: str) -> Iterator[None]:
    """Check a local ``path`` before loading; turn transformers' "not found / not a model" errors into a
    ModelError naming the path and what to give instead. OS errors with an errno (disk full, permissions)
    pass through for the CLI to report."""
    local = Path(path).expanduser()
    noun = "model or tokenizer" if kind == "tokenizer" else kind  # the tokenizer is read from the model's folder
    if local.is_dir():
        if not any((local / name).is_file() for name in _MARKERS[kind]):
            raise ModelError(f"{path} is not a {kind} folder: it holds none of {', '.join(_MARKERS[kind])}; give "
                             "a folder written by save_pretrained, or a Hub id such as 'org/name'")
    elif local.exists():
        raise ModelError(f"{path} is a file, not a {noun} folder; give the folder written by save_pretrained "
                         "(config.json and the weights), or a Hub id such as 'org/name'")
    elif _looks_local(path):
        raise ModelError(f"{path}: no such {noun} folder (relative paths start at {Path.cwd()}); check the path: "
                         f"give a folder written by save_pretrained, or a Hub id such as 'org/name'")
    try:
        yield
    except OSError as err:
        if err.errno is not None:
            raise
        cause = " ".join(str(err).split())
        raise ModelError(f"{path}: could not load the {kind} ({cause}); give a local folder written by "
                         "save_pretrained, or a Hub id that can be downloaded or is in the Hugging Face cache") from err


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    with _loading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and of the loss, so any id works; EOS is the
        # convention users expect.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer at {path} has no eos_token; preftune appends EOS to every completion: set one "
                         "(tokenizer.eos_token = ...; save_pretrained)")
    return tokenizer


def load_causal_lm(path: str, cfg: TrainConfig) -> PreTrainedModel:
    """A causal LM from a local folder or the Hub. Weights load through transformers, which reads
    safetensors and refuses pickled code; ``trust_remote_code`` stays off unless asked for."""
    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with _loading(path, "model"):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_reward_model(path: str, cfg: TrainConfig) -> PreTrainedModel:
    """A one-output sequence classifier (a causal LM checkpoint gets a new ``score`` head)."""
    kwargs = dict(num_labels=1, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with _loading(path, "model"):
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def as_reward_model(causal_lm: PreTrainedModel) -> PreTrainedModel:
    """The same body with a new one-output ``score`` head (the LM head is dropped), for reward modelling."""
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    reward = AutoModelForSequenceClassification.from_config(config, attn_implementation=config._attn_implementation)
    reward.base_model.load_state_dict(causal_lm.base_model.state_dict())
    return reward


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the policy's and the reference's log-probs differ at step 0 (DPO's loss ≠ ln 2)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def add_lora(model: PreTrainedModel, cfg: TrainConfig, task: str = "CAUSAL_LM") -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type=task,
    )
    return get_peft_model(model, lora)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
