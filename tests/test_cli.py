"""The CLI end to end: a user's JSONL file and a local checkpoint, overrides, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.data.builtin import builtin_preferences
from preftune.modeling.tiny import default_model, default_tokenizer


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    rows = builtin_preferences(24, seed=5)
    tok = default_tokenizer(rows)
    default_model(tok, seed=0).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "run.yaml").write_text(
        f"model_name_or_path: {root / 'sft'}\ndataset: {root / 'prefs.jsonl'}\nmethod: ipo\nbeta: 0.5\n"
        f"max_steps: 2\nlogging_steps: 1\nper_device_train_batch_size: 4\nlearning_rate: 1.0e-3\ndisable_tqdm: true\n"
        f"eval_split_size: 0.25\ncache_dir: {root / 'cache'}\n"
    )
    return root


def test_train_from_yaml_with_overrides_writes_a_loadable_run(user_files, capsys):
    out = user_files / "run-ipo"
    assert main(["train", str(user_files / "run.yaml"), f"output_dir={out}", "beta=0.25"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "beta: 0.25" in saved and "method: ipo" in saved
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(1 / (4 * 0.25**2), rel=1e-5)  # IPO at π = π_ref: (1/2β)²
    assert any("eval_loss" in r for r in records)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(user_files / "sft")
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)
    assert "run directory" in capsys.readouterr().out


def test_unknown_key_suggests_the_closest(user_files, capsys):
    assert main(["train", str(user_files / "run.yaml"), "learning_rat=1e-4"]) == 2
    assert "Did you mean 'learning_rate'?" in capsys.readouterr().err


def test_malformed_row_names_file_row_and_field(user_files, capsys):
    bad = user_files / "bad.jsonl"
    rows = builtin_preferences(4, seed=1)
    rows[2]["rejected"] = rows[2]["chosen"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", str(user_files / "run.yaml"), f"dataset={bad}", f"output_dir={user_files / 'bad'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl" in err and "row 2" in err and "rejected" in err


def test_methods_lists_the_registry(capsys):
    from preftune.methods.registry import METHODS

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in METHODS)
