"""Facts about the demo world: distinct seeded reviews whose gold reward spans [0, 1] around 0.5, sentences
the lexicon reads the way they are meant, and prompts that are 2–8-token word-boundary prefixes."""

from __future__ import annotations

import random
import statistics

import pytest

from preftune.demo import world
from preftune.rollout.judges import GoldSentimentJudge


@pytest.fixture(scope="module")
def corpus():
    return world.review_corpus(2000, seed=0)


@pytest.fixture(scope="module")
def world_tok(corpus):
    return world.world_tokenizer(corpus)


@pytest.fixture(scope="module")
def gold():
    return GoldSentimentJudge()


def test_corpus_is_distinct_and_seeded(corpus):
    assert len(corpus) == len(set(corpus)) == 2000
    assert world.review_corpus(2000, seed=0) == corpus
    assert world.review_corpus(2000, seed=1) != corpus


def test_reviews_have_one_to_three_sentences_and_varied_structure(corpus):
    ends = [sum(r.count(c) for c in ".!") for r in corpus]
    assert set(ends) == {1, 2, 3}
    assert any(" but " in r for r in corpus)
    assert any(" not " in r for r in corpus) and any(" never " in r for r in corpus)


def test_gold_reward_spans_the_range_around_one_half(corpus, gold):
    rewards = gold.score_texts(corpus)
    assert 0.45 < statistics.fmean(rewards) < 0.55
    assert sum(r < 0.3 for r in rewards) > 0.3 * len(rewards)
    assert sum(r > 0.7 for r in rewards) > 0.3 * len(rewards)
    assert min(rewards) < 0.05 and max(rewards) > 0.95


@pytest.mark.parametrize(("makers", "sign"), [
    (world.POSITIVE_SENTENCES + [world._pos_closer], 1),
    (world.NEGATIVE_SENTENCES + [world._neg_closer], -1),
    ([world._neutral_opener, world._rating], 0),
])
def test_every_sentence_template_has_its_intended_sentiment(gold, makers, sign):
    rng = random.Random(0)
    for make in makers:
        for _ in range(300):
            sentence = make(rng)
            compound = gold.compound([sentence])[0]
            assert (compound > 0) - (compound < 0) == sign, (make.__name__, sentence, compound)


def test_prompts_are_two_to_eight_token_prefixes(corpus, world_tok):
    prompts = world.review_prompts(corpus, world_tok, 300, seed=0)
    assert len(prompts) == 300
    assert world.review_prompts(corpus, world_tok, 300, seed=0) == prompts
    for prompt in prompts:
        ids = world_tok(prompt, add_special_tokens=False)["input_ids"]
        assert 2 <= len(ids) <= 8
        # A prefix of some review, ending where a word ends.
        assert any(review.startswith(prompt) and len(review) > len(prompt) and not review[len(prompt)].isalnum()
                   for review in corpus)
    lengths = {len(world_tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert min(lengths) == 2 and max(lengths) == 8
    assert len(set(prompts)) > 100


def test_world_model_is_a_small_llama_over_the_world_vocabulary(world_tok):
    model = world.world_model(world_tok, seed=0)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(world_tok) <= world.WORLD_VOCAB_SIZE
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    # Nearly every word is one token: reviews stay short sequences.
    words = sum(len(r.split()) for r in ["The acting was great, but the plot was boring."])
    assert len(world_tok("The acting was great, but the plot was boring.", add_special_tokens=False)["input_ids"]) \
        <= words + 2
