"""Load the policy, the tokenizer and (optionally) LoRA adapters, as Hugging Face objects."""

from __future__ import annotations

import copy
import logging

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

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and of the loss, so any id works; EOS is the
        # convention users expect.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos_token; preftune appends EOS to every completion")
    return tokenizer


def load_causal_lm(path: str, cfg: TrainConfig) -> PreTrainedModel:
    """A causal LM from a local folder or the Hub. Weights load through transformers, which reads
    safetensors and refuses pickled code; ``trust_remote_code`` stays off unless asked for."""
    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_reward_model(path: str, cfg: TrainConfig) -> PreTrainedModel:
    """A one-output sequence classifier (a causal LM checkpoint gets a new ``score`` head)."""
    kwargs = dict(num_labels=1, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
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
