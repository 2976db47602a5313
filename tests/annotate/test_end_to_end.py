"""The two loops a user runs, end to end through the real server and the CLI:
pairs (as ``preftune pairs`` writes them) → annotate → export → ``preftune train`` reads and trains on them; and
``preftune eval --samples-out`` → blind human evaluation → the human win rate beside the judge's."""

from __future__ import annotations

import json

import pytest
from annotate_helpers import write_jsonl

from preftune.cli import main
from preftune.data.builtin import builtin_preferences
from preftune.data.formats import load_rows, normalise
from preftune.data.tokenize import tokenize_rows
from preftune.rollout.pairs import pair_row, save_pairs


def _label_as(client, annotator: str, wanted: dict, task: str = "pairs") -> dict[str, int]:
    """Annotate every item: ``wanted(prompt, left, right)`` returns the click; returns the clicks counted."""
    clicks: dict[str, int] = {}
    while (item := client.next(annotator, task)["item"]) is not None:
        choice = wanted(item["prompt"], item["left"], item["right"])
        assert client.vote(annotator, item["id"], choice, task)["recorded"] is True
        clicks[choice] = clicks.get(choice, 0) + 1
    return clicks


def test_pairs_annotated_in_the_app_train(serve, tmp_path, tokenizer, tiny_model, capsys):
    rows = [{**r, "prompt": f"{r['prompt']} ({i})"} for i, r in enumerate(builtin_preferences(10, seed=3))]
    text = save_pairs([pair_row(r["prompt"], r["chosen"], r["rejected"], 0.9, 0.1) for r in rows],
                      tmp_path / "pairs.jsonl")
    chat_prompts = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": r["prompt"]}]
                    for r in rows[:4]]
    chat = save_pairs([pair_row(p, r["chosen"], r["rejected"], 0.8, 0.3) for p, r in zip(chat_prompts, rows)],
                      tmp_path / "chat.jsonl")
    server = serve("--pairs", str(text), "--pairs", str(chat))
    assert any("10 pairs rows → 10 new items" in line for line in server.output)
    index = {r["prompt"]: i for i, r in enumerate(rows)}
    wanted = {0: "rejected", 1: "rejected", 2: "tie", 3: "both_bad"}  # text rows; the rest as the judge had them

    def human(prompt, left, right):
        if isinstance(prompt, list):  # conversations: always the judge's choice
            row = rows[index[prompt[-1]["content"]]]
            return "left" if left == [{"role": "assistant", "content": row["chosen"]}] else "right"
        want = wanted.get(index[prompt], "chosen")
        return want if want in ("tie", "both_bad") else "left" if left == rows[index[prompt]][want] else "right"

    clicks = _label_as(server.client, "alice", human)
    assert sum(clicks.values()) == 14

    out, chat_out = tmp_path / "annotated.jsonl", tmp_path / "annotated-chat.jsonl"
    db = str(server.db)
    assert main(["annotate", "export", "--db", db, "--out", str(out), "--source", str(text)]) == 0
    assert main(["annotate", "export", "--db", db, "--out", str(chat_out), "--source", str(chat)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"exported 8 of 10 pairs items as preference rows to {out}; left out 1 decided tie, "
                          "1 decided both bad, 0 split votes, 0 unlabelled; 2 exported rows reverse the file's order")
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    reversed_by_alice = [(rows[i]["rejected"], rows[i]["chosen"]) for i in (0, 1)]
    as_judged = [(rows[i]["chosen"], rows[i]["rejected"]) for i in range(4, 10)]
    assert [(r["chosen"], r["rejected"]) for r in exported] == reversed_by_alice + as_judged

    # preftune train reads both exports as it reads `preftune pairs` output, in the same formats …
    canonical, report = normalise(load_rows(str(out)), str(out))
    assert str(report.format) == "standard, text" and report.rows_out == 8
    assert report.ignored_columns == ["notes", "votes"]  # the annotators' notes travel along, unused by training
    chat_rows, chat_report = normalise(load_rows(str(chat_out)), str(chat_out))
    assert str(chat_report.format) == "standard, conversational" and chat_report.rows_out == 4
    assert chat_rows[0]["prompt"] == chat_prompts[0]
    tokenized, _ = tokenize_rows(chat_rows, tokenizer, max_length=None, max_prompt_length=None, cache_dir=tmp_path)
    assert len(tokenized) == 4
    # … and trains on them: one DPO step with the tiny model.
    import preftune

    result = preftune.train(dict(dataset=str(out), output_dir=str(tmp_path / "dpo"), max_steps=1,
                                 per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True,
                                 cache_dir=str(tmp_path / "cache"), eval_split_size=0),
                            model=tiny_model(), tokenizer=tokenizer)
    assert result.global_step == 1 and result.train_metrics["loss"] == pytest.approx(0.6931, abs=1e-3)


@pytest.fixture
def two_models(tmp_path_factory):
    """A policy and a reference (tiny Llamas with different seeds) sharing one tokenizer, saved as folders."""
    from preftune.modeling.tiny import default_model, default_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = default_tokenizer(builtin_preferences(24, seed=5))
    for name, seed in (("policy", 0), ("reference", 1)):
        default_model(tok, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_eval_samples_blind_human_win_rate_beside_the_judges(serve, two_models, tmp_path, monkeypatch, capsys):
    root = two_models
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in builtin_preferences(6, 9)])
    (tmp_path / "judge_fn.py").write_text("def chars(prompts, completions):\n"
                                          "    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    samples, metrics = tmp_path / "samples.jsonl", tmp_path / "eval.json"
    assert main(["eval", "--model", str(root / "policy"), "--reference", str(root / "reference"), "--prompts",
                 str(prompts), "--judge", "judge_fn:chars", "--num-samples", "2", "--max-new-tokens", "8",
                 "--out", str(metrics), "--samples-out", str(samples)]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    evaluation = json.loads(metrics.read_text())["policy"]
    # One row per comparison the win rate counted, scored by the named judge, reproducing the reported win rate.
    assert len(rows) == evaluation["n"] == 12 and {r["judge"] for r in rows} == {"judge_fn:chars"}
    assert [r["sample"] for r in rows] == [0, 1] * 6
    assert all(r["policy_score"] == len(r["policy"]) and r["reference_score"] == len(r["reference"]) for r in rows)
    file_rate = sum(1.0 if r["policy_score"] > r["reference_score"] else 0.5 if r["policy_score"] ==
                    r["reference_score"] else 0.0 for r in rows) / len(rows)
    assert file_rate == pytest.approx(evaluation["win_rate"])

    server = serve("--samples", str(samples))

    def longer(prompt, left, right):  # a person who prefers the longer answer: the judge's own rule
        return "left" if len(left) > len(right) else "right" if len(right) > len(left) else "tie"

    _label_as(server.client, "bob", longer, task="eval")
    out = tmp_path / "report.json"
    assert main(["annotate", "report", "--db", str(server.db), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())["eval"]
    human, judge = report["human_win_rate"], report["judge_win_rate"]
    assert human["value"] == pytest.approx(evaluation["win_rate"]) == pytest.approx(judge["value"])
    assert judge["judge"] == "judge_fn:chars" and judge["items"] == human["items"] == 12
    assert human["ci95"] == judge["ci95"]  # the same per-item scores, resampled with the same draws
    assert report["judge_agreement"]["rate"] in (None, 1.0)
    assert f"human win rate of the policy: {evaluation['win_rate']:.3f}" in text
