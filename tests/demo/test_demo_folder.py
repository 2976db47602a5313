"""`preftune demo` writes only into a folder of its own and never replaces a finished demo unasked."""

from __future__ import annotations

import pytest

from preftune.demo.pipeline import DEMO_MARKER, DemoSettings, claim_demo_folder
from preftune.errors import RunDirError


def test_a_folder_with_someone_elses_files_is_refused(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "my_model.bin").write_bytes(b"weights")
    with pytest.raises(RunDirError, match="is not a demo folder .*holds sft"):
        claim_demo_folder(DemoSettings(output_dir=str(tmp_path)))
    assert (tmp_path / "sft" / "my_model.bin").read_bytes() == b"weights"
    assert not (tmp_path / DEMO_MARKER).exists()


def test_a_finished_demo_is_replaced_only_when_asked(tmp_path):
    claim_demo_folder(DemoSettings(output_dir=str(tmp_path)))
    (tmp_path / "demo.json").write_text("{}")
    with pytest.raises(RunDirError, match="finished demo; pass --overwrite"):
        claim_demo_folder(DemoSettings(output_dir=str(tmp_path)))
    assert (tmp_path / "demo.json").exists()
    claim_demo_folder(DemoSettings(output_dir=str(tmp_path), overwrite=True))
    assert not (tmp_path / "demo.json").exists()  # running again: unfinished until it ends


def test_an_unfinished_demo_runs_again(tmp_path):
    claim_demo_folder(DemoSettings(output_dir=str(tmp_path)))
    (tmp_path / "sft").mkdir()
    assert claim_demo_folder(DemoSettings(output_dir=str(tmp_path))) == tmp_path


def test_demo_output_dir_tilde_is_checked_where_the_stages_write(tmp_path, monkeypatch, capsys):
    """`preftune demo --output-dir '~'`: the home folder (here a temporary one, holding a user's files) is what is
    checked and refused, not a literal ./~; nothing is written there or in the current folder."""
    from preftune import cli
    from preftune.demo import pipeline

    home, work = tmp_path / "home", tmp_path / "work"
    (home / "sft").mkdir(parents=True)
    (home / "sft" / "config.yaml").write_text("mine: true\n")
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)

    def past_the_check(*args, **kwargs):
        raise AssertionError("the demo went past its folder check")

    monkeypatch.setattr(pipeline, "review_corpus", past_the_check)
    assert cli.main(["demo", "--quick", "--output-dir", "~"]) == RunDirError.exit_code
    assert f"preftune: {home} is not a demo folder (it holds sft)" in capsys.readouterr().err
    assert sorted(p.name for p in home.rglob("*")) == ["config.yaml", "sft"]
    assert list(work.iterdir()) == []


def test_demo_stages_write_under_the_expanded_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = DemoSettings(output_dir="~/demo")
    assert claim_demo_folder(settings) == tmp_path / "demo"
    assert settings.output_dir == str(tmp_path / "demo")  # what train_stage and the pairs file are written under
    assert (tmp_path / "demo" / DEMO_MARKER).exists()
