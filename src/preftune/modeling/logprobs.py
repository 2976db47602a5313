"""Per-sequence completion log-probs without ever materialising ``[batch, seq, vocab]`` logits.

The model body runs once; only the hidden states at positions whose *next* token is a completion
token go through the LM head, ``chunk_size`` positions at a time, each chunk checkpointed so its
``[chunk, vocab]`` logits are freed after use and recomputed in backward. ``log p = z[target] −
logsumexp(z)`` is taken in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel


def unwrap_causal_lm(model: nn.Module) -> PreTrainedModel:
    """The ``*ForCausalLM`` inside a PEFT model (LoRA layers stay injected) or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """LM-head logits ``[k, V]`` of hidden states ``[k, H]`` in fp32 (fp64 for fp64 models). Under mixed
    precision the projection itself runs in the autocast dtype, like every other matmul of the model (and as
    TRL does); the result is upcast before any softmax."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        logits = F.linear(hidden, weight, bias).to(dtype)
    else:
        logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if softcap is not None:  # Gemma-style final logit soft-capping, as the model's own forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _head_chunk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None, with_wpo: bool
) -> tuple[Tensor, Tensor | None]:
    """``hidden [k, H]`` → (``log p(target) [k]``, ``log Σ_v p_v² [k]`` or None), log-softmax in fp32."""
    logits = head_logits(hidden, weight, bias, softcap)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        lse = logits.logsumexp(-1)
        target_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        log_sq_norm = None
        if with_wpo:  # WPO's per-token normaliser, kept off the graph: log Σ p² = lse(2z) − 2·lse(z)
            with torch.no_grad():
                log_sq_norm = (2 * logits).logsumexp(-1) - 2 * lse
    return target_logps, log_sq_norm


def attention_mask_for(lm: PreTrainedModel, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean ``[R, 1, L, L]`` mask becomes one additive mask (0 / dtype-min) in the dtype the attention
    computes in (the autocast dtype under mixed precision). SDPA would otherwise convert the boolean mask
    again in every layer and keep each copy for backward; eager attention needs the additive form anyway.
    ``[R, L]`` padding masks pass through."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    device = mask.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def flat_hidden_states(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                       position_ids: Tensor | None, mask_dtype: torch.dtype) -> Tensor:
    """The body's last hidden states for a collated batch, flattened to ``[R·L, H]`` (what score indices point
    into); the head is left to the caller."""
    return model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask_for(model, attention_mask, mask_dtype),
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state.flatten(0, 1)


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    score_index: Tensor,
    score_target: Tensor,
    score_seq: Tensor,
    seq_tokens: Tensor,
    *,
    position_ids: Tensor | None = None,
    token_weights: Tensor | None = None,
    chunk_size: int = 1024,
    with_wpo: bool = False,
    seq_last_index: Tensor | None = None,  # part of every batch; reward models read it, log-probs do not
) -> dict[str, Tensor]:
    """Summed completion log-probs of S sequences laid out in R rows (see ``preftune.data.batching``).

    Args: ``input_ids [R, L]``; ``attention_mask`` ``[R, L]`` or boolean ``[R, 1, L, L]``; ``score_index``,
    ``score_target``, ``score_seq`` ``[M]`` (flat predictor position, target token, sequence of each scored
    token); ``seq_tokens [S]``; ``token_weights`` optional ``[M]`` (LD-DPO); ``position_ids [R, L]``.
    Returns fp32 ``[S]`` tensors: ``logps`` = Σ_t w_t·log p(y_t | x, y_<t), ``tokens`` = |y|, and with
    ``with_wpo`` ``wpo`` = mean_t [log p(y_t) − log Σ_v p_v²] (no grad; WPO's log-weight).
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    hidden = flat_hidden_states(lm, input_ids, attention_mask, position_ids, head.weight.dtype)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    h = hidden[score_index]

    pieces, sq_norms = [], []
    for start in range(0, h.shape[0], chunk_size):
        args = (h[start : start + chunk_size], head.weight, head.bias, score_target[start : start + chunk_size],
                softcap, with_wpo)
        if torch.is_grad_enabled():
            logp, sq = checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            logp, sq = _head_chunk(*args)
        pieces.append(logp)
        sq_norms.append(sq)
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)

    n = seq_tokens.shape[0]
    weighted = token_logps * token_weights.to(token_logps.dtype) if token_weights is not None else token_logps
    logps = token_logps.new_zeros(n).index_add(0, score_seq, weighted)
    out = {"logps": logps, "tokens": seq_tokens.to(logps.dtype)}
    if with_wpo:
        log_sq_norm = torch.cat(sq_norms) if sq_norms else token_logps.detach()
        wpo = token_logps.new_zeros(n).index_add(0, score_seq, (token_logps - log_sq_norm).detach())
        out["wpo"] = wpo / out["tokens"].clamp(min=1)
    return out


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "score_index", "score_target", "score_seq",
                "seq_tokens", "seq_last_index")


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a collated batch that :func:`completion_logps` reads."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


class LogProbModel(nn.Module):
    """A causal LM whose forward returns :func:`completion_logps`.

    This is the module handed to Accelerate, so DDP/FSDP/DeepSpeed see an ordinary forward call while
    the LM head only ever projects completion positions.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        score_index: Tensor,
        score_target: Tensor,
        score_seq: Tensor,
        seq_tokens: Tensor,
        position_ids: Tensor | None = None,
        token_weights: Tensor | None = None,
        seq_last_index: Tensor | None = None,
        with_wpo: bool = False,
    ) -> dict[str, Tensor]:
        return completion_logps(
            self.model, input_ids, attention_mask, score_index, score_target, score_seq, seq_tokens,
            position_ids=position_ids, token_weights=token_weights, chunk_size=self.chunk_size, with_wpo=with_wpo,
        )
