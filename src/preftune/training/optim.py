"""The optimizer and learning-rate schedule of a run, by transformers' names."""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from preftune.config import OPTIMIZERS, TrainConfig
from preftune.schedules import build_scheduler


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optim`` names (transformers' names, see ``config.OPTIMIZERS``) over the trainable
    parameters.

    Optimizer state per trainable parameter: AdamW keeps m and v in fp32 (8 bytes); bitsandbytes' 8-bit AdamW
    (Dettmers et al. 2022, arXiv 2110.02861) keeps them as 8-bit codes with one fp32 absmax per block of 256 values
    (2 + 8/256 ≈ 2.03 bytes; tensors under 4096 values keep fp32 states), dequantized for each update; the paged
    variants let the GPU driver move the states to CPU memory under memory pressure (plain states on a CPU);
    torchao's 8- and 4-bit AdamW keep 8- or 4-bit codes with per-block scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    spec = OPTIMIZERS[cfg.optim]
    if spec.name == "RMSprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                   eps=cfg.adam_epsilon)
    adam = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_epsilon)
    if spec.module == "torch.optim":
        # The fused kernel is one pass over the parameters (≈8× faster than foreach on a 2-core CPU for 58M
        # parameters); it exists for CPU and CUDA tensors of floating dtype.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, fused=fused, **adam)
    return getattr(importlib.import_module(spec.module), spec.name)(params, **adam)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int, num_processes: int):
    """The config's learning-rate schedule over ``steps`` steps, warming up over ``warmup_steps`` (else
    ``warmup_ratio`` of them). Accelerate steps a prepared scheduler once per process per step, so its warm-up,
    its length and the step counts in ``lr_scheduler_kwargs`` are scaled by ``num_processes``."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    return build_scheduler(cfg.lr_scheduler_type, optimizer, warmup * num_processes, steps * num_processes,
                           cfg.scheduler_kwargs(num_processes))
