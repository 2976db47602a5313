"""Gated MLPs that keep two of their four ``[tokens, intermediate]`` activations for backward instead of four.

Llama, Mistral, Qwen, Gemma and most current decoders compute ``down(act(gate(x)) · up(x))``. Autograd keeps
``gate(x)``, ``up(x)``, ``act(gate(x))`` and the product (the input of ``down``) until backward: four tensors of
``tokens × intermediate`` per layer, the largest activations of the model. :class:`GatedDown` computes
``down(act(g) · u)`` as one step that keeps only ``g`` and ``u`` and recomputes ``act(g) · u`` (elementwise, no
matmul) in backward. Values and gradients are unchanged.

It is applied only where it is safe: the module's ``forward`` is exactly that expression and ``down_proj`` is a
plain ``nn.Linear`` without hooks (so LoRA, quantised or offloaded layers keep their own forward), and not under
DeepSpeed ZeRO-3, which gathers each weight in its module's own forward hook.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The forward bodies (docstring aside, as ast.unparse prints them) that compute down(act(gate(x)) · up(x)).
GATED_FORWARDS = (
    "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
    "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\nreturn down_proj",
)


class GatedDown(torch.autograd.Function):
    """``(g, u, W, b, act)`` → ``(act(g) · u) Wᵀ + b``, keeping ``g`` and ``u`` (not the product) for backward:

    ∂W = ∂yᵀ p,  ∂b = Σ ∂y,  ∂p = ∂y W,  ∂u = ∂p · act(g),  ∂g = ∂p · u · act′(g),  with p = act(g) · u.
    Under autocast the matmuls run in the dtype of ``g`` (the autocast dtype), like ``nn.Linear`` would."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None, act: nn.Module) -> Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up, weight, bias)
        with torch.no_grad():
            product = act(gate) * up
            return F.linear(product, weight.to(product.dtype), None if bias is None else bias.to(product.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, up, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
            product = ctx.act(g) * u
        grad_out = grad_out.to(product.dtype)
        flat_grad, flat_product = grad_out.flatten(0, -2), product.detach().flatten(0, -2)
        grad_w = (flat_grad.t() @ flat_product).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_b = flat_grad.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        grad_gate, grad_up = torch.autograd.grad(product, (g, u), grad_out @ weight.to(product.dtype))
        return grad_gate, grad_up, grad_w, grad_b, None


def _fused_forward(self: nn.Module, x: Tensor) -> Tensor:
    return GatedDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias,
                           self.act_fn)


def _is_plain_gated_mlp(module: nn.Module) -> bool:
    down = getattr(module, "down_proj", None)
    if type(down) is not nn.Linear or down._forward_hooks or down._forward_pre_hooks or hasattr(down, "_hf_hook"):
        return False
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "act_fn")):
        return False
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    statements = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return "\n".join(ast.unparse(s) for s in statements) in GATED_FORWARDS


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every plain gated MLP of ``model`` the :class:`GatedDown` forward; returns how many were changed."""
    count = 0
    for module in model.modules():
        if _is_plain_gated_mlp(module):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
