"""Facts about the pair builder: chosen always scores higher, C(k, 2) pairs minus ties, every drop counted, and
pairs are written in the format of their prompts so that training reads them with the same template."""

from __future__ import annotations

import json
from math import comb

import pytest
from datasets import Dataset

from preftune.data.formats import load_rows, normalise
from preftune.data.tokenize import tokenize_rows
from preftune.errors import ConfigError
from preftune.rollout.judges import score_rollout
from preftune.rollout.pairs import build_pairs, pair_row, pairs_from_rollout, save_pairs
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams


def make_rollout(groups: list[list[str]], scores: list[float], prompts: list | None = None) -> Rollout:
    k = len(groups[0])
    prompts = prompts or [f"prompt {i}" for i in range(len(groups))]
    texts = [t for g in groups for t in g]
    n = len(texts)
    return Rollout(prompts=prompts, prompt_ids=[[1]] * len(prompts), group_size=k, completion_ids=[[5]] * n,
                   logprobs=[[-1.0]] * n, ended_with_eos=[True] * n, completions=texts, scores=scores, judge="table")


def test_all_pairs_order_by_score_and_drop_ties():
    rows, report = pairs_from_rollout(make_rollout([[" a", " b", " c", " d"]], [0.9, 0.1, 0.5, 0.5]), mode="all")
    # C(4,2) = 6 candidates; (c, d) tie → 5 pairs, each with the higher score as chosen.
    assert {(r["chosen"], r["rejected"]) for r in rows} == {
        (" a", " b"), (" a", " c"), (" a", " d"), (" c", " b"), (" d", " b")}
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert all(r["prompt"] == "prompt 0" for r in rows)
    assert (report.candidate_pairs, report.pairs, report.tied, report.identical) == (6, 5, 1, 0)
    assert report.judge == "table" and "judged by table" in str(report)


def test_identical_and_empty_completions_are_dropped_and_counted():
    rollout = make_rollout([[" same", " same", "", " other"], [" x", " x", " x", " x"]],
                           [0.2, 0.7, 0.9, 0.4, 0.1, 0.2, 0.3, 0.4])
    rows, report = pairs_from_rollout(rollout, mode="all")
    # Group 0: (same, same) identical; 3 pairs with the empty one; 2 real pairs. Group 1: 6 identical.
    assert report.identical == 1 + 6
    assert report.with_empty == 3
    assert report.pairs == len(rows) == 2
    assert report.prompts_without_pairs == 1
    assert report.candidate_pairs == 12 == report.pairs + report.dropped


def test_best_vs_worst_gives_one_pair_per_prompt():
    rollout = make_rollout([[" a", " b", " c", " d"], [" e", " f", " g", " h"]],
                           [0.3, 0.8, 0.1, 0.5, 0.4, 0.4, 0.4, 0.4])
    rows, report = pairs_from_rollout(rollout, mode="best_vs_worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(" b", " c")]
    assert (report.candidate_pairs, report.pairs, report.tied, report.prompts_without_pairs) == (2, 1, 1, 1)
    assert report.mean_score_gap == pytest.approx(0.7)


def test_pairs_need_two_samples_a_known_mode_and_scores():
    with pytest.raises(ConfigError, match="at least 2 samples"):
        pairs_from_rollout(make_rollout([[" a"]], [0.1]))
    with pytest.raises(ConfigError, match="mode must be one of"):
        pairs_from_rollout(make_rollout([[" a", " b"]], [0.1, 0.2]), mode="some")
    unscored = make_rollout([[" a", " b"]], [0.1, 0.2])
    unscored.scores = None
    with pytest.raises(ValueError, match="no scores"):
        pairs_from_rollout(unscored)


class HashJudge:
    """Scores that depend only on the completion, in a few buckets so that ties happen."""

    name = "hash"

    def score(self, prompts, completions):
        return [float(sum(map(ord, c)) % 3) for c in completions]


def test_build_pairs_end_to_end_with_a_controlled_judge(tiny_model, tokenizer):
    prompts = ["The movie was", "What", "I did not like", "A terrible film"]
    k = 4
    params = SamplingParams(max_new_tokens=3, n=k, seed=0)
    rows, report = build_pairs(tiny_model(), tokenizer, prompts, HashJudge(), params)
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
    again, _ = build_pairs(tiny_model(), tokenizer, prompts, HashJudge(), params)
    assert again == rows
    with pytest.raises(ConfigError, match="at least 2"):
        build_pairs(tiny_model(), tokenizer, prompts, HashJudge(), SamplingParams(max_new_tokens=3, n=1))


def test_save_pairs_writes_standard_jsonl(tmp_path):
    rows = [pair_row("The plot", " was great.", " was dull.", 0.9, 0.2)]
    path = save_pairs(rows, tmp_path / "pairs" / "train.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows == [
        {"prompt": "The plot", "chosen": " was great.", "rejected": " was dull.", "score_chosen": 0.9,
         "score_rejected": 0.2}]


def test_conversation_prompts_give_conversational_pairs_that_training_reads_with_the_same_template(
        tiny_model, tokenizer, tmp_path):
    prompts = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "The movie was"}],
               [{"role": "user", "content": "What is\nthe capital?"}]]
    from preftune.rollout.sampling import generate

    rollout = score_rollout(HashJudge(), generate(tiny_model(), tokenizer, prompts,
                                                  SamplingParams(max_new_tokens=4, n=4, seed=1)))
    rows, report = pairs_from_rollout(rollout)
    assert rows and report.pairs == len(rows)
    for row in rows:
        assert row["prompt"] in prompts
        assert row["chosen"] == [{"role": "assistant", "content": row["chosen"][0]["content"]}]
        assert row["rejected"][0]["role"] == "assistant"
    path = save_pairs(rows, tmp_path / "pairs.jsonl")

    # The data layer reads them back as conversational preference rows …
    canonical, normalised = normalise(load_rows(str(path)), str(path))
    assert str(normalised.format) == "standard, conversational" and normalised.rows_out == len(rows)
    # … and training encodes their prompts to exactly the ids the samples were drawn from.
    tokenized, _ = tokenize_rows(canonical, tokenizer, max_length=None, max_prompt_length=None, cache_dir=tmp_path)
    drawn_from = {json.dumps(p): ids for p, ids in zip(rollout.prompts, rollout.prompt_ids)}
    for row, ids in zip(rows, tokenized["prompt_ids"]):
        assert ids == drawn_from[json.dumps(row["prompt"])]
    # The chosen completion trains on the sampled text, closed by the turn's EOS. (Pairs are text: re-encoding a
    # random model's byte soup need not give back the sampled ids, the decoded text is what is kept.)
    first = rows[0]
    chosen_ids = tokenized[0]["chosen_ids"]
    assert chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(chosen_ids[:-1], skip_special_tokens=True) == first["chosen"][0]["content"]


def test_text_pairs_round_trip_as_standard_text_rows(tmp_path):
    rows = [pair_row("Human: hi\n\nAssistant:", " hello", " go away", 1.0, 0.0)]
    path = save_pairs(rows, tmp_path / "p.jsonl")
    canonical, normalised = normalise(load_rows(str(path)), str(path))
    assert str(normalised.format) == "standard, text"
    assert canonical[0]["prompt"] == "Human: hi\n\nAssistant:" and canonical[0]["chosen"] == " hello"
    assert Dataset.from_list(rows).column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]


def test_pairs_from_a_short_context_gpt2_judged_by_its_reward_model_end_to_end(tokenizer, tmp_path, monkeypatch,
                                                                               caplog, capsys):
    """Issue 20, items 4 and 18: a GPT-2-style policy (128 positions, no pad token) judged by a reward model of the
    same shape, through `preftune pairs` with 200 new tokens: sampling stops at the policy's last position and the
    judge reads at most its own, where both ended in GPT-2's `IndexError: index out of range in self`."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from preftune.cli import main
    from preftune.modeling.tiny import build_tiny_model
    from preftune.rollout import pairs, sampling

    gpt2_tokenizer = copy.deepcopy(tokenizer)
    gpt2_tokenizer.pad_token = None  # GPT-2 style
    policy = build_tiny_model(gpt2_tokenizer, arch="gpt2", n_positions=128)
    policy.save_pretrained(tmp_path / "GPT2")
    gpt2_tokenizer.save_pretrained(tmp_path / "GPT2")
    torch.manual_seed(1)
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "RM" / "final")
    gpt2_tokenizer.save_pretrained(tmp_path / "RM" / "final")
    prompts = [" ".join(["The movie was good."] * 8), "What is the capital of France?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "pairs.jsonl"
    sampled = []  # the rollout `pairs` judges, to read its token counts
    monkeypatch.setattr(pairs, "generate", lambda *a, **k: sampled.append(sampling.generate(*a, **k)) or sampled[-1])

    with caplog.at_level("INFO", logger="preftune"):
        code = main(["pairs", "--model", str(tmp_path / "GPT2"), "--prompts", str(tmp_path / "prompts.txt"),
                     "--judge", str(tmp_path / "RM" / "final"), "--k", "2", "--max-new-tokens", "200",
                     "--out", str(out), "--seed", "0"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts  # one pair per prompt: two random samples never tie
    (rollout,) = sampled
    totals = [len(p) + len(c) for p, c in zip(rollout.sample_prompt_ids, rollout.completion_ids)]
    assert max(totals) == 128 and all(len(c) < 200 for c in rollout.completion_ids)
    assert "samples hit the length budget" in capsys.readouterr().out
    # The judge re-encodes the decoded text (random byte soup re-encodes to more tokens) and cuts it to its 128.
    assert any(r.getMessage().startswith("judge reward_model:") and "at most 128 positions" in r.getMessage()
               for r in caplog.records)
