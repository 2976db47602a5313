"""Facts about scoring at a temperature: the LM head's ``logit_scale`` s gives log softmax(s·z) and its gradient,
and a batch's ``logit_scale`` reaches the head through ``completion_logps``."""

from __future__ import annotations

import pytest
import torch

from preftune.modeling.lm_head import head_token_logps
from preftune.modeling.logprobs import LogProbModel, model_inputs


def autograd_logps(hidden, weight, bias, targets, softcap, scale):
    """Full ``[M, V]`` logits through ordinary autograd, soft-capped then divided by T = 1/s (TRL's order)."""
    z = hidden @ weight.t() + bias
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return (z * scale).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("scale", [1 / 0.7, 0.5])
def test_scaled_head_equals_autograd_on_scaled_full_logits_in_fp64(softcap, scale):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    hidden, weight, bias = make(11, 6), make(37, 6), make(37)
    targets = torch.randint(0, 37, (11,), generator=g)
    upstream = torch.linspace(-2.0, 1.5, 11, dtype=torch.float64)

    expected = autograd_logps(hidden, weight, bias, targets, softcap, scale)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [hidden, weight, bias])
    got = head_token_logps(hidden, weight, bias, targets, softcap, 4, vocab_block=8, logit_scale=scale)["logps"]
    grads = torch.autograd.grad((got * upstream).sum(), [hidden, weight, bias])

    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    # and it is another distribution than the unscaled one
    assert not torch.allclose(got, autograd_logps(hidden, weight, bias, targets, softcap, 1.0))


def test_a_batch_logit_scale_scores_the_tempered_distribution(tokenizer, tiny_model):
    from preftune.data.batching import PreferenceCollator

    model = tiny_model().double()
    collator = PreferenceCollator(tokenizer.pad_token_id, prefix_sharing=False)
    batch = collator.groups([[5, 6, 7]], [[8, 9, 10, 11], [12, 13]], 2)
    scorer = LogProbModel(model)
    plain = scorer(**model_inputs(batch))["token_logps"]
    tempered = scorer(**model_inputs(batch | {"logit_scale": torch.tensor(1 / 0.7)}))["token_logps"]

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1)
    z = logits[batch["score_index"]].double()
    expected = (z / 0.7).log_softmax(-1).gather(-1, batch["score_target"][:, None]).squeeze(-1)
    torch.testing.assert_close(tempered, expected, rtol=0, atol=1e-7)
    assert (tempered - plain).abs().max() > 1e-3
