"""The CLI end to end: a user's JSONL file and a local checkpoint, overrides, and clear errors.

Every user error ends with one line ``preftune: <what, where, what to do>`` on stderr, no traceback, and
the exit code of its kind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune import cli
from preftune.cli import main
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError, DataError, ModelError, RunDirError
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
    assert code == DataError.exit_code
    assert "bad.jsonl, line 3, field 'rejected'" in err  # row 2 (0-based) is the file's line 3


def test_methods_lists_the_registry(capsys):
    from preftune.methods.registry import METHODS

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in METHODS)


def test_config_lists_every_key_with_its_default(capsys):
    from preftune.config import FIELDS

    assert main(["config"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in listing] == list(FIELDS)
    assert "lr_scheduler_kwargs: {}" in listing and "beta: None" in listing


# ---- every user error is one line and an exit code ---------------------------------------------------------


def one_line_error(capsys) -> str:
    """The ``preftune:`` line on stderr, checking it is the only one and that no traceback was printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("preftune:")]
    assert len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0]
    return lines[0]


def train_args(user_files, *overrides: str, name: str = "err") -> list[str]:
    return ["train", str(user_files / "run.yaml"), f"output_dir={user_files / name}", *overrides]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_all_rows_skipped_says_none_were_kept_and_why(user_files, capsys):
    rows = builtin_preferences(5, seed=2)
    for row in rows:
        row["rejected"] = row["chosen"]
    data = write_rows(user_files / "all-bad.jsonl", rows)
    assert main(train_args(user_files, f"dataset={data}", "skip_invalid_rows=true")) == DataError.exit_code
    line = one_line_error(capsys)
    assert "all-bad.jsonl" in line and "kept 0 of 5 rows" in line and "identical chosen/rejected" in line


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_byte_that_is_not_utf8_names_the_file_and_line(user_files, capsys, suffix):
    rows = builtin_preferences(4, seed=3)
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
    lines = text.encode().split(b"\n")
    lines[2] = lines[2].replace(b"e", b"\xe9", 1)  # Latin-1 é on line 3
    data = user_files / f"latin1{suffix}"
    data.write_bytes(b"\n".join(lines))
    assert main(train_args(user_files, f"dataset={data}")) == DataError.exit_code
    line = one_line_error(capsys)
    assert f"latin1{suffix}: line 3" in line and "UTF-8" in line


def test_an_empty_file_is_named(user_files, capsys):
    (user_files / "empty.jsonl").write_text("")
    assert main(train_args(user_files, f"dataset={user_files / 'empty.jsonl'}")) == DataError.exit_code
    line = one_line_error(capsys)
    assert "empty.jsonl" in line and "empty" in line.split("empty.jsonl")[1]


def test_a_broken_json_line_names_its_line_number(user_files, capsys):
    lines = [json.dumps(r) for r in builtin_preferences(6, seed=4)]
    lines[4] = lines[4][:-2]  # cut mid-string
    (user_files / "broken.jsonl").write_text("\n".join(lines) + "\n")
    assert main(train_args(user_files, f"dataset={user_files / 'broken.jsonl'}")) == DataError.exit_code
    line = one_line_error(capsys)
    assert "broken.jsonl: line 5" in line and "not valid JSON" in line


def test_a_missing_dataset_path_is_named(user_files, capsys):
    assert main(train_args(user_files, f"dataset={user_files / 'nope.jsonl'}")) == DataError.exit_code
    assert "nope.jsonl: no such file or folder" in one_line_error(capsys)


def test_a_missing_model_path_says_there_is_no_such_model_folder(user_files, capsys):
    missing = user_files / "no" / "such-model"
    assert main(train_args(user_files, f"model_name_or_path={missing}")) == ModelError.exit_code
    line = one_line_error(capsys)
    assert str(missing) in line and "no such" in line and "save_pretrained" in line and "Repo id" not in line


@pytest.mark.parametrize("override,words", [
    ("method=dpp", ["unknown method 'dpp'", "Did you mean", "'dpo'"]),
    ("max_length=0", ["max_length must be >= 1", "null for no limit"]),
    ("beta=0", ["beta must be > 0"]),  # the run is IPO: 1/(2β) was a ZeroDivisionError
    ("learning_rate=-1", ["learning_rate must be > 0"]),
    ("report_to=tensorbord", ["report_to", "Did you mean 'tensorboard'"]),
])
def test_config_errors_name_the_key(user_files, capsys, override, words):
    assert main(train_args(user_files, override)) == ConfigError.exit_code
    line = one_line_error(capsys)
    assert all(word in line for word in words), line


def test_a_bad_value_in_the_yaml_file_names_the_file_and_line(user_files, tmp_path, capsys):
    config = tmp_path / "lr.yaml"
    config.write_text((user_files / "run.yaml").read_text().replace("learning_rate: 1.0e-3", "learning_rate: 0"))
    assert main(["train", str(config)]) == ConfigError.exit_code
    line = one_line_error(capsys)
    number = config.read_text().splitlines().index("learning_rate: 0") + 1
    assert f"{config}, line {number}: learning_rate must be > 0" in line


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("method: dpo\nbeta: [0.1\nmax_steps: 2\n")
    assert main(["train", str(config)]) == ConfigError.exit_code
    line = one_line_error(capsys)
    assert f"{config}, line 3" in line and "invalid YAML" in line


def test_a_duplicated_yaml_key_names_the_key_and_both_lines(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("beta: 0.1\nmethod: dpo\nbeta: 0.3\n")
    assert main(["train", str(config)]) == ConfigError.exit_code
    line = one_line_error(capsys)
    assert str(config) in line and "'beta'" in line and "lines 1 and 3" in line


# The run-folder checks may refuse these first, as a RunDirError; either way one line naming the path.
NOT_A_FOLDER = (cli.EXIT_NOT_WRITABLE, RunDirError.exit_code)


def test_an_output_dir_that_is_a_file_is_named(user_files, capsys):
    blocker = user_files / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", str(user_files / "run.yaml"), f"output_dir={blocker}"]) in NOT_A_FOLDER
    line = one_line_error(capsys)
    assert str(blocker) in line and "file" in line
    assert main(["train", str(user_files / "run.yaml"), f"output_dir={blocker / 'run'}"]) in NOT_A_FOLDER
    line = one_line_error(capsys)
    assert f"{blocker} is a file" in line


def test_a_read_only_output_dir_is_named(user_files, capsys, monkeypatch):
    # Tests may run as root, where permission bits do not stop a write: make mkdir fail as a read-only folder does.
    read_only = user_files / "read-only"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == read_only / "run" or read_only in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code = main(["train", str(user_files / "run.yaml"), f"output_dir={read_only / 'run'}"])
    assert code in NOT_A_FOLDER
    line = one_line_error(capsys)
    assert str(read_only / "run") in line and "permission denied" in line


def test_disk_full_is_a_message_with_its_own_exit_code(user_files, capsys, monkeypatch):
    from preftune.config import TrainConfig

    def save(self, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(TrainConfig, "save", save)
    assert main(train_args(user_files, name="full")) == cli.EXIT_DISK_FULL
    line = one_line_error(capsys)
    assert "no space left" in line and str(user_files / "full" / "config.yaml") in line


def test_debug_shows_the_traceback_of_a_user_error_too(user_files, capsys, monkeypatch):
    assert main(train_args(user_files, "method=dpp", "--debug")) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("preftune: ")
    monkeypatch.setenv("PREFTUNE_DEBUG", "1")
    assert main(train_args(user_files, "method=dpp")) == ConfigError.exit_code
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(user_files, monkeypatch):
    import preftune.training.loop

    def broken(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(preftune.training.loop, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(train_args(user_files))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    environ = os.environ | {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])} | (env or {})
    return subprocess.run([sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True,
                          env=environ, timeout=600)


def test_end_to_end_a_user_error_is_one_line_on_stderr_and_its_exit_code():
    done = _cli("train", "method=ipo", "beta=0")
    assert done.returncode == ConfigError.exit_code
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("preftune: beta must be > 0")


def test_help_and_the_parser_do_not_import_torch():
    """`preftune --help`, `preftune methods` and `preftune config` need no torch (it took seconds to import)."""
    code = ("import sys, preftune.cli as c; c._parser(); "
            "from preftune.methods.registry import describe; describe(); "
            "from preftune.config import TrainConfig; TrainConfig(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'accelerate') if m in sys.modules))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": src})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
