"""Annotating as a team, SQLite and PostgreSQL alike: an annotator undoes their last vote (retracted, logged, no
longer counted) or skips an item (it goes to others, comes back last); the task's guidelines are shown as
text, never markup; notes reach the export; whoever runs the task reads counts on an overview behind its own
token."""

from __future__ import annotations

import http.client
import json
import sqlite3
from pathlib import Path

import pytest
from annotate_helpers import query, text_pairs, write_jsonl

from preftune.annotate.guidelines import MAX_BYTES, parse
from preftune.annotate.items import read_items
from preftune.annotate.results import annotation_report, format_report, overview
from preftune.annotate.store import SCHEMA, AnnotationStore, Refused
from preftune.cli import main
from preftune.errors import ConfigError, DataError

STATIC = Path(__file__).resolve().parents[2] / "src" / "preftune" / "annotate" / "static"
S1, S2 = "session-one-0123456789", "session-two-0123456789"
TOKEN = "a-team-token-of-enough-length"


@pytest.fixture
def store(database, tmp_path):
    with AnnotationStore(database) as s:
        s.add_items(read_items(write_jsonl(tmp_path / "pairs.jsonl", text_pairs(3)), "pairs"))
        yield s


def test_undo_retracts_only_the_last_vote_of_this_session(store, database):
    first = store.next_item("pairs", "x")
    store.vote(first["id"], "x", "left", session=S1)
    second = store.next_item("pairs", "x")
    store.vote(second["id"], "x", "right", "B reads better", session=S1)
    with pytest.raises(Refused, match="cast in another session") as refused:
        store.undo("pairs", "x", S2)
    assert refused.value.status == 409
    with pytest.raises(Refused, match="'y' has no vote on pairs items to undo"):
        store.undo("pairs", "y", S1)

    undone = store.undo("pairs", "x", S1, now=1e9)
    assert undone == {"item": second, "choice": "right", "note": "B reads better"}  # the same sides, shown again
    assert [v["item_id"] for v in store.votes("pairs")] == [first["id"]]  # only live votes are votes
    retracted = query(database, "SELECT vote_id, item_id, annotator, choice, note, session, retracted_at "
                                "FROM retractions")
    assert retracted == [(2, second["id"], "x", "right", "B reads better", S1, 1e9)]  # recorded, not erased
    assert store.next_item("pairs", "x") == second  # open for them again
    assert store.vote(second["id"], "x", "tie", session=S1)["recorded"] is True  # and voted anew

    report = annotation_report(store)["pairs"]
    assert (report["votes"], report["labels"]["tie"], report["changes"]) == (
        2, 1, {"x": {"retracted": 1, "skipped": 0}})
    assert "x undid 1 and skipped 0" in format_report(annotation_report(store))


def test_undo_reaches_the_last_vote_only(store):
    first = store.next_item("pairs", "x")
    store.vote(first["id"], "x", "left", session=S1)
    second = store.next_item("pairs", "x")
    store.vote(second["id"], "x", "left", session=S2)  # another tab voted last
    with pytest.raises(Refused, match=r"last vote \(item 2\) was cast in another session"):
        store.undo("pairs", "x", S1)  # the first tab's vote is no longer the last one
    assert len(store.votes("pairs")) == 2


def test_a_skipped_item_goes_to_others_and_comes_back_last(store, database):
    with pytest.raises(Refused, match="was not shown to 'x'"):
        store.skip(1, "x")
    shown = store.next_item("pairs", "x")
    assert shown["id"] == 1
    store.skip(1, "x", S1, now=5.0)
    assert query(database, "SELECT item_id, annotator, left_side IN ('a', 'b'), session, created_at FROM skips") == [
        (1, "x", True, S1, 5.0)]
    assert store.next_item("pairs", "y")["id"] == 1  # back for others at once
    order = []
    while (item := store.next_item("pairs", "x", votes_per_item=2)) is not None:
        order.append(item["id"])
        store.vote(item["id"], "x", "tie")
    assert order == [2, 3, 1]  # and for them, after every other item
    with pytest.raises(Refused, match="already voted on item 1; undo the vote to change it"):
        store.skip(1, "x")
    assert store.changes("pairs") == {"x": {"retracted": 0, "skipped": 1}}


def test_a_database_from_before_undo_opens_and_gains_the_session(tmp_path):
    path = tmp_path / "old.sqlite"
    old_schema = SCHEMA.split("CREATE TABLE IF NOT EXISTS retractions")[0]  # the tables as they were
    old_schema = old_schema.replace("    session TEXT NOT NULL DEFAULT '',  -- the page's session id ('' when cast "
                                    "outside the page)\n", "")
    with sqlite3.connect(path) as conn:
        conn.executescript(old_schema.format(id="INTEGER PRIMARY KEY", real="REAL"))
        conn.execute("INSERT INTO meta VALUES ('schema', '1')")
    assert "session" not in {r[1] for r in query(path, "PRAGMA table_info(votes)")}
    with AnnotationStore(path) as store:
        store.add_items(read_items(write_jsonl(tmp_path / "p.jsonl", text_pairs(1)), "pairs"))
        store.vote(store.next_item("pairs", "x")["id"], "x", "left", session=S1)
        assert store.undo("pairs", "x", S1)["choice"] == "left"


# ------------------------------------------------------------------------------------ through the server


def test_undo_and_skip_through_the_server(serve, tmp_path, database):
    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(3))), db=database)
    client = server.client

    def post(path, body):
        return client.request("POST", path, {"task": "pairs", "annotator": "x", **body})[:2]

    item = client.next("x")["item"]
    assert post("/api/vote", {"item": item["id"], "choice": "left", "note": "A is kinder", "session": S1})[0] == 200
    assert post("/api/undo", {"session": S2}) == (409, {"error": "'x''s last vote (item 1) was cast in another "
                                                         "session (another tab, or before the page was reloaded); "
                                                         "only a vote from this page can be undone"})
    assert post("/api/undo", {})[1] == {"error": "field 'session' is missing"}
    assert post("/api/undo", {"session": "<script>"})[1]["error"].startswith("field 'session' must be 16 to 64")
    status, undone = post("/api/undo", {"session": S1})
    assert status == 200 and undone["item"] == item and (undone["choice"], undone["note"]) == ("left", "A is kinder")
    assert undone["progress"]["done"] == 0 and undone["progress"]["votes"] == 0
    assert query(server.db, "SELECT COUNT(*) FROM votes") == [(0,)]
    assert query(server.db, "SELECT item_id, choice, note FROM retractions") == [(item["id"], "left", "A is kinder")]

    assert post("/api/skip", {"item": item["id"], "session": S1})[0] == 200
    assert client.next("x")["item"]["id"] == 2  # the skipped item waits
    assert client.next("y")["item"]["id"] == 1  # others get it first
    assert post("/api/skip", {"item": 3})[0] == 409  # never shown to x
    assert query(server.db, "SELECT item_id, annotator, session FROM skips") == [(1, "x", S1)]


def test_the_overview_needs_its_own_token_and_shows_counts_only(serve, tmp_path, database):
    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(3))), "--votes-per-item", "2",
                   db=database)
    client = server.client
    assert len(server.admin_token) >= 32 and server.admin_token != client.token

    def vote(name: str, want: str) -> int:
        item = client.next(name)["item"]
        shown = "a" if item["left"] == text_pairs(3)[item["id"] - 1]["chosen"] else "b"
        client.vote(name, item["id"], "left" if shown == want else "right")
        return item["id"]

    assert (vote("alice", "a"), vote("alice", "a")) == (1, 2)
    assert client.next("bob")["item"]["id"] == 3  # the least covered, which bob skips
    assert client.request("POST", "/api/skip", {"task": "pairs", "annotator": "bob", "item": 3})[0] == 200
    assert (vote("bob", "a"), vote("bob", "b")) == (1, 2)  # they disagree on item 2 only

    status, payload, headers = client.request("GET", "/api/overview")  # the annotators' token
    assert status == 401 and payload["error"].startswith("missing or wrong admin token")
    admin = {"Authorization": f"Bearer {server.admin_token}"}
    assert client.request("POST", "/api/next", {"task": "pairs", "annotator": "x"}, headers=admin)[0] == 401
    status, payload, headers = client.request("GET", "/api/overview", headers=admin)
    assert status == 200 and headers["cache-control"] == "no-store"
    assert payload == {"database": str(server.db), "votes_per_item": 2, "tasks": {"pairs": {
        "items": 3, "complete": 2, "votes": 4,
        "annotators": {"alice": {"votes": 2, "retracted": 0, "skipped": 0},
                       "bob": {"votes": 2, "retracted": 0, "skipped": 1}},
        "agreement": {"items": 2, "krippendorff_alpha": payload["tasks"]["pairs"]["agreement"]["krippendorff_alpha"]},
        "split": [{"id": 2, "source": str(tmp_path / "p.jsonl"), "line": 2, "labels": {"a": 1, "b": 1}}]}}}
    with AnnotationStore(database, create=False) as store:
        assert payload["tasks"] == overview(store, 2)  # the same numbers as the function
    status, page, headers = client.request("GET", "/overview", token=False)
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
    assert client.request("GET", "/static/overview.js", token=False)[0] == 200


def test_the_admin_token_is_checked(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", text_pairs(1))
    serve_args = ["annotate", "serve", "--db", str(tmp_path / "a.sqlite"), "--pairs", str(pairs), "--port", "0",
                  "--token", TOKEN]
    assert main([*serve_args, "--admin-token", TOKEN]) == ConfigError.exit_code
    assert capsys.readouterr().err == ("preftune: --admin-token is the annotators' --token: give the overview its own "
                                       "token, or leave --admin-token out for a random one\n")
    assert main([*serve_args, "--admin-token", "short"]) == ConfigError.exit_code
    assert capsys.readouterr().err.startswith("preftune: --admin-token: at least 16 characters, got 5")


def test_the_guidelines_are_text_never_markup(serve, tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("# How to judge\n\nPrefer **honest** answers; see `rules` and [the wiki](https://w.example).\n"
                     "<script>window.pwned = 1</script>\n\n- read both\n- then *vote*\n", encoding="utf-8")
    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(1))), "--guidelines", str(guide))
    client = server.client
    status, payload, _ = client.request("GET", "/api/status")
    assert payload["guidelines"] == [
        {"kind": "h1", "spans": [{"text": "How to judge", "style": ""}]},
        {"kind": "p", "spans": [{"text": "Prefer ", "style": ""}, {"text": "honest", "style": "strong"},
                                {"text": " answers; see ", "style": ""}, {"text": "rules", "style": "code"},
                                {"text": " and ", "style": ""}, {"text": "the wiki (https://w.example)", "style": ""},
                                {"text": ". <script>window.pwned = 1</script>", "style": ""}]},
        {"kind": "ul", "items": [[{"text": "read both", "style": ""}],
                                 [{"text": "then ", "style": ""}, {"text": "vote", "style": "em"}]]}]
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    conn.request("GET", "/api/status", headers={"Authorization": f"Bearer {client.token}"})
    raw = conn.getresponse().read()
    assert b"<" not in raw and b"\\u003cscript\\u003e" in raw  # the markup travels escaped, as text
    assert parse("```\n<b>kept</b>\n```") == [{"kind": "pre", "text": "<b>kept</b>"}]
    # Both pages build every text with textContent; neither script parses HTML or code from strings.
    for script in ("app.js", "overview.js"):
        source = (STATIC / script).read_text()
        assert not [sink for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                                      "new Function", "DOMParser") if sink in source]


def test_a_bad_guidelines_file_is_one_line_and_nothing_is_loaded(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", text_pairs(1))
    db = tmp_path / "a.sqlite"
    serve_args = ["annotate", "serve", "--db", str(db), "--pairs", str(pairs), "--port", "0", "--guidelines"]
    assert main([*serve_args, str(tmp_path / "absent.md")]) == DataError.exit_code
    assert capsys.readouterr().err == (f"preftune: --guidelines {tmp_path / 'absent.md'}: no such file; give the "
                                       "Markdown file your annotators should read (e.g. --guidelines guide.md)\n")
    (tmp_path / "latin.md").write_bytes(b"# Guide\ncaf\xe9\n")
    assert main([*serve_args, str(tmp_path / "latin.md")]) == DataError.exit_code
    assert capsys.readouterr().err == (f"preftune: --guidelines {tmp_path / 'latin.md'}, line 2: not UTF-8 text; "
                                       "save the file as UTF-8\n")
    (tmp_path / "big.md").write_text("x" * (MAX_BYTES + 1))
    assert main([*serve_args, str(tmp_path / "big.md")]) == DataError.exit_code
    assert f"{MAX_BYTES + 1} bytes, at most {MAX_BYTES}" in capsys.readouterr().err
    assert not db.exists()  # refused before the database was touched


def test_the_export_carries_the_notes(serve, tmp_path, database):
    rows = text_pairs(2)
    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", rows)), "--votes-per-item", "2", db=database)
    client = server.client
    for name, note in (("alice", "clearly better"), ("bob", "")):
        while (item := client.next(name)["item"]) is not None:
            chosen_left = item["left"] == rows[item["id"] - 1]["chosen"]
            client.vote(name, item["id"], "left" if chosen_left else "right", note=note if item["id"] == 1 else "")
    item = client.next("carol")  # nothing left: both items have their 2 votes
    assert item["item"] is None
    out = tmp_path / "prefs.jsonl"
    assert main(["annotate", "export", "--db", str(database), "--out", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen"], r["votes"], r["notes"]) for r in written] == [
        (rows[0]["chosen"], 2, [{"annotator": "alice", "note": "clearly better"}]), (rows[1]["chosen"], 2, [])]
