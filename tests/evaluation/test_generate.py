"""Facts about sampling: it stops at EOS, is reproducible with a seed, and greedy is the argmax path."""

from __future__ import annotations

import copy

import torch
from torch import nn

from preftune.evaluation.generate import generate

PROMPTS = ["The movie was", "I did not like the plot; it was slow", "What"]


def with_eos_bias(model, tokenizer, bias: float):
    """The same model with ``bias`` added to the EOS logit, so that samples end early and often."""
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight.data.copy_(old.weight.data)
    head.bias.data.zero_()
    head.bias.data[tokenizer.eos_token_id] = bias
    model.lm_head = head
    return model


def naive_greedy(model, prompt_ids, steps, eos_id):
    """Argmax decoding one prompt at a time, recomputing the whole sequence at every step (no cache)."""
    ids = list(prompt_ids)
    out = []
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
        if nxt == eos_id:
            break
    return out


def test_greedy_with_cache_and_left_padding_equals_naive_argmax(tiny_model, tokenizer):
    model = tiny_model()
    samples = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0)
    for prompt_ids, completion in zip(samples.prompt_ids, samples.completion_ids):
        assert completion == naive_greedy(model, prompt_ids, 10, tokenizer.eos_token_id)


def test_prompt_ids_are_the_unpadded_encoding(tiny_model, tokenizer):
    samples = generate(tiny_model(), tokenizer, PROMPTS, max_new_tokens=3, temperature=0)
    for prompt, ids in zip(PROMPTS, samples.prompt_ids):
        assert ids == tokenizer(prompt)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id


def test_top_k_1_sampling_is_greedy(tiny_model, tokenizer):
    model = tiny_model()
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0)
    top1 = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=3)
    assert top1.completion_ids == greedy.completion_ids


def test_seeded_sampling_is_deterministic_and_leaves_global_rng_alone(tiny_model, tokenizer):
    model = tiny_model()
    state = torch.random.get_rng_state()
    a = generate(model, tokenizer, PROMPTS, max_new_tokens=12, num_samples=3, seed=7)
    b = generate(model, tokenizer, PROMPTS, max_new_tokens=12, num_samples=3, seed=7)
    c = generate(model, tokenizer, PROMPTS, max_new_tokens=12, num_samples=3, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids
    # The samples of one prompt differ from each other (the seed is not reset per sample).
    assert len({tuple(ids) for ids in a.completion_ids[:3]}) > 1


def test_samples_stop_at_the_first_eos(tiny_model, tokenizer):
    model = with_eos_bias(tiny_model(), tokenizer, bias=5.0)
    eos = tokenizer.eos_token_id
    samples = generate(model, tokenizer, PROMPTS, max_new_tokens=10, num_samples=16, seed=0, batch_size=20)
    assert 0 < sum(samples.ended_with_eos) < len(samples)  # both cases occur
    for ids, ended, text in zip(samples.completion_ids, samples.ended_with_eos, samples.completions):
        if ended:
            assert ids[-1] == eos and eos not in ids[:-1]
        else:
            assert len(ids) == 10 and eos not in ids
        assert "<|eos|>" not in text and "<|pad|>" not in text
    assert samples.lengths == [len(ids) for ids in samples.completion_ids]


def test_layout_is_prompt_major_and_state_is_restored(tiny_model, tokenizer):
    model = tiny_model().train()
    tokenizer.padding_side = "right"
    samples = generate(model, tokenizer, PROMPTS, max_new_tokens=4, num_samples=2, seed=0, batch_size=4)
    assert samples.prompts == [p for p in PROMPTS for _ in range(2)]
    assert [list(g) for g in samples.groups()] == [[0, 1], [2, 3], [4, 5]]
    assert tokenizer.padding_side == "right"
    assert model.training


def test_batch_size_does_not_change_greedy_output(tiny_model, tokenizer):
    model = tiny_model()
    one = generate(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0, batch_size=1)
    all_ = generate(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0, batch_size=64)
    assert one.completion_ids == all_.completion_ids


def test_a_tokenizer_without_pad_token_pads_with_eos_and_is_restored(tiny_model, tokenizer):
    model = tiny_model()
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=5, temperature=0)
    got = generate(model, no_pad, PROMPTS, max_new_tokens=5, temperature=0)
    assert got.completion_ids == expected.completion_ids
    assert no_pad.pad_token is None


def test_rows_hold_the_decoded_samples(tiny_model, tokenizer):
    samples = generate(tiny_model(), tokenizer, PROMPTS, max_new_tokens=4, seed=0)
    rows = samples.to_rows()
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["tokens"] for r in rows] == samples.lengths
    for row, ids in zip(rows, samples.completion_ids):
        assert row["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
