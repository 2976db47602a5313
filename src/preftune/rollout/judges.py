"""Judges: anything that scores completions of prompts, higher is better, behind one interface.

* :class:`Judge` — ``score(prompts, completions) -> list[float]``; prompts as given to sampling (strings or
  conversations), completions as decoded text. Judges read text, so a judge with its own tokenizer
  re-encodes the policy's decoded completion with that tokenizer (and its chat template).
* :class:`CallableJudge` — any user function ``(prompts, completions) -> scores``, also loadable from a
  ``module:function`` (or ``path/to/file.py:function``) spec.
* :class:`GoldSentimentJudge` — the demo world's ground truth: VADER sentiment of prompt + completion,
  mapped to (0, 1) like a sentiment classifier's p(positive) (the DPO paper's IMDb reward, arXiv 2305.18290 §6.1).
* :class:`RewardModelJudge` — a Bradley–Terry reward model scored by
  :func:`preftune.modeling.reward.sequence_rewards`, the scorer reward-model training uses: the score head
  reads the last token of prompt + completion, the EOS the completion ends with, so a judged text gets
  the number training gave it.
* :class:`ImplicitRewardJudge` — a DPO policy's implicit reward β·log π(y|x)/π_ref(y|x) (arXiv 2305.18290 §5);
  only differences between completions of the same prompt are meaningful.
* :class:`PairwiseJudge` — ``prefer(prompts, a, b) -> P(a ≻ b)``; :class:`ScalarPairwiseJudge` makes one of
  any scalar judge, σ(s_a − s_b) (Bradley–Terry); :func:`win_rate` reads either kind.
* :func:`load_judge` — ``gold``, a reward-model folder, or ``module:function``.
* :func:`resolve_judge` — a run's judge, the one place it is decided: the object passed to a trainer (a judge, a
  pairwise judge, a plain function) or the config's spec, :func:`default_judge` for the embedded world, and one
  message when there is none; :class:`PairPreferenceJudge` lets a pairwise judge score the two samples of a prompt.

Text is turned into ids the way training does (:mod:`preftune.rollout.encoding`): the prompt with BOS or
through the chat template, the completion after it, ending with one EOS. A model judge reads at most its
positions: a longer completion is cut to fit, keeping its start, as training cuts a row at ``max_length``
(said once in the log), and a prompt that leaves no room is refused by row.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from preftune.data.batching import pad_sequences
from preftune.errors import ConfigError, ModelError, PreftuneError
from preftune.modeling.logprobs import completion_logps, max_positions, model_inputs, unwrap_causal_lm
from preftune.modeling.reward import sequence_rewards
from preftune.rollout.encoding import (
    Prompt,
    check_aligned,
    check_prompts,
    encode_completions,
    fit_positions,
    length_sorted_batches,
    prompt_text,
)
from preftune.rollout.record import Rollout

log = logging.getLogger("preftune")


@runtime_checkable
class Judge(Protocol):
    """Scores ``completions[i]`` as a reply to ``prompts[i]``; higher is better."""

    name: str

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]: ...


def judge_scores(judge: Judge, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
    """``judge.score`` checked: a sequence (list, tuple, 1-D tensor or array) of one finite real number per
    completion, nothing else (a dict would be read by its keys, a string digit by digit); else :class:`ModelError`
    naming the judge. A judge that raises is named too (a :class:`PreftuneError` it raises passes as it is)."""
    check_aligned(prompts, completions)
    try:
        returned = judge.score(prompts, completions)
    except PreftuneError:
        raise
    except Exception as e:
        raise ModelError(f"judge {judge.name!r} raised {type(e).__name__}: {e}") from e
    scores = _real_numbers(returned)
    if scores is None:
        shown = "None" if returned is None else f"a {type(returned).__name__} ({_short(returned)})"
        raise ModelError(f"judge {judge.name!r} returned {shown}; a judge returns one real number per completion, "
                         f"as a list of {len(completions)} numbers")
    if len(scores) != len(completions):
        raise ModelError(f"judge {judge.name!r} returned {len(scores)} scores for {len(completions)} completions")
    bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
    if bad is not None:
        raise ModelError(f"judge {judge.name!r} returned {scores[bad]} for completion {bad} "
                         f"({completions[bad][:60]!r}); scores must be finite")
    return scores


def _real_numbers(returned) -> list[float] | None:
    """``returned`` as floats when it is a sequence of real numbers (or a 1-D tensor / array), else None."""
    if isinstance(returned, (Tensor, np.ndarray)):
        if returned.ndim != 1:
            return None
        returned = returned.tolist()
    if not isinstance(returned, Sequence) or isinstance(returned, (str, bytes)):
        return None
    values = []
    for value in returned:
        if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0:
            value = value.item()
        if not isinstance(value, numbers.Real):
            return None
        values.append(float(value))
    return values


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def score_rollout(judge: Judge, rollout: Rollout) -> Rollout:
    """Fill ``rollout.scores`` (one per sample) and ``rollout.judge`` with ``judge``'s verdict; returns it."""
    rollout.scores = judge_scores(judge, rollout.sample_prompts, rollout.completions)
    rollout.judge = judge.name
    return rollout


# ------------------------------------------------------------------------------------ a user's function


class CallableJudge:
    """A user's function ``fn(prompts, completions) -> scores`` as a judge (prompts as given, completions text)."""

    def __init__(self, fn: Callable[[list, list], Sequence[float]], name: str | None = None):
        if not callable(fn):
            raise ConfigError(f"a judge function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> Sequence[float]:
        # As the function returns it: judge_scores checks it (list() would turn a dict into its keys).
        return self.fn(list(prompts), list(completions))


def load_callable(spec: str) -> Callable:
    """The function named by ``module.sub:function`` (imported with the current directory on the path) or
    ``path/to/file.py:function``; :class:`ConfigError` names the spec when it cannot be found."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"judge {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"judge {spec!r}: no such file {path}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            cwd = str(Path.cwd())
            added = cwd not in sys.path
            if added:  # a judge module beside the user's config, as `python -m` would find it
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(cwd)
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(f"judge {spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"judge {spec!r}: module {module_name!r} has no attribute {attr!r}")
    return fn


# ------------------------------------------------------------------------------------ gold reward


class GoldSentimentJudge:
    """p(positive) of ``prompt + completion`` from the VADER lexicon: ``σ(scale · compound)``.

    VADER's ``compound`` ∈ [−1, 1] is a squashed sum of word valences (negation flips and damps a word,
    "but" up-weights the clause after it). The logistic makes it read like a sentiment classifier's
    positive-class probability, as the siebert classifier in the DPO paper: 0.5 for neutral text, ≈0.85
    for one mild positive word ("The plot was good.", compound 0.44), 0.97 for "This movie was great, I
    loved it." (0.84), and at the ends σ(±4) = 0.018 / 0.982 — saturating like a classifier, yet strictly
    monotone in ``compound``, so two positive completions are still ordered.

    This is the demo world's judge (movie-review sentiment); on any other task it measures sentiment, not
    quality. A conversation prompt is read as its messages' text.
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

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        check_aligned(prompts, completions)
        # The prompt counts: as in the paper, the classifier reads the whole review x + y.
        return self.score_texts([prompt_text(p) + c for p, c in zip(prompts, completions)])


# ------------------------------------------------------------------------------------ model judges


# What a reward model reads of a collated batch (preftune.modeling.reward.sequence_rewards' arguments, in order).
_SCORED_SEQUENCE = ("input_ids", "attention_mask", "seq_last_index", "seq_tokens", "position_ids")


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
            out[idx] = completion_logps(model, **batch)["logps"].float().cpu()
    finally:
        model.train(was_training)
    return out


def _fit_judge_positions(judge, prompts: Sequence[Prompt], prompt_ids: list, completion_ids: list,
                         positions: int | None) -> list[list[int]]:
    """``completion_ids`` cut to the judge's ``positions`` (:func:`~preftune.rollout.encoding.fit_positions`); the
    first time a judge cuts any, the log says so."""
    fitted, cut = fit_positions(prompt_ids, completion_ids, positions, f"judge {judge.name}", prompts)
    if cut and not getattr(judge, "_said_cut", False):
        judge._said_cut = True
        log.info("judge %s reads at most %d positions: %d of %d completions cut to fit, keeping their start (as "
                 "training cuts a row at max_length); later cuts are not logged", judge.name, positions, cut,
                 len(fitted))
    return fitted


class ImplicitRewardJudge:
    """DPO's implicit reward r̂(x, y) = β · (log π(y|x) − log π_ref(y|x)), summed over completion tokens
    (EOS included), both models sharing the policy's tokenizer."""

    name = "implicit_reward"

    def __init__(self, policy: nn.Module, reference: nn.Module, tokenizer, beta: float, batch_size: int = 32):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.beta, self.batch_size = beta, batch_size

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        prompt_ids, completion_ids = encode_completions(self.tokenizer, prompts, completions)
        positions = [p for p in (max_positions(self.policy), max_positions(self.reference)) if p is not None]
        completion_ids = _fit_judge_positions(self, prompts, prompt_ids, completion_ids, min(positions, default=None))
        policy = sequence_logps(self.policy, prompt_ids, completion_ids, batch_size=self.batch_size)
        reference = sequence_logps(self.reference, prompt_ids, completion_ids, batch_size=self.batch_size)
        return (self.beta * (policy - reference)).tolist()


class RewardModelJudge:
    """A scalar reward model (``AutoModelForSequenceClassification``, one label) with its own tokenizer.

    Each prompt + completion is encoded with the judge's tokenizer as training encodes a row (text: BOS
    prompt, completion, EOS; a conversation: the judge's chat template with the completion as the assistant
    turn — a judge tokenizer without a chat template reads the conversation's text instead), then scored by
    :func:`preftune.modeling.reward.sequence_rewards`: the ``score`` head on the hidden state of the last
    token, the completion's EOS, exactly where training reads it. (Hugging Face's own pooling skips trailing
    pad tokens, so with pad = EOS it would read the token before the EOS and give another number.)

    A sequence classifier without a ``score`` head on a decoder (an encoder such as DeBERTa, which
    preftune does not train) is scored by its own forward on the text pair ``(prompt, completion)``, the
    input such models are trained on.
    """

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 32, name: str = "reward_model"):
        config = unwrap_causal_lm(model).config
        if getattr(config, "num_labels", 1) != 1:
            raise ModelError(f"judge {name}: a reward model has one output label, this one has {config.num_labels}")
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.last_token_head = hasattr(unwrap_causal_lm(model), "score")
        if self.last_token_head and tokenizer.eos_token_id is None:
            raise ModelError(f"judge {name}: its tokenizer has no eos_token, but the score is read at the EOS "
                             "that ends each completion")

    @classmethod
    def from_pretrained(cls, path: str, *, batch_size: int = 32, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> RewardModelJudge:
        """Load a reward model and its tokenizer from ``path``. A checkpoint without trained weights for
        every parameter (e.g. a causal LM whose config claims one label: transformers would initialise a
        random ``score`` head, so scores — and pairs — would differ between identical runs) is refused."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from preftune.modeling.loading import refuse_pickled_weights

        refuse_pickled_weights(path, "judge")
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, output_loading_info=True, **({"dtype": dtype} if dtype is not None else {}))
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"judge {path}: cannot load a sequence-classification model and tokenizer from it "
                             f"({type(e).__name__}: {e})") from e
        untrained = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
        if untrained:
            raise ModelError(
                f"judge {path}: the checkpoint has no weights for {', '.join(untrained)}, so transformers would "
                "initialise them at random and every run would score differently (is it a causal LM rather than "
                "a reward model?). Give a reward model trained with `method: reward` (its final/ folder)")
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, batch_size=batch_size, name=f"reward_model:{path}")

    def _encode(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> tuple[list, list]:
        if check_prompts(prompts, self.name) and not getattr(self.tokenizer, "chat_template", None):
            prompts = [prompt_text(p) for p in prompts]
        return encode_completions(self.tokenizer, prompts, completions, self.name)

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        check_aligned(prompts, completions)
        was_training = self.model.training
        self.model.eval()
        try:
            if not self.last_token_head:
                return self._score_pairs(prompts, completions)
            return self._score_last_token(prompts, completions)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def score_batches(self, batches: Iterable[dict[str, Tensor]]) -> Tensor:
        """Scores ``[N]`` (fp32, CPU) of sequences already encoded with this judge's tokenizer, in the collator's
        batches (``input_ids``, ``attention_mask``, ``seq_last_index``, ``seq_tokens``, ``position_ids``): the
        ``score`` head at each sequence's last token, in evaluation mode. PPO scores its sampled ids this way when
        the policy shares the judge's tokenizer."""
        device = _device(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            return torch.cat([sequence_rewards(self.model, *(b[k].to(device) for k in _SCORED_SEQUENCE))["logps"]
                              .float().cpu() for b in batches])
        finally:
            self.model.train(was_training)

    def _score_last_token(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        prompt_ids, completion_ids = self._encode(prompts, completions)
        completion_ids = _fit_judge_positions(self, prompts, prompt_ids, completion_ids, max_positions(self.model))
        lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
        order = list(length_sorted_batches(lengths, self.batch_size))
        # One row per sequence, right-padded: the pads come after the EOS and are never read.
        scores = self.score_batches(pad_sequences([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx],
                                                  pad_id=0) for idx in order)
        out = torch.zeros(len(prompt_ids))
        out[torch.tensor([i for idx in order for i in idx], dtype=torch.long)] = scores
        return out.tolist()

    def _score_pairs(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        texts = [prompt_text(p) for p in prompts]
        out = torch.zeros(len(texts))
        device = _device(self.model)
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size],
                                 list(completions[start : start + self.batch_size]),
                                 padding=True, truncation=True, return_tensors="pt").to(device)
            out[start : start + len(enc["input_ids"])] = self.model(**enc).logits[:, 0].float().cpu()
        return out.tolist()


# ------------------------------------------------------------------------------------ pairwise judges


@runtime_checkable
class PairwiseJudge(Protocol):
    """``prefer(prompts, a, b)[i]`` = P(``a[i]`` ≻ ``b[i]`` | ``prompts[i]``) ∈ [0, 1]; ½ is a tie."""

    name: str

    def prefer(self, prompts: Sequence[Prompt], completions_a: Sequence[str],
               completions_b: Sequence[str]) -> list[float]: ...


class ScalarPairwiseJudge:
    """A scalar judge as a pairwise one, by Bradley–Terry: P(a ≻ b) = σ(s_a − s_b)."""

    def __init__(self, judge: Judge):
        self.judge, self.name = judge, judge.name

    def prefer(self, prompts: Sequence[Prompt], completions_a: Sequence[str],
               completions_b: Sequence[str]) -> list[float]:
        check_aligned(prompts, completions_a)
        check_aligned(prompts, completions_b)
        scores = judge_scores(self.judge, list(prompts) * 2, list(completions_a) + list(completions_b))
        n = len(prompts)
        return [1.0 / (1.0 + math.exp(b - a)) for a, b in zip(scores[:n], scores[n:])]


def compare(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of items where a beats b, a tie counting ½: mean of 1[a > b] + ½·1[a = b]."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"need two equally long, non-empty score lists, got {len(scores_a)} and {len(scores_b)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)) / len(scores_a)


def win_rate(judge: Judge | PairwiseJudge, prompts: Sequence[Prompt], completions_a: Sequence[str],
             completions_b: Sequence[str]) -> float:
    """How often ``completions_a[i]`` beats ``completions_b[i]`` for ``prompts[i]``, a tie counting ½.

    A scalar judge compares scores (:func:`compare`); a pairwise judge's P(a ≻ b) counts as a win above
    ½, a tie at ½ — the same verdicts as the scalar judge through :class:`ScalarPairwiseJudge`.
    """
    check_aligned(prompts, completions_a)
    check_aligned(prompts, completions_b)
    if isinstance(judge, PairwiseJudge):
        preferences = judge.prefer(prompts, completions_a, completions_b)
        return compare(list(preferences), [0.5] * len(preferences))
    scores = judge_scores(judge, list(prompts) * 2, list(completions_a) + list(completions_b))
    return compare(scores[: len(prompts)], scores[len(prompts) :])


# ------------------------------------------------------------------------------------ loading


def load_judge(spec: str, *, batch_size: int = 32, device: str | torch.device | None = None) -> Judge:
    """A judge from its spec: ``gold`` (the demo world's VADER sentiment judge), the folder of a reward model
    (e.g. ``runs/rm/final``), or ``module:function`` / ``file.py:function`` (a user's scoring function)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"judge: expected 'gold', a reward-model folder or 'module:function', got {spec!r}")
    if spec == "gold":
        return GoldSentimentJudge()
    if Path(spec).is_dir():
        return RewardModelJudge.from_pretrained(spec, batch_size=batch_size, device=device)
    if ":" in spec:
        return CallableJudge(load_callable(spec), name=spec)
    if Path(spec).exists():
        raise ModelError(f"judge {spec}: a reward model is a folder (config.json, weights, tokenizer), not a file")
    try:
        return RewardModelJudge.from_pretrained(spec, batch_size=batch_size, device=device)
    except ModelError as e:
        raise ModelError(f"judge {spec!r} is neither 'gold', an existing reward-model folder, nor "
                         f"'module:function' ({e})") from e



# ------------------------------------------------------------------------------------ a run's judge


class PairPreferenceJudge:
    """A pairwise judge as a scalar one over completions that come in pairs: completions ``2i`` and ``2i + 1`` are
    two samples of one prompt (a rollout of ``n = 2``, Online DPO's layout), and each scores its probability of
    beating the other, ``P(a ≻ b)`` and ``1 − P(a ≻ b)``. So the higher-scored completion is the one the judge
    prefers and a tie (½) stays a tie, as with the labels 1/0; the scores keep the judge's confidence.

    A single sample has no such score: completions that are not pairs of one prompt are refused by name.
    """

    def __init__(self, judge: PairwiseJudge):
        self.judge, self.name = judge, judge.name

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        check_aligned(prompts, completions)
        unpaired = ("got an odd number of completions" if len(completions) % 2 else next(
            (f"completions {i} and {i + 1} answer different prompts" for i in range(0, len(prompts), 2)
             if prompts[i] != prompts[i + 1]), None))
        if unpaired is not None:
            raise ConfigError(f"judge {self.name!r} is pairwise: it scores completions two at a time, two samples of "
                              f"one prompt (Online DPO's pairs), but {unpaired}; a single sample (such as one "
                              "per held-out prompt in evaluation) needs a scalar judge")
        a, b = list(completions[0::2]), list(completions[1::2])
        try:
            returned = self.judge.prefer(list(prompts[0::2]), a, b)
        except PreftuneError:
            raise
        except Exception as e:
            raise ModelError(f"judge {self.name!r} raised {type(e).__name__}: {e}") from e
        preferences = _real_numbers(returned)
        if preferences is None or len(preferences) != len(a):
            raise ModelError(f"judge {self.name!r} returned {_short(returned)} for {len(a)} pairs; a pairwise judge "
                             "returns one P(a ≻ b) per pair")
        bad = next((p for p in preferences if not 0 <= p <= 1), None)  # NaN fails the comparison too
        if bad is not None:
            raise ModelError(f"judge {self.name!r} returned {bad}; P(a ≻ b) must lie in [0, 1]")
        return [score for p in preferences for score in (p, 1.0 - p)]


# How a run's judging reads a pairwise judge: "keep" it (the caller calls ``prefer``: the rounds), score "pairs"
# with it (:class:`PairPreferenceJudge`: Online DPO's two samples of a prompt), or "refuse" it (GRPO, RLOO, PPO:
# their advantages read one score per completion).
PairwiseUse = Literal["keep", "pairs", "refuse"]


def default_judge(given, spec: str | None, *, embedded_world: bool) -> str | None:
    """The judge spec of a run that needs a judge: ``spec`` as it is, or ``gold`` — the embedded world's gold reward —
    when no judge is given (no ``judge=`` object, no config ``judge``) and model and data are both the embedded
    default (tiny Llama, built-in preferences, whose chosen replies are kind and rejected ones rude); the log says
    so. The caller records the result as the config's ``judge``, so config.yaml says what judged the run."""
    if given is not None or spec or not embedded_world:
        return spec
    log.info("no judge: the embedded default (tiny Llama, built-in preferences) is judged by its gold reward, "
             "judge=gold (VADER sentiment of prompt + completion); set judge to use another")
    return "gold"


def check_judge(given, spec: str | None, *, who: str, pairwise: PairwiseUse = "refuse") -> None:
    """Refuse, before anything loads, a run that needs a judge and has none (one message, naming ``who`` and every
    way to give one), a ``judge=`` that is no judge, and a pairwise judge where ``pairwise`` is ``"refuse"``."""
    if given is None:
        if not spec:
            raise ConfigError(
                f"{who} needs a judge to score its samples, and none is given: set judge to a reward-model folder "
                "(reward_model_path, TRL's name, is the same key), to 'module:function' or 'path/to/file.py:function' "
                "(a function (prompts, completions) -> one score per completion), or to 'gold' (the demo world's "
                "sentiment reward); or pass judge= to the trainer (a judge, a pairwise judge, or such a function)")
        return
    if hasattr(given, "score"):
        return
    if isinstance(given, str):
        raise ConfigError(f"judge={given!r} passed to the trainer is a spec: set it as the config's judge (so "
                          "config.yaml records it); judge= takes a judge object or a function")
    if isinstance(given, PairwiseJudge):
        if pairwise == "refuse":
            raise ConfigError(
                f"judge {given.name!r} is pairwise (it prefers one of two completions), but {who} needs one score "
                "per completion; give a scalar judge (a reward-model folder, or a function (prompts, completions) "
                "-> scores), or train a method that compares pairs: online_dpo, rso, sppo or iterative_dpo")
        return
    if not callable(given):
        raise ConfigError(f"judge= must be a judge (with score), a pairwise judge (with name and prefer) or a function "
                          f"(prompts, completions) -> scores; got {_short(given)} of type {type(given).__name__}")


def resolve_judge(given, spec: str | None, *, who: str, pairwise: PairwiseUse = "refuse",
                  device: str | torch.device | None = None, batch_size: int = 32) -> Judge | PairwiseJudge:
    """A run's judge: ``given`` (the object passed to the trainer) wins over ``spec`` (the config's ``judge``, read by
    :func:`load_judge` onto ``device``). A plain function ``(prompts, completions) -> scores`` becomes a
    :class:`CallableJudge`; a pairwise judge is kept, wrapped in :class:`PairPreferenceJudge` or refused as
    ``pairwise`` says; no judge at all is :func:`check_judge`'s one message, naming ``who`` needs it. Apply
    :func:`default_judge` to ``spec`` first where the embedded world may be judged by its gold reward."""
    check_judge(given, spec, who=who, pairwise=pairwise)
    if given is None:
        return load_judge(spec, batch_size=batch_size, device=device)
    if hasattr(given, "score"):
        return given
    if isinstance(given, PairwiseJudge):
        return PairPreferenceJudge(given) if pairwise == "pairs" else given
    return CallableJudge(given)
