"""Facts about the pair builder: chosen always scores higher, C(k, 2) pairs minus ties, every drop counted."""

from __future__ import annotations

import json
from math import comb

import pytest

from preftune.evaluation.generate import Samples
from preftune.evaluation.pairs import build_pairs, pairs_from_samples, save_pairs


def make_samples(groups: list[list[str]], prompts: list[str] | None = None) -> Samples:
    k = len(groups[0])
    prompts = prompts or [f"prompt {i}" for i in range(len(groups))]
    flat_prompts = [p for p in prompts for _ in range(k)]
    texts = [t for g in groups for t in g]
    n = len(texts)
    return Samples(flat_prompts, [[1]] * n, [[5]] * n, texts, [True] * n, num_samples=k)


def test_all_pairs_order_by_score_and_drop_ties():
    samples = make_samples([[" a", " b", " c", " d"]])
    rows, report = pairs_from_samples(samples, [0.9, 0.1, 0.5, 0.5], mode="all")
    # C(4,2) = 6 candidates; (c, d) tie → 5 pairs, each with the higher score as chosen.
    assert {(r["chosen"], r["rejected"]) for r in rows} == {
        (" a", " b"), (" a", " c"), (" a", " d"), (" c", " b"), (" d", " b")}
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert all(r["prompt"] == "prompt 0" for r in rows)
    assert (report.candidate_pairs, report.pairs, report.tied, report.identical) == (6, 5, 1, 0)


def test_identical_and_empty_completions_are_dropped_and_counted():
    samples = make_samples([[" same", " same", "", " other"], [" x", " x", " x", " x"]])
    rows, report = pairs_from_samples(samples, [0.2, 0.7, 0.9, 0.4, 0.1, 0.2, 0.3, 0.4], mode="all")
    # Group 0: (same, same) identical; 3 pairs with the empty one; 2 real pairs. Group 1: 6 identical.
    assert report.identical == 1 + 6
    assert report.with_empty == 3
    assert report.pairs == len(rows) == 2
    assert report.prompts_without_pairs == 1
    assert report.candidate_pairs == 12 == report.pairs + report.dropped


def test_best_vs_worst_gives_one_pair_per_prompt():
    samples = make_samples([[" a", " b", " c", " d"], [" e", " f", " g", " h"]])
    rows, report = pairs_from_samples(samples, [0.3, 0.8, 0.1, 0.5, 0.4, 0.4, 0.4, 0.4], mode="best_vs_worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(" b", " c")]
    assert (report.candidate_pairs, report.pairs, report.tied, report.prompts_without_pairs) == (2, 1, 1, 1)
    assert report.mean_score_gap == pytest.approx(0.7)


class HashJudge:
    """Scores that depend only on the completion, in a few buckets so that ties happen."""

    name = "hash"

    def score(self, prompts, completions):
        return [float(sum(map(ord, c)) % 3) for c in completions]


def test_build_pairs_end_to_end_with_a_controlled_judge(tiny_model, tokenizer):
    prompts = ["The movie was", "What", "I did not like", "A terrible film"]
    k = 4
    rows, report = build_pairs(tiny_model(), tokenizer, prompts, HashJudge(), k=k, max_new_tokens=3, seed=0)
    judge = HashJudge()
    for row in rows:
        chosen, rejected = judge.score([row["prompt"]] * 2, [row["chosen"], row["rejected"]])
        assert chosen > rejected
        assert (row["score_chosen"], row["score_rejected"]) == (chosen, rejected)
    assert report.prompts == len(prompts) and report.samples == k * len(prompts)
    assert report.candidate_pairs == comb(k, 2) * len(prompts)
    assert report.pairs == len(rows) == report.candidate_pairs - report.dropped
    # Pigeonhole: 4 samples in 3 score buckets, so every prompt has a tie (or identical completions).
    assert report.tied + report.identical >= len(prompts)
    # Reproducible: the same seed gives the same pairs.
    again, _ = build_pairs(tiny_model(), tokenizer, prompts, HashJudge(), k=k, max_new_tokens=3, seed=0)
    assert again == rows


def test_save_pairs_writes_standard_jsonl(tmp_path):
    rows = [{"prompt": "The plot", "chosen": " was great.", "rejected": " was dull.", "score_chosen": 0.9,
             "score_rejected": 0.2}]
    path = save_pairs(rows, tmp_path / "pairs" / "train.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
