"""Facts about the judges: the gold reward reads sentiment correctly; a reward model judges a text with the
number training gives it (even with its own tokenizer and chat template); model judges match direct
computations; a user's function is a judge; a checkpoint without a trained score head is refused."""

from __future__ import annotations

import copy
import json
import math
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification

from preftune.data.batching import PreferenceCollator
from preftune.data.tokenize import tokenize_rows
from preftune.errors import ConfigError, DataError, ModelError
from preftune.modeling.loading import as_reward_model
from preftune.modeling.logprobs import model_inputs
from preftune.modeling.reward import RewardModel
from preftune.modeling.tiny import build_tiny_model, build_tokenizer
from preftune.rollout.encoding import encode_completions
from preftune.rollout.judges import (
    CallableJudge,
    GoldSentimentJudge,
    ImplicitRewardJudge,
    Judge,
    PairwiseJudge,
    RewardModelJudge,
    ScalarPairwiseJudge,
    compare,
    load_judge,
    score_rollout,
    win_rate,
)
from preftune.rollout.sampling import SamplingParams, generate

PROMPTS = ["The movie was", "What", "I did not like the plot"]
COMPLETIONS = [" good.", " is the capital of France? Paris is the capital.", " at all"]


@pytest.fixture(scope="module")
def gold():
    return GoldSentimentJudge()


def test_gold_reward_on_known_sentences(gold):
    great, terrible = gold.score_texts(["This movie was great, I loved it.", "This movie was terrible and boring."])
    assert great > 0.8
    assert terrible < 0.2


@pytest.mark.parametrize(("worse", "better"), [
    ("The plot was not good.", "The plot was good."),
    ("The pacing was boring.", "The pacing was never boring."),
    ("The acting was bad.", "The acting was not bad at all."),
    ("The score was good, but the plot was terrible.", "The score was terrible, but the plot was good."),
])
def test_gold_reward_reads_negation_and_contrast(gold, worse, better):
    low, high = gold.score_texts([worse, better])
    assert low < 0.5 < high


def test_gold_mapping_is_a_monotone_probability(gold):
    grid = [i / 100 for i in range(-100, 101)]
    rewards = [gold.reward(c) for c in grid]
    assert all(a < b for a, b in zip(rewards, rewards[1:]))
    assert all(0 < r < 1 for r in rewards)
    assert gold.reward(0.0) == 0.5
    assert gold.reward(0.3) + gold.reward(-0.3) == pytest.approx(1.0)
    assert gold.reward(0.5) == pytest.approx(1 / (1 + math.exp(-4 * 0.5)))


def test_gold_judge_scores_prompt_plus_completion(gold):
    assert gold.score(["This movie was"], [" great, I loved it."]) == gold.score_texts(
        ["This movie was great, I loved it."])
    assert gold.score([[{"role": "user", "content": "This movie was"}]], [" great, I loved it."]) == \
        gold.score_texts(["This movie was great, I loved it."])
    assert isinstance(gold, Judge)


class TableJudge:
    """A judge whose scores are looked up by completion text."""

    name = "table"

    def __init__(self, table):
        self.table = table

    def score(self, prompts, completions):
        return [self.table[c] for c in completions]


def test_win_rate_counts_ties_as_half_for_scalar_and_pairwise_judges():
    judge = TableJudge({"a": 1.0, "b": 0.0, "c": 0.5})
    a, b = ["a", "b", "c", "a"], ["b", "a", "c", "c"]
    # a>b (win), b<a (loss), c=c (tie), a>c (win) → (1 + 0 + ½ + 1) / 4
    assert win_rate(judge, ["p"] * 4, a, b) == pytest.approx(2.5 / 4)
    pairwise = ScalarPairwiseJudge(judge)
    assert isinstance(pairwise, PairwiseJudge) and not isinstance(judge, PairwiseJudge)
    assert pairwise.prefer(["p"] * 4, a, b) == pytest.approx([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0)),
                                                             0.5, 1 / (1 + math.exp(-0.5))])
    assert win_rate(pairwise, ["p"] * 4, a, b) == win_rate(judge, ["p"] * 4, a, b)
    assert compare([0.3, 0.3], [0.3, 0.3]) == 0.5


@torch.no_grad()
def naive_logp(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return float(logp[len(prompt_ids) - 1 :].gather(-1, ids[0, len(prompt_ids) :, None]).sum())


def test_implicit_reward_is_beta_times_log_ratio(tiny_model, tokenizer):
    policy, reference = tiny_model(seed=0).double(), tiny_model(seed=1).double()
    prompts, completions = ["The movie was", "What is"], [" good and the acting was great.", " the capital"]
    scores = ImplicitRewardJudge(policy, reference, tokenizer, beta=0.1, batch_size=1).score(prompts, completions)
    prompt_ids, completion_ids = encode_completions(tokenizer, prompts, completions)
    for score, p, c in zip(scores, prompt_ids, completion_ids):
        assert c[-1] == tokenizer.eos_token_id  # completions are scored with their EOS, as in training
        expected = 0.1 * (naive_logp(policy, p, c) - naive_logp(reference, p, c))
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ImplicitRewardJudge(policy, policy, tokenizer, beta=0.1).score(prompts, completions) == [0.0, 0.0]


# ------------------------------------------------------------------------------------ reward models


def reward_model(tokenizer, seed=0, pad_is_eos=False):
    """A tiny Llama sequence classifier (one label) on ``tokenizer``; optionally with pad = EOS, as a tokenizer
    without a pad token gets for training."""
    torch.manual_seed(seed)
    model = as_reward_model(build_tiny_model(tokenizer, seed=seed)).eval()
    torch.nn.init.normal_(model.score.weight, std=0.5)
    if pad_is_eos:
        model.config.pad_token_id = tokenizer.eos_token_id
    return model


@torch.no_grad()
def training_scores(model, tokenizer, rows, tmp_path):
    """The reward-model training path: tokenize the rows, collate them (prompt shared by both completions), score
    with the training module; returns (chosen scores, rejected scores)."""
    data, _ = tokenize_rows(Dataset.from_list(rows), tokenizer, max_length=None, max_prompt_length=None,
                            cache_dir=tmp_path)
    batch = PreferenceCollator(tokenizer.pad_token_id, prefix_sharing=True)(list(data))
    scores = RewardModel(model)(**model_inputs(batch))["logps"]
    return scores[: len(rows)].tolist(), scores[len(rows) :].tolist()


def test_the_judge_gives_a_text_the_score_training_gives_it_with_pad_equal_to_eos(tokenizer, tmp_path):
    """Training reads the score at the completion's EOS; Hugging Face's pooling skips trailing pad tokens, so
    with pad = EOS it read the token before (the judge used to give another number than training)."""
    pad_is_eos = copy.deepcopy(tokenizer)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    model = reward_model(pad_is_eos, pad_is_eos=True)
    rows = [{"prompt": p, "chosen": c, "rejected": " no."} for p, c in zip(PROMPTS, COMPLETIONS)]
    chosen, rejected = training_scores(model, pad_is_eos, rows, tmp_path)
    judge = RewardModelJudge(model, pad_is_eos, batch_size=2)
    assert judge.score(PROMPTS, COMPLETIONS) == pytest.approx(chosen, abs=1e-5)
    assert judge.score(PROMPTS, [" no."] * 3) == pytest.approx(rejected, abs=1e-5)
    # The other position, for the record: Hugging Face's pooling of the same ids reads the token before EOS.
    prompt_ids, completion_ids = encode_completions(pad_is_eos, PROMPTS[:1], COMPLETIONS[:1])
    with torch.no_grad():
        pooled = float(model(input_ids=torch.tensor([prompt_ids[0] + completion_ids[0]])).logits[0, 0])
    assert abs(pooled - chosen[0]) > 1e-3


def test_the_judge_scores_conversations_through_its_chat_template_as_training_does(tokenizer, tmp_path):
    model = reward_model(tokenizer)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    rows = [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": "no."}]} for p, c in zip(prompts, COMPLETIONS)]
    chosen, _ = training_scores(model, tokenizer, rows, tmp_path)
    assert RewardModelJudge(model, tokenizer).score(prompts, COMPLETIONS) == pytest.approx(chosen, abs=1e-5)
    # Without a chat template the judge reads the conversation's text as a plain-text prompt.
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    text_scores = RewardModelJudge(model, plain).score(PROMPTS, COMPLETIONS)
    assert RewardModelJudge(model, plain).score(prompts, COMPLETIONS) == pytest.approx(text_scores, abs=1e-6)


def test_a_reward_model_with_its_own_tokenizer_scores_the_decoded_text(tiny_model, tokenizer):
    """The policy and the judge tokenize differently: the judge decodes nothing itself, it re-encodes the policy's
    decoded completion with its own tokenizer, so its score is that of the text."""
    other = build_tokenizer(["the the the movie was good", "paris is a capital; what is it?"] * 30, vocab_size=290)
    assert other.get_vocab() != tokenizer.get_vocab()
    judge_model = reward_model(other, seed=3)
    judge = RewardModelJudge(judge_model, other)
    rollout = generate(tiny_model(), tokenizer, PROMPTS, SamplingParams(max_new_tokens=8, n=2, seed=0))
    scores = score_rollout(judge, rollout).scores
    assert rollout.judge == "reward_model"
    for k, score in enumerate(scores):
        text_prompt, text = rollout.sample_prompts[k], rollout.completions[k]
        ids = other(text_prompt)["input_ids"] + other(text, add_special_tokens=False)["input_ids"]
        ids.append(other.eos_token_id)
        with torch.no_grad():
            direct = judge_model.score(judge_model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1])
        assert score == pytest.approx(float(direct), abs=1e-5)
    # The policy's ids would have meant other tokens to the judge.
    assert rollout.prompt_ids[0] != other(PROMPTS[0])["input_ids"]


def test_reward_model_scores_do_not_depend_on_padding(tokenizer):
    model = reward_model(tokenizer)
    batched = RewardModelJudge(model, tokenizer, batch_size=8).score(PROMPTS, COMPLETIONS)
    one_by_one = [RewardModelJudge(model, tokenizer).score([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_an_encoder_classifier_reads_the_text_pair(tokenizer):
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    scores = RewardModelJudge(model, tokenizer, batch_size=2).score(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        direct = [float(model(**tokenizer(p, c, return_tensors="pt")).logits[0, 0])
                  for p, c in zip(PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(direct, abs=1e-5)


def test_load_judge_refuses_a_checkpoint_without_a_trained_score_head(tokenizer, tmp_path):
    """A causal LM whose config claims one label: transformers would build a random score head, so two identical
    runs would write different pairs."""
    causal = build_tiny_model(tokenizer)
    causal.config.num_labels = 1
    causal.save_pretrained(tmp_path / "causal")
    tokenizer.save_pretrained(tmp_path / "causal")
    with pytest.raises(ModelError, match=r"causal.*score\.weight"):
        load_judge(str(tmp_path / "causal"))
    trained = reward_model(tokenizer, seed=2)
    trained.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge = load_judge(str(tmp_path / "rm"))
    assert judge.name == f"reward_model:{tmp_path / 'rm'}"
    assert judge.score(PROMPTS, COMPLETIONS) == pytest.approx(
        RewardModelJudge(trained, tokenizer).score(PROMPTS, COMPLETIONS), abs=1e-5)


def test_load_judge_finds_a_users_function(tmp_path, monkeypatch, gold):
    (tmp_path / "my_judges.py").write_text(textwrap.dedent("""
        def length(prompts, completions):
            return [float(len(c)) for c in completions]

        def broken(prompts, completions):
            return [float("nan")] * len(completions)
    """))
    monkeypatch.chdir(tmp_path)
    judge = load_judge("my_judges:length")
    assert judge.name == "my_judges:length" and isinstance(judge, CallableJudge)
    assert judge.score(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    assert load_judge(f"{tmp_path / 'my_judges.py'}:length").score(["p"], ["abc"]) == [3.0]
    assert isinstance(load_judge("gold"), GoldSentimentJudge)
    from preftune.rollout.record import Rollout

    rollout = Rollout(prompts=["p"], prompt_ids=[[1]], group_size=2, completion_ids=[[5], [5]], logprobs=[[0.], [0.]],
                      ended_with_eos=[True, True], completions=["a", "b"])
    with pytest.raises(ModelError, match="my_judges:broken.*finite"):
        score_rollout(load_judge("my_judges:broken"), rollout)
    with pytest.raises(ModelError, match="returned 1 scores for 2"):
        score_rollout(CallableJudge(lambda p, c: [1.0], name="short"), rollout)
    with pytest.raises(ConfigError, match="no attribute 'missing'"):
        load_judge("my_judges:missing")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        load_judge("no_such_module:f")
    with pytest.raises(ModelError, match="neither 'gold'"):
        load_judge("no/such/folder")


# ------------------------------------------------------------------------------------ the judge's positions


def gpt2_reward_model(tokenizer, positions: int):
    """A GPT-2 sequence classifier with a learned table of ``positions`` positions (IndexError past it)."""
    model = as_reward_model(build_tiny_model(tokenizer, arch="gpt2", n_positions=positions)).eval()
    torch.nn.init.normal_(model.score.weight, std=0.5)
    return model


def test_a_reward_model_judge_scores_a_long_completion_as_training_scores_the_row_cut_to_its_positions(
        tokenizer, tmp_path, caplog):
    """Item 4 of issue 20: a text longer than the judge's positions is cut as training cuts it at max_length (the
    completion keeps its start), not sent into GPT-2's position table (IndexError)."""
    model = gpt2_reward_model(tokenizer, positions=64)
    long = " The movie was good and the acting was great." * 12
    rows = [{"prompt": "The movie was", "chosen": long, "rejected": " no."},
            {"prompt": "What", "chosen": " is it?", "rejected": long}]
    data, _ = tokenize_rows(Dataset.from_list(rows), tokenizer, max_length=64, max_prompt_length=None,
                            cache_dir=tmp_path)
    batch = PreferenceCollator(tokenizer.pad_token_id)(list(data))
    with torch.no_grad():
        trained = RewardModel(model)(**model_inputs(batch))["logps"].tolist()
    judge = RewardModelJudge(model, tokenizer, name="rm")
    with caplog.at_level("INFO", logger="preftune"):
        scored = judge.score([r["prompt"] for r in rows] * 2,
                             [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
        judge.score(["The movie was"], [long])
    assert scored == pytest.approx(trained, abs=1e-5)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("judge rm")]
    assert len(said) == 1 and "64 positions: 2 of 4 completions cut" in said[0]


def test_a_prompt_that_fills_the_judges_positions_is_refused_by_row(tokenizer):
    judge = RewardModelJudge(gpt2_reward_model(tokenizer, positions=16), tokenizer, name="rm")
    with pytest.raises(DataError, match=r"judge rm, row 1 \(0-based\), field 'prompt': the prompt "
                                        r"\('The movie was good.*takes \d+ tokens of the model's 16 positions"):
        judge.score(["What", " ".join(["The movie was good."] * 4)], [" yes", " no"])


def test_the_implicit_reward_judge_reads_at_most_its_models_positions(tiny_model, tokenizer):
    policy, reference = tiny_model("gpt2", n_positions=32, seed=1), tiny_model("gpt2", n_positions=32)
    judge = ImplicitRewardJudge(policy, reference, tokenizer, beta=0.5)
    long = " The movie was good and the acting was great." * 6
    prompt_ids, completion_ids = encode_completions(tokenizer, ["What"], [long])
    cut = completion_ids[0][: 32 - len(prompt_ids[0])]
    expected = 0.5 * (naive_logp(policy, prompt_ids[0], cut) - naive_logp(reference, prompt_ids[0], cut))
    assert judge.score(["What"], [long]) == pytest.approx([expected], abs=1e-4)


# ------------------------------------------------------------------------------------ what a judge returns


@pytest.fixture(scope="module")
def judged_world(tmp_path_factory, tokenizer):
    """A saved tiny policy, two prompts and a module of judges, for `preftune pairs` as a user runs it."""
    folder = tmp_path_factory.mktemp("judged")
    build_tiny_model(tokenizer).save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")
    (folder / "prompts.txt").write_text("The movie was\nWhat\n")
    (folder / "issue20_judges.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch

        def as_dict(prompts, completions):
            return {i: 0.5 for i in range(len(completions))}

        def as_string(prompts, completions):
            return "7" * len(completions)

        def as_text_numbers(prompts, completions):
            return ["0.5"] * len(completions)

        def nothing(prompts, completions):
            return None

        def raises(prompts, completions):
            raise ValueError("my judge cannot read this")

        def as_tensor(prompts, completions):
            return torch.arange(len(completions), dtype=torch.float32)

        def as_array_tuple(prompts, completions):
            return tuple(np.arange(len(completions), dtype=np.float64))
    """))
    return folder


def run_pairs(folder, judge: str) -> int:
    from preftune.cli import main

    return main(["pairs", "--model", str(folder / "policy"), "--prompts", str(folder / "prompts.txt"), "--judge", judge,
                 "--k", "2", "--max-new-tokens", "3", "--out", str(folder / "pairs.jsonl")])


@pytest.mark.parametrize("spec, message", [
    ("issue20_judges:as_dict", "judge 'issue20_judges:as_dict' returned a dict ({0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}); "
                               "a judge returns one real number per completion, as a list of 4 numbers"),
    ("issue20_judges:as_string", "judge 'issue20_judges:as_string' returned a str ('7777'); a judge returns one real "
                                 "number per completion"),
    ("issue20_judges:as_text_numbers", "judge 'issue20_judges:as_text_numbers' returned a list (['0.5', '0.5', "),
    ("issue20_judges:nothing", "judge 'issue20_judges:nothing' returned None; a judge returns one real number per "
                               "completion"),
    ("issue20_judges:raises", "judge 'issue20_judges:raises' raised ValueError: my judge cannot read this"),
])
def test_a_judge_that_returns_anything_but_one_real_number_per_completion_is_named(judged_world, monkeypatch, capsys,
                                                                                  spec, message):
    """Item 17 of issue 20: a dict was scored by its keys (reward 7.5), a string digit by digit; None and a judge's
    own exception ended in a traceback that did not name the judge."""
    monkeypatch.chdir(judged_world)
    assert run_pairs(judged_world, spec) == ModelError.exit_code
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["issue20_judges:as_tensor", "issue20_judges:as_array_tuple"])
def test_a_judge_may_return_a_tensor_or_a_sequence_of_numpy_numbers(judged_world, monkeypatch, spec):
    monkeypatch.chdir(judged_world)
    assert run_pairs(judged_world, spec) == 0
    rows = [json.loads(line) for line in (judged_world / "pairs.jsonl").read_text().splitlines()]
    # Scores 0, 1 (first prompt) and 2, 3 (second): the later sample is chosen, by exactly 1.
    assert [(r["score_chosen"], r["score_rejected"]) for r in rows] == [(1.0, 0.0), (3.0, 2.0)]
