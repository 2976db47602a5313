"""`preftune pairs` and `preftune eval` check their output paths before loading or sampling anything."""

from __future__ import annotations

import pytest

from preftune.cli import main
from preftune.errors import ConfigError


@pytest.mark.parametrize(("command", "flag", "example"), [
    (["pairs", "--judge", "gold"], "--out", "pairs.jsonl"),
    (["eval", "--judge", "gold", "--reference", "no/such/ref"], "--out", "eval.json"),
    (["eval", "--judge", "gold", "--reference", "no/such/ref"], "--samples-out", "samples.jsonl"),
])
def test_an_output_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, command, flag, example):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi\n")
    folder = tmp_path / "results"
    folder.mkdir()
    code = main([*command, "--model", "no/such/model", "--prompts", str(prompts), flag, str(folder)]
                + (["--out", str(tmp_path / "o.json")] if flag == "--samples-out" else []))
    assert code == ConfigError.exit_code  # not a model that cannot load: nothing was loaded yet
    assert f"preftune: {flag} {folder} is a folder; give the path of the file to write (e.g. {folder / example})" \
        in capsys.readouterr().err
    assert list(folder.iterdir()) == []
