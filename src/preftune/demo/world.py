"""The demo world: synthetic movie reviews, their prompts, tokenizer and a tiny Llama to SFT on them.

A miniature of the DPO paper's IMDb experiment (arXiv 2305.18290, §6.1) that runs on a laptop CPU:

* :func:`review_corpus` — seeded reviews of 1–3 sentences: positive, negative and mixed ("…, but …"),
  with intensifiers ("very", "a bit") and negations the VADER lexicon scores correctly ("not good" is
  negative, "never boring" and "not bad at all" positive). Every sentiment-bearing word comes from the
  lexicon, so the gold reward (:class:`preftune.rollout.judges.GoldSentimentJudge`) reads the review
  the way a person would; the mix is calibrated so that the corpus' mean gold reward is ≈ 0.5.
* :func:`review_prompts` — 2–8-token prefixes of reviews, cut at word boundaries (as the paper's IMDb
  prefixes), so that prompt + completion tokenizes the way the review did during SFT.
* :func:`world_tokenizer`, :func:`world_model` — a byte-level BPE trained on the corpus and a randomly
  initialised Llama small enough to SFT in well under a minute on two CPU cores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerFast

from preftune.modeling.tiny import build_tiny_model, build_tokenizer

# ------------------------------------------------------------------------------------ vocabulary

POSITIVE = ["great", "good", "excellent", "wonderful", "brilliant", "superb", "beautiful", "fantastic",
            "amazing", "charming", "delightful", "clever", "lovely", "perfect", "enjoyable", "thrilling",
            "engaging", "strong", "funny", "fresh"]
NEGATIVE = ["bad", "terrible", "awful", "boring", "dull", "weak", "poor", "horrible", "dreadful", "lazy",
            "painful", "messy", "stupid", "disappointing", "annoying", "confusing"]
# Negatives whose negation reads as praise ("never boring", "not bad at all").
NEGATABLE = ["boring", "dull", "bad", "weak", "annoying", "disappointing", "confusing"]
BOOSTERS = ["very ", "really ", "incredibly ", "extremely ", "quite ", "remarkably "]
DAMPENERS = ["a bit ", "somewhat ", "slightly "]

# (noun phrase, verb) so that agreement is right: "the characters were", "the plot was".
ASPECTS = [("acting", "was"), ("plot", "was"), ("script", "was"), ("score", "was"), ("soundtrack", "was"),
           ("direction", "was"), ("dialogue", "was"), ("cinematography", "was"), ("pacing", "was"),
           ("ending", "was"), ("story", "was"), ("camera work", "was"), ("lead performance", "was"),
           ("final act", "was"), ("editing", "was"), ("music", "was"), ("cast", "was"), ("premise", "was"),
           ("characters", "were"), ("visuals", "were"), ("effects", "were"), ("performances", "were"),
           ("action scenes", "were"), ("costumes", "were"), ("songs", "were"), ("sets", "were")]
FILMS = ["movie", "film", "sequel", "drama", "western", "mystery", "musical", "remake", "picture", "biopic",
         "documentary", "spy film", "family drama", "period piece"]
PEOPLE = ["young detective", "retired teacher", "family", "soldier", "young woman", "young boy", "chef",
          "small band", "pair of sisters", "journalist", "old farmer", "group of students"]
PLACES = ["in a small town", "in Paris", "in New York", "in the desert", "in a big city", "in the mountains",
          "in a quiet village", "in London", "in the suburbs", "on a ship at sea"]
COMPANIONS = ["my sister", "my brother", "my cousin", "my parents", "my wife", "my husband", "my roommate",
              "my kids"]

Rng = random.Random
Sentence = Callable[[Rng], str]


def _pick(rng: Rng, items: Sequence):
    return items[rng.randrange(len(items))]


def _degree(rng: Rng) -> str:
    """An optional intensifier: VADER boosts or damps the next sentiment word by ±0.293."""
    roll = rng.random()
    return _pick(rng, BOOSTERS) if roll < 0.35 else _pick(rng, DAMPENERS) if roll < 0.45 else ""


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _with(word: str, rng: Rng) -> str:
    """``word`` before a random aspect, with an article when the aspect is singular: "a dull plot", "weak jokes"."""
    aspect, verb = _pick(rng, ASPECTS)
    return f"{_a(word)} {aspect}" if verb == "was" else f"{word} {aspect}"


# ------------------------------------------------------------------------------------ sentences
# Each maker returns one sentence whose VADER sign matches its list (tests check every maker).


def _aspect(rng: Rng, words: Sequence[str]) -> str:
    aspect, verb = _pick(rng, ASPECTS)
    return f"The {aspect} {verb} {_degree(rng)}{_pick(rng, words)}."


def _two(rng: Rng, words: Sequence[str]) -> str:
    aspect, verb = _pick(rng, ASPECTS)
    first, second = rng.sample(words, 2)
    return f"The {aspect} {verb} {first} and {second}."


def _pos_aspect(rng: Rng) -> str:
    return _aspect(rng, POSITIVE)


def _pos_two(rng: Rng) -> str:
    return _two(rng, POSITIVE)


def _pos_negated(rng: Rng) -> str:
    aspect, verb = _pick(rng, ASPECTS)
    word = _pick(rng, NEGATABLE)
    return _pick(rng, [f"The {aspect} {verb} never {word}.", f"The {aspect} {verb} not {word} at all."])


def _pos_verb(rng: Rng) -> str:
    aspect, _ = _pick(rng, ASPECTS)
    return f"I {_pick(rng, ['loved', 'enjoyed', 'liked', 'adored'])} the {aspect}."


def _film(rng: Rng, words: Sequence[str]) -> str:
    """A sentence about the film as a whole, its sentiment words drawn from ``words``."""
    film, word = _pick(rng, FILMS), _pick(rng, words)
    return _pick(rng, [f"What {_a(word)} {film}!", f"This {film} is {_degree(rng)}{word}.",
                       f"{_a(word).capitalize()} {film} with {_with(_pick(rng, words), rng)}."])


def _pos_film(rng: Rng) -> str:
    return _film(rng, POSITIVE)


def _pos_closer(rng: Rng) -> str:
    return _pick(rng, ["I would happily watch it again.", "Highly recommended.", "Worth every minute.",
                       f"One of the best {_pick(rng, FILMS)}s of the year.", "I laughed a lot.",
                       f"Easily the best {_pick(rng, FILMS)} I have seen in years."])


def _neg_aspect(rng: Rng) -> str:
    return _aspect(rng, NEGATIVE)


def _neg_two(rng: Rng) -> str:
    return _two(rng, NEGATIVE)


def _neg_negated(rng: Rng) -> str:
    aspect, verb = _pick(rng, ASPECTS)
    word = _pick(rng, ["good", "great", "funny", "clever", "enjoyable", "engaging", "strong"])
    return _pick(rng, [f"The {aspect} {verb} not {word}.", f"The {aspect} {verb} never {word}.",
                       f"The {aspect} {verb} not very {word}."])


def _neg_verb(rng: Rng) -> str:
    aspect, _ = _pick(rng, ASPECTS)
    verb = _pick(rng, ["hated", "disliked", "did not like", "did not enjoy"])
    return f"I {verb} the {aspect}."


def _neg_film(rng: Rng) -> str:
    return _film(rng, NEGATIVE)


def _neg_closer(rng: Rng) -> str:
    return _pick(rng, ["Not worth the ticket.", "A waste of two hours.", "Avoid it.",
                       f"One of the worst {_pick(rng, FILMS)}s of the year.", "What a mess!",
                       f"Probably the worst {_pick(rng, FILMS)} I have seen in years."])


def _contrast(rng: Rng) -> str:
    """"X was good, but Y was bad" (or the reverse): VADER weighs the clause after "but" 1.5×, before 0.5×."""
    (a1, v1), (a2, v2) = rng.sample(ASPECTS, 2)
    w1, w2 = _pick(rng, POSITIVE), _pick(rng, NEGATIVE)
    if rng.random() < 0.5:
        w1, w2 = w2, w1
    return _pick(rng, [f"The {a1} {v1} {_degree(rng)}{w1}, but the {a2} {v2} {_degree(rng)}{w2}.",
                       f"{w1.capitalize()} {a1}, but {_with(w2, rng)}."])


def _neutral_opener(rng: Rng) -> str:
    film = _pick(rng, FILMS)
    return _pick(rng, [f"I watched this {film} last night.", f"I saw this {film} with {_pick(rng, COMPANIONS)}.",
                       f"I had heard a lot about this {film}.", f"This is the second {film} from this director.",
                       f"The story follows {_a(_pick(rng, PEOPLE))} {_pick(rng, PLACES)}.",
                       f"It is set {_pick(rng, PLACES)}.", f"I went to see this {film} on a Sunday."])


def _rating(rng: Rng) -> str:
    return f"{rng.randint(1, 10)} out of 10."


POSITIVE_SENTENCES: list[Sentence] = [_pos_aspect, _pos_aspect, _pos_two, _pos_negated, _pos_verb, _pos_film]
NEGATIVE_SENTENCES: list[Sentence] = [_neg_aspect, _neg_aspect, _neg_two, _neg_negated, _neg_verb, _neg_film]

# Share of each kind of review; tuned so that the corpus' mean gold reward is ≈ 0.5 (VADER's positive
# words are on average stronger than its negative ones, and negated praise is weaker than praise).
KIND_WEIGHTS = {"positive": 0.33, "negative": 0.39, "mixed": 0.28}


# ------------------------------------------------------------------------------------ reviews


def _review(rng: Rng) -> str:
    """One review of 1–3 sentences: an optional neutral opener, a body of the chosen kind, an optional closer."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    n_sentences = rng.randint(1, 3)
    if kind == "mixed":
        body = [_contrast] + [_pick(rng, POSITIVE_SENTENCES + NEGATIVE_SENTENCES) for _ in range(n_sentences - 1)]
        rng.shuffle(body)
        closer: Sentence = _rating
    else:
        pool = POSITIVE_SENTENCES if kind == "positive" else NEGATIVE_SENTENCES
        body = [_pick(rng, pool) for _ in range(n_sentences)]
        closer = _pos_closer if kind == "positive" else _neg_closer
    # Frame a longer review with a neutral opener or a closing verdict instead of more of the same.
    if n_sentences >= 2 and rng.random() < 0.4:
        body[0] = _neutral_opener
    if n_sentences >= 2 and rng.random() < 0.4 and body[-1] is not _contrast:
        body[-1] = closer
    if all(s in (_neutral_opener, _rating) for s in body):  # keep at least one sentence with sentiment
        body[-1] = _contrast
    return " ".join(make(rng) for make in body)


def review_corpus(n: int, seed: int) -> list[str]:
    """``n`` distinct synthetic movie reviews, deterministic given ``seed``.

    Raises ``ValueError`` if ``n`` distinct reviews cannot be found (the space holds millions).
    """
    rng = random.Random(seed)
    seen: dict[str, None] = {}  # insertion-ordered set: the output order depends only on the seed
    for _ in range(50 * n + 100):
        if len(seen) == n:
            break
        seen.setdefault(_review(rng), None)
    if len(seen) < n:
        raise ValueError(f"could only generate {len(seen)} distinct reviews, {n} requested")
    return list(seen)


# ------------------------------------------------------------------------------------ prompts


def _word_boundary_cuts(ids: list[int], tokenizer, min_tokens: int, max_tokens: int) -> list[int]:
    """Prefix lengths k in [min_tokens, max_tokens] whose next token starts a new word or punctuation.

    Cutting mid-word ("The plot was gr") would give prompts that tokenize unlike the training text.
    """
    cuts = []
    for k in range(min_tokens, min(max_tokens, len(ids) - 1) + 1):
        next_text = tokenizer.decode([ids[k]])
        if next_text and not next_text[0].isalnum():
            cuts.append(k)
    return cuts


def review_prompts(
    corpus: Sequence[str],
    tokenizer: PreTrainedTokenizerFast,
    n: int,
    seed: int,
    min_tokens: int = 2,
    max_tokens: int = 8,
) -> list[str]:
    """``n`` prompts: decoded prefixes of ``min_tokens``–``max_tokens`` tokens of random reviews.

    Token counts exclude BOS. Each prompt re-encodes to exactly its prefix tokens and ends at a word
    boundary, leaving at least one token of the review to complete. Prompts may repeat (short prefixes
    such as "The plot was" are common, as in IMDb).
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    prompts: list[str] = []
    for _ in range(100 * n + 100):
        if len(prompts) == n:
            break
        ids = tokenizer(_pick(rng, corpus), add_special_tokens=False)["input_ids"]
        cuts = _word_boundary_cuts(ids, tokenizer, min_tokens, max_tokens)
        if not cuts:
            continue
        k = _pick(rng, cuts)
        prompt = tokenizer.decode(ids[:k])
        if tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids[:k]:
            prompts.append(prompt)
    if len(prompts) < n:
        raise ValueError(f"found only {len(prompts)} prompts of {min_tokens}-{max_tokens} tokens, {n} requested")
    return prompts


# ------------------------------------------------------------------------------------ tokenizer, model

WORLD_VOCAB_SIZE = 1024

# Sized for SFT in under a minute on two CPU cores; see world_model's docstring.
WORLD_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)


def world_tokenizer(corpus: Sequence[str], vocab_size: int = WORLD_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the chat template of :func:`build_tokenizer`, trained on ``corpus``.

    At 1024 tokens nearly every word of the corpus is one token, so reviews are short sequences.
    """
    return build_tokenizer(corpus, vocab_size=vocab_size)


def world_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised Llama for the world: 2 layers × hidden 128 (MLP 384, 4 heads, 2 KV heads),
    ≈0.65M parameters, 0.13M of them in each (untied) embedding.

    Why this size: reviews are ≈16 tokens, an SFT step on 64 of them takes ≈0.06 s on two idle CPU cores,
    and 300–400 steps (under half a minute at lr 3e-3) reach the corpus' entropy floor (held-out loss
    ≈1.42 nats/token) with fluent reviews. Measured at 600 steps, 4×128, 3×192 and 4×96 end at the same
    held-out loss but are 1.3–2.2× slower per step: the grammar is shallow, so depth and width buy nothing
    here, while a small model keeps sampling, DPO steps and the exact per-token KL (1k vocabulary) cheap.
    """
    return build_tiny_model(tokenizer, arch="llama", seed=seed, **WORLD_MODEL)
