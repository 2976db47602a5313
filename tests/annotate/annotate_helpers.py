"""Helpers of the annotation tests: a real annotation server (``preftune annotate serve`` in its own process on a
free loopback port) and a small HTTP client that speaks to it as the page does (token, Origin, JSON)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
URL_LINE = re.compile(r"annotating at (http://127\.0\.0\.1:(\d+))/#token=(\S+)")
OVERVIEW_LINE = re.compile(r"overview at http://127\.0\.0\.1:\d+/overview#token=(\S+)")


def python_path() -> str:
    """This checkout's ``src`` first, then whatever PYTHONPATH held."""
    return os.pathsep.join(p for p in [SRC, *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p)


def query(db: str | Path, sql: str) -> list[tuple]:
    """``sql``'s rows as a fresh connection of the database's own driver reads them (not through the store)."""
    if str(db).startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(str(db)) as conn:
            return conn.execute(sql).fetchall()
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def text_pairs(n: int) -> list[dict]:
    """``n`` text pairs as ``preftune pairs`` writes them (the chosen one scored higher)."""
    return [{"prompt": f"Review {i}: the film was", "chosen": f" wonderful, number {i}.", "rejected": f" dull {i}.",
             "score_chosen": 0.9, "score_rejected": 0.1} for i in range(n)]


@dataclass
class Client:
    """The page's requests, by hand: ``Authorization: Bearer``, a same-origin ``Origin``, JSON bodies."""

    host: str
    port: int
    token: str

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                token: bool = True, origin: bool = True) -> tuple[int, dict, dict]:
        """``(status, JSON body or {}, response headers)``."""
        sent = {}
        if token:
            sent["Authorization"] = f"Bearer {self.token}"
        if method == "POST":
            sent["Content-Type"] = "application/json"
            if origin:
                sent["Origin"] = self.origin
        sent.update(headers or {})
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            raw = response.read()
            found = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        payload = json.loads(raw) if found.get("content-type", "").startswith("application/json") else {}
        return response.status, payload, found

    def next(self, annotator: str, task: str = "pairs") -> dict:
        status, payload, _ = self.request("POST", "/api/next", {"task": task, "annotator": annotator})
        assert status == 200, payload
        return payload

    def vote(self, annotator: str, item: int, choice: str, task: str = "pairs", note: str = "") -> dict:
        status, payload, _ = self.request("POST", "/api/vote", {"task": task, "annotator": annotator, "item": item,
                                                                "choice": choice, "note": note})
        assert status == 200, payload
        return payload


@dataclass
class Server:
    process: subprocess.Popen
    client: Client
    db: Path | str
    output: list[str]
    admin_token: str = ""  # of the overview, from the line after the page's URL

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=20)


def start_server(db: Path | str, *args: str, env: dict | None = None) -> Server:
    """``preftune annotate serve --db db --port 0 *args``; waits for the URL line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "preftune.cli", "annotate", "serve", "--db", str(db), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {"PYTHONPATH": python_path()} | (env or {}))
    output = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line.rstrip("\n"))
        found = URL_LINE.search(line)
        if found:
            admin = process.stdout.readline()
            output.append(admin.rstrip("\n"))
            admin_token = OVERVIEW_LINE.search(admin)
            return Server(process, Client("127.0.0.1", int(found.group(2)), found.group(3)), db, output,
                          admin_token.group(1) if admin_token else "")
    process.kill()
    raise AssertionError("the server did not start:\n" + "\n".join(output) + (process.stdout.read() or ""))
