"""A Bradley–Terry reward model on a sequence-classification head, laid out like the policy's batches.

The model body runs on the same collated batch as the log-prob engine (prefix sharing and packing
included); the scalar head reads the hidden state of each sequence's last token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from preftune.modeling.logprobs import flat_hidden_states, unwrap_causal_lm


def sequence_rewards(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, seq_last_index: Tensor,
                     seq_tokens: Tensor, position_ids: Tensor | None = None) -> dict[str, Tensor]:
    """``r(x, y)`` for S sequences: the ``score`` head on each sequence's last hidden state; fp32 ``[S]``."""
    cls = unwrap_causal_lm(model)
    head = cls.score
    last = flat_hidden_states(cls, input_ids, attention_mask, position_ids, head.weight.dtype)[seq_last_index]
    with torch.autocast(device_type=last.device.type, enabled=False):
        scores = head(last.to(head.weight.dtype)).squeeze(-1).float()
    return {"logps": scores, "tokens": seq_tokens.to(scores.dtype)}


class RewardModel(nn.Module):
    """The module handed to Accelerate for reward modelling; its ``logps`` output holds the scores, so the
    loop and the losses read it like log-probs."""

    def __init__(self, model: nn.Module, chunk_size: int = 0):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, seq_last_index: Tensor, seq_tokens: Tensor,
                position_ids: Tensor | None = None, **_: Tensor) -> dict[str, Tensor]:
        return sequence_rewards(self.model, input_ids, attention_mask, seq_last_index, seq_tokens, position_ids)
