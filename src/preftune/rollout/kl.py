"""The sequence-level KL(π‖π_ref) of sampled completions, one estimator for every report that names a ``kl`` of
samples (``preftune eval``, the frontier, a rounds run's evaluations).

Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)), the exact per-token KL over the whole vocabulary summed over the completion's
tokens (the EOS step included when the sample produced one): the x-axis of the DPO paper's Fig. 2 (Rafailov et al.
2023, arXiv 2305.18290, §6.1). Its mean over y ~ π estimates KL(π(·|x) ‖ π_ref(·|x)) with lower variance than
Σ_t log π/π_ref.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from preftune.data.batching import pad_sequences
from preftune.modeling.lm_head import head_logits
from preftune.modeling.logprobs import flat_hidden_states, unwrap_causal_lm
from preftune.modeling.modes import eval_mode
from preftune.rollout.encoding import length_sorted_batches
from preftune.rollout.record import Rollout


def _completion_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Hidden states ``[M, H]`` at the M positions that predict a completion token (``batch["score_index"]``)."""
    lm = unwrap_causal_lm(model)
    device = next(lm.parameters()).device
    hidden = flat_hidden_states(lm, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                batch["position_ids"].to(device), lm.get_output_embeddings().weight.dtype)
    return hidden[batch["score_index"].to(device)]


def _log_softmax_head(model: nn.Module, hidden: Tensor) -> Tensor:
    """``log π(·|context)`` ``[k, V]`` from hidden states ``[k, H]``, in fp32 (fp64 for fp64 models)."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    return head_logits(hidden, head.weight, getattr(head, "bias", None),
                       getattr(lm.config, "final_logit_softcapping", None)).log_softmax(-1)


@torch.no_grad()
def sequence_kl(
    policy: nn.Module, reference: nn.Module, rollout: Rollout, *, batch_size: int = 32, chunk_size: int = 1024
) -> Tensor:
    """Sequence-level KL(π‖π_ref) of each sample, fp32 ``[N]``: Σ_t Σ_v π_t(v) (log π_t(v) − log π_ref,t(v)).

    ``t`` runs over the completion's tokens (``rollout.completion_ids``, EOS step included). The model
    bodies run once per length-sorted batch; only the completion positions are projected to the
    vocabulary, ``chunk_size`` at a time, so ``[batch, seq, vocab]`` logits never exist. Sequences are
    laid out by :func:`preftune.data.batching.pad_sequences` (right padding, explicit positions).
    """
    out = torch.zeros(len(rollout))
    prompt_ids = rollout.sample_prompt_ids
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, rollout.completion_ids)]
    with eval_mode(policy, reference):
        for idx in length_sorted_batches(lengths, batch_size):
            batch = pad_sequences([prompt_ids[i] for i in idx], [rollout.completion_ids[i] for i in idx], pad_id=0)
            h_policy, h_reference = _completion_hidden(policy, batch), _completion_hidden(reference, batch)
            per_token = []
            for start in range(0, h_policy.shape[0], chunk_size):
                logp = _log_softmax_head(policy, h_policy[start : start + chunk_size])
                logq = _log_softmax_head(reference, h_reference[start : start + chunk_size]).to(logp.device)
                per_token.append((logp.exp() * (logp - logq)).sum(-1))
            kl = torch.cat(per_token).float().cpu()
            out[idx] = torch.zeros(len(idx)).index_add(0, batch["score_seq"], kl)
    return out
