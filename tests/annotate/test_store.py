"""The annotation database: random sides recorded and decoded, items spread over annotators, votes that stand,
each comparison loaded once, bad files named by line and field, WAL mode."""

from __future__ import annotations

import json
import sqlite3

import pytest
from annotate_helpers import text_pairs, write_jsonl

from preftune.annotate.items import read_items
from preftune.annotate.store import AnnotationStore, Refused
from preftune.errors import ConfigError, DataError


@pytest.fixture
def store(tmp_path):
    with AnnotationStore(tmp_path / "a.sqlite") as s:
        yield s


def load(store, tmp_path, rows, task="pairs", name="pairs.jsonl"):
    return store.add_items(read_items(write_jsonl(tmp_path / name, rows), task))


def test_sides_are_drawn_at_random_recorded_and_decoded(store, tmp_path):
    load(store, tmp_path, text_pairs(200))
    by_id = {i["id"]: i for i in store.items("pairs")}
    for _ in range(200):
        item = store.next_item("pairs", "x")
        again = store.next_item("pairs", "x")
        assert again == item  # shown again until voted on, with the same sides
        side = "a" if item["left"] == by_id[item["id"]]["a"] else "b"
        assert item["right"] == by_id[item["id"]]["b" if side == "a" else "a"]
        assert store.vote(item["id"], "x", "left") == {"recorded": True, "label": side}
    assert store.next_item("pairs", "x") is None
    votes = store.votes("pairs")
    assert all(v["label"] == v["left_side"] and v["choice"] == "left" for v in votes)
    left_a = sum(v["left_side"] == "a" for v in votes)
    assert 70 <= left_a <= 130  # a fair coin: P(outside) < 1e-5 for Binomial(200, ½)


def test_items_spread_over_annotators_and_stop_at_votes_per_item(store, tmp_path):
    load(store, tmp_path, text_pairs(3))
    shown = {name: store.next_item("pairs", name, votes_per_item=2)["id"] for name in ("x", "y", "z")}
    assert sorted(shown.values()) == [1, 2, 3]  # an item open for one annotator is not handed to the next
    for name, item in shown.items():
        store.vote(item, name, "tie")
    assert store.progress("pairs", "x", votes_per_item=2) == {
        "done": 1, "left": 2, "items": 3, "complete": 0, "votes": 3, "annotators": 3, "votes_per_item": 2}
    for name in ("x", "y", "z"):
        while (item := store.next_item("pairs", name, votes_per_item=2)) is not None:
            store.vote(item["id"], name, "right")
    counts = {}
    for vote in store.votes("pairs"):
        counts[vote["item_id"]] = counts.get(vote["item_id"], 0) + 1
    assert counts == {1: 2, 2: 2, 3: 2}  # each item reached 2 votes, none more
    assert store.next_item("pairs", "w", votes_per_item=2) is None
    assert store.next_item("pairs", "w", votes_per_item=3)["id"] in (1, 2, 3)
    assert store.progress("pairs", "w", votes_per_item=2)["complete"] == 3


def test_a_vote_needs_the_item_shown_and_the_first_vote_stands(store, tmp_path):
    load(store, tmp_path, text_pairs(2))
    with pytest.raises(Refused, match="not shown") as refused:
        store.vote(1, "x", "left")
    assert refused.value.status == 409
    item = store.next_item("pairs", "x")
    with pytest.raises(Refused, match="choice must be one of") as refused:
        store.vote(item["id"], "x", "maybe")
    assert refused.value.status == 400
    first = store.vote(item["id"], "x", "both_bad", "neither answers")
    assert first == {"recorded": True, "label": "both_bad"}
    assert store.vote(item["id"], "x", "both_bad")["recorded"] is False  # a retried request: nothing new
    with pytest.raises(Refused, match="first vote stands"):
        store.vote(item["id"], "x", "left")
    assert [(v["choice"], v["note"]) for v in store.votes("pairs")] == [("both_bad", "neither answers")]


def test_each_comparison_is_loaded_once(store, tmp_path):
    rows = text_pairs(3)
    first = load(store, tmp_path, rows)
    assert (first.read, first.added, first.already) == (3, 3, 0)
    swapped = {**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"]}
    again = load(store, tmp_path, [*rows, swapped, {**rows[1], "prompt": "another prompt"}], name="more.jsonl")
    assert (again.read, again.added, again.already) == (5, 1, 4)
    assert "4 already in the database" in str(again)
    assert store.count_items() == {"pairs": 4, "eval": 0}


@pytest.mark.parametrize("task, row, message", [
    ("pairs", {"prompt": "p", "chosen": "c"}, "field 'rejected': missing"),
    ("pairs", {"prompt": "p", "chosen": " ", "rejected": "r"}, "field 'chosen': empty"),
    ("pairs", {"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "field 'chosen': message 0"),
    ("pairs", {"prompt": 3, "chosen": "c", "rejected": "r"}, "field 'prompt': expected a string or a list"),
    ("pairs", {"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": "high"},
     "field 'score_chosen': expected a finite"),
    ("eval", {"prompt": "p", "policy": "c"}, "field 'reference': missing"),
    ("eval", {"prompt": "p", "policy": "", "reference": "r", "judge": 1}, "field 'judge': expected the judge's name"),
])
def test_bad_rows_are_named_by_file_line_and_field(tmp_path, task, row, message):
    good = {"pairs": text_pairs(1)[0], "eval": {"prompt": "p", "policy": "x", "reference": "y"}}[task]
    path = write_jsonl(tmp_path / "rows.jsonl", [good, row])
    with pytest.raises(DataError, match=f"rows.jsonl, line 2, {message}"):
        read_items(path, task)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl, line 2: not valid JSON"):
        read_items(tmp_path / "broken.jsonl", "pairs")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_items(tmp_path / "empty.jsonl", "pairs")
    with pytest.raises(DataError, match="no such file"):
        read_items(tmp_path / "none.jsonl", "pairs")


def test_the_database_is_sqlite_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "a.sqlite"
    with AnnotationStore(f"sqlite:///{path}") as store:
        load(store, tmp_path, text_pairs(1))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 1
    with pytest.raises(ConfigError, match="only SQLite databases are supported"):
        AnnotationStore("postgresql://team@db/annotations")
    (tmp_path / "not.sqlite").write_text("hello, I am text " * 100)
    with pytest.raises(DataError, match="not a usable SQLite database"):
        AnnotationStore(tmp_path / "not.sqlite")
    with pytest.raises(DataError, match="no such annotation database"):
        AnnotationStore(tmp_path / "absent.sqlite", create=False)


def test_items_keep_conversations_as_loaded(store, tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
           "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    load(store, tmp_path, [row])
    item = store.next_item("pairs", "x")
    assert item["prompt"] == row["prompt"] and {json.dumps(item["left"]), json.dumps(item["right"])} == {
        json.dumps(row["chosen"]), json.dumps(row["rejected"])}
