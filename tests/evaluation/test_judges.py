"""Facts about the judges: the gold reward reads sentiment correctly, model judges match direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from preftune.evaluation.judges import (
    GoldSentimentJudge,
    ImplicitRewardJudge,
    Judge,
    RewardModelJudge,
    compare,
    encode_texts,
    win_rate,
)


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
    assert isinstance(gold, Judge)


class TableJudge:
    """A judge whose scores are looked up by completion text."""

    name = "table"

    def __init__(self, table):
        self.table = table

    def score(self, prompts, completions):
        return [self.table[c] for c in completions]


def test_win_rate_counts_ties_as_half():
    judge = TableJudge({"a": 1.0, "b": 0.0, "c": 0.5})
    # a>b (win), b<a (loss), c=c (tie), a>c (win) → (1 + 0 + ½ + 1) / 4
    assert win_rate(judge, ["p"] * 4, ["a", "b", "c", "a"], ["b", "a", "c", "c"]) == pytest.approx(2.5 / 4)
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
    prompt_ids, completion_ids = encode_texts(tokenizer, prompts, completions)
    for score, p, c in zip(scores, prompt_ids, completion_ids):
        assert c[-1] == tokenizer.eos_token_id  # completions are scored with their EOS, as in training
        expected = 0.1 * (naive_logp(policy, p, c) - naive_logp(reference, p, c))
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ImplicitRewardJudge(policy, policy, tokenizer, beta=0.1).score(prompts, completions) == [0.0, 0.0]


def test_reward_model_scores_do_not_depend_on_padding(tokenizer):
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    prompts = ["The movie was", "What", "I did not like the plot"]
    completions = [" good.", " is the capital of France? Paris is the capital.", " at all"]
    batched = RewardModelJudge(model, tokenizer, batch_size=8).score(prompts, completions)
    one_by_one = [RewardModelJudge(model, tokenizer).score([p], [c])[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    prompt_ids, completion_ids = encode_texts(tokenizer, prompts[:1], completions[:1])
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([prompt_ids[0] + completion_ids[0]])).logits[0, 0]
    assert batched[0] == pytest.approx(float(direct), abs=1e-5)
