"""Facts about the log-prob engine: equal to the naive full-logits computation, padding-invariant."""

from __future__ import annotations

import pytest
import torch

from preftune.data.batching import pad_sequences
from preftune.modeling.logprobs import completion_logps

ARCHS = ["llama", "gpt2", "qwen2", "mistral"]


def naive_logps(model, batch):
    """Full ``[N, L, V]`` logits, log-softmax in fp32, summed over completion targets."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def sample_batch(seed: int = 0, vocab: int = 300):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (3, 7, 5)]
    completions = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (6, 2, 9)]
    return prompts, completions


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_logps_equal_full_logits(tiny_model, arch, chunk_size):
    model = tiny_model(arch).double()
    batch = pad_sequences(*sample_batch(), pad_id=0)
    out = completion_logps(model, **batch, chunk_size=chunk_size)
    torch.testing.assert_close(out["logps"].double(), naive_logps(model, batch), rtol=1e-6, atol=1e-6)
    assert out["tokens"].tolist() == [6, 2, 9]


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_gradient_equals_full_logits_gradient(tiny_model, arch):
    batch = pad_sequences(*sample_batch(1), pad_id=0)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grads = []
    for fn in (lambda m: completion_logps(m, **batch, chunk_size=3)["logps"].double(),
               lambda m: naive_logps(m, batch)):
        model = tiny_model(arch).double()
        (fn(model) * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_does_not_change_logps(tiny_model, arch):
    model = tiny_model(arch)
    prompts, completions = sample_batch(2)
    together = completion_logps(model, **pad_sequences(prompts, completions, pad_id=0))["logps"]
    alone = torch.cat([
        completion_logps(model, **pad_sequences([p], [c], pad_id=0))["logps"]
        for p, c in zip(prompts, completions)
    ])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_token_weights_scale_each_completion_token(tiny_model):
    model = tiny_model().double()
    batch = pad_sequences(*sample_batch(3), pad_id=0)
    weights = batch["completion_mask"].double() * 0.5
    full = completion_logps(model, **batch)["logps"]
    half = completion_logps(model, **batch, token_weights=weights)["logps"]
    torch.testing.assert_close(half, 0.5 * full)


def test_wpo_log_weight_matches_definition(tiny_model):
    model = tiny_model().double()
    batch = pad_sequences(*sample_batch(4), pad_id=0)
    out = completion_logps(model, **batch)
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    logp = logits.log_softmax(-1)
    target = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    log_sq = (2 * logp).logsumexp(-1)
    mask = batch["completion_mask"][:, 1:]
    expected = ((target - log_sq) * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(out["wpo"].double(), expected, rtol=1e-6, atol=1e-6)
