"""Nothing lost, nothing silent: run folders, locks, resumes, caches, non-finite values and up-front checks."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from preftune import train
from preftune.data.builtin import builtin_preferences
from preftune.errors import DataError, ModelError, ResumeError, RunDirError, TrainingError
from preftune.modeling.tiny import build_tiny_model, build_tokenizer, default_tokenizer
from preftune.training.checkpoint import write_checksums
from preftune.training.rundir import RunLock

ROWS = builtin_preferences(24, seed=5)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def run(tmp_path, tok, name="run", model=None, rows=ROWS, **overrides):
    config = dict(output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), max_steps=2,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True,
                  seed=0, bf16=False) | overrides
    return train(config, model=model or build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=rows)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ the run folder


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path, tok):
    out = tmp_path / "run"
    run(tmp_path, tok, save_steps=1)
    (out / "notes.txt").write_text("my notes")
    (out / "prefs.jsonl").write_text("{}\n")
    (out / "run.yaml").write_text("beta: 0.1\n")
    run(tmp_path, tok, overwrite_output_dir=True, max_steps=1)
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "prefs.jsonl").exists() and (out / "run.yaml").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == []  # the earlier run's checkpoints went
    assert [r["step"] for r in records(out) if "loss" in r] == [1]  # and its metrics


@pytest.mark.parametrize("where", [".", ".."])
def test_the_current_directory_or_a_parent_is_refused(tmp_path, tok, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(RunDirError, match="current directory or one of its parents"):
        run(tmp_path, tok, output_dir=where, overwrite_output_dir=True)
    assert (work / "keep.txt").read_text() == "mine"


def test_a_folder_holding_the_runs_inputs_is_refused(tmp_path, tok):
    out = tmp_path / "run"
    out.mkdir()
    data = out / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(RunDirError, match="holds the run's dataset"):
        train(dict(output_dir=str(out), dataset=str(data), max_steps=1, overwrite_output_dir=True,
                   disable_tqdm=True, cache_dir=str(tmp_path / "cache")),
              model=build_tiny_model(tok, seed=0), tokenizer=tok)
    assert data.exists()


def test_a_fresh_start_beside_a_crashed_runs_checkpoints_is_refused(tmp_path, tok):
    def crash(step, model):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train_with(tmp_path, tok, [crash], max_steps=3, save_steps=1)
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
    with pytest.raises(RunDirError, match="resume_from_checkpoint=true"):
        run(tmp_path, tok, method="ipo")
    assert (tmp_path / "run" / "checkpoint-1").is_dir()  # refused, and nothing deleted


def _train_with(tmp_path, tok, callbacks, name="run", **overrides):
    from preftune import PreferenceTrainer
    from preftune.config import build_config

    config = dict(output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), per_device_train_batch_size=4,
                  learning_rate=1e-3, logging_steps=1, disable_tqdm=True, seed=0, bf16=False) | overrides
    trainer = PreferenceTrainer(build_config(config), model=build_tiny_model(tok, seed=0), tokenizer=tok,
                                train_dataset=ROWS, callbacks=callbacks)
    return trainer.train()


def test_a_second_run_on_a_locked_folder_is_refused_with_the_owners_pid(tmp_path, tok):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out).acquire()
    try:
        with pytest.raises(RunDirError, match=f"in use by another preftune run \\(process {os.getpid()}\\)"):
            run(tmp_path, tok)
    finally:
        lock.release()
    run(tmp_path, tok)  # released: the folder is free again


# ------------------------------------------------------------------------------------------------ resumes


def test_a_resume_reads_as_one_run_in_metrics_and_tensorboard(tmp_path, tok):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole = _train_with(tmp_path, tok, [], name="whole", max_steps=4, save_steps=2, report_to=["tensorboard"])

    def crash(step, model):
        if step == 3:  # after checkpoint-2 and the log of step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train_with(tmp_path, tok, [crash], max_steps=4, save_steps=2, report_to=["tensorboard"])
    resumed = _train_with(tmp_path, tok, [], max_steps=4, save_steps=2, report_to=["tensorboard"],
                          resume_from_checkpoint=True)
    steps = [r["step"] for r in records(resumed.output_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert [r["loss"] for r in records(resumed.output_dir) if "loss" in r] == pytest.approx(
        [r["loss"] for r in records(whole.output_dir) if "loss" in r], abs=1e-6)
    events = EventAccumulator(str(resumed.output_dir / "logs" / "preftune"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in records(resumed.output_dir) if "loss" in r])


def test_a_resume_under_other_settings_is_refused_naming_them(tmp_path, tok):
    run(tmp_path, tok, max_steps=2, save_steps=1)
    original = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"belongs to another run") as refused:
        run(tmp_path, tok, max_steps=2, save_steps=1, method="ipo", beta=0.2, resume_from_checkpoint=True)
    assert "beta: 0.1 → 0.2" in str(refused.value) and "method: 'dpo' → 'ipo'" in str(refused.value)
    with pytest.raises(ResumeError, match="the train data"):
        run(tmp_path, tok, max_steps=2, save_steps=1, rows=ROWS[:20], resume_from_checkpoint=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == original
    # What only changes how the run is watched may change.
    run(tmp_path, tok, max_steps=2, save_steps=1, logging_steps=5, resume_from_checkpoint=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == original


def test_config_yaml_records_the_resolved_choices(tmp_path, tok):
    import yaml

    run(tmp_path, tok)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["bf16"] is False and saved["precompute_ref_log_probs"] is True
    assert saved["prefix_sharing"] is True and saved["padding_free"] is True  # sdpa takes 4D masks
    assert saved["fused_mlp"] is True  # the tiny Llama's MLPs are the plain gated form


def test_a_crafted_pickle_in_a_checkpoint_never_runs(tmp_path, tok):
    run(tmp_path, tok, max_steps=2, save_steps=1)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = tmp_path / "run" / "checkpoint-1"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Exploit()))
    write_checksums(checkpoint)  # past the checksums (whoever planted the pickle rewrote them): the loaders' own guard
    with pytest.raises(ResumeError, match="the training state does not load"):  # a state preftune never writes
        run(tmp_path, tok, max_steps=2, save_steps=1, resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    # A random-number state that does not load safely fails the resume instead of being skipped.
    torch.save({"random_state": Exploit()}, checkpoint / "random_states_0.pkl")
    write_checksums(checkpoint)
    with pytest.raises(ResumeError, match="random-number state does not load safely"):
        run(tmp_path, tok, max_steps=2, save_steps=1, resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_tr_dpo_resume_restores_the_moving_reference(tmp_path, tok):
    tr = dict(max_steps=4, save_steps=2, num_train_epochs=3, sync_ref_model=True, ref_model_sync_steps=1,
              ref_model_mixup_alpha=0.5)
    whole = run(tmp_path, tok, "whole", **tr)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(whole.output_dir / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert (tmp_path / "resumed" / "checkpoint-2" / "reference.safetensors").exists()
    assert not list((tmp_path / "resumed" / "checkpoint-2").glob("custom_checkpoint_*"))
    resumed = run(tmp_path, tok, "resumed", resume_from_checkpoint=True, **tr)
    a, b = load_file(whole.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------ caches


def _reference_cache(tmp_path):
    (path,) = (tmp_path / "cache" / "reference").glob("*.npy")
    return path


@pytest.mark.parametrize("damage", ["shift", "nan", "truncate", "swap"])
def test_a_damaged_reference_cache_is_rebuilt(tmp_path, tok, damage, caplog):
    run(tmp_path, tok, "first", max_steps=1)
    path = _reference_cache(tmp_path)
    values = np.load(path)
    if damage == "shift":
        np.save(path, values + 0.5)
    elif damage == "nan":
        values[0, 0] = np.nan
        np.save(path, values)
    elif damage == "swap":
        np.save(path, values[:, ::-1].copy())
    else:
        path.write_bytes(path.read_bytes()[:60])
    with caplog.at_level("WARNING", logger="preftune"):
        second = run(tmp_path, tok, "second", max_steps=1)
    assert "recomputing it" in caplog.text
    assert records(second.output_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    np.testing.assert_array_equal(np.load(path), values if damage != "nan" else np.load(path))


def test_a_tokenized_cache_with_swapped_ids_is_rebuilt(tmp_path, tok, caplog):
    import datasets

    from preftune.data import formats, tokenize

    rows, _ = formats.normalise(datasets.Dataset.from_list(ROWS), "rows")
    first, _ = tokenize.tokenize_rows(rows, tok, max_length=64, max_prompt_length=32, cache_dir=tmp_path)
    original = first.to_dict()
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    swapped = first.rename_columns({"chosen_ids": "rejected_ids", "rejected_ids": "chosen_ids"})
    swapped.save_to_disk(str(tmp_path / "swapped"))
    del first, swapped
    shutil.rmtree(folder / "dataset")
    shutil.move(str(tmp_path / "swapped"), str(folder / "dataset"))
    with caplog.at_level("WARNING"):
        second, report = tokenize.tokenize_rows(rows, tok, max_length=64, max_prompt_length=32, cache_dir=tmp_path)
    assert "ids are not those written" in caplog.text and not report.from_cache
    assert second.to_dict() == original


# ------------------------------------------------------------------------------------------------ non-finite values


def test_a_diverging_run_stops_with_a_report_and_exports_nothing(tmp_path):
    # The embedded default at learning_rate 1e6 gets a NaN gradient at its second step.
    with pytest.raises(TrainingError, match=r"training stopped at step 2 .*gradient norm is nan on rows \d+, \d+"):
        train(dict(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), max_steps=6,
                   learning_rate=1e6, disable_tqdm=True))
    assert not (tmp_path / "run" / "final").exists()
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_non_finite_loss_names_its_term_and_rows(tmp_path, tok, monkeypatch):
    from preftune.methods import losses

    real = losses.sft

    def poisoned(lp, beta):
        out = real(lp, beta)
        return losses.LossOutput(out.losses * float("nan"), out.chosen_rewards, out.rejected_rewards)

    monkeypatch.setattr(losses, "sft", poisoned)
    from preftune.methods import registry

    monkeypatch.setitem(registry.METHODS, "sft", registry.Method(
        "sft", poisoned, data="sft", needs_reference=False, uses_chosen_nll=True, defaults={"beta": 0.1}))
    with pytest.raises(TrainingError, match=r"step 1 .*loss term 'dpo': finite; loss term 'sft': \d+ non-finite"
                                             r".*on rows \d+"):
        run(tmp_path, tok, method=["dpo", "sft"], loss_weights=[1.0, 1.0])


# ------------------------------------------------------------------------------------------------ up-front checks


def test_a_reference_with_another_vocabulary_is_refused(tmp_path, tok):
    other = build_tokenizer([r["prompt"] + r["chosen"] for r in ROWS], vocab_size=300)
    with pytest.raises(ModelError, match="vocabulary has .* entries, the policy's"):
        train(dict(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), max_steps=1,
                   disable_tqdm=True, bf16=False), model=build_tiny_model(tok, seed=0),
              ref_model=build_tiny_model(other, seed=1), tokenizer=tok, train_dataset=ROWS)


def test_a_row_longer_than_the_models_positions_is_named(tmp_path, tok):
    rows = ROWS[:8] + [{"prompt": "Tell me about the weather.", "chosen": " Sure!" * 40, "rejected": " No."}]
    with pytest.raises(DataError, match=r"train_dataset, row 8 \(0-based\): needs \d+ positions .* the model has 64"):
        run(tmp_path, tok, rows=rows, model=build_tiny_model(tok, seed=0, max_position_embeddings=64),
            max_length=None, max_prompt_length=None)


def test_a_run_with_no_row_left_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="no row is left to train on: tokenized 0 of 24 rows.*prompt leaves no room"):
        run(tmp_path, tok, max_length=3, max_prompt_length=None)
    assert not (tmp_path / "run" / "final").exists()


def test_kto_trains_every_row_even_fewer_than_one_batch(tmp_path, tok):
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in ROWS[:3]]
    result = run(tmp_path, tok, rows=unpaired, method="kto", per_device_train_batch_size=8, max_steps=1)
    assert records(result.output_dir)[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # KTO at π = π_ref


def test_a_full_disk_leaves_no_partial_checkpoint_behind(tmp_path, tok, monkeypatch):
    import errno

    from accelerate import Accelerator

    real = Accelerator.save_state

    def fill_the_disk(self, output_dir, **kwargs):
        real(self, output_dir, **kwargs)  # some files land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path, tok, save_steps=1)
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # neither complete-looking nor .tmp
