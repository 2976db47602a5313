"""A run deletes only what it recorded as its own (the folder's manifest) and never a path its config names."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from preftune import train
from preftune.cli import main
from preftune.data.builtin import builtin_preferences
from preftune.errors import RunDirError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training.rundir import MANIFEST

ROWS = builtin_preferences(16, seed=3)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def run(out, tok, **overrides):
    config = dict(output_dir=str(out), cache_dir=str(out.parent / "cache"), max_steps=1,
                  per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True, seed=0, bf16=False) | overrides
    return train(config, model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=ROWS)


def manifest(out) -> list[str]:
    return json.loads((out / MANIFEST).read_text())["entries"]


# ------------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("key", ["judge", "value_model"])
def test_a_ppo_run_never_deletes_its_own_reward_or_value_model(tmp_path, monkeypatch, capsys, key):
    """`train method=reward output_dir=rm`, then `train method=ppo judge=rm/final output_dir=rm
    overwrite_output_dir=true`: refused before anything is deleted."""
    monkeypatch.chdir(tmp_path)
    common = [f"cache_dir={tmp_path / 'cache'}", "max_steps=1", "disable_tqdm=true", "bf16=false"]
    assert main(["train", "method=reward", "output_dir=rm", *common]) == 0
    weights = sorted(p.name for p in (tmp_path / "rm" / "final").iterdir())
    capsys.readouterr()
    judge = ["judge=gold"] if key == "value_model" else []
    code = main(["train", "method=ppo", f"{key}=rm/final", *judge, "output_dir=rm", "overwrite_output_dir=true",
                 *common])
    assert code == RunDirError.exit_code
    shown = "judge (reward model)" if key == "judge" else "value model"
    assert f"output_dir rm holds the run's {shown} (rm/final)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "rm" / "final").iterdir()) == weights


def test_a_judge_function_file_inside_the_output_folder_is_refused(tmp_path, tok):
    out = tmp_path / "run"
    out.mkdir()
    (out / "judge_fn.py").write_text("def score(prompts, completions):\n    return [0.0] * len(completions)\n")
    with pytest.raises(RunDirError, match=r"holds the run's judge \(reward model\)"):
        run(out, tok, method="online_dpo", judge=f"{out / 'judge_fn.py'}:score", overwrite_output_dir=True)
    assert (out / "judge_fn.py").exists()


# ------------------------------------------------------------------------------------------------ the manifest


def test_the_manifest_lists_what_the_run_wrote(tmp_path, tok):
    out = tmp_path / "run"
    run(out, tok, max_steps=2, save_steps=1)
    assert manifest(out) == ["checkpoint-1", "checkpoint-2", "config.yaml", "final", "metrics.jsonl",
                             "summary.json"]


@pytest.mark.parametrize("through_a_link", [False, True])
def test_overwrite_deletes_nothing_in_a_folder_no_run_recorded(tmp_path, tok, through_a_link):
    """A folder with the user's own config.yaml and logs/ (no manifest) is refused, even with
    overwrite_output_dir, and even when output_dir is a symlink to it."""
    mine = tmp_path / "mine"
    (mine / "logs").mkdir(parents=True)
    (mine / "logs" / "day1.txt").write_text("my log")
    (mine / "config.yaml").write_text("my: config\n")
    out = tmp_path / "link" if through_a_link else mine
    if through_a_link:
        out.symlink_to(mine, target_is_directory=True)
    with pytest.raises(RunDirError, match=rf"holds config.yaml, logs, which no preftune run recorded as its own "
                                          rf"\(no {MANIFEST} lists them"):
        run(out, tok, overwrite_output_dir=True)
    assert (mine / "config.yaml").read_text() == "my: config\n"
    assert (mine / "logs" / "day1.txt").read_text() == "my log"
    assert not (mine / MANIFEST).exists()


def test_a_users_files_beside_a_run_are_left_alone_and_named(tmp_path, tok, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO, logger="preftune"):
        run(out, tok, max_steps=1)
    assert "left alone (not a run's): notes.txt" in caplog.text
    assert "notes.txt" not in manifest(out)
    (out / "logs").mkdir()  # the user's, added after the run: not in the manifest
    with pytest.raises(RunDirError, match="holds logs, which no preftune run recorded"):
        run(out, tok, overwrite_output_dir=True)
    (out / "logs").rmdir()
    run(out, tok, overwrite_output_dir=True, save_steps=1)
    assert (out / "notes.txt").read_text() == "mine"
    assert manifest(out) == ["checkpoint-1", "config.yaml", "final", "metrics.jsonl", "summary.json"]


def test_a_run_from_before_the_manifest_still_resumes(tmp_path, tok):
    out = tmp_path / "run"
    run(out, tok, max_steps=2, save_steps=1)
    for gone in ("checkpoint-2", "final", "summary.json"):  # interrupted after its first checkpoint
        shutil.rmtree(out / gone) if (out / gone).is_dir() else (out / gone).unlink()
    (out / MANIFEST).unlink()  # as an older preftune left it
    result = run(out, tok, max_steps=2, save_steps=1, resume_from_checkpoint=True)
    assert result.global_step == 2
    assert manifest(out) == ["checkpoint-1", "checkpoint-2", "config.yaml", "final", "metrics.jsonl",
                             "summary.json"]


def test_a_killed_run_is_still_replaced_by_what_it_claimed(tmp_path, tok):
    """Killed before it could record what it wrote (SIGKILL, out of memory): the manifest written at the claim
    still names the run's entries, so an overwrite deletes them and the user's file stays."""
    out = tmp_path / "run"
    run(out, tok, max_steps=2, save_steps=1)
    record = json.loads((out / MANIFEST).read_text())
    record["entries"] = ["config.yaml", "metrics.jsonl", "summary.json", "logs", "final", "checkpoint-*"]
    (out / MANIFEST).write_text(json.dumps(record))
    (out / "notes.txt").write_text("mine")
    run(out, tok, overwrite_output_dir=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == []
    assert (out / "notes.txt").read_text() == "mine"


def test_an_offline_run_over_a_rounds_folder_keeps_a_users_notes_in_a_round(tmp_path, tok):
    out = tmp_path / "run"
    run(out, tok, method="iterative_dpo", num_rounds=1, num_generations=2, max_completion_length=4,
        judge="gold")
    recorded = set(manifest(out))
    (out / "round-1" / "notes.md").write_text("round 1 looked good")
    run(out, tok, method="dpo", overwrite_output_dir=True)
    assert sorted(p.name for p in (out / "round-1").iterdir()) == ["notes.md"]
    assert (out / "round-1" / "notes.md").read_text() == "round 1 looked good"
    assert not (out / "rounds.json").exists() and (out / "final").is_dir() and not (out / "final").is_symlink()
    assert {"round-1", "rounds.json", "final", "round-1/pairs.jsonl"} <= recorded
    assert "round-1" not in manifest(out)
    run(out, tok, method="dpo", overwrite_output_dir=True)  # a second overwrite leaves the kept round alone too
    assert (out / "round-1" / "notes.md").read_text() == "round 1 looked good"


def test_final_symlinked_elsewhere_is_replaced_by_the_model_and_its_target_kept(tmp_path, tok, caplog):
    out = tmp_path / "run"
    run(out, tok, max_steps=2, save_steps=1)
    shutil.rmtree(out / "checkpoint-2")  # resumed from its first checkpoint
    elsewhere = tmp_path / "shared-models"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the run's")
    shutil.rmtree(out / "final")
    (out / "final").symlink_to(elsewhere, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        run(out, tok, max_steps=2, save_steps=1, resume_from_checkpoint=True)
    assert (out / "final").is_dir() and not (out / "final").is_symlink()
    assert (out / "final" / "config.json").exists() and not (out / "final.tmp").exists()
    assert (elsewhere / "keep.txt").read_text() == "not the run's"
    assert f"was a link to {elsewhere}" in caplog.text


def test_a_manifest_cannot_reach_outside_its_folder_and_a_torn_one_deletes_nothing(tmp_path, tok):
    from preftune.training.rundir import delete_run_entries

    out, outside = tmp_path / "run", tmp_path / "outside.txt"
    out.mkdir()
    outside.write_text("mine")
    (out / "final").mkdir()
    (out / MANIFEST).write_text(json.dumps({"entries": ["../outside.txt", str(outside), "final"]}))
    assert delete_run_entries(out) == ["final"]
    assert outside.read_text() == "mine"
    (out / "config.yaml").write_text("my: config\n")
    (out / MANIFEST).write_text('{"entries": ["config.ya')
    with pytest.raises(RunDirError, match=f"{MANIFEST} is not a readable run manifest .*nothing is deleted"):
        run(out, tok, overwrite_output_dir=True)
    assert (out / "config.yaml").read_text() == "my: config\n"
