"""Judges: anything that scores completions of prompts, higher is better, behind one interface.

* :class:`GoldSentimentJudge` — the demo world's ground truth: VADER sentiment of prompt + completion,
  mapped to (0, 1) like a sentiment classifier's p(positive) (the DPO paper's IMDb reward, §1.3).
* :class:`RewardModelJudge` — a Bradley–Terry reward model (``AutoModelForSequenceClassification``, 1 label).
* :class:`ImplicitRewardJudge` — a DPO policy's implicit reward β·log π(y|x)/π_ref(y|x) (§4.1); only
  differences between completions of the same prompt are meaningful.
* :func:`win_rate` — pairwise comparison of two sets of completions of the same prompts by one judge.

Text is turned into ids the way training does (``preftune.data.tokenize``): the prompt with the
tokenizer's special tokens (BOS), the completion on its own without them, ending with one EOS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from preftune.data.batching import pad_sequences
from preftune.modeling.logprobs import completion_logps, model_inputs


@runtime_checkable
class Judge(Protocol):
    """Scores ``completions[i]`` as a reply to ``prompts[i]``; higher is better."""

    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


# ------------------------------------------------------------------------------------ gold reward


class GoldSentimentJudge:
    """p(positive) of ``prompt + completion`` from the VADER lexicon: ``σ(scale · compound)``.

    VADER's ``compound`` ∈ [−1, 1] is a squashed sum of word valences (negation flips and damps a word,
    "but" up-weights the clause after it). The logistic makes it read like a sentiment classifier's
    positive-class probability, as the siebert classifier in the DPO paper: 0.5 for neutral text, ≈0.85
    for one mild positive word ("The plot was good.", compound 0.44), 0.97 for "This movie was great, I
    loved it." (0.84), and at the ends σ(±4) = 0.018 / 0.982 — saturating like a classifier, yet strictly
    monotone in ``compound``, so two positive completions are still ordered.
    """

    name = "gold_sentiment"

    def __init__(self, scale: float = 4.0):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        if scale <= 0:
            raise ValueError(f"scale must be positive so that the reward is increasing, got {scale}")
        self.scale = scale
        self._analyzer = SentimentIntensityAnalyzer()

    def compound(self, texts: Sequence[str]) -> list[float]:
        """VADER's compound sentiment of each text, in [−1, 1]."""
        return [self._analyzer.polarity_scores(text)["compound"] for text in texts]

    def reward(self, compound: float) -> float:
        """The monotone map compound ∈ [−1, 1] → p(positive) = σ(scale · compound)."""
        return 1.0 / (1.0 + math.exp(-self.scale * compound))

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Gold reward of whole texts (e.g. the reviews of the corpus)."""
        return [self.reward(c) for c in self.compound(texts)]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_aligned(prompts, completions)
        # The prompt counts: as in the paper, the classifier reads the whole review x + y.
        return self.score_texts([p + c for p, c in zip(prompts, completions)])


# ------------------------------------------------------------------------------------ model judges


def encode_texts(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list, list]:
    """``(prompt_ids, completion_ids)`` as training encodes text rows: prompt with BOS, completion + EOS."""
    _check_aligned(prompts, completions)
    prompt_ids = tokenizer(list(prompts), return_attention_mask=False)["input_ids"]
    encoded = tokenizer(list(completions), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    eos = tokenizer.eos_token_id
    completion_ids = [list(ids) if ids and ids[-1] == eos else list(ids) + [eos] for ids in encoded]
    return [list(p) for p in prompt_ids], completion_ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute is spent on padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sequence_logps(
    model: nn.Module, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
    *, batch_size: int = 32,
) -> Tensor:
    """Summed completion log-probs ``log π(y|x)``, fp32 ``[n]``, in length-sorted batches (eval mode)."""
    out = torch.zeros(len(prompt_ids))
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    was_training = model.training
    model.eval()
    try:
        for idx in length_sorted_batches(lengths, batch_size):
            # Pads sit after every sequence, so they are never attended to; id 0 is simply a valid index.
            batch = pad_sequences([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id=0)
            batch = {k: v.to(_device(model)) for k, v in model_inputs(batch).items()}
            logps = completion_logps(model, **batch)["logps"]
            out[idx] = logps.float().cpu()
    finally:
        model.train(was_training)
    return out


class ImplicitRewardJudge:
    """DPO's implicit reward r̂(x, y) = β · (log π(y|x) − log π_ref(y|x)), summed over completion tokens."""

    name = "implicit_reward"

    def __init__(self, policy: nn.Module, reference: nn.Module, tokenizer, beta: float, batch_size: int = 32):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.beta, self.batch_size = beta, batch_size

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        prompt_ids, completion_ids = encode_texts(self.tokenizer, prompts, completions)
        policy = sequence_logps(self.policy, prompt_ids, completion_ids, batch_size=self.batch_size)
        reference = sequence_logps(self.reference, prompt_ids, completion_ids, batch_size=self.batch_size)
        return (self.beta * (policy - reference)).tolist()


class RewardModelJudge:
    """A scalar reward model: ``AutoModelForSequenceClassification`` with one label on prompt + completion.

    Sequences are right-padded; the model pools its last non-pad token, so its config needs ``pad_token_id``.
    """

    name = "reward_model"

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 32):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model has one output label, this one has {model.config.num_labels}")
        if getattr(model.config, "pad_token_id", None) is None:
            raise ValueError("the reward model's config has no pad_token_id, so it cannot find the last token "
                             "of a padded sequence; set model.config.pad_token_id = tokenizer.pad_token_id")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        prompt_ids, completion_ids = encode_texts(self.tokenizer, prompts, completions)
        sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
        out = torch.zeros(len(sequences))
        was_training = self.model.training
        self.model.eval()
        try:
            for idx in length_sorted_batches([len(s) for s in sequences], self.batch_size):
                batch = pad_sequences([sequences[i] for i in idx], [[] for _ in idx], self.model.config.pad_token_id)
                logits = self.model(input_ids=batch["input_ids"].to(_device(self.model)),
                                    attention_mask=batch["attention_mask"].to(_device(self.model))).logits
                out[idx] = logits[:, 0].float().cpu()
        finally:
            self.model.train(was_training)
        return out.tolist()


# ------------------------------------------------------------------------------------ win rates


def compare(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of items where a beats b, a tie counting ½: mean of 1[a > b] + ½·1[a = b]."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"need two equally long, non-empty score lists, got {len(scores_a)} and {len(scores_b)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)) / len(scores_a)


def win_rate(judge: Judge, prompts: Sequence[str], completions_a: Sequence[str],
             completions_b: Sequence[str]) -> float:
    """How often the judge prefers ``completions_a[i]`` over ``completions_b[i]`` for ``prompts[i]`` (ties ½)."""
    _check_aligned(prompts, completions_a)
    _check_aligned(prompts, completions_b)
    scores = judge.score(list(prompts) * 2, list(completions_a) + list(completions_b))
    return compare(scores[: len(prompts)], scores[len(prompts) :])


def _check_aligned(prompts: Sequence, completions: Sequence) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; they are paired by index")
