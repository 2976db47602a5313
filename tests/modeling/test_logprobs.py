"""Facts about the log-prob engine: equal to full logits, and equal across every batch layout."""

from __future__ import annotations

import pytest
import torch

from preftune.data.batching import PreferenceCollator, pad_sequences
from preftune.modeling.logprobs import completion_logps, model_inputs

ARCHS = ["llama", "gpt2", "qwen2", "mistral"]
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]  # (prefix_sharing, padding_free)


def naive_logps(model, prompts, completions, masks=None):
    """One sequence at a time, full ``[L, V]`` logits, log-softmax, summed over the completion targets where
    the mask (if any) is True."""
    out = []
    for k, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([list(p) + list(c)])
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        token_logps = logp[len(p) - 1 :].gather(-1, ids[0, len(p) :, None]).squeeze(-1)
        if masks is not None and masks[k] is not None:
            token_logps = token_logps[torch.tensor(masks[k])]
        out.append(token_logps.sum())
    return torch.stack(out)


def random_ids(g, lengths, vocab=300):
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def random_masks(g, completions):
    """A mask per completion (as conversations give: assistant tokens True), its first token always scored."""
    masks = [(torch.rand(len(c), generator=g) < 0.6).tolist() for c in completions]
    return [[True] + m[1:] for m in masks]


def sample_pairs(seed: int = 0, unpaired: bool = False, masked: bool = False):
    g = torch.Generator().manual_seed(seed)
    prompts = random_ids(g, (3, 7, 5, 1))
    chosen, rejected = random_ids(g, (6, 2, 9, 4)), random_ids(g, (4, 5, 1, 8))
    if unpaired:
        kl = random_ids(g, (5, 3, 2, 7))  # the fixed mismatched completions (tokenization takes other rows')
        rows = [{"prompt_ids": p, "completion_ids": c, "kl_completion_ids": k, "label": i % 2 == 0}
                for i, (p, c, k) in enumerate(zip(prompts, chosen, kl))]
    else:
        rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(prompts, chosen, rejected)]
    if masked:
        for row in rows:
            for name in [k[: -len("_ids")] for k in row if k.endswith("_ids") and k != "prompt_ids"]:
                row[f"{name}_mask"] = random_masks(g, [row[f"{name}_ids"]])[0]
    return rows


def expected_sequences(rows):
    """(prompts, completions, masks) of sequences 0..2B-1 in the collators' numbering (masks None if absent)."""
    prompts = [r["prompt_ids"] for r in rows]
    names = ("chosen", "rejected") if "chosen_ids" in rows[0] else ("completion", "kl_completion")
    completions = [r[f"{name}_ids"] for name in names for r in rows]
    masks = [r.get(f"{name}_mask") for name in names for r in rows]
    return prompts * 2, completions, masks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_logps_equal_full_logits(tiny_model, arch, chunk_size):
    model = tiny_model(arch).double()
    prompts, completions, _ = expected_sequences(sample_pairs())
    out = completion_logps(model, **model_inputs(pad_sequences(prompts, completions, 0)), chunk_size=chunk_size)
    torch.testing.assert_close(out["logps"], naive_logps(model, prompts, completions), rtol=1e-9, atol=1e-9)
    assert out["tokens"].tolist() == [len(c) for c in completions]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["padded", "shared", "packed", "shared+packed"])
@pytest.mark.parametrize("unpaired", [False, True], ids=["paired", "unpaired"])
def test_every_layout_gives_the_log_probs_and_gradients_of_separate_forwards(tiny_model, arch, layout, unpaired):
    """Prefix sharing and packing change the layout only: values and gradients are those of one
    sequence at a time (fp64, so any difference would be a masking or position error)."""
    assert_layout_equals_separate_forwards(tiny_model, arch, layout, sample_pairs(1, unpaired))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary and learned positions; the mask is the collator's
@pytest.mark.parametrize("layout", LAYOUTS, ids=["padded", "shared", "packed", "shared+packed"])
@pytest.mark.parametrize("unpaired", [False, True], ids=["paired", "unpaired"])
def test_masked_rows_sum_only_their_masked_tokens_in_every_layout(tiny_model, arch, layout, unpaired):
    """Rows with completion masks (the assistant tokens of conversations) score only the masked-in tokens,
    with the others in the sequence as context: the same values and gradients in every layout."""
    assert_layout_equals_separate_forwards(tiny_model, arch, layout, sample_pairs(1, unpaired, masked=True))


def assert_layout_equals_separate_forwards(tiny_model, arch, layout, rows):
    prompts, completions, masks = expected_sequences(rows)
    weights = torch.linspace(-1.0, 2.0, 2 * len(rows), dtype=torch.float64)

    reference_model = tiny_model(arch).double()
    expected = naive_logps(reference_model, prompts, completions, masks)
    (expected * weights).sum().backward()

    model = tiny_model(arch).double()
    batch = PreferenceCollator(0, prefix_sharing=layout[0], padding_free=layout[1])(rows)
    got = completion_logps(model, **model_inputs(batch), chunk_size=3)["logps"]
    assert batch["seq_tokens"].tolist() == [len(c) if m is None else sum(m) for c, m in zip(completions, masks)]
    (got * weights).sum().backward()

    torch.testing.assert_close(got, expected.detach(), rtol=1e-9, atol=1e-9)
    # Llama-family RMSNorm computes in fp32 even in an fp64 model; the shared prompt sums its two branches'
    # gradients before that fp32 backward, separate forwards after it, so agreement is to fp32 rounding.
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6 * q.grad.abs().max().item(), msg=name)


def test_prefix_sharing_encodes_the_prompt_once_and_packing_removes_rows():
    g = torch.Generator().manual_seed(2)
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in
            zip(random_ids(g, (20, 3, 4, 2)), random_ids(g, (10, 2, 3, 1)), random_ids(g, (12, 3, 2, 2)))]
    padded = PreferenceCollator(0, prefix_sharing=False, padding_free=False)(rows)
    shared = PreferenceCollator(0, prefix_sharing=True, padding_free=False)(rows)
    packed = PreferenceCollator(0, prefix_sharing=True, padding_free=True)(rows)
    prompt_tokens = sum(len(r["prompt_ids"]) for r in rows)
    assert int(padded["num_input_tokens"]) - int(shared["num_input_tokens"]) == prompt_tokens
    assert packed["input_ids"].shape[0] < shared["input_ids"].shape[0] == len(rows)
    assert packed["input_ids"].shape[1] == shared["input_ids"].shape[1]  # rows never exceed the longest pair


def test_eager_attention_takes_the_same_layouts(tiny_model):
    model = tiny_model("llama").double()
    model.set_attn_implementation("eager")
    rows = sample_pairs(3)
    batch = PreferenceCollator(0, prefix_sharing=True, padding_free=True)(rows)
    got = completion_logps(model, **model_inputs(batch))["logps"]
    torch.testing.assert_close(got, naive_logps(model, *expected_sequences(rows)), rtol=1e-9, atol=1e-9)


def test_token_weights_scale_each_completion_token(tiny_model):
    model = tiny_model().double()
    batch = pad_sequences(*expected_sequences(sample_pairs(3))[:2], 0)
    full = completion_logps(model, **model_inputs(batch))["logps"]
    half = completion_logps(model, **model_inputs(batch), token_weights=torch.full_like(
        batch["score_target"], 0.5, dtype=torch.float64))["logps"]
    torch.testing.assert_close(half, 0.5 * full)


def test_wpo_log_weight_matches_definition(tiny_model):
    model = tiny_model().double()
    prompts, completions, _ = expected_sequences(sample_pairs(4))
    out = completion_logps(model, **model_inputs(pad_sequences(prompts, completions, 0)), with_wpo=True)
    expected = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([list(p) + list(c)])
        logp = model(input_ids=ids).logits[0, len(p) - 1 : -1].log_softmax(-1)
        target = logp.gather(-1, ids[0, len(p) :, None]).squeeze(-1)
        expected.append((target - (2 * logp).logsumexp(-1)).mean())
    torch.testing.assert_close(out["wpo"], torch.stack(expected).detach(), rtol=1e-9, atol=1e-9)


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="empty prompt"):
        PreferenceCollator(0)([{"prompt_ids": [], "chosen_ids": [5], "rejected_ids": [6]}])


def test_a_mask_that_does_not_fit_its_completion_is_refused():
    with pytest.raises(ValueError, match="mask has 2 entries for 3"):
        PreferenceCollator(0)([{"prompt_ids": [4], "chosen_ids": [5, 6, 7], "rejected_ids": [6],
                                "chosen_mask": [True, False], "rejected_mask": [True]}])


def test_unpaired_rows_without_a_fixed_mismatched_completion_are_refused():
    rows = [{"prompt_ids": [4], "completion_ids": [5], "label": True}] * 2
    with pytest.raises(ValueError, match="kl_completion_ids"):
        PreferenceCollator(0)(rows)
