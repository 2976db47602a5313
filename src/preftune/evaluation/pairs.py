"""On-policy preference pairs: sample k completions per prompt, score them with a judge, order them.

As in the DPO paper's IMDb setup (arXiv 2305.18290, §6.1 and App. C.1): 4 samples per prefix from the SFT model, all
C(4, 2) = 6 pairs ordered by the ground-truth reward. ``mode="all"`` writes every pair (i, j) with
score_i ≠ score_j, the higher-scored one as ``chosen``; ``mode="best_vs_worst"`` writes one pair per
prompt, the highest against the lowest. Nothing is dropped silently: :class:`PairReport` counts pairs
with equal scores, pairs of identical completions, and empty completions (which the data layer refuses).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Literal

from torch import nn

from preftune.evaluation.generate import Samples, generate
from preftune.evaluation.judges import Judge

PairMode = Literal["all", "best_vs_worst"]


@dataclass
class PairReport:
    """Counts of what :func:`build_pairs` did; ``candidate_pairs = pairs + tied + identical + with_empty``."""

    prompts: int = 0
    samples: int = 0
    candidate_pairs: int = 0  # C(k, 2) per prompt ("all") or 1 per prompt ("best_vs_worst")
    pairs: int = 0
    tied: int = 0  # different completions with equal scores
    identical: int = 0  # the same completion text twice
    with_empty: int = 0  # a pair involving an empty completion (immediate EOS)
    without_eos: int = 0  # samples cut at max_new_tokens (kept; training appends EOS to every completion)
    prompts_without_pairs: int = 0
    mean_score_gap: float = 0.0  # mean score_chosen − score_rejected over written pairs

    @property
    def dropped(self) -> int:
        return self.tied + self.identical + self.with_empty

    def __str__(self) -> str:
        return (f"{self.pairs} pairs from {self.prompts} prompts × {self.samples // max(self.prompts, 1)} samples; "
                f"dropped {self.dropped} of {self.candidate_pairs} candidates ({self.tied} tied scores, "
                f"{self.identical} identical completions, {self.with_empty} with an empty completion); "
                f"{self.prompts_without_pairs} prompts gave no pair; {self.without_eos} samples hit max_new_tokens; "
                f"mean score gap {self.mean_score_gap:.3f}")

    def to_dict(self) -> dict:
        return asdict(self)


def _candidate_pairs(scores: Sequence[float], mode: PairMode) -> list[tuple[int, int]]:
    """Index pairs (a, b) within one prompt's group to consider, unordered."""
    if mode == "all":
        return list(combinations(range(len(scores)), 2))
    if mode == "best_vs_worst":
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        return [(best, worst)] if best != worst else [(0, len(scores) - 1)]  # all equal: a counted tie
    raise ValueError(f"mode must be 'all' or 'best_vs_worst', got {mode!r}")


def pairs_from_samples(
    samples: Samples, scores: Sequence[float], mode: PairMode = "all"
) -> tuple[list[dict], PairReport]:
    """Preference rows ``{prompt, chosen, rejected, score_chosen, score_rejected}`` from scored samples."""
    if len(scores) != len(samples):
        raise ValueError(f"{len(scores)} scores for {len(samples)} samples")
    if samples.num_samples < 2:
        raise ValueError("pairs need at least 2 samples per prompt")
    report = PairReport(samples=len(samples), without_eos=len(samples) - sum(samples.ended_with_eos))
    rows: list[dict] = []
    for group in samples.groups():
        report.prompts += 1
        texts = [samples.completions[i] for i in group]
        group_scores = [float(scores[i]) for i in group]
        written = 0
        for a, b in _candidate_pairs(group_scores, mode):
            report.candidate_pairs += 1
            if not texts[a].strip() or not texts[b].strip():
                report.with_empty += 1
            elif texts[a] == texts[b]:
                report.identical += 1
            elif group_scores[a] == group_scores[b]:
                report.tied += 1
            else:
                hi, lo = (a, b) if group_scores[a] > group_scores[b] else (b, a)
                rows.append({"prompt": samples.prompts[group[0]], "chosen": texts[hi], "rejected": texts[lo],
                             "score_chosen": group_scores[hi], "score_rejected": group_scores[lo]})
                written += 1
        report.prompts_without_pairs += written == 0
    report.pairs = len(rows)
    if rows:
        report.mean_score_gap = sum(r["score_chosen"] - r["score_rejected"] for r in rows) / len(rows)
    return rows, report


def build_pairs(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    judge: Judge,
    *,
    k: int = 4,
    mode: PairMode = "all",
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[list[dict], PairReport]:
    """Sample ``k`` completions of each prompt from ``policy``, score them with ``judge`` and pair them.

    Returns standard-format rows (``prompt``, ``chosen``, ``rejected`` plus ``score_chosen`` and
    ``score_rejected``) and the :class:`PairReport`.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 to form pairs, got {k}")
    samples = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, num_samples=k, batch_size=batch_size, seed=seed)
    scores = judge.score(samples.prompts, samples.completions)
    return pairs_from_samples(samples, scores, mode)


def save_pairs(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows as JSONL (one object per line, UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
