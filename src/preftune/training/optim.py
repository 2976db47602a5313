"""The optimizer and learning-rate schedule of a run, by transformers' names."""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from preftune.config import OPTIMIZERS, TrainConfig
from preftune.schedules import build_scheduler


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optim`` names (transformers' names, see ``config.OPTIMIZERS``) over the trainable
    parameters; with ``optimizer_in_backward``, one such optimizer per parameter stepped inside backward
    (:class:`OptimizerInBackward`).

    Optimizer state per trainable parameter: AdamW keeps m and v in fp32 (8 bytes); bitsandbytes' 8-bit AdamW
    (Dettmers et al. 2022, arXiv 2110.02861) keeps them as 8-bit codes with one fp32 absmax per block of 256 values
    (2 + 8/256 ≈ 2.03 bytes; tensors under 4096 values keep fp32 states), dequantized for each update; the paged
    variants let the GPU driver move the states to CPU memory under memory pressure (plain states on a CPU);
    torchao's 8- and 4-bit AdamW keep 8- or 4-bit codes with per-block scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer_in_backward:
        return OptimizerInBackward(params, lambda one: _optimizer(cfg, one))
    return _optimizer(cfg, params)


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
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


class OptimizerInBackward(torch.optim.Optimizer):
    """The optimizer step fused into backward (torchtune's optimizer-in-backward): one optimizer per parameter,
    stepped by a hook the moment backward has summed that parameter's gradient, which is then freed. The gradients
    never all exist at once: for full fine-tuning in fp32 that is 4 bytes per parameter off the peak (policy 4,
    AdamW's m and v 8, gradients 4 → at most the largest parameter's).

    The update is the one the wrapped optimizer would take over all parameters at once — without clipping, since
    each parameter steps before the global norm is known, and with one backward per step (no accumulation): the
    config refuses ``max_grad_norm`` other than its default, ``gradient_accumulation_steps`` > 1 and fp16, and the
    accelerator refuses more than one process (DDP reduces a gradient after its hook has run). The global norm
    ``‖g‖₂ = (Σ_p ‖g_p‖²)^½`` is still summed in the hooks for the log and the finite check.

    ``param_groups`` are the per-parameter optimizers' own groups, so a learning-rate schedule reaches them all;
    ``step`` and ``zero_grad`` have nothing left to do; the state dict is the list of theirs."""

    def __init__(self, params: list[nn.Parameter], make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
        self.parts = [make([p]) for p in params]
        super().__init__(params, dict(self.parts[0].defaults) if self.parts else {})  # the schedule's base_lr
        self.param_groups = [group for part in self.parts for group in part.param_groups]
        self._squared_norm = torch.zeros((), dtype=torch.float64)
        self._of = {id(p): part for p, part in zip(params, self.parts)}
        self._hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._step_one, part))
                       for p, part in zip(params, self.parts)]

    def part_of(self, param: nn.Parameter) -> torch.optim.Optimizer:
        """The optimizer that steps ``param``."""
        return self._of[id(param)]

    @torch.no_grad()
    def _step_one(self, part: torch.optim.Optimizer, param: nn.Parameter) -> None:
        # per parameter in its own dtype, as clip_grad_norm_ does (no copy of the gradient)
        self._squared_norm += torch.linalg.vector_norm(param.grad).double().square()
        part.step()
        param.grad = None

    def take_grad_norm(self) -> Tensor:
        """The global L2 norm of the gradients stepped since the last call (a float32 tensor of shape ``(1,)``)."""
        norm, self._squared_norm = self._squared_norm.sqrt().float().reshape(1), torch.zeros((), dtype=torch.float64)
        return norm

    def step(self, closure=None) -> None:  # every parameter stepped in backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # every gradient freed in backward
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)
        self.param_groups = [group for part in self.parts for group in part.param_groups]


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int, num_processes: int):
    """The config's learning-rate schedule over ``steps`` steps, warming up over ``warmup_steps`` (else
    ``warmup_ratio`` of them). Accelerate steps a prepared scheduler once per process per step, so its warm-up,
    its length and the step counts in ``lr_scheduler_kwargs`` are scaled by ``num_processes``."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    return build_scheduler(cfg.lr_scheduler_type, optimizer, warmup * num_processes, steps * num_processes,
                           cfg.scheduler_kwargs(num_processes))
