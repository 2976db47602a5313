"""Per-sequence completion log-probs without ever materialising ``[batch, seq, vocab]`` logits.

The model body runs once; only the hidden states at positions whose *next* token is a completion
token go through the LM head, ``chunk_size`` positions at a time, their logits a cache-sized tile of the
vocabulary at a time, recomputed in backward (``preftune.modeling.lm_head``). ``log p = z[target] − logsumexp(z)``
is taken in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from preftune.modeling.lm_head import head_token_logps

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def unwrap_causal_lm(model: nn.Module) -> PreTrainedModel:
    """The ``*ForCausalLM`` inside a PEFT model (LoRA layers stay injected) or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def max_positions(model: nn.Module) -> int | None:
    """The most positions ``model`` reads (``max_position_embeddings``, GPT-2's ``n_positions``), None when its
    config names none. A learned position table (GPT-2) raises IndexError past it; rotary models read on, untrained."""
    config = getattr(unwrap_causal_lm(model), "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def flex_block_mask(mask: Tensor) -> BlockMask:
    """A boolean ``[R, 1, L, L]`` mask as a FlexAttention ``BlockMask``: blocks with no allowed pair are
    skipped, and the attention never sees a dense ``L × L`` mask. transformers passes any 4D mask through."""
    from torch.nn.attention.flex_attention import create_block_mask  # torch ≥ 2.5, like flex_attention itself

    rows, _, length, _ = mask.shape
    # Indexed through a flat [R, L·L] view: inductor's CPU kernel (torch 2.13) fails to compile a mask_mod
    # that indexes the 4D mask once the sequence length has become a dynamic shape.
    flat = mask.reshape(rows, length * length)

    def may_attend(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return flat[b, q * length + kv]

    return create_block_mask(may_attend, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=mask.device)


def attention_implementation(lm: PreTrainedModel) -> str | None:
    """The attention the model was loaded with (``sdpa``, ``eager``, ``flex_attention``, …)."""
    return getattr(lm.config, "_attn_implementation", None)


# The attention implementations that take the boolean [R, 1, L, L] mask of a layout other than plain padding (prefix
# sharing, packing): flex_attention as a BlockMask built from it, the others as an additive mask (attention_mask_for).
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def attention_mask_for(lm: PreTrainedModel, mask: Tensor, dtype: torch.dtype) -> Tensor | BlockMask:
    """A boolean ``[R, 1, L, L]`` mask becomes one additive mask (0 / dtype-min) in the dtype the attention
    computes in (the autocast dtype under mixed precision). SDPA would otherwise convert the boolean mask
    again in every layer and keep each copy for backward; eager attention needs the additive form anyway.
    Under ``flex_attention`` it becomes a ``BlockMask`` instead. ``[R, L]`` padding masks pass through."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    if attention_implementation(lm) == "flex_attention":
        return flex_block_mask(mask)
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
    logit_scale: Tensor | float | None = None,
) -> dict[str, Tensor]:
    """Summed completion log-probs of S sequences laid out in R rows (see ``preftune.data.batching``).

    Args: ``input_ids [R, L]``; ``attention_mask`` ``[R, L]`` or boolean ``[R, 1, L, L]``; ``score_index``,
    ``score_target``, ``score_seq`` ``[M]`` (flat predictor position, target token, sequence of each scored
    token); ``seq_tokens [S]``; ``token_weights`` optional ``[M]`` (LD-DPO); ``position_ids [R, L]``.
    Returns fp32 ``[S]`` tensors: ``logps`` = Σ_t w_t·log p(y_t | x, y_<t), ``tokens`` = |y|, and with
    ``with_wpo`` ``wpo`` = mean_t [log p(y_t) − log Σ_v p_v²] (no grad; WPO's log-weight); and
    ``token_logps [M]`` = log p(y_t | x, y_<t) of every scored token (unweighted, in ``score_seq`` order), which
    token-level objectives (GRPO's clipped ratio and KL) read; and, without gradient, per sequence ``[S]``:
    ``mean_logits`` = mean over its tokens of the mean logit over the vocabulary (TRL's ``logits/*``) and
    ``token_accuracy`` = the fraction of its tokens that are the argmax of their distribution.
    ``logit_scale`` s (a 0-dim tensor or a number; online batches carry s = 1/T): every probability above is
    that of ``softmax(s·z)``, the distribution a sampler at temperature T draws from before any top-k/top-p cut.
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    hidden = flat_hidden_states(lm, input_ids, attention_mask, position_ids, head.weight.dtype)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    stats = head_token_logps(hidden[score_index], head.weight, head.bias, score_target, softcap, chunk_size,
                             with_sq_norm=with_wpo, logit_scale=1.0 if logit_scale is None else float(logit_scale))
    token_logps = stats["logps"]

    n = seq_tokens.shape[0]
    weighted = token_logps * token_weights.to(token_logps.dtype) if token_weights is not None else token_logps
    logps = token_logps.new_zeros(n).index_add(0, score_seq, weighted)
    tokens = seq_tokens.to(logps.dtype)
    per_sequence_mean = lambda values: (logps.new_zeros(n).index_add(0, score_seq, values.to(logps.dtype))
                                        / tokens.clamp(min=1))
    out = {"logps": logps, "tokens": tokens, "token_logps": token_logps,
           "mean_logits": per_sequence_mean(stats["mean_logit"]),
           "token_accuracy": per_sequence_mean(stats["is_argmax"])}
    if with_wpo:
        out["wpo"] = per_sequence_mean((token_logps - stats["sq_norm"]).detach())
    return out


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "score_index", "score_target", "score_seq",
                "seq_tokens", "seq_last_index", "logit_scale")


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
        logit_scale: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        return completion_logps(
            self.model, input_ids, attention_mask, score_index, score_target, score_seq, seq_tokens,
            position_ids=position_ids, token_weights=token_weights, chunk_size=self.chunk_size, with_wpo=with_wpo,
            logit_scale=logit_scale,
        )
