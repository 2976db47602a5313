"""The demo pipeline end to end at a reduced size, and the pairs / eval commands on its outputs."""

from __future__ import annotations

import json

import pytest

from preftune.cli import main
from preftune.demo.pipeline import DemoSettings, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(DemoSettings.quick(str(out)))


def test_dpo_raises_the_gold_reward_of_the_sft_model(demo):
    out, summary = demo
    sft, dpo = summary["evaluation"]["SFT (π_ref)"], summary["evaluation"]["DPO"]
    assert sft["kl"] == pytest.approx(0.0, abs=1e-4) and sft["win_rate"] == 0.5  # π_ref against itself
    assert dpo["reward"] > sft["reward"] + 0.05
    assert dpo["kl"] > 0
    assert summary["judge"] == sft["judge"] == dpo["judge"] == "gold_sentiment"
    for name in ("demo.json", "demo.md", "pairs.jsonl", "training_curves.png", "reward_distribution.png",
                 "dpo/report.html", "dpo/report.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "dpo" / "final" / "model.safetensors").exists()


def test_the_demo_reports_its_verbosity_drift_as_a_warning_with_the_logged_numbers(demo):
    out, summary = demo
    records = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in records if "length" in r]  # the sample monitor, every monitor_every steps
    assert [r["step"] for r in samples] == [20, 40, 60]
    assert [r["step"] for r in records if "eval_loss" in r] == [20, 40, 60]  # held-out pairs, same steps
    assert all("lengths/margin_corr" in r for r in records if "loss" in r)
    before, after = samples[-1]["ref_length"], samples[-1]["length"]
    assert after > 1.15 * before  # the drift is there: the policy's samples are longer than π_ref's
    verbosity = next(h for h in summary["health"] if h["check"] == "verbosity")
    assert verbosity["status"] == "warning" and "ld_alpha" in verbosity["suggestion"]
    assert f"sampled responses {before:.1f} tokens (π_ref) → {after:.1f} at step 60" in verbosity["evidence"]
    assert verbosity["evidence"] in (out / "dpo" / "report.md").read_text()
    assert "Response length (verbosity)" in (out / "dpo" / "report.html").read_text()
    assert "[verbosity] warning" in (out / "demo.md").read_text()


def test_pairs_and_eval_commands_on_the_demo_models(demo, tmp_path, capsys):
    out, _ = demo
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The acting was\nI watched this film\n")
    pairs = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--model", str(out / "sft" / "final"), "--prompts", str(prompts), "--out", str(pairs),
                 "--judge", "gold", "--k", "3", "--max-new-tokens", "12"]) == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out / "dpo" / "final"), "--reference", str(out / "sft" / "final"),
                 "--prompts", str(prompts), "--pairs", str(pairs), "--beta", "0.5", "--max-new-tokens", "12",
                 "--judge", "gold", "--out", str(report)]) == 0
    saved = json.loads(report.read_text())
    metrics = saved["policy"]
    assert saved["judge"] == metrics["judge"] == "gold_sentiment"
    assert {"reward", "kl", "win_rate", "length", "eos_rate", "implicit_reward_accuracy"} <= set(metrics)
    assert "reward" in capsys.readouterr().out
