"""The LM head as one autograd function: token log-probs of ``k`` positions, chunk by chunk, in one reused buffer.

For hidden states ``h [M, H]``, head ``W [V, H]`` (bias ``b [V]``) and targets ``y [M]``:

    z = h Wᵀ + b,   log p(y) = z_y − logsumexp(z),   ∂ log p(y) / ∂z = onehot(y) − softmax(z)

Forward keeps no logits: each chunk of ``chunk_size`` positions is projected into the same ``[chunk, V]`` buffer
(fp32, or fp64 for fp64 models), reduced in place and overwritten by the next chunk. Backward recomputes each
chunk's logits into one buffer, turns them into ``g·(onehot − softmax)`` in place and applies the two matmuls
(``∂h = ∂z W``, ``∂W += ∂zᵀ h``). Compared with checkpointing every chunk through autograd (what this replaces),
the result is the same, but the ``[chunk, V]`` temporaries of ``logsumexp``, the softmax gradient and their
casts are not allocated again for every chunk: fewer large allocations, less heap fragmentation on CPU.

Matmuls run in the autocast dtype under mixed precision (as every other matmul of the model, and as TRL does)
and in the weights' dtype otherwise; the softmax is always fp32 (fp64 for fp64 models). Gemma-style soft-capping
``z ← c·tanh(z / c)`` is applied as the model's own forward does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The autocast dtype under mixed precision, else the common dtype of the operands (a bf16 model projects in
    bf16, as its own forward would, rather than upcasting a ``[V, H]`` copy of the head)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _project(h: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, softcap: float | None) -> Tensor | None:
    """``out[:] = z`` for hidden rows ``h``; returns ``tanh(z_raw / c)`` when soft-capping (backward needs it)."""
    if weight.dtype == out.dtype:
        torch.mm(h.to(out.dtype), weight.t(), out=out)
    else:
        out.copy_(h.to(weight.dtype) @ weight.t())
    if bias is not None:
        out.add_(bias.to(out.dtype))
    if softcap is None:
        return None
    out.div_(softcap).tanh_()
    tanh = out.clone()
    out.mul_(softcap)
    return tanh


def _chunk_buffer(hidden: Tensor, weight: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """The one ``[chunk, V]`` buffer every chunk's logits are written into."""
    return hidden.new_empty(min(chunk_size, max(hidden.shape[0], 1)), weight.shape[0], dtype=dtype)


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """Logits ``[k, V]`` of hidden states ``[k, H]``, in fp32 (fp64 for fp64 models), multiplied in the dtype
    :class:`LMHeadLogProbs` uses; for callers that need whole distributions (the KL metric), a few rows at a time."""
    w = weight.to(_matmul_dtype(hidden, weight))
    out = hidden.new_empty(hidden.shape[0], weight.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
    with torch.autocast(hidden.device.type, enabled=False):
        _project(hidden, w, bias, out, softcap)
    return out


class LMHeadLogProbs(torch.autograd.Function):
    """``(hidden [M, H], weight [V, H], bias [V] | None, targets [M])`` → ``log p(targets) [M]``; with
    ``with_sq_norm`` WPO's ``log Σ_v p_v² [M]``; and, read off each chunk while its logits are in the buffer (no
    gradient): the mean logit ``mean_v z_v [M]`` (TRL's ``logits/*`` metrics) and whether the target is the
    argmax, ``z_y = max_v z_v [M]`` (token accuracy). See the module docstring."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                softcap: float | None, chunk_size: int, with_sq_norm: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        matmul_dtype = _matmul_dtype(hidden, weight)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        m = hidden.shape[0]
        w = weight.to(matmul_dtype)  # one cast per forward (a no-op in fp32)
        logps = hidden.new_empty(m, dtype=out_dtype)
        sq_norm = hidden.new_empty(m if with_sq_norm else 0, dtype=out_dtype)
        mean_logit = hidden.new_empty(m, dtype=out_dtype)
        is_argmax = hidden.new_empty(m, dtype=torch.bool)
        buf = _chunk_buffer(hidden, weight, chunk_size, out_dtype)
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            for start in range(0, m, chunk_size):
                rows = slice(start, start + chunk_size)
                z = buf[: hidden[rows].shape[0]]
                _project(hidden[rows], w, bias, z, softcap)
                top = z.amax(-1, keepdim=True)
                target_z = z.gather(-1, targets[rows, None]).squeeze(-1)
                mean_logit[rows] = z.mean(-1)
                is_argmax[rows] = target_z >= top.squeeze(-1)
                z.sub_(top).exp_()
                log_sum = z.sum(-1).log_()  # logsumexp(z) − max
                logps[rows] = target_z - top.squeeze(-1) - log_sum
                if with_sq_norm:  # log Σ p² = log Σ e^{2(z−max)} − 2·(logsumexp(z) − max)
                    sq_norm[rows] = z.square_().sum(-1).log_() - 2 * log_sum
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.softcap, ctx.chunk_size, ctx.matmul_dtype = softcap, chunk_size, matmul_dtype
        ctx.mark_non_differentiable(sq_norm, mean_logit, is_argmax)
        return logps, sq_norm, mean_logit, is_argmax

    @staticmethod
    def backward(ctx, grad_logps: Tensor, *_grads_of_statistics: Tensor | None):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        out_dtype = grad_logps.dtype
        w = weight.to(ctx.matmul_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=out_dtype, device=bias.device) if need_b else None
        m = hidden.shape[0]
        buf = _chunk_buffer(hidden, weight, ctx.chunk_size, out_dtype)
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            for start in range(0, m, ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows]
                g = grad_logps[rows, None]
                dz = buf[: h.shape[0]]
                tanh = _project(h, w, bias, dz, ctx.softcap)
                # ∂z = g·(onehot(y) − softmax(z)), built in place in the logits' buffer
                dz.sub_(dz.amax(-1, keepdim=True)).exp_()
                dz.div_(dz.sum(-1, keepdim=True)).mul_(-g)
                dz.scatter_add_(-1, targets[rows, None], g)
                if tanh is not None:  # through z = c·tanh(z_raw / c): ∂z_raw = ∂z·(1 − tanh²)
                    dz.mul_(1 - tanh.square_())
                if grad_b is not None:
                    grad_b += dz.sum(0)
                dz_mm = dz.to(w.dtype)
                if grad_h is not None:
                    grad_h[rows] = (dz_mm @ w).to(hidden.dtype)
                if grad_w is not None and grad_w.dtype == dz_mm.dtype:
                    # In place: no [V, H] temporary per chunk (2.1 GB in fp32 for a 128k × 4096 head).
                    grad_w.addmm_(dz_mm.t(), h.to(w.dtype))
                elif grad_w is not None:
                    grad_w += dz_mm.t() @ h.to(w.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def head_token_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None,
                     chunk_size: int, with_sq_norm: bool = False) -> dict[str, Tensor]:
    """Per target of hidden states ``[M, H]``: ``logps`` = log p(target) (with gradient); no gradient:
    ``mean_logit``, ``is_argmax`` and, with ``with_sq_norm``, WPO's ``sq_norm`` = log Σ p²; each ``[M]``."""
    logps, sq_norm, mean_logit, is_argmax = LMHeadLogProbs.apply(hidden, weight, bias, targets, softcap, chunk_size,
                                                                with_sq_norm)
    out = {"logps": logps, "mean_logit": mean_logit, "is_argmax": is_argmax}
    return out | ({"sq_norm": sq_norm} if with_sq_norm else {})
