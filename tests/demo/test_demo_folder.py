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
