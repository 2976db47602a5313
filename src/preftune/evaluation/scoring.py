"""A trained policy as a reward model: implicit-reward scores of responses, and pairwise accuracy on preference data.

DPO's policy defines a reward, r(x, y) = β·log π(y|x)/π_ref(y|x) (Rafailov et al. 2023, arXiv 2305.18290, Eq. 5).
Scoring follows RewardBench (Lambert et al. 2024, arXiv 2403.13787): the log-ratio is summed over the response's
tokens (the prompt is not scored; β only scales it, so it changes no ranking), and a pair counts as correct only
when score(chosen) > score(rejected), strictly — a tie is wrong, so a policy equal to its reference scores 0.

Variants, for a response y of prompt x with scored tokens t = 1..|y| (the EOS each completion ends with included;
assistant turns only for conversations), s = Σ_t log π(y_t | x, y_<t) and r the same under π_ref:

* ``sum`` — β·(s − r): DPO's implicit reward; RewardBench's score (β = 1);
* ``avg`` — β·(s − r)/|y|: the per-token average log-ratio, less favourable to length;
* ``ref_free_sum`` — s, the log-likelihood;
* ``ref_free_avg`` — s/|y| (RewardBench's default reference-free score);
* ``ref_free_norm`` — −‖(log π(y_t | x, y_<t))_t‖₂ (RewardBench's "norm");
* ``reward`` — a Bradley–Terry reward model's score head r(x, y) (``method: reward``), read at the last token.

Fast, because it reads data the way training does: rows are normalised and tokenized by :mod:`preftune.data`
(cached on disk), laid out by :class:`preftune.data.batching.PreferenceCollator` — a pair's prompt once with both
responses branching from it, units packed into rows — and scored by
:func:`preftune.modeling.logprobs.completion_logps`, which never builds ``[batch, seq, vocab]`` logits. The
reference's summed log-probs are computed once per (reference weights, tokenized data) and cached on disk by
:func:`preftune.modeling.reference.save_cached`, so scoring checkpoint after checkpoint runs the reference once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor, nn

from preftune.data import formats, tokenize
from preftune.data.batching import PreferenceCollator, example_lengths
from preftune.errors import ConfigError, DataError
from preftune.evaluation.table import format_table
from preftune.modeling import reference as reference_cache
from preftune.modeling.loading import check_same_vocabulary
from preftune.modeling.logprobs import (
    MASK_IMPLEMENTATIONS,
    attention_implementation,
    completion_logps,
    model_inputs,
    unwrap_causal_lm,
)
from preftune.modeling.modes import eval_mode
from preftune.modeling.reward import sequence_rewards

log = logging.getLogger("preftune")

REFERENCE_VARIANTS = ("sum", "avg")
REFERENCE_FREE_VARIANTS = ("ref_free_sum", "ref_free_avg", "ref_free_norm")
VARIANTS = (*REFERENCE_VARIANTS, *REFERENCE_FREE_VARIANTS, "reward")
DESCRIPTIONS = {
    "sum": "β·Σ log π/π_ref",
    "avg": "β·Σ log π/π_ref / |y|",
    "ref_free_sum": "Σ log π",
    "ref_free_avg": "Σ log π / |y|",
    "ref_free_norm": "−‖log π per token‖₂",
    "reward": "reward model r(x, y)",
}
SUBSET = "subset"  # RewardBench's column: accuracy is also reported per subset when the rows carry it
CACHE_VERSION = "score-1"


def is_reward_model(model: nn.Module) -> bool:
    """A sequence classifier with a one-output ``score`` head (what ``method: reward`` trains)."""
    return hasattr(unwrap_causal_lm(model), "score")


def default_variants(model: nn.Module, reference: nn.Module | None) -> list[str]:
    if is_reward_model(model):
        return ["reward"]
    return [*REFERENCE_VARIANTS, *REFERENCE_FREE_VARIANTS] if reference is not None else list(REFERENCE_FREE_VARIANTS)


def _check_variants(variants: Sequence[str], model: nn.Module, reference: nn.Module | None) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown score variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if is_reward_model(model) and set(variants) != {"reward"}:
        raise ConfigError("the model is a reward model (a score head, no LM head): its only variant is 'reward'")
    if not is_reward_model(model) and "reward" in variants:
        raise ConfigError("variant 'reward' needs a reward model (a sequence classifier trained with method: reward)")
    if reference is None and any(v in REFERENCE_VARIANTS for v in variants):
        raise ConfigError(f"variants {list(REFERENCE_VARIANTS)} are log-ratios and need a reference model "
                          f"(--reference); without one use {', '.join(REFERENCE_FREE_VARIANTS)}")


# ------------------------------------------------------------------------------------ data


@dataclass
class ScoringData:
    """Tokenized rows ready for the collator: ``kind`` is ``pairs`` (prompt/chosen/rejected) or ``responses``
    (prompt/completion); ``subsets`` holds each kept row's ``subset`` value (or None); ``source_rows`` each kept
    row's index in the input."""

    kind: str
    rows: datasets.Dataset
    source_rows: list[int]
    subsets: list[str] | None
    rows_in: int
    report: str


def prepare_data(data: str | Path | datasets.Dataset | Sequence[Mapping], tokenizer, *, max_length: int | None = None,
                 max_prompt_length: int | None = None, cache_dir: str | Path | None = None,
                 skip_invalid: bool = False, split: str = "train") -> ScoringData:
    """Load (a path, a Hub id, a ``Dataset`` or a list of rows), validate, normalise and tokenize, as training does.

    Paired rows (any of TRL's paired formats) are scored as pairs; ``prompt``/``completion`` rows as responses.
    Rows dropped by validation (``skip_invalid``) or by truncation (``max_length``) are counted in ``report``."""
    source = str(data) if isinstance(data, (str, Path)) else "rows"
    if isinstance(data, (str, Path)):
        raw = formats.load_rows(str(data), split)
    elif isinstance(data, datasets.Dataset):
        raw = data
    else:
        if not data:
            raise DataError(source, None, None, "no rows to score")
        raw = datasets.Dataset.from_list([dict(r) for r in data])
    if len(raw) == 0:
        raise DataError(source, None, None, "no rows to score")
    normalised, norm_report = formats.normalise(raw, source, skip_invalid=skip_invalid)
    paired = formats.is_paired(normalised)
    if not paired and "label" in normalised.column_names:
        normalised = normalised.remove_columns("label")  # responses are scored, not trained on: no KTO label
    tokenized, tok_report = tokenize.tokenize_rows(normalised, tokenizer, max_length=max_length,
                                                   max_prompt_length=max_prompt_length,
                                                   cache_dir=Path(cache_root(cache_dir)) / "tokenized", source=source)
    if len(tokenized) == 0:
        raise DataError(source, None, None, f"no row is left to score: {tok_report}; raise --max-length")
    source_rows = tokenized[formats.SOURCE_ROW]
    subsets = None
    if SUBSET in raw.column_names:
        column = raw[SUBSET]
        subsets = [str(column[i]) for i in source_rows]
    keep = [c for c in tokenized.column_names if c.endswith(("_ids", "_mask"))]
    return ScoringData("pairs" if paired else "responses", tokenized.select_columns(keep), source_rows, subsets,
                       len(raw), f"{norm_report}; {tok_report}")


def cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, else ``$PREFTUNE_CACHE``, else ``~/.cache/preftune`` (as training's caches)."""
    return Path(cache_dir or os.environ.get("PREFTUNE_CACHE") or Path.home() / ".cache" / "preftune").expanduser()


# ------------------------------------------------------------------------------------ scores


@dataclass
class ScoreResult:
    """Scores of every kept row: ``scores[variant]`` is ``[n, 2]`` (chosen, rejected) for pairs, ``[n]`` for
    responses; ``tokens`` the scored token counts, same shape."""

    kind: str
    scores: dict[str, np.ndarray]
    tokens: np.ndarray
    source_rows: list[int]
    subsets: list[str] | None
    beta: float
    seconds: float
    rows_in: int
    data_report: str = ""
    reference_cache: str | None = None  # "hit", "miss" or None (no reference)
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.source_rows)

    @property
    def rate(self) -> float:
        """Pairs (or responses) scored per second, policy and reference passes included."""
        return self.n / self.seconds if self.seconds > 0 else math.inf

    def accuracy(self, rows: Sequence[int] | None = None) -> dict[str, float]:
        """Per variant: the fraction of pairs with score(chosen) > score(rejected), strictly (ties are wrong)."""
        if self.kind != "pairs":
            raise ValueError("accuracy needs pairs (prompt, chosen, rejected); these rows are responses")
        picked = {v: s if rows is None else s[list(rows)] for v, s in self.scores.items()}
        return {v: float(np.mean(pairwise_correct(s))) for v, s in picked.items()}

    def accuracy_by_subset(self) -> dict[str, dict]:
        """``{subset: {"n": pairs, "accuracy": {variant: value}}}``, subsets in order of first appearance."""
        if self.subsets is None:
            return {}
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.subsets):
            groups.setdefault(name, []).append(i)
        return {name: {"n": len(rows), "accuracy": self.accuracy(rows)} for name, rows in groups.items()}

    def summary(self) -> dict:
        """JSON-ready: counts, speed and (pairs) accuracy overall and per subset, or (responses) mean scores."""
        unit = "pairs" if self.kind == "pairs" else "responses"
        out = {"kind": self.kind, "n": self.n, "rows_in": self.rows_in, "beta": self.beta,
               "variants": {v: DESCRIPTIONS[v] for v in self.scores}, "seconds": round(self.seconds, 3),
               f"{unit}_per_second": round(self.rate, 2), "reference_cache": self.reference_cache,
               "data_report": self.data_report, **self.meta}
        if self.kind == "pairs":
            out["accuracy"] = self.accuracy()
            if self.subsets is not None:
                out["subsets"] = self.accuracy_by_subset()
        else:
            out["mean_score"] = {v: float(np.mean(s)) for v, s in self.scores.items()}
        return out

    def rows(self) -> list[dict]:
        """One JSON-ready dict per kept row: its ``source_row`` (and ``subset``), and each variant's score(s)."""
        out = []
        for i, row in enumerate(self.source_rows):
            record: dict = {"source_row": row}
            if self.subsets is not None:
                record[SUBSET] = self.subsets[i]
            if self.kind == "pairs":
                for side, k in (("chosen", 0), ("rejected", 1)):
                    record[side] = {v: float(s[i, k]) for v, s in self.scores.items()}
            else:
                record.update({v: float(s[i]) for v, s in self.scores.items()})
            out.append(record)
        return out

    def table(self) -> str:
        """Readable text: accuracy per variant (rows) overall and per subset (columns), or mean scores."""
        if self.kind == "pairs":
            columns = {f"all (n={self.n})": self.accuracy()}
            for name, group in self.accuracy_by_subset().items():
                columns[f"{name} (n={group['n']})"] = group["accuracy"]
            title = "pairwise accuracy (score(chosen) > score(rejected), ties wrong)"
        else:
            columns = {"mean": {v: float(np.mean(s)) for v, s in self.scores.items()},
                       "std": {v: float(np.std(s)) for v, s in self.scores.items()}}
            title = f"scores of {self.n} responses"
        named = {c: {f"{v}: {DESCRIPTIONS[v]}": x for v, x in values.items()} for c, values in columns.items()}
        unit = "pairs" if self.kind == "pairs" else "responses"
        cache = f"; reference log-probs {'read from' if self.reference_cache == 'hit' else 'written to'} the cache" \
            if self.reference_cache else ""
        speed = f"{self.n} {unit} in {self.seconds:.2f} s: {self.rate:.1f} {unit}/s{cache}"
        return f"{title}\n{format_table(named)}\n{speed}"


def pairwise_correct(scores: np.ndarray) -> np.ndarray:
    """``[n, 2]`` (chosen, rejected) scores → bool ``[n]``: chosen strictly above rejected (a tie is wrong)."""
    return scores[:, 0] > scores[:, 1]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _collator(tokenizer, models: Sequence[nn.Module], kind: str) -> PreferenceCollator:
    """Prefix sharing and packing when every model's attention takes the collator's 4D masks, else plain padding."""
    masks = all(attention_implementation(unwrap_causal_lm(m)) in MASK_IMPLEMENTATIONS for m in models)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreferenceCollator(pad, prefix_sharing=masks, padding_free=masks, sft=kind == "responses")


def _batches(rows: datasets.Dataset, batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (packing wastes less), longest first."""
    lengths = example_lengths(rows)
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _on(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in model_inputs(batch).items()}


@torch.no_grad()
def _sequence_scores(model: nn.Module, batch: dict[str, Tensor], want_norm: bool, chunk_size: int) -> dict[str, Tensor]:
    """``logps``, ``tokens`` (and ``norm`` = −‖per-token log-probs‖₂) ``[S]`` of one collated batch; a reward
    model's ``logps`` are its scores."""
    inputs = _on(batch, _device(model))
    if is_reward_model(model):
        return sequence_rewards(model, inputs["input_ids"], inputs["attention_mask"], inputs["seq_last_index"],
                                inputs["seq_tokens"], inputs.get("position_ids"))
    out = completion_logps(model, **inputs, chunk_size=chunk_size)
    if want_norm:
        squares = out["token_logps"].float().pow(2)
        out["norm"] = -squares.new_zeros(out["logps"].shape[0]).index_add(0, inputs["score_seq"], squares).sqrt()
    return out


def _run(model: nn.Module, data: ScoringData, collate: PreferenceCollator, batch_size: int, want_norm: bool,
         chunk_size: int) -> dict[str, np.ndarray]:
    """Every row's per-sequence outputs, as numpy ``[n, branches]`` arrays in row order."""
    branches = 2 if data.kind == "pairs" else 1
    n = len(data.rows)
    out: dict[str, np.ndarray] = {}
    with eval_mode(model):
        for idx in _batches(data.rows, batch_size):
            batch = collate([data.rows[i] for i in idx])
            scores = _sequence_scores(model, batch, want_norm, chunk_size)
            for name in ("logps", "tokens", "norm"):
                if name not in scores:
                    continue
                values = scores[name].float().cpu().numpy().reshape(branches, len(idx)).T  # seq b·B + i → [i, b]
                out.setdefault(name, np.zeros((n, branches), dtype=np.float64))[idx] = values
    return out


def _reference_logps(reference: nn.Module, data: ScoringData, collate: PreferenceCollator, batch_size: int,
                     chunk_size: int, cache_dir: str | Path | None, use_cache: bool) -> tuple[np.ndarray, str]:
    """Summed reference log-probs ``[n, branches]``, read from the on-disk cache or computed and written there."""
    branches = 2 if data.kind == "pairs" else 1
    if not use_cache:
        return _run(reference, data, collate, batch_size, False, chunk_size)["logps"], "off"
    key = reference_cache.cache_key(CACHE_VERSION, reference_cache.model_fingerprint(reference),
                                    data.rows._fingerprint, data.kind, len(data.rows))
    path = cache_root(cache_dir) / "reference" / f"{key}.npy"
    cached = reference_cache.load_cached(path, len(data.rows), branches)
    if cached is not None:
        log.info("reference log-probs read from cache %s", path)
        return cached.astype(np.float64), "hit"
    values = _run(reference, data, collate, batch_size, False, chunk_size)["logps"]
    reference_cache.save_cached(path, values.astype(np.float32))
    log.info("reference log-probs of %d rows cached at %s", len(data.rows), path)
    # What the cache holds (fp32): a later run that reads it then scores exactly as this one.
    return values.astype(np.float32).astype(np.float64), "miss"


def score_data(model: nn.Module, tokenizer, data, reference: nn.Module | None = None, *, beta: float = 1.0,
               variants: Sequence[str] | None = None, batch_size: int = 32, max_length: int | None = None,
               max_prompt_length: int | None = None, cache_dir: str | Path | None = None,
               reference_cache_enabled: bool = True, skip_invalid: bool = False, chunk_size: int = 1024,
               split: str = "train") -> ScoreResult:
    """Score preference pairs or (prompt, response) rows with ``model`` (see the module docstring for variants).

    ``data``: a path or Hub id (any format :func:`preftune.data.formats.load_rows` reads), a ``Dataset`` or a list
    of rows. ``reference`` is needed by ``sum`` and ``avg``; its log-probs are cached under
    ``cache_dir/reference`` unless ``reference_cache_enabled`` is False. ``seconds`` (and the rate) time the model
    passes only, not loading or tokenizing.
    """
    if beta <= 0:
        raise ConfigError(f"beta must be positive (it scales the log-ratio), got {beta}")
    variants = list(variants) if variants else default_variants(model, reference)
    _check_variants(variants, model, reference)
    prepared = data if isinstance(data, ScoringData) else prepare_data(
        data, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, cache_dir=cache_dir,
        skip_invalid=skip_invalid, split=split)
    needs_reference = any(v in REFERENCE_VARIANTS for v in variants)
    if needs_reference:
        check_same_vocabulary(model, reference)
    collate = _collator(tokenizer, [model] + ([reference] if needs_reference else []), prepared.kind)

    started = time.perf_counter()
    policy = _run(model, prepared, collate, batch_size, "ref_free_norm" in variants, chunk_size)
    ref, cache_state = None, None
    if needs_reference:
        ref, cache_state = _reference_logps(reference, prepared, collate, batch_size, chunk_size, cache_dir,
                                            reference_cache_enabled)
    seconds = time.perf_counter() - started

    tokens = np.maximum(policy["tokens"], 1)
    computed = {
        "sum": lambda: beta * (policy["logps"] - ref),
        "avg": lambda: beta * (policy["logps"] - ref) / tokens,
        "ref_free_sum": lambda: policy["logps"],
        "ref_free_avg": lambda: policy["logps"] / tokens,
        "ref_free_norm": lambda: policy["norm"],
        "reward": lambda: policy["logps"],
    }
    squeeze = (lambda a: a[:, 0]) if prepared.kind == "responses" else (lambda a: a)
    scores = {v: squeeze(computed[v]()) for v in variants}
    return ScoreResult(prepared.kind, scores, squeeze(policy["tokens"]), prepared.source_rows, prepared.subsets, beta,
                       seconds, prepared.rows_in, prepared.report, cache_state)


# ------------------------------------------------------------------------------------ command


def load_scoring_model(path: str, dtype: str = "float32", device: str | None = None) -> nn.Module:
    """A causal LM, or a reward model when its config names a ``*ForSequenceClassification`` architecture."""
    from transformers import AutoConfig

    from preftune.config import build_config
    from preftune.modeling import loading

    cfg = build_config({"dtype": dtype})
    try:
        architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    except (OSError, ValueError):
        architectures = []  # loading it as a causal LM names the problem
    reward = any(a.endswith("ForSequenceClassification") for a in architectures)
    model = (loading.load_reward_model if reward else loading.load_causal_lm)(path, cfg)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def score_command(model: str, data: str, reference: str | None = None, variant: list[str] | None = None,
                  beta: float = 1.0, batch_size: int = 32, max_length: int | None = None,
                  max_prompt_length: int | None = None, split: str = "train", dtype: str = "float32",
                  device: str | None = None, cache_dir: str | None = None, no_reference_cache: bool = False,
                  skip_invalid_rows: bool = False, out: str | None = None, scores_out: str | None = None) -> str:
    """``preftune score``: load, score, write ``out`` (JSON summary) and ``scores_out`` (JSONL, one row per input
    row); returns the table."""
    import json

    from preftune.modeling.loading import load_tokenizer

    policy = load_scoring_model(model, dtype, device)
    tokenizer = load_tokenizer(model)
    ref = load_scoring_model(reference, dtype, device) if reference else None
    if ref is not None and is_reward_model(ref):
        raise ConfigError(f"--reference {reference} is a reward model; the reference must be a causal LM (the SFT "
                          "model the policy was trained from)")
    result = score_data(policy, tokenizer, data, ref, beta=beta, variants=variant, batch_size=batch_size,
                        max_length=max_length, max_prompt_length=max_prompt_length, cache_dir=cache_dir,
                        reference_cache_enabled=not no_reference_cache, skip_invalid=skip_invalid_rows, split=split)
    result.meta = {"model": model, "reference": reference, "data": data}
    if out:
        Path(out).write_text(json.dumps(result.summary(), indent=2) + "\n")
    if scores_out:
        with open(scores_out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in result.rows())
    hint = "" if scores_out or result.kind == "pairs" else "\n(per-row scores: --scores-out FILE.jsonl)"
    return result.table() + hint
