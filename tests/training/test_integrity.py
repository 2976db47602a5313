"""Inputs and checkpoints are known by their content: a file rewritten with the same size and modification time, a
model overwritten in place or a checkpoint edited on disk is seen, and a write that fails leaves nothing behind."""

from __future__ import annotations

import json
import logging
import os
import shutil

import datasets
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from preftune import train
from preftune.data.builtin import builtin_preferences
from preftune.errors import ModelError, ResumeError, TrainingError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training import checkpoint

ROWS = builtin_preferences(24, seed=5)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """`load_dataset` caches what it reads; keep that out of the user's ~/.cache (and out of other tests)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def settings(tmp_path, name="run", **overrides) -> dict:
    return dict(output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), max_steps=2, save_steps=1,
                per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, disable_tqdm=True, seed=0,
                bf16=False) | overrides


def losses(result) -> list[float]:
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_model_folder(folder, tok, seed=0):
    build_tiny_model(tok, seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- item 14: data by content


def test_a_dataset_rewritten_with_the_same_size_and_mtime_is_read_again_and_refuses_a_resume(tmp_path, tok, caplog):
    data = tmp_path / "prefs.jsonl"
    write_rows(data, ROWS)
    original = train(settings(tmp_path, "original", dataset=str(data)), model=build_tiny_model(tok), tokenizer=tok)

    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in ROWS]
    before = os.stat(data)
    write_rows(data, swapped)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(data).st_size == before.st_size and os.stat(data).st_mtime_ns == before.st_mtime_ns

    with caplog.at_level(logging.INFO):
        rewritten = train(settings(tmp_path, "rewritten", dataset=str(data)), model=build_tiny_model(tok),
                          tokenizer=tok)
    assert not any("loaded from cache" in r.getMessage() for r in caplog.records)
    fresh_copy = tmp_path / "swapped.jsonl"
    write_rows(fresh_copy, swapped)
    expected = train(settings(tmp_path, "expected", dataset=str(fresh_copy)), model=build_tiny_model(tok),
                     tokenizer=tok)
    assert losses(rewritten) == pytest.approx(losses(expected), abs=1e-6)  # the swapped rows were trained
    assert losses(rewritten)[1] != pytest.approx(losses(original)[1], abs=1e-4)

    with pytest.raises(ResumeError, match=f"the train data {data} \\(other rows, or the same file with other"):
        train(settings(tmp_path, "original", dataset=str(data), resume_from_checkpoint=True),
              model=build_tiny_model(tok), tokenizer=tok)


def test_a_touched_dataset_with_the_same_content_still_resumes(tmp_path, tok):
    data = tmp_path / "prefs.jsonl"
    write_rows(data, ROWS)
    train(settings(tmp_path, dataset=str(data)), model=build_tiny_model(tok), tokenizer=tok)
    os.utime(data, ns=(0, 10**18))  # another time, same bytes
    resumed = train(settings(tmp_path, dataset=str(data), resume_from_checkpoint=True), model=build_tiny_model(tok),
                    tokenizer=tok)
    assert resumed.global_step == 2


def test_a_save_to_disk_folder_is_known_by_its_rows(tmp_path, tok):
    from preftune.data.formats import load_rows

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(folder)
    first = load_rows(str(folder))._fingerprint
    state = json.loads((folder / "state.json").read_text())
    shutil.rmtree(folder)
    datasets.Dataset.from_list(ROWS[::-1]).save_to_disk(folder)
    (folder / "state.json").write_text(json.dumps(state))  # the old fingerprint, other rows
    assert load_rows(str(folder))._fingerprint != first


# --------------------------------------------------------------------------- item 15: model folders by content


def test_a_model_folder_overwritten_in_place_refuses_the_resume(tmp_path, tok):
    folder = save_model_folder(tmp_path / "base", tok)
    train(settings(tmp_path, model_name_or_path=str(folder)), train_dataset=ROWS)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    build_tiny_model(tok, seed=1).save_pretrained(folder)  # other weights, same names, same size
    assert weights.stat().st_size == size
    with pytest.raises(ResumeError, match=f"the model_name_or_path folder {folder}: model.safetensors \\(files added, "
                                          "removed or overwritten in place\\)"):
        train(settings(tmp_path, model_name_or_path=str(folder), resume_from_checkpoint=True), train_dataset=ROWS)


def test_every_model_folder_the_config_names_is_in_the_fingerprint(tmp_path, tok):
    ref, value, judge = (save_model_folder(tmp_path / name, tok) for name in ("ref", "value", "judge"))
    config = {"ref_model_name_or_path": str(ref), "value_model": str(value), "judge": str(judge),
              "model_name_or_path": "org/hub-model"}
    before = checkpoint.run_fingerprint(config, {})
    assert sorted(before["models"]) == ["judge", "ref_model_name_or_path", "value_model"]  # a Hub id: by its name
    (judge / "tokenizer.json").write_text((judge / "tokenizer.json").read_text() + " ")
    for folder in (ref, value):
        save_file({k: v + 1 for k, v in load_file(folder / "model.safetensors").items()}, folder / "model.safetensors")
    changes = checkpoint.fingerprint_changes(before, checkpoint.run_fingerprint(config, {}))
    assert changes == [f"the {key} folder {folder}: {file} (files added, removed or overwritten in place)"
                       for key, folder, file in [("judge", judge, "tokenizer.json"),
                                                 ("ref_model_name_or_path", ref, "model.safetensors"),
                                                 ("value_model", value, "model.safetensors")]]


# ------------------------------------------------------------------------------ item 16: checkpoints verified


@pytest.fixture(scope="module")
def written(tmp_path_factory, tok):
    """A run of 2 steps with checkpoint-1 kept; each test resumes from its own copy."""
    root = tmp_path_factory.mktemp("written")
    train(settings(root), model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS)
    return root / "run" / "checkpoint-1"


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def set_a_weight(path):
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = 3e4
    save_file(tensors, path, metadata={"format": "pt"})


def edit_global_step(path):
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "global_step": 2}, indent=2))


@pytest.mark.parametrize("damage, file", [(flip_a_byte, "model.safetensors"), (set_a_weight, "model.safetensors"),
                                          (edit_global_step, "trainer_state.json"), (None, None)])
def test_a_checkpoint_edited_on_disk_is_refused_naming_the_file(tmp_path, tok, written, damage, file):
    copy = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(written, copy)
    resume = settings(tmp_path, resume_from_checkpoint=str(copy))
    if damage is None:  # an intact copy resumes: the refusals below are the damage's
        assert train(resume, model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS).global_step == 2
        return
    damage(copy / file)
    with pytest.raises(ResumeError, match=f"{copy / file}: its contents differ from when the checkpoint was written"):
        train(resume, model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS)


def test_a_checkpoint_missing_a_file_or_holding_another_is_refused(tmp_path, tok, written):
    copy = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(written, copy)
    resume = settings(tmp_path, resume_from_checkpoint=str(copy))
    (copy / "extra.pkl").write_bytes(b"")
    with pytest.raises(ResumeError, match=f"{copy / 'extra.pkl'}: not written with the checkpoint"):
        train(resume, model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS)
    (copy / "extra.pkl").unlink()
    (copy / "optimizer.bin").unlink()
    with pytest.raises(ResumeError, match=f"{copy / 'optimizer.bin'}: missing \\(listed in checksums.json\\)"):
        train(resume, model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS)
    (copy / "checksums.json").unlink()
    with pytest.raises(ResumeError, match="has no checksums.json"):
        train(resume, model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS)


# ------------------------------------------------------------------------------- a full disk, pickled weights


def test_a_full_disk_in_any_library_leaves_no_partial_checkpoint_and_says_so(tmp_path, tok, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state

    def fill_the_disk(self, output_dir, **kwargs):
        real(self, output_dir, **kwargs)  # some files land, then safetensors finds the disk full
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull })')

    monkeypatch.setattr(Accelerator, "save_state", fill_the_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=f"{out / 'checkpoint-1'} could not be written \\(SafetensorError: .*"
                                            "disk full\\? .*the partial checkpoint-1.tmp was removed"):
        train(settings(tmp_path), model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS)
    assert not list(out.glob("checkpoint-*"))


def test_a_full_disk_while_writing_final_leaves_no_partial_folder(tmp_path, tok, monkeypatch):
    def fill_the_disk(self, folder, *args, **kwargs):
        (folder / "tokenizer.json").write_text("{")  # half written
        raise RuntimeError("PytorchStreamWriter failed writing file: file write failed")

    monkeypatch.setattr(type(tok), "save_pretrained", fill_the_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=f"{out / 'final'} could not be written \\(RuntimeError: .*disk full\\?"):
        train(settings(tmp_path, save_steps=None), model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS)
    assert not (out / "final.tmp").exists() and not (out / "final").exists()


def pickled_folder(folder, tok):
    model = build_tiny_model(tok)
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("role", ["model_name_or_path", "ref_model_name_or_path"])
def test_pickled_weights_are_refused_by_name(tmp_path, tok, role):
    folder = pickled_folder(tmp_path / "pickled", tok)
    paths = {role: str(folder)} | ({} if role == "model_name_or_path" else
                                   {"model_name_or_path": str(save_model_folder(tmp_path / "policy", tok))})
    with pytest.raises(ModelError, match=f"model {folder}: its weights are pickled \\(pytorch_model.bin\\), and "
                                         "preftune loads safetensors only .*convert it once"):
        train(settings(tmp_path, **paths), train_dataset=ROWS)


def test_a_pickled_judge_or_value_model_is_refused_by_name(tmp_path, tok):
    from preftune.config import build_config
    from preftune.modeling.loading import load_reward_model
    from preftune.rollout.judges import load_judge

    folder = pickled_folder(tmp_path / "pickled", tok)
    with pytest.raises(ModelError, match=f"judge {folder}: its weights are pickled \\(pytorch_model.bin\\)"):
        load_judge(str(folder))
    with pytest.raises(ModelError, match=f"model {folder}: its weights are pickled \\(pytorch_model.bin\\)"):
        load_reward_model(str(folder), build_config({}))  # how the value model (and a reward model) loads
