"""Facts about the LM-head function: its values and gradients are those of plain autograd on full logits."""

from __future__ import annotations

import pytest
import torch

from preftune.modeling.lm_head import head_token_logps


def autograd_logps(hidden, weight, bias, targets, softcap):
    """Full ``[M, V]`` logits through ordinary autograd: the definition the function must match."""
    z = hidden @ weight.t() + (0 if bias is None else bias)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def leaves(seed, dtype=torch.float64, m=11, h=6, v=37, bias=True):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(m, h), make(v, h), (make(v) if bias else None), torch.randint(0, v, (m,), generator=g)


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])
@pytest.mark.parametrize("vocab_block", [5, 16, 64])  # 37 entries: 8 tiles with a short last one, 3 tiles, 1 tile
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_autograd_on_full_logits(chunk_size, vocab_block, softcap, bias):
    hidden, weight, b, targets = leaves(0, bias=bias)
    upstream = torch.linspace(-2.0, 1.5, hidden.shape[0], dtype=torch.float64)  # a loss that weighs tokens unequally

    expected = autograd_logps(hidden, weight, b, targets, softcap)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [t for t in (hidden, weight, b) if t is not None])
    got = head_token_logps(hidden, weight, b, targets, softcap, chunk_size, vocab_block=vocab_block)["logps"]
    grads = torch.autograd.grad((got * upstream).sum(), [t for t in (hidden, weight, b) if t is not None])

    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_sq_norm_is_log_sum_of_squared_probabilities():
    hidden, weight, b, targets = leaves(1)
    sq_norm = head_token_logps(hidden, weight, b, targets, None, 4, with_sq_norm=True, vocab_block=5)["sq_norm"]
    p = (hidden @ weight.t() + b).softmax(-1)
    torch.testing.assert_close(sq_norm, p.square().sum(-1).log().detach(), rtol=1e-12, atol=1e-12)
    assert not sq_norm.requires_grad


def test_a_frozen_head_gets_no_gradient_but_the_hidden_states_do():
    hidden, weight, _, targets = leaves(2, bias=False)
    weight.requires_grad_(False)  # LoRA leaves the head frozen
    got = head_token_logps(hidden, weight, None, targets, None, 3, vocab_block=8)["logps"]
    got.sum().backward()
    assert weight.grad is None
    expected = torch.autograd.grad(autograd_logps(hidden, weight, None, targets, None).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-10, atol=1e-12)


def test_under_bf16_autocast_matches_autocast_autograd_with_an_fp32_softmax():
    """Mixed precision: both paths multiply in bf16 and take the softmax in fp32, so they agree to fp32
    rounding (the bf16 product is the same; only summation order differs)."""
    hidden, weight, _, targets = leaves(3, dtype=torch.float32, m=40, h=32, v=300, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = (hidden @ weight.t()).float()
        expected = z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        got = head_token_logps(hidden, weight, None, targets, None, 16, vocab_block=64)["logps"]
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    grads = torch.autograd.grad(got.sum(), (hidden, weight))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_mean_logit_and_argmax_are_read_off_the_tiles(softcap):
    torch.manual_seed(4)
    hidden, weight, bias = torch.randn(9, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64), None
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    targets = logits.argmax(-1)
    targets[::2] = (targets[::2] + 1) % 11  # every other target is not the argmax
    out = head_token_logps(hidden, weight, bias, targets, softcap, chunk_size=4, vocab_block=3)
    torch.testing.assert_close(out["mean_logit"], logits.mean(-1), rtol=0, atol=1e-12)
    assert out["is_argmax"].tolist() == (targets == logits.argmax(-1)).tolist()
    assert out["is_argmax"].tolist() == [i % 2 == 1 for i in range(9)]
