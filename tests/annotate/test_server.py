"""The server, safe by default, run as a user runs it (``preftune annotate serve`` in its own process):
token and same-origin on every write, sizes limited, text never markup, loopback unless a token is given,
no vote lost to concurrent annotators or to a killed server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from annotate_helpers import python_path, query, text_pairs, write_jsonl

from preftune.annotate.server import MAX_BODY, MAX_NAME, MAX_NOTE, check_bind
from preftune.cli import main
from preftune.errors import ConfigError

STATIC = Path(__file__).resolve().parents[2] / "src" / "preftune" / "annotate" / "static"
TOKEN = "a-team-token-of-enough-length"


def votes_in(db: Path | str) -> list[tuple]:
    """The votes as a fresh connection reads them from the database."""
    return query(db, "SELECT item_id, annotator, choice FROM votes ORDER BY id")


def test_writes_need_the_token_and_the_same_origin(serve, tmp_path):
    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(3))),
                   env={"PREFTUNE_ANNOTATE_TOKEN": TOKEN})
    client = server.client
    assert client.token == TOKEN  # the token from the environment, in the printed URL
    item = client.next("x")["item"]
    vote = {"task": "pairs", "annotator": "x", "item": item["id"], "choice": "left"}
    refused = {
        "no token": client.request("POST", "/api/vote", vote, token=False),
        "wrong token": client.request("POST", "/api/vote", vote, headers={"Authorization": "Bearer " + "x" * 29}),
        "another site": client.request("POST", "/api/vote", vote, headers={"Origin": "http://evil.example"}),
        "another port": client.request("POST", "/api/vote", vote,
                                       headers={"Origin": f"http://127.0.0.1:{client.port + 1}"}),
        "opaque origin": client.request("POST", "/api/vote", vote, headers={"Origin": "null"}),
        "no origin": client.request("POST", "/api/vote", vote, origin=False),
        "a form's type": client.request("POST", "/api/vote", vote, headers={"Content-Type": "text/plain"}),
        "rebound host": client.request("POST", "/api/vote", vote, headers={"Host": f"evil.example:{client.port}",
                                                                            "Origin": f"http://evil.example:{client.port}"}),
    }
    assert {why: r[0] for why, r in refused.items()} == {
        "no token": 401, "wrong token": 401, "another site": 403, "another port": 403, "opaque origin": 403,
        "no origin": 403, "a form's type": 415, "rebound host": 400}
    assert refused["no token"][2]["www-authenticate"] == "Bearer"
    assert "cross-origin write refused" in refused["another site"][1]["error"]
    assert votes_in(server.db) == []  # nothing refused was written
    assert client.request("GET", "/api/status", token=False)[0] == 401  # reads need the token too
    status, payload, _ = client.request("POST", "/api/vote", vote, origin=False,
                                        headers={"Referer": f"{client.origin}/?task=pairs"})
    assert status == 200 and payload["recorded"] is True  # a same-origin Referer stands in for a missing Origin
    assert votes_in(server.db) == [(item["id"], "x", "left")]


def test_requests_and_fields_are_limited(serve, tmp_path):
    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(2))))
    client = server.client
    item = client.next("x")["item"]["id"]
    base = {"task": "pairs", "annotator": "x", "item": item, "choice": "tie"}

    def post(body, **kw):
        return client.request("POST", "/api/vote", body, **kw)[:2]

    assert post({**base, "note": "n" * (MAX_BODY + 1)})[0] == 413  # declared length over the limit
    chunks = (b'{"note": "' + b"n" * 4096 for _ in range(5))  # no Content-Length: counted as it arrives
    status, _ = post(chunks)  # http.client sends an iterable with Transfer-Encoding: chunked
    assert status == 413
    assert post({**base, "note": "n" * (MAX_NOTE + 1)}) == (400, {"error": f"field 'note' holds {MAX_NOTE + 1} "
                                                                    f"characters, at most {MAX_NOTE}"})
    assert post({**base, "annotator": "y" * (MAX_NAME + 1)})[0] == 400
    assert post({**base, "annotator": "x\u202e"})[1]["error"] == ("field 'annotator' must not hold control or format "
                                                                  "characters")
    assert post({**base, "choice": "<b>"})[0] == 400
    assert post({**base, "item": "1"})[1]["error"] == "field 'item' must be an integer"
    assert post({**base, "admin": True})[1]["error"].startswith("unknown fields ['admin']")
    assert post(b"{not json")[0] == 400
    assert votes_in(server.db) == []
    assert post({**base, "note": "  fine  "})[0] == 200
    assert query(server.db, "SELECT note FROM votes") == [("fine",)]


def test_text_is_never_markup(serve, tmp_path):
    attack = ' <script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & more'
    rows = [{"prompt": "<b>bold?</b>", "chosen": attack, "rejected": "plain"}]
    server = serve("--samples", str(write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "q", "policy": attack, "reference": "r", "policy_score": 1.0, "reference_score": 0.0,
         "judge": "gold"}])), "--pairs", str(write_jsonl(tmp_path / "p.jsonl", rows)))
    client = server.client
    status, page, headers = client.request("GET", "/", token=False)
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    conn_raw = client.request("POST", "/api/next", {"task": "pairs", "annotator": "x"})
    assert conn_raw[1]["item"]["left"] in (attack, "plain") and conn_raw[2]["content-type"] == "application/json"
    # The raw bytes hold no markup at all: < > & travel as \u003c \u003e \u0026.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    conn.request("POST", "/api/next", json.dumps({"task": "pairs", "annotator": "x"}),
                 {"Authorization": f"Bearer {client.token}", "Origin": client.origin,
                  "Content-Type": "application/json"})
    raw = conn.getresponse().read()
    assert b"<" not in raw and b">" not in raw and b"&" not in raw and b"\\u003cscript\\u003e" in raw
    # The page builds every text with textContent; nothing in its script parses HTML or code from strings.
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script
    assert script.count("textContent =") >= 5
    # A blind evaluation says nothing of which side is which: neither in the item nor in the vote's answer.
    item = client.next("x", task="eval")["item"]
    assert set(item) == {"id", "prompt", "left", "right"}
    answer = client.vote("x", item["id"], "left", task="eval")
    assert set(answer) == {"recorded", "progress"} and "gold" not in json.dumps(answer)


def test_only_loopback_without_a_token(tmp_path, capsys):
    assert check_bind("127.0.0.1", None) != check_bind("::1", None)  # a fresh random token each start
    assert len(check_bind("localhost", None)) >= 32
    assert check_bind("0.0.0.0", TOKEN) == TOKEN
    for host in ("0.0.0.0", "192.168.1.20", "annotate.example.org"):
        with pytest.raises(ConfigError, match="needs an access token"):
            check_bind(host, None)
    with pytest.raises(ConfigError, match="at least 16 characters"):
        check_bind("127.0.0.1", "short")
    pairs = write_jsonl(tmp_path / "p.jsonl", text_pairs(1))
    code = main(["annotate", "serve", "--db", str(tmp_path / "a.sqlite"), "--pairs", str(pairs), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and err.startswith("preftune: --host 0.0.0.0: serving beyond this machine")
    assert err.count("\n") == 1


def test_concurrent_annotators_lose_no_vote(serve, tmp_path, database):
    threads, items = 20, 25
    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(items))),
                   "--votes-per-item", str(threads), db=database)
    client = server.client
    acknowledged: Counter = Counter()
    failures: list[str] = []

    def annotate(name: str) -> None:
        try:
            for _ in range(items):
                item = client.next(name)["item"]
                if client.vote(name, item["id"], ("left", "right", "tie", "both_bad")[item["id"] % 4])["recorded"]:
                    acknowledged[name] += 1
            assert client.next(name)["item"] is None
        except Exception as e:  # noqa: BLE001 - reported below with the thread's name
            failures.append(f"{name}: {e!r}")

    workers = [threading.Thread(target=annotate, args=(f"annotator-{i}",)) for i in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    elapsed = time.perf_counter() - started
    assert not failures, failures
    rows = votes_in(server.db)
    assert sum(acknowledged.values()) == len(rows) == threads * items
    assert len(set((item, who) for item, who, _ in rows)) == threads * items  # each annotator once per item
    assert Counter(item for item, _, _ in rows) == {i: threads for i in range(1, items + 1)}
    assert all(choice == ("left", "right", "tie", "both_bad")[item % 4] for item, _, choice in rows)
    print(f"{len(rows)} votes from {threads} concurrent annotators in {elapsed:.1f} s")


def test_a_killed_server_keeps_every_acknowledged_vote(serve, tmp_path, database):
    db = database
    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(40))), db=db)
    sent = []
    for _ in range(30):
        item = server.client.next("x")["item"]
        assert server.client.vote("x", item["id"], "left")["recorded"] is True
        sent.append((item["id"], "x", "left"))
    server.process.send_signal(signal.SIGKILL)  # no shutdown, no flush, no checkpoint
    assert server.process.wait(timeout=10) == -signal.SIGKILL
    assert votes_in(db) == sent
    # And the server starts again on the same database, carrying on where it stopped.
    again = serve(db=db)
    assert again.client.next("x")["progress"]["done"] == 30


def test_the_cli_loads_no_web_stack_and_the_server_no_torch(tmp_path):
    """`preftune --help` imports neither the web stack nor torch; the annotation app, built, imports no torch."""
    pairs = write_jsonl(tmp_path / "p.jsonl", text_pairs(2))
    code = ("import sys, preftune.cli as c; c._parser(); "
            "heavy = ('torch', 'transformers', 'datasets', 'starlette', 'uvicorn'); "
            "print(sorted(m for m in heavy if m in sys.modules)); "
            "from preftune.annotate.commands import load_command; from preftune.annotate.server import create_app; "
            "from preftune.annotate.store import AnnotationStore; "
            f"load_command({str(tmp_path / 'a.sqlite')!r}, [{str(pairs)!r}]); "
            f"create_app(AnnotationStore({str(tmp_path / 'a.sqlite')!r}), token='t' * 16); import uvicorn; "
            "print(sorted(m for m in heavy if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": python_path()})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "['starlette', 'uvicorn']"]


def test_a_wrong_port_or_an_unknown_host_is_one_line(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", text_pairs(1))
    serve_args = ["annotate", "serve", "--db", str(tmp_path / "a.sqlite"), "--pairs", str(pairs)]
    assert main([*serve_args, "--port", "70000"]) == ConfigError.exit_code
    assert capsys.readouterr().err == ("preftune: --port 70000: a port is a number from 1 to 65535 (0 picks a free "
                                       "one); e.g. --port 8765\n")
    assert not (tmp_path / "a.sqlite").exists()  # refused before anything was loaded
    assert main([*serve_args, "--host", "no-such-host.invalid", "--token", TOKEN, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preftune: --host no-such-host.invalid: not an address of this machine (")
    assert err.endswith("give one of its addresses or names, e.g. --host 127.0.0.1 (this machine only) or --host "
                        "0.0.0.0 (every network interface)\n") and "--port" not in err


def test_lone_surrogates_and_huge_ids_are_refused_by_field(serve, tmp_path, capsys):
    rows = text_pairs(2)
    rows[1]["rejected"] = " broken \ud800 text"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes the escape \ud800
    assert main(["annotate", "load", "--db", str(tmp_path / "b.sqlite"), "--pairs", str(bad)]) == 3
    assert capsys.readouterr().err == (
        f"preftune: {bad}, line 2, field 'rejected': holds a lone UTF-16 surrogate (an escape \\ud800–\\udfff that is "
        "not part of a pair), which is not text; fix the file's text (it must be valid UTF-8 once decoded)\n")
    assert query(tmp_path / "b.sqlite", "SELECT COUNT(*) FROM items") == [(0,)]  # not even the good row

    server = serve("--pairs", str(write_jsonl(tmp_path / "p.jsonl", text_pairs(2))))
    client = server.client
    item = client.next("x")["item"]["id"]
    base = {"task": "pairs", "annotator": "x", "item": item, "choice": "left"}
    surrogate = "field '{}' holds a lone UTF-16 surrogate (\\ud800–\\udfff), which is not text; send UTF-8 text"
    for body, error in [
        ({"task": "pairs", "annotator": "x\ud800"}, surrogate.format("annotator")),
        ({**base, "note": "fine \udfff"}, surrogate.format("note")),
        ({**base, "item": 10**30}, "field 'item' must be an id from /api/next (0 to 9223372036854775807), got a "
                                   "number out of that range"),
    ]:
        path = "/api/next" if "item" not in body else "/api/vote"
        assert client.request("POST", path, body)[:2] == (400, {"error": error})
    assert votes_in(server.db) == []
    assert client.vote("x", item, "left")["recorded"] is True  # the server still answers
