"""PPO's policy and critic as one module: per-token log-probs and per-token values of a collated batch.

A value V(x, y_<t) belongs to the state *before* token y_t is emitted, so it is read at the position whose hidden
state predicts y_t — the batch's ``score_index``, where the log-prob of y_t is read too. Applied there, a reward
model's ``score`` head (``AutoModelForSequenceClassification``, one label) gives one value per completion token, as
:func:`preftune.modeling.reward.sequence_rewards` gives one score per sequence at ``seq_last_index``. The critic is
either such a sequence classifier of its own (initialised from the reward model, as TRL and OpenRLHF do, or from
the policy's body), or a linear value head on the policy's own last hidden states (``shared``: one body, as old
TRL's ``AutoModelForCausalLMWithValueHead``).

Every layout of :mod:`preftune.data.batching` works (prefix sharing, packing); ``[batch, seq, vocab]`` logits are
never built (the LM head runs on the scored positions only, chunk by chunk), except for the exact entropy, which
is asked for only with an entropy bonus.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from preftune.modeling.lm_head import head_token_logps
from preftune.modeling.logprobs import flat_hidden_states, unwrap_causal_lm
from preftune.modeling.reward import sequence_rewards


def token_values(critic: nn.Module, input_ids: Tensor, attention_mask: Tensor, score_index: Tensor,
                 seq_tokens: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """V(x, y_<t) of every scored token: the critic's ``score`` head on the hidden state that predicts y_t,
    fp32 ``[M]`` (in ``score_seq`` order)."""
    return sequence_rewards(critic, input_ids, attention_mask, score_index, seq_tokens, position_ids)["logps"]


def token_entropy(hidden: Tensor, lm: PreTrainedModel, chunk_size: int = 256, logit_scale: float = 1.0) -> Tensor:
    """Exact entropy H(π(·|x, y_<t)) = −Σ_v p_v log p_v at each hidden state ``[M, H]`` → fp32 ``[M]``, with
    gradient (p = softmax(s·z), s = ``logit_scale``). Each chunk's ``[chunk, V]`` logits are kept for backward, so
    this costs M·V floats in all."""
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start : start + chunk_size].to(head.weight.dtype) @ head.weight.t()).float()
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = (logits * logit_scale).log_softmax(-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class PolicyAndValue(nn.Module):
    """The module handed to Accelerate for PPO: ``model`` (the causal LM being trained) and its critic —
    ``critic`` (a one-label sequence classifier) or ``value_head`` (``Linear(hidden, 1)`` on the policy's trunk).

    ``forward`` returns fp32 ``token_logps [M]`` = log π(y_t | x, y_<t), ``values [M]`` = V(x, y_<t), and with
    ``with_entropy`` ``entropy [M]``; ``logps`` and ``tokens`` ``[S]`` as
    :class:`~preftune.modeling.logprobs.LogProbModel` gives them (so a reference that is the policy with its
    adapters off reads it alike).
    """

    def __init__(self, model: nn.Module, critic: nn.Module | None = None, value_head: nn.Linear | None = None,
                 chunk_size: int = 1024):
        super().__init__()
        if (critic is None) == (value_head is None):
            raise ValueError("give exactly one of critic (a sequence classifier) or value_head (on the policy's trunk)")
        self.model, self.critic, self.value_head, self.chunk_size = model, critic, value_head, chunk_size

    @property
    def shared(self) -> bool:
        return self.value_head is not None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, score_index: Tensor, score_target: Tensor,
                score_seq: Tensor, seq_tokens: Tensor, position_ids: Tensor | None = None,
                seq_last_index: Tensor | None = None, token_weights: Tensor | None = None,
                with_entropy: bool = False, logit_scale: Tensor | float | None = None) -> dict[str, Tensor]:
        scale = 1.0 if logit_scale is None else float(logit_scale)  # 1/T: scored at the sampling temperature
        lm = unwrap_causal_lm(self.model)
        head = lm.get_output_embeddings()
        hidden = flat_hidden_states(lm, input_ids, attention_mask, position_ids, head.weight.dtype)[score_index]
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        token_logps = head_token_logps(hidden, head.weight, head.bias, score_target, softcap, self.chunk_size,
                                       logit_scale=scale)["logps"]
        if self.shared:
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        else:
            values = token_values(self.critic, input_ids, attention_mask, score_index, seq_tokens, position_ids)
        weighted = token_logps if token_weights is None else token_logps * token_weights.to(token_logps.dtype)
        out = {"token_logps": token_logps, "values": values, "tokens": seq_tokens.to(token_logps.dtype),
               "logps": token_logps.new_zeros(seq_tokens.shape[0]).index_add(0, score_seq, weighted)}
        if with_entropy:
            out["entropy"] = token_entropy(hidden, lm, self.chunk_size, scale)
        return out


def value_head(policy: nn.Module) -> nn.Linear:
    """A ``Linear(hidden, 1)`` value head for the policy's trunk, zero-initialised (V = 0 at the start, as the
    value head of Ziegler et al. 2019's lm-human-preferences code, ``init_scale=0``), in the policy's dtype."""
    lm = unwrap_causal_lm(policy)
    weight = lm.get_output_embeddings().weight
    head = nn.Linear(weight.shape[1], 1, dtype=weight.dtype, device=weight.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def critic_from_policy(policy: nn.Module) -> PreTrainedModel:
    """A separate critic with the policy's body (its weights now) and a new one-output ``score`` head. Under LoRA,
    the body with the adapters merged (freshly added adapters are zero, so: the base weights)."""
    lm = policy
    if hasattr(policy, "merge_and_unload"):
        lm = copy.deepcopy(policy).merge_and_unload()
    lm = unwrap_causal_lm(lm)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    critic = AutoModelForSequenceClassification.from_config(config, attn_implementation=config._attn_implementation,
                                                             dtype=lm.dtype)
    critic.base_model.load_state_dict(lm.base_model.state_dict())
    return critic.to(next(lm.parameters()).device)
