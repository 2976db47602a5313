"""The scorer experiment at a reduced size, and the facts it rests on: Spearman's ρ with tied ranks; the scores of
prefix-shared pairs equal those of the same responses scored one by one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from preftune.experiments.scorer import SCORERS, ScorerSettings, rank, run_scorer_experiment, scorer_table, spearman


def test_ranks_share_ties_and_spearman_is_the_correlation_of_ranks():
    assert rank([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # By hand: ranks x = (1, 2.5, 2.5, 4), y = (1, 2, 3, 4): ρ = 4.5 / √(4.5 · 5).
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("scorer")
    return out, run_scorer_experiment(ScorerSettings.quick(str(out)))


def test_every_scorer_is_measured_on_the_held_out_pairs(experiment):
    out, results = experiment
    assert list(results["scorers"]) == list(SCORERS)
    assert results["heldout_pairs"] > 50 and results["heldout_responses"] > results["heldout_prompts"]
    for label, row in results["scorers"].items():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["train_accuracy"] <= 1, label
        assert -1 <= row["spearman"] <= 1 and -1 <= row["spearman_within_prompt"] <= 1, label
        assert row["pairs_per_second"] > 0
    # DPO's implicit reward learned the training pairs' preference: above chance on them, unlike the SFT model,
    # which saw no preference (its log-likelihood is blind to the labels' direction).
    assert results["scorers"]["DPO implicit reward, Σ log π/π_ref"]["train_accuracy"] > 0.6
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "scorer.md").read_text()
    assert table == scorer_table(results) + "\n" and table.count("\n| ") == len(SCORERS) + 1


def test_prefix_shared_pairs_score_as_the_responses_scored_alone(tiny_model, tokenizer, tmp_path):
    from preftune.evaluation.scoring import score_data

    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    pairs = [{"prompt": "The movie was", "chosen": " good.", "rejected": " not bad at all, the acting was great."},
             {"prompt": "What is", "chosen": " the capital of France?", "rejected": " Paris"}]
    on_pairs = score_data(policy, tokenizer, pairs, reference, cache_dir=tmp_path)
    responses = [{"prompt": p["prompt"], "completion": p[side]} for side in ("chosen", "rejected") for p in pairs]
    alone = score_data(policy, tokenizer, responses, reference, cache_dir=tmp_path)
    for variant, values in on_pairs.scores.items():
        np.testing.assert_allclose(values.T.reshape(-1), alone.scores[variant], rtol=1e-4, atol=1e-4)
