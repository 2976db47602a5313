"""Facts about the lean decoding step: on Llama, Qwen2 (q/k/v bias) and Mistral it gives the Hugging Face
forward's logits for left-padded prompts (rope scaling, tied embeddings, an explicit head_dim and a non-default
rms_norm_eps included), sampling through it draws the same tokens as the plain loop for the same seed, and
models it does not compute are left to the Hugging Face path."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from preftune.rollout import fast_decode, sampling
from preftune.rollout.sampling import SamplingParams, generate

PROMPT_IDS = [[1, 17, 42, 9, 250, 33, 8], [1, 5, 6], [1, 77, 78, 79, 80]]  # left-padded to 7: rows 2, 3 padded
CONFIGS = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2"),  # q/k/v projections with bias
    "mistral": dict(arch="mistral"),
    "llama-variants": dict(arch="llama", tie_word_embeddings=True, head_dim=24, rms_norm_eps=1e-3,
                           attention_bias=True, mlp_bias=True,
                           rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "llama3-rope": dict(arch="llama", rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16}),
}


def build(tiny_model, name: str, seed: int = 0) -> nn.Module:
    cfg = dict(CONFIGS[name])
    tied = cfg.pop("tie_word_embeddings", False)
    model = tiny_model(cfg.pop("arch"), seed=seed, **cfg)
    if tied:  # the LM head is the embedding matrix
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():  # nonzero biases, so a bias the step forgot would show
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


def left_padded(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return sampling._left_padded(PROMPT_IDS, pad_id, torch.device("cpu"))


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_decoding_steps_give_the_hf_forwards_logits(tiny_model, tokenizer, name):
    model = build(tiny_model, name)
    input_ids, mask = left_padded(tokenizer.pad_token_id)
    steps = 6
    assert fast_decode.supports(model, input_ids.shape[1] + steps)
    if name == "llama-variants":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    decoder = fast_decode.LlamaDecoder(model, cache, mask, steps)
    generator = torch.Generator().manual_seed(0)
    new = torch.randint(3, model.config.vocab_size, (len(PROMPT_IDS), steps), generator=generator)
    position = positions[:, -1:]
    for t in range(steps):
        position = position + 1
        logits = decoder.step(new[:, t], position)
        # The whole sequence through the HF forward, no cache.
        ids = torch.cat([input_ids, new[:, : t + 1]], 1)
        full_mask = torch.cat([mask, torch.ones_like(new[:, : t + 1])], 1)
        full_positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        expected = model(input_ids=ids, attention_mask=full_mask, position_ids=full_positions).logits[:, -1]
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama-variants"])
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_seeded_samples_are_the_plain_loops(tiny_model, tokenizer, name, temperature, top_k, top_p):
    model = build(tiny_model, name, seed=1)
    n = 1 if temperature == 0 else 3
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, n=n, seed=7,
                            batch_size=2 * n)
    prompts = ["The movie was", "I did not like the plot; it was slow", "What"]
    calls = []
    original = fast_decode.LlamaDecoder.step

    def counted(self, token, position):
        calls.append(1)
        return original(self, token, position)

    with mock.patch.object(fast_decode.LlamaDecoder, "step", counted):
        lean = generate(model, tokenizer, prompts, params)
    assert calls, "the lean step was not used"
    with mock.patch.object(fast_decode, "supports", return_value=False):
        plain = generate(model, tokenizer, prompts, params)
    assert lean.completion_ids == plain.completion_ids
    assert lean.ended_with_eos == plain.ended_with_eos
    for a, b in zip(lean.logprobs, plain.logprobs):
        assert a == pytest.approx(b, abs=1e-6)


def test_models_it_does_not_compute_keep_the_hf_path(tiny_model):
    assert fast_decode.supports(tiny_model("llama"), 64)
    assert not fast_decode.supports(tiny_model("gpt2"), 64)
    # A sliding window the sequence can reach changes the attention: refused; one it cannot reach does not.
    windowed = tiny_model("mistral", sliding_window=16)
    assert fast_decode.supports(windowed, 16) and not fast_decode.supports(windowed, 17)
    assert not fast_decode.supports(tiny_model("qwen2", use_sliding_window=True, sliding_window=16,
                                               max_window_layers=0), 8)
    # A wrapped linear layer (LoRA, quantization) or a hook (offloading) would be bypassed: refused.
    wrapped = tiny_model("llama")
    proj = wrapped.model.layers[0].mlp.up_proj
    wrapped.model.layers[0].mlp.up_proj = nn.Sequential(proj)
    assert not fast_decode.supports(wrapped, 64)
    hooked = tiny_model("llama")
    hooked.model.layers[1].self_attn.register_forward_hook(lambda *args: None)
    assert not fast_decode.supports(hooked, 64)
