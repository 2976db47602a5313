"""`preftune annotate` never writes over the database or a user's file, and names a --db that is a folder."""

from __future__ import annotations

import json

import pytest
from annotate_helpers import text_pairs, write_jsonl

from preftune.annotate.store import AnnotationStore
from preftune.cli import main
from preftune.errors import ConfigError


@pytest.fixture
def labelled(tmp_path) -> str:
    """A SQLite database with three pairs items, each labelled once (what `annotate export` exports)."""
    db = str(tmp_path / "a.sqlite")
    assert main(["annotate", "load", "--db", db, "--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(3)))]) \
        == 0
    with AnnotationStore(db, create=False) as store:
        while (item := store.next_item("pairs", "ann", votes_per_item=1)) is not None:
            store.vote(item["id"], "ann", "left")
    return db


def test_export_over_its_own_database_is_refused(labelled, tmp_path, capsys):
    before = (tmp_path / "a.sqlite").read_bytes()
    for out in (labelled, f"{labelled}-wal", f"{tmp_path}/../{tmp_path.name}/a.sqlite"):
        assert main(["annotate", "export", "--db", labelled, "--out", out]) == ConfigError.exit_code
        assert f"preftune: --out {out} is the annotation database (--db {labelled})" in capsys.readouterr().err
    assert (tmp_path / "a.sqlite").read_bytes() == before
    with AnnotationStore(labelled, create=False) as store:
        assert len(store.votes("pairs")) == 3


def test_export_replaces_an_existing_file_only_with_overwrite(labelled, tmp_path, capsys):
    out = tmp_path / "mine.jsonl"
    out.write_text("my own rows\n")
    assert main(["annotate", "export", "--db", labelled, "--out", str(out)]) == ConfigError.exit_code
    assert f"preftune: --out {out} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_text() == "my own rows\n"
    assert main(["annotate", "export", "--db", labelled, "--out", str(out), "--overwrite"]) == 0
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 3


def test_export_to_a_folder_is_refused(labelled, tmp_path, capsys):
    assert main(["annotate", "export", "--db", labelled, "--out", str(tmp_path)]) == ConfigError.exit_code
    assert f"preftune: --out {tmp_path} is a folder; give the path of the JSON Lines file" in capsys.readouterr().err


@pytest.mark.parametrize("action", [["export", "--out", "x.jsonl"], ["serve", "--port", "0"], ["report"], ["load"]])
def test_a_db_that_is_a_folder_is_named(tmp_path, monkeypatch, capsys, action):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "votes").mkdir()
    pairs = ["--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(2)))] if action[0] == "load" else []
    assert main(["annotate", action[0], "--db", "votes", *action[1:], *pairs]) == ConfigError.exit_code
    assert ("preftune: --db votes is a folder; give the annotation database's file (e.g. votes/annotations.sqlite)"
            in capsys.readouterr().err)
    assert list((tmp_path / "votes").iterdir()) == []
