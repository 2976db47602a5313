"""Facts about sampling: prompts are encoded as training encodes them, generation stops at every EOS id,
the recorded log-probs are those of the distribution sampled from, greedy is the argmax path, a seed
reproduces the samples without touching the global RNG, and bad parameters are refused by name."""

from __future__ import annotations

import copy
import dataclasses
from unittest import mock

import pytest
import torch
from torch import nn
from transformers.generation.logits_process import TopPLogitsWarper

from preftune.errors import ConfigError, DataError
from preftune.rollout import sampling
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate, stop_token_ids

PROMPTS = ["The movie was", "I did not like the plot; it was slow", "What"]
CONVERSATIONS = [[{"role": "user", "content": "The movie was"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]]


def with_logit_bias(model, token_id: int, bias: float):
    """The same model with ``bias`` added to one token's logit, so that it is sampled early and often."""
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight.data.copy_(old.weight.data)
    head.bias.data.zero_()
    head.bias.data[token_id] = bias
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


@torch.no_grad()
def naive_logprobs(model, prompt_ids, completion_ids, temperature=1.0, top_k=0, top_p=1.0):
    """log softmax of (logits / T, top-k filtered, then Hugging Face's top-p warper) at each completion token,
    each prefix run alone."""
    out = []
    for t, token in enumerate(completion_ids):
        logits = model(input_ids=torch.tensor([prompt_ids + completion_ids[:t]])).logits[0, -1].double()
        logits = logits / temperature
        if top_k:
            kth = logits.topk(top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            logits = TopPLogitsWarper(top_p=top_p)(None, logits[None])[0]
        out.append(float(logits.log_softmax(-1)[token]))
    return out


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 0), (0.7, 5), (0, 0)])
def test_logprobs_are_those_of_the_distribution_sampled_from(tiny_model, tokenizer, temperature, top_k):
    model = tiny_model().double()
    n = 1 if temperature == 0 else 2
    rollout = generate(model, tokenizer, PROMPTS[:2], SamplingParams(max_new_tokens=6, temperature=temperature,
                                                                     top_k=top_k, n=n, seed=1))
    rollout.check()
    for k, (completion, logprobs) in enumerate(zip(rollout.completion_ids, rollout.logprobs)):
        expected = naive_logprobs(model, rollout.prompt_ids[rollout.prompt_index(k)], completion,
                                  temperature=temperature or 1.0, top_k=top_k)
        assert logprobs == pytest.approx(expected, abs=1e-6)


def test_logprobs_under_top_p_are_those_of_hugging_faces_warper(tiny_model, tokenizer):
    model = tiny_model().double()
    rollout = generate(model, tokenizer, ["The movie was"], SamplingParams(max_new_tokens=5, temperature=0.8,
                                                                         top_p=0.9, n=4, seed=4))
    for k, completion in enumerate(rollout.completion_ids):
        expected = naive_logprobs(model, rollout.prompt_ids[0], completion, temperature=0.8, top_p=0.9)
        assert rollout.logprobs[k] == pytest.approx(expected, abs=1e-6)


def test_the_draw_refuses_non_finite_scores():
    with pytest.raises(ValueError, match="NaN or inf"):
        sampling.draw(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]))


def test_the_two_level_draw_over_many_blocks_follows_the_softmax_row_by_row():
    """A vocabulary of 3.5 blocks and four rows of their own (a peaked one, a flat one, one whose only live
    entries are the very first and the very last, one with a single live entry in the padded tail block):
    40 000 draws per row; filtered entries never drawn, and within 4.5 standard errors of softmax(s) the frequency
    of every entry expected 20 times or more and the total frequency of the rarer ones."""
    vocab = int(3.5 * sampling.DRAW_BLOCK)
    generator = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.randn(vocab, generator=generator) * 3, torch.zeros(vocab),
                        torch.full((vocab,), float("-inf")), torch.full((vocab,), float("-inf"))])
    rows[2, 0], rows[2, -1] = 0.0, 1.0
    rows[3, -3] = 5.0
    draws = 40_000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        token, _ = sampling.draw(rows.repeat_interleave(draws, dim=0))
    for r, scores in enumerate(rows):
        probs = scores.double().softmax(-1)
        counts = torch.bincount(token[r * draws : (r + 1) * draws], minlength=vocab).double()
        assert counts[probs == 0].sum() == 0
        common = probs * draws >= 20
        rare_probs = probs[~common].sum().reshape(1)
        frequencies = torch.cat([counts[common], counts[~common].sum().reshape(1)]) / draws
        expected = torch.cat([probs[common], rare_probs])
        error = (frequencies - expected).abs()
        assert bool((error <= 4.5 * (expected * (1 - expected) / draws).sqrt() + 1e-12).all()), (r, error.max())


def test_the_draw_follows_the_softmax_of_the_scores_and_never_picks_a_filtered_token():
    """50 000 draws from one row: every frequency within 4.5 standard errors of softmax(s), the filtered
    (-inf) tokens, first and last included, never drawn, and the log-prob returned is log_softmax(s)[y]."""
    scores = torch.tensor([float("-inf"), 1.0, 0.0, float("-inf"), 2.5, -1.0, 0.3, float("-inf")])
    probs = scores.softmax(-1)
    draws = 50_000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        token, logprob = sampling.draw(scores.expand(draws, -1).contiguous())
    counts = torch.bincount(token, minlength=len(scores)).double()
    assert counts[probs == 0].sum() == 0
    error = (counts / draws - probs.double()).abs()
    assert bool((error <= 4.5 * (probs.double() * (1 - probs.double()) / draws).sqrt() + 1e-12).all()), error
    torch.testing.assert_close(logprob, scores.log_softmax(-1)[token])
    greedy, greedy_logprob = sampling.draw(scores[None], greedy=True)
    assert int(greedy) == 4 and float(greedy_logprob) == pytest.approx(float(scores.log_softmax(-1)[4]))


def test_the_checkpoints_generation_config_cannot_change_the_distribution(tiny_model, tokenizer):
    model = tiny_model()
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.top_k = 1
    model.generation_config.min_new_tokens = 4
    rollout = generate(model, tokenizer, PROMPTS[:1], SamplingParams(max_new_tokens=6, n=2, seed=0))
    for completion, logprobs in zip(rollout.completion_ids, rollout.logprobs):
        assert logprobs == pytest.approx(naive_logprobs(model, rollout.prompt_ids[0], completion), abs=1e-5)


def test_top_k_1_sampling_is_greedy(tiny_model, tokenizer):
    model = tiny_model()
    greedy = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    top1 = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=8, top_k=1, seed=3))
    assert top1.completion_ids == greedy.completion_ids


def test_seeded_sampling_is_deterministic_and_leaves_global_rng_alone(tiny_model, tokenizer):
    model = tiny_model()
    state = torch.random.get_rng_state()
    a = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=7))
    b = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=7))
    c = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=8))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids
    # The samples of one prompt differ from each other (the seed is not reset per sample).
    assert len({tuple(ids) for ids in a.completion_ids[:3]}) > 1


@pytest.mark.parametrize("path", ["llama", "gpt2", "generate"])
def test_a_prompts_samples_under_its_own_seed_do_not_depend_on_the_prompts_beside_it(tiny_model, tokenizer, path):
    """With ``prompt_seeds`` a prompt's n samples are the same sampled alone, in one batch with the others, or in
    another order and batch size (llama: the fast decoder; gpt2: the plain loop; generate: Hugging Face's, for
    models the loop does not drive). With an EOS bias the rows end at different steps, so the batch runs on after
    a prompt's samples ended."""
    model = with_logit_bias(tiny_model("gpt2" if path == "generate" else path), tokenizer.eos_token_id, 3.0).double()
    seeds = (11, 22, 33)
    params = SamplingParams(max_new_tokens=10, n=3, seed=None, batch_size=9, prompt_seeds=seeds)
    state = torch.random.get_rng_state()
    with mock.patch.object(sampling, "_lean_decoding", return_value=path != "generate"):
        together = generate(model, tokenizer, PROMPTS, params)
        reordered = generate(model, tokenizer, PROMPTS[::-1],
                             dataclasses.replace(params, prompt_seeds=seeds[::-1], batch_size=3))
        alone = [generate(model, tokenizer, [prompt], dataclasses.replace(params, prompt_seeds=(seed,)))
                 for prompt, seed in zip(PROMPTS, seeds)]
        other = generate(model, tokenizer, PROMPTS[:1], dataclasses.replace(params, prompt_seeds=(12,)))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert 0 < sum(together.ended_with_eos) < len(together)
    for i, single in enumerate(alone):
        mine, theirs = slice(3 * i, 3 * i + 3), slice(3 * (2 - i), 3 * (2 - i) + 3)
        assert together.completion_ids[mine] == single.completion_ids == reordered.completion_ids[theirs]
        for a, b in zip(together.logprobs[mine], single.logprobs):
            assert a == pytest.approx(b, abs=1e-9)
    assert len({tuple(ids) for ids in alone[0].completion_ids}) > 1  # the group's samples are not one draw repeated
    assert other.completion_ids != alone[0].completion_ids  # another seed, other samples


def test_prompt_seeds_are_checked_by_name(tiny_model, tokenizer):
    with pytest.raises(ConfigError, match="prompt_seeds must be integers in \\[0, 2\\*\\*63\\), got -1"):
        SamplingParams(prompt_seeds=(1, -1))
    with pytest.raises(ValueError, match="3 prompts but 2 prompt_seeds"):
        generate(tiny_model(), tokenizer, PROMPTS, SamplingParams(max_new_tokens=2, prompt_seeds=(1, 2)))


def test_samples_stop_at_the_first_eos(tiny_model, tokenizer):
    eos = tokenizer.eos_token_id
    model = with_logit_bias(tiny_model(), eos, bias=5.0)
    rollout = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=10, n=16, seed=0, batch_size=20))
    assert 0 < sum(rollout.ended_with_eos) < len(rollout)  # both cases occur
    for ids, ended, text in zip(rollout.completion_ids, rollout.ended_with_eos, rollout.completions):
        if ended:
            assert ids[-1] == eos and eos not in ids[:-1]
        else:
            assert len(ids) == 10 and eos not in ids
        assert "<|eos|>" not in text and "<|pad|>" not in text
    assert rollout.lengths == [len(ids) for ids in rollout.completion_ids]


def test_generation_stops_at_every_eos_id_of_the_generation_config(tiny_model, tokenizer):
    """Like Llama 3 (<|eot_id|> besides <|end_of_text|>) or Qwen (<|im_end|> besides <|endoftext|>)."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|user|>")  # a second end id, not the tokenizer's EOS
    model = with_logit_bias(tiny_model(), end_of_turn, bias=4.0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, end_of_turn]
    rollout = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=12, n=8, seed=0))
    stopped = [ids for ids, ended in zip(rollout.completion_ids, rollout.ended_with_eos) if ended]
    assert any(ids[-1] == end_of_turn for ids in stopped)
    for ids, ended in zip(rollout.completion_ids, rollout.ended_with_eos):
        inner = ids[:-1] if ended else ids
        assert end_of_turn not in inner and tokenizer.eos_token_id not in inner
        assert ended == (ids[-1] in (tokenizer.eos_token_id, end_of_turn))
    # The text is what precedes the stop token.
    k = next(k for k, ids in enumerate(rollout.completion_ids) if ids[-1] == end_of_turn)
    assert rollout.completions[k] == tokenizer.decode(rollout.completion_ids[k][:-1], skip_special_tokens=True)
    # The model's generation config may also name a single int.
    model.generation_config.eos_token_id = end_of_turn
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, end_of_turn]


def test_layout_is_prompt_major_and_state_is_restored(tiny_model, tokenizer):
    model = tiny_model().train()
    tokenizer.padding_side = "right"
    rollout = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=4, n=2, seed=0, batch_size=4))
    assert rollout.sample_prompts == [p for p in PROMPTS for _ in range(2)]
    assert len(rollout.prompt_ids) == len(PROMPTS)  # encoded once per group
    assert [list(g) for g in rollout.groups()] == [[0, 1], [2, 3], [4, 5]]
    assert tokenizer.padding_side == "right"
    assert model.training


def test_batch_size_does_not_change_greedy_output(tiny_model, tokenizer):
    model = tiny_model()
    one = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=6, temperature=0, batch_size=1))
    all_ = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=6, temperature=0, batch_size=64))
    assert one.completion_ids == all_.completion_ids


def test_a_tokenizer_without_pad_token_works_and_is_left_alone(tiny_model, tokenizer):
    model = tiny_model()
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    expected = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=5, temperature=0))
    got = generate(model, no_pad, PROMPTS, SamplingParams(max_new_tokens=5, temperature=0))
    assert got.completion_ids == expected.completion_ids
    assert no_pad.pad_token is None


def test_rows_and_padded_tensors_hold_the_samples(tiny_model, tokenizer):
    rollout = generate(tiny_model(), tokenizer, PROMPTS, SamplingParams(max_new_tokens=4, seed=0))
    rows = rollout.to_rows()
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["tokens"] for r in rows] == rollout.lengths
    for row, ids in zip(rows, rollout.completion_ids):
        assert row["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
    padded = rollout.padded(pad_id=0)
    assert padded["completion_mask"].sum(1).tolist() == rollout.lengths
    for k, ids in enumerate(rollout.completion_ids):
        assert padded["completion_ids"][k, : len(ids)].tolist() == ids
        assert padded["logprobs"][k, : len(ids)].tolist() == pytest.approx(rollout.logprobs[k])
        assert (padded["logprobs"][k, len(ids):] == 0).all()


def test_rollout_grouped_view_is_prompt_major():
    rollout = Rollout(prompts=["a", "b"], prompt_ids=[[1], [1]], group_size=3)
    assert rollout.grouped([0, 1, 2, 3, 4, 5]).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert [rollout.prompt_index(k) for k in range(6)] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", 0), ("n", 0), ("batch_size", -1), ("temperature", -0.5), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("seed", 1.5), ("n", 2.0),
])
def test_bad_sampling_params_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(ConfigError, match="temperature=0"):
        SamplingParams(temperature=0, n=2)


def test_a_runs_sampling_params_are_its_configs():
    from preftune.config import build_config

    cfg = build_config({"method": "grpo", "max_completion_length": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 5})
    assert SamplingParams.from_config(cfg, n=8, prompt_seeds=[3, 4]) == SamplingParams(
        max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=5, n=8, seed=None, batch_size=64, prompt_seeds=(3, 4))
    unset = SamplingParams.from_config(build_config({"method": "grpo"}), n=100, seed=1)
    assert (unset.max_new_tokens, unset.batch_size, unset.seed) == (256, 100, 1)  # a whole group per call
    with pytest.raises(ConfigError, match="temperature=0 is greedy"):  # checked as any SamplingParams
        SamplingParams.from_config(dataclasses.replace(cfg, temperature=0.0), n=2)


def test_prompts_of_two_kinds_or_malformed_messages_are_refused(tiny_model, tokenizer):
    model = tiny_model()
    with pytest.raises(DataError, match="row 1.*prompt 0 is a string"):
        generate(model, tokenizer, ["text", CONVERSATIONS[0]], SamplingParams(max_new_tokens=2))
    with pytest.raises(DataError, match="message 0: 'content' must be a string"):
        generate(model, tokenizer, [[{"role": "user", "content": 3}]], SamplingParams(max_new_tokens=2))
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(DataError, match="no chat_template"):
        generate(model, no_template, CONVERSATIONS, SamplingParams(max_new_tokens=2))


# ------------------------------------------------------------------------------------ the decoding loop


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_the_greedy_decoding_loop_gives_hf_generates_tokens(tiny_model, tokenizer, arch):
    """The loop (prefill once per prompt, cache, left-padded batches of two prompts) against transformers'
    generate on the same batches: the same tokens, the same ends, the same log-probs."""
    model = with_logit_bias(tiny_model(arch), tokenizer.eos_token_id, bias=3.0)
    params = SamplingParams(max_new_tokens=12, temperature=0, batch_size=2)
    loop = generate(model, tokenizer, PROMPTS, params)
    with mock.patch.object(sampling, "_lean_decoding", return_value=False):
        reference = generate(model, tokenizer, PROMPTS, params)
    assert sampling._lean_decoding(model)
    assert loop.completion_ids == reference.completion_ids
    assert loop.ended_with_eos == reference.ended_with_eos
    for a, b in zip(loop.logprobs, reference.logprobs):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_each_sample_of_the_decoding_loop_carries_its_own_prefixs_distribution(tiny_model, tokenizer, arch,
                                                                               temperature, top_k, top_p):
    """Sampled groups from left-padded batches sharing one prefill per prompt: every sample stops at its first
    EOS, and each recorded log-prob is that of its own prefix run alone through the model and the same
    warpers. With plain sampling the EOS bias makes rows stop at different steps, so finished rows ride along
    padded while the others go on (a wrong cache, position or mask for them would change the log-probs)."""
    model = with_logit_bias(tiny_model(arch), tokenizer.eos_token_id, bias=3.0).double()
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, n=3, seed=5,
                            batch_size=6)
    assert sampling._lean_decoding(model)
    rollout = generate(model, tokenizer, PROMPTS, params)
    rollout.check()
    if temperature == 1.0:  # some rows ended, some ran to the budget: finished rows rode along padded
        assert 0 < sum(rollout.ended_with_eos) < len(rollout)
    for k, (completion, logprobs) in enumerate(zip(rollout.completion_ids, rollout.logprobs)):
        assert tokenizer.eos_token_id not in completion[:-1]
        expected = naive_logprobs(model, rollout.prompt_ids[rollout.prompt_index(k)], completion,
                                  temperature=temperature, top_k=top_k, top_p=top_p)
        assert logprobs == pytest.approx(expected, abs=1e-6)


def test_each_prompt_is_prefilled_once_for_its_group(tiny_model, tokenizer):
    model = tiny_model()
    calls = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    rollout = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=5, n=4, seed=0))
    width = max(map(len, rollout.prompt_ids))
    assert calls[0] == (len(PROMPTS), width)  # the prefill: 3 prompts, not 12 copies
    assert all(shape == (4 * len(PROMPTS), 1) for shape in calls[1:])  # then one token per sample and step
    assert len(calls) == max(rollout.lengths)


# --------------------------------------------------------------------------- the model's positions cap the budget


def test_generation_stops_at_the_models_positions_and_says_so_once(tiny_model, tokenizer, caplog):
    """Item 18 of issue 20: a 128-position GPT-2 asked for 200 new tokens after a long prompt samples up to its last
    position, never past it (GPT-2's position embedding would raise IndexError); each row has its own room."""
    model = with_logit_bias(tiny_model("gpt2", n_positions=128), tokenizer.eos_token_id, bias=-1e4)  # never ends
    prompts = [" ".join(["The movie was good."] * 12), "What"]
    lengths = [len(ids) for ids in sampling.encode_prompts(tokenizer, prompts)]
    assert lengths[0] > 40
    sampling._log_capped_budget.cache_clear()
    with caplog.at_level("INFO", logger="preftune"):
        rollout = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=200, n=2, seed=0))
        generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=200, n=2, seed=1))
    assert rollout.lengths == [128 - lengths[0]] * 2 + [128 - lengths[1]] * 2
    assert not any(rollout.ended_with_eos)
    capped = [r.getMessage() for r in caplog.records if "positions" in r.getMessage()]
    assert len(capped) == 1 and "128 positions" in capped[0] and "max_new_tokens=200" in capped[0]
    # Within the positions the budget is the one asked for, and nothing is logged.
    caplog.clear()
    assert generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=8, seed=0)).lengths == [8, 8]
    assert not caplog.records


def test_the_cap_holds_on_the_lean_path_and_through_generate(tiny_model, tokenizer):
    """The Llama fast decoder and Hugging Face's generate (models the lean loop refuses) stop there too."""
    prompt = [" ".join(["The movie was good."] * 5)]
    width = len(sampling.encode_prompts(tokenizer, prompt)[0])
    assert 20 < width < 64
    llama = with_logit_bias(tiny_model("llama", max_position_embeddings=64), tokenizer.eos_token_id, bias=-1e4)
    assert generate(llama, tokenizer, prompt, SamplingParams(max_new_tokens=200)).lengths == [64 - width]
    gpt2 = with_logit_bias(tiny_model("gpt2", n_positions=64), tokenizer.eos_token_id, bias=-1e4)
    with mock.patch.object(sampling, "_lean_decoding", return_value=False):
        assert generate(gpt2, tokenizer, prompt, SamplingParams(max_new_tokens=200)).lengths == [64 - width]


def test_a_prompt_that_fills_the_models_positions_is_refused_by_row(tiny_model, tokenizer):
    model = tiny_model("gpt2", n_positions=32)
    prompts = ["What", " ".join(["The movie was good."] * 12)]
    with pytest.raises(DataError, match=r"the held-out prompts, row 1 \(0-based\), field 'prompt': .* tokens .* "
                                        r"32 positions"):
        generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=4), source="the held-out prompts")
