"""On-policy preference pairs: sample k completions per prompt, score them with a judge, order them.

As in the DPO paper's IMDb setup (arXiv 2305.18290, §6.1 and App. C.1): 4 samples per prefix from the SFT model,
all C(4, 2) = 6 pairs ordered by the ground-truth reward. ``mode="all"`` writes every pair (i, j) with
score_i ≠ score_j, the higher-scored one as ``chosen``; ``mode="best_vs_worst"`` writes one pair per
prompt, the highest against the lowest. RSO's pairings of its accepted samples (Liu et al. 2023, arXiv
2309.06657, §3.2), in the order the samples come: ``"first_round"`` — n/2 disjoint pairs (1, 2), (3, 4), …;
``"tournament"`` — a knockout, each match's winner meeting the next in the following stage, n − 1 pairs.
Nothing is dropped silently: :class:`PairReport` counts pairs with equal scores, pairs of identical
completions, and empty completions (which the data layer refuses).

Rows come in the format of their prompts, so the next ``preftune train`` reads them with the same template
it would use for the prompts: a text prompt gives a standard text row ``{prompt, chosen, rejected}``; a
conversation gives a conversational row — ``prompt`` the messages, ``chosen`` and ``rejected`` each
``[{"role": "assistant", "content": text}]``. Both carry ``score_chosen`` and ``score_rejected``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Literal

from torch import nn

from preftune.errors import ConfigError
from preftune.rollout.encoding import Prompt, is_conversation
from preftune.rollout.judges import Judge, score_rollout
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate

PairMode = Literal["all", "best_vs_worst", "first_round", "tournament"]
PAIR_MODES = ("all", "best_vs_worst", "first_round", "tournament")


@dataclass
class PairReport:
    """Counts of what :func:`pairs_from_rollout` did; ``candidate_pairs = pairs + tied + identical + with_empty``."""

    prompts: int = 0
    samples: int = 0
    candidate_pairs: int = 0  # per prompt: C(k, 2) ("all"), 1 ("best_vs_worst"), ⌊k/2⌋ or k − 1 (RSO's pairings)
    pairs: int = 0
    tied: int = 0  # different completions with equal scores
    identical: int = 0  # the same completion text twice
    with_empty: int = 0  # a pair involving an empty completion (immediate EOS)
    without_eos: int = 0  # samples cut at max_new_tokens or the model's positions (kept; training appends EOS)
    prompts_without_pairs: int = 0
    mean_score_gap: float = 0.0  # mean score_chosen − score_rejected over written pairs
    judge: str | None = None

    @property
    def dropped(self) -> int:
        return self.tied + self.identical + self.with_empty

    def __str__(self) -> str:
        return (f"{self.pairs} pairs from {self.prompts} prompts × {self.samples // max(self.prompts, 1)} samples, "
                f"judged by {self.judge}; dropped {self.dropped} of {self.candidate_pairs} candidates ({self.tied} "
                f"tied scores, {self.identical} identical completions, {self.with_empty} with an empty completion); "
                f"{self.prompts_without_pairs} prompts gave no pair; {self.without_eos} samples hit the length budget; "
                f"mean score gap {self.mean_score_gap:.3f}")

    def to_dict(self) -> dict:
        return asdict(self)


def pair_row(prompt: Prompt, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> dict:
    """One preference row in the format of ``prompt`` (see the module docstring)."""
    if is_conversation(prompt):
        return {"prompt": [dict(m) for m in prompt],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "score_chosen": score_chosen, "score_rejected": score_rejected}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": score_chosen,
            "score_rejected": score_rejected}


def _candidate_pairs(scores: Sequence[float], mode: PairMode) -> list[tuple[int, int]]:
    """Index pairs (a, b) within one prompt's group to consider, unordered."""
    if mode == "all":
        return list(combinations(range(len(scores)), 2))
    if mode == "first_round":  # an odd last sample sits out
        return [(i, i + 1) for i in range(0, len(scores) - 1, 2)]
    if mode == "tournament":  # a tied match sends the first on; an odd one out advances unplayed
        matches, alive = [], list(range(len(scores)))
        while len(alive) > 1:
            winners = []
            for a, b in zip(alive[::2], alive[1::2]):
                matches.append((a, b))
                winners.append(a if scores[a] >= scores[b] else b)
            alive = winners + alive[len(alive) - len(alive) % 2 :]
        return matches
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    return [(best, worst)] if best != worst else [(0, len(scores) - 1)]  # all equal: a counted tie


def _check_mode(mode: str) -> None:
    if mode not in PAIR_MODES:
        raise ConfigError(f"pairs: mode must be one of {', '.join(PAIR_MODES)}, got {mode!r}")


def pairs_from_rollout(rollout: Rollout, mode: PairMode = "all",
                       extras: dict[str, Sequence[float]] | None = None) -> tuple[list[dict], PairReport]:
    """Preference rows (:func:`pair_row`) from a judged rollout (``rollout.scores`` filled).

    ``extras`` maps a name to one number per sample (e.g. ``{"win_prob": …}``); each row then carries
    ``chosen_<name>`` and ``rejected_<name>``, the values of its two samples."""
    _check_mode(mode)
    if rollout.scores is None:
        raise ValueError("the rollout has no scores; judge it first (preftune.rollout.judges.score_rollout)")
    rollout.check()
    if rollout.group_size < 2:
        raise ConfigError(f"pairs need at least 2 samples per prompt, the rollout has {rollout.group_size}")
    report = PairReport(samples=len(rollout), without_eos=len(rollout) - sum(rollout.ended_with_eos),
                        judge=rollout.judge)
    rows: list[dict] = []
    for i, group in enumerate(rollout.groups()):
        report.prompts += 1
        texts = [rollout.completions[k] for k in group]
        scores = [float(rollout.scores[k]) for k in group]
        written = 0
        for a, b in _candidate_pairs(scores, mode):
            report.candidate_pairs += 1
            if not texts[a].strip() or not texts[b].strip():
                report.with_empty += 1
            elif texts[a] == texts[b]:
                report.identical += 1
            elif scores[a] == scores[b]:
                report.tied += 1
            else:
                hi, lo = (a, b) if scores[a] > scores[b] else (b, a)
                row = pair_row(rollout.prompts[i], texts[hi], texts[lo], scores[hi], scores[lo])
                for name, values in (extras or {}).items():
                    row[f"chosen_{name}"], row[f"rejected_{name}"] = float(values[group[hi]]), float(values[group[lo]])
                rows.append(row)
                written += 1
        report.prompts_without_pairs += written == 0
    report.pairs = len(rows)
    if rows:
        report.mean_score_gap = sum(r["score_chosen"] - r["score_rejected"] for r in rows) / len(rows)
    return rows, report


def build_pairs(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    judge: Judge,
    params: SamplingParams,
    mode: PairMode = "all",
) -> tuple[list[dict], PairReport]:
    """Sample ``params.n`` (k ≥ 2) completions of each prompt from ``policy``, score them with ``judge`` and
    pair them; returns the rows (:func:`pair_row`) and the :class:`PairReport`."""
    _check_mode(mode)
    if params.n < 2:
        raise ConfigError(f"pairs: k (samples per prompt) must be at least 2 to form a pair, got {params.n}")
    rollout = score_rollout(judge, generate(policy, tokenizer, prompts, params))
    return pairs_from_rollout(rollout, mode)


def save_pairs(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows as JSONL (one object per line, UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
