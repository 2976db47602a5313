"""Facts about `preftune score`: every variant equals a direct computation from full logits; ties are wrong;
accuracy per subset; the reference is read back from its cache; a reward model scores at its last token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from preftune.cli import main
from preftune.errors import ConfigError
from preftune.evaluation.scoring import pairwise_correct, score_data
from preftune.modeling.loading import as_reward_model

PROMPTS = ["The movie was", "What is the capital of France?", "I did not like the plot; it was", "A terrible"]
CHOSEN = [" good and the acting was great.", " Paris.", " slow", " film with a wonderful score"]
REJECTED = [" dull.", " Paris is the capital of France, not bad at all.", " not bad at all", " film"]


def pair_rows() -> list[dict]:
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]


@torch.no_grad()
def token_logps(model, tokenizer, prompt: str, completion: str) -> torch.Tensor:
    """log π(y_t | x, y_<t) of every completion token (EOS appended), from one unbatched forward: the full
    ``[L, V]`` logits and their log-softmax, in fp64."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0].double()
    predictors = logits[len(prompt_ids) - 1 : ids.shape[1] - 1].log_softmax(-1)
    return predictors.gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def direct_scores(policy, reference, tokenizer, prompt: str, completion: str, beta: float) -> dict[str, float]:
    lp, lq = token_logps(policy, tokenizer, prompt, completion), token_logps(reference, tokenizer, prompt, completion)
    n = lp.numel()
    return {"sum": beta * float(lp.sum() - lq.sum()), "avg": beta * float(lp.sum() - lq.sum()) / n,
            "ref_free_sum": float(lp.sum()), "ref_free_avg": float(lp.sum()) / n,
            "ref_free_norm": -float(lp.pow(2).sum().sqrt())}


def test_every_variant_equals_a_direct_computation(tiny_model, tokenizer, tmp_path):
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    result = score_data(policy, tokenizer, pair_rows(), reference, beta=0.5, cache_dir=tmp_path, batch_size=3)
    assert result.kind == "pairs" and result.n == len(PROMPTS)
    assert set(result.scores) == {"sum", "avg", "ref_free_sum", "ref_free_avg", "ref_free_norm"}
    for i, (prompt, chosen, rejected) in enumerate(zip(PROMPTS, CHOSEN, REJECTED)):
        for side, completion in ((0, chosen), (1, rejected)):
            expected = direct_scores(policy, reference, tokenizer, prompt, completion, beta=0.5)
            for variant, value in expected.items():
                assert result.scores[variant][i, side] == pytest.approx(value, abs=2e-4, rel=1e-4), (variant, i, side)
    # Accuracy is the strict comparison of those scores, per variant.
    for variant, scores in result.scores.items():
        assert result.accuracy()[variant] == pytest.approx(np.mean(scores[:, 0] > scores[:, 1]))


def test_prompt_and_response_rows_score_like_the_direct_computation(tiny_model, tokenizer, tmp_path):
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    rows = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, CHOSEN)]
    result = score_data(policy, tokenizer, rows, reference, beta=2.0, cache_dir=tmp_path)
    assert result.kind == "responses" and result.scores["sum"].shape == (len(rows),)
    for i, row in enumerate(rows):
        expected = direct_scores(policy, reference, tokenizer, row["prompt"], row["completion"], beta=2.0)
        for variant, value in expected.items():
            assert result.scores[variant][i] == pytest.approx(value, abs=2e-4, rel=1e-4)
    assert [r["source_row"] for r in result.rows()] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="needs pairs"):
        result.accuracy()


def test_a_tie_counts_as_wrong(tiny_model, tokenizer, tmp_path):
    assert pairwise_correct(np.array([[1.0, 1.0], [2.0, 1.0], [0.0, 1.0]])).tolist() == [False, True, False]
    model = tiny_model(seed=0)
    # A policy scored against itself: every log-ratio is exactly 0, every pair a tie, accuracy 0 (not ½).
    result = score_data(model, tokenizer, pair_rows(), model, cache_dir=tmp_path, variants=["sum", "avg"])
    assert np.all(result.scores["sum"] == 0.0)
    assert result.accuracy() == {"sum": 0.0, "avg": 0.0}


def test_accuracy_per_subset(tiny_model, tokenizer, tmp_path):
    policy = tiny_model(seed=0)
    free = score_data(policy, tokenizer, pair_rows(), cache_dir=tmp_path, variants=["ref_free_avg"])
    right = free.scores["ref_free_avg"][:, 0] > free.scores["ref_free_avg"][:, 1]
    # Orient every pair: subset "easy" holds pairs the policy ranks right, "hard" the same pairs swapped.
    rows = []
    for row, ok in zip(pair_rows(), right):
        good = row if ok else {**row, "chosen": row["rejected"], "rejected": row["chosen"]}
        rows.append({**good, "subset": "easy"})
        rows.append({**good, "chosen": good["rejected"], "rejected": good["chosen"], "subset": "hard"})
    result = score_data(policy, tokenizer, rows, cache_dir=tmp_path, variants=["ref_free_avg"])
    by_subset = result.accuracy_by_subset()
    assert by_subset == {"easy": {"n": 4, "accuracy": {"ref_free_avg": 1.0}},
                         "hard": {"n": 4, "accuracy": {"ref_free_avg": 0.0}}}
    assert result.accuracy() == {"ref_free_avg": 0.5}
    summary = result.summary()
    assert summary["subsets"] == by_subset and summary["pairs_per_second"] > 0
    table = result.table()
    assert "easy (n=4)" in table and "hard (n=4)" in table and "pairs/s" in table


def test_the_reference_is_read_back_from_its_cache(tiny_model, tokenizer, tmp_path):
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    first = score_data(policy, tokenizer, pair_rows(), reference, cache_dir=tmp_path)
    assert first.reference_cache == "miss" and list((tmp_path / "reference").glob("*.npy"))
    calls = []
    reference.model.register_forward_hook(lambda *a: calls.append(1))  # the body runs for every score
    again = score_data(policy, tokenizer, pair_rows(), reference, cache_dir=tmp_path)
    assert again.reference_cache == "hit" and not calls  # the reference never ran
    np.testing.assert_array_equal(again.scores["sum"], first.scores["sum"])
    with torch.no_grad():
        reference.lm_head.weight.mul_(1.5)  # other weights: another cache entry, computed afresh
    changed = score_data(policy, tokenizer, pair_rows(), reference, cache_dir=tmp_path)
    assert changed.reference_cache == "miss" and calls
    assert not np.allclose(changed.scores["sum"], first.scores["sum"])


def test_a_reward_model_scores_at_the_last_token(tiny_model, tokenizer, tmp_path):
    reward = as_reward_model(tiny_model(seed=0)).eval()
    result = score_data(reward, tokenizer, pair_rows(), cache_dir=tmp_path)
    assert list(result.scores) == ["reward"]
    for i, (prompt, chosen) in enumerate(zip(PROMPTS, CHOSEN)):
        ids = tokenizer(prompt)["input_ids"] + tokenizer(chosen, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = reward(input_ids=torch.tensor([ids + [tokenizer.eos_token_id]])).logits[0, 0]
        assert result.scores["reward"][i, 0] == pytest.approx(float(expected), abs=1e-4)
    with pytest.raises(ConfigError, match="only variant is 'reward'"):
        score_data(reward, tokenizer, pair_rows(), cache_dir=tmp_path, variants=["ref_free_sum"])


def test_log_ratio_variants_need_a_reference(tiny_model, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="need a reference"):
        score_data(tiny_model(seed=0), tokenizer, pair_rows(), cache_dir=tmp_path, variants=["sum"])


def test_score_command_writes_json_and_prints_a_table(tiny_model, tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    for name, seed in (("policy", 0), ("reference", 1)):
        tiny_model(seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({**row, "subset": "s1" if i % 2 else "s2"}) + "\n"
                            for i, row in enumerate(pair_rows())))
    out, rows_out = tmp_path / "score.json", tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"),
                 "--data", str(data), "--beta", "0.1", "--out", str(out), "--scores-out", str(rows_out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["n"] == 4 and set(saved["subsets"]) == {"s1", "s2"} and saved["pairs_per_second"] > 0
    assert set(saved["accuracy"]) == {"sum", "avg", "ref_free_sum", "ref_free_avg", "ref_free_norm"}
    printed = capsys.readouterr().out
    assert "pairwise accuracy" in printed and "pairs/s" in printed
    per_row = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert [r["subset"] for r in per_row] == ["s2", "s1", "s2", "s1"] and "sum" in per_row[0]["chosen"]
    assert main(["score", "--model", str(tmp_path / "policy"), "--data", str(data), "--variant", "sum"]) != 0
    assert "need a reference" in capsys.readouterr().err
