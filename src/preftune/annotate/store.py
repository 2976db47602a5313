"""Where annotations live: one SQLite database (WAL mode) through Python's ``sqlite3``.

Tables: ``items`` (what is compared, :class:`preftune.annotate.items.Item`), ``assignments`` (which item was
shown to which annotator, and which side — ``a`` or ``b`` — was on the left: drawn at random when the item is
first shown, kept for that annotator, so the order is recorded and position bias can be measured) and
``votes`` (one per item and annotator: the ``choice`` as clicked — left, right, tie, both_bad — and the
``label`` it means — a, b, tie, both_bad —, an optional note, and the seconds between showing and voting).

Durability: every write is one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) that has committed before the
method returns, so the server acknowledges only votes that are on disk; ``synchronous=FULL`` makes the commit
survive a power cut too, not only a killed process. One connection serves all the server's threads behind a
lock (a vote costs one short transaction; annotators are people), and ``busy_timeout`` lets another process —
``preftune annotate export`` while the server runs — wait its turn; WAL lets readers read while it writes.

The database is a file path or a ``sqlite:///path`` URL. Only SQLite is implemented: the store is this one
class with a narrow interface (load items, next item, vote, progress, read items and votes), which a shared
server database (PostgreSQL) could implement later.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.annotate.items import TASKS, Item
from preftune.errors import ConfigError, DataError

SCHEMA_VERSION = "1"
CHOICES = ("left", "right", "tie", "both_bad")  # what the annotator clicked
LABELS = ("a", "b", "tie", "both_bad")  # what it means for the item
OPEN_SECONDS = 30 * 60  # an item shown to someone this recently, and not yet voted on, counts as taken

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL CHECK (task IN ('pairs', 'eval')),
    key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,              -- JSON: a string or a list of messages
    a TEXT NOT NULL,                   -- JSON: the file's chosen (pairs), the policy's completion (eval)
    b TEXT NOT NULL,                   -- JSON: the file's rejected (pairs), the reference's completion (eval)
    a_score REAL, b_score REAL, judge TEXT,
    source TEXT NOT NULL, line INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    served_at REAL NOT NULL,
    PRIMARY KEY (item_id, annotator)
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),
    label TEXT NOT NULL CHECK (label IN ('a', 'b', 'tie', 'both_bad')),
    note TEXT NOT NULL DEFAULT '',
    seconds REAL,
    created_at REAL NOT NULL,
    UNIQUE (item_id, annotator)
);
CREATE INDEX IF NOT EXISTS items_task ON items (task, id);
CREATE INDEX IF NOT EXISTS votes_annotator ON votes (annotator, item_id);
"""


class Refused(Exception):
    """A request the store turns down; ``status`` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class LoadReport:
    """What :meth:`AnnotationStore.add_items` did with a file's items."""

    source: str
    task: str
    read: int = 0
    added: int = 0
    already: int = 0  # the same comparison was loaded before, or appears twice in the file: kept once

    def __str__(self) -> str:
        return (f"{self.source}: {self.read} {self.task} rows → {self.added} new items"
                + (f", {self.already} already in the database (same prompt and responses), kept once"
                   if self.already else ""))


def database_path(db: str | Path) -> Path:
    """The SQLite file of ``db``: a path or ``sqlite:///path``; any other URL is a :class:`ConfigError`."""
    text = str(db)
    if text.startswith("sqlite:///"):
        return Path(text.removeprefix("sqlite:///"))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(f"--db {scheme}://…: only SQLite databases are supported (a file path or "
                          "sqlite:///path); one server with a SQLite file serves many annotators at once")
    return Path(text)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class AnnotationStore:
    """The annotation database (see the module docstring). Safe to share between threads."""

    def __init__(self, db: str | Path, *, create: bool = True):
        self.path = database_path(db)
        if not create and not self.path.is_file():
            raise DataError(str(self.path), None, None, "no such annotation database; give the --db that "
                            "`preftune annotate serve` used")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=30000")
            version = self._init_schema()
        except sqlite3.DatabaseError as e:
            raise DataError(str(self.path), None, None, f"not a usable SQLite database ({e})") from e
        if mode.lower() != "wal":
            raise ConfigError(f"{self.path}: SQLite cannot use WAL mode there (journal mode {mode}); put the "
                              "database on a local disk")
        if version != SCHEMA_VERSION:
            raise DataError(str(self.path), None, None, f"annotation schema version {version}, this preftune "
                            f"reads version {SCHEMA_VERSION}")

    def _init_schema(self) -> str:
        with self._transaction() as conn:
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            return conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (on disk) when the block ends, rolled back if it raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    # ------------------------------------------------------------------------------------ loading

    def add_items(self, items: Iterable[Item]) -> LoadReport:
        """Insert items not yet present (by :attr:`Item.key`); one transaction for the whole file."""
        items = list(items)
        report = LoadReport(source=items[0].source if items else "", task=items[0].task if items else "")
        now = time.time()
        with self._transaction() as conn:
            for item in items:
                report.read += 1
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO items (task, key, prompt, a, b, a_score, b_score, judge, source, line, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.task, item.key, json.dumps(item.prompt, ensure_ascii=False),
                     json.dumps(item.a, ensure_ascii=False), json.dumps(item.b, ensure_ascii=False),
                     item.a_score, item.b_score, item.judge, item.source, item.line, now))
                report.added += cursor.rowcount
        report.already = report.read - report.added
        return report

    # ------------------------------------------------------------------------------------ annotating

    def next_item(self, task: str, annotator: str, votes_per_item: int = 1, *, now: float | None = None
                  ) -> dict | None:
        """The item to show ``annotator`` next, ``{"id", "prompt", "left", "right"}``, or None when none is left.

        An item shown to them and not yet voted on comes back first, with the same sides. Otherwise: an item they
        have not seen, with fewer than ``votes_per_item`` votes, the least covered first (votes plus others'
        open assignments, so that concurrent annotators spread out), then in file order; its left side is drawn
        at random (a fair coin) and recorded. Responses only: never scores, judge, or which side is which.
        """
        _check_task(task)
        now = time.time() if now is None else now
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT s.item_id FROM assignments s JOIN items i ON i.id = s.item_id "
                "WHERE i.task = ? AND s.annotator = ? AND NOT EXISTS "
                "(SELECT 1 FROM votes v WHERE v.item_id = s.item_id AND v.annotator = s.annotator) "
                "ORDER BY s.served_at, s.item_id LIMIT 1", (task, annotator)).fetchone()
            if row is None:  # nothing open: pick one
                found = conn.execute(
                    f"SELECT i.id FROM items i WHERE {_ELIGIBLE} ORDER BY "
                    "(SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id) + "
                    "(SELECT COUNT(*) FROM assignments s WHERE s.item_id = i.id AND s.served_at > ? AND NOT EXISTS "
                    " (SELECT 1 FROM votes v WHERE v.item_id = s.item_id AND v.annotator = s.annotator)), i.id "
                    "LIMIT 1", (task, annotator, annotator, votes_per_item, now - OPEN_SECONDS)).fetchone()
                if found is None:
                    return None
                row = (found[0],)
            return self._show(conn, row[0], annotator, now)

    def show(self, item_id: int, annotator: str, *, now: float | None = None) -> dict:
        """Show a given item to ``annotator`` (as :meth:`next_item` does with the one it picks): its sides are
        drawn at random and recorded the first time, and kept after."""
        with self._transaction() as conn:
            return self._show(conn, item_id, annotator, time.time() if now is None else now)

    @staticmethod
    def _show(conn: sqlite3.Connection, item_id: int, annotator: str, now: float) -> dict:
        found = conn.execute("SELECT prompt, a, b FROM items WHERE id = ?", (item_id,)).fetchone()
        if found is None:
            raise Refused(404, f"no item {item_id}")
        conn.execute("INSERT OR IGNORE INTO assignments (item_id, annotator, left_side, served_at) VALUES (?, ?, ?, ?)",
                     (item_id, annotator, "a" if secrets.randbelow(2) == 0 else "b", now))
        left_side = conn.execute("SELECT left_side FROM assignments WHERE item_id = ? AND annotator = ?",
                                 (item_id, annotator)).fetchone()[0]
        prompt, a, b = found
        left, right = (a, b) if left_side == "a" else (b, a)
        return {"id": item_id, "prompt": _loads(prompt), "left": _loads(left), "right": _loads(right)}

    def vote(self, item_id: int, annotator: str, choice: str, note: str = "", *, now: float | None = None) -> dict:
        """Record ``annotator``'s ``choice`` on an item shown to them; returns ``{"recorded", "label"}``.

        The label is read off the recorded sides: ``left`` means the response that was on the left. Voting the
        same choice again (a retried request) records nothing and answers ``recorded: False``; another choice
        on an item already voted on is refused (409): the first vote stands.
        """
        if choice not in CHOICES:
            raise Refused(400, f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        now = time.time() if now is None else now
        with self._transaction() as conn:
            shown = conn.execute("SELECT left_side, served_at FROM assignments WHERE item_id = ? AND annotator = ?",
                                 (item_id, annotator)).fetchone()
            if shown is None:
                raise Refused(409, f"item {item_id} was not shown to {annotator!r}; ask for the next item first")
            left_side, served_at = shown
            earlier = conn.execute("SELECT choice FROM votes WHERE item_id = ? AND annotator = ?",
                                   (item_id, annotator)).fetchone()
            label = _label(choice, left_side)
            if earlier is not None:
                if earlier[0] == choice:
                    return {"recorded": False, "label": label}
                raise Refused(409, f"{annotator!r} already voted {earlier[0]!r} on item {item_id}; the first vote "
                              "stands")
            conn.execute("INSERT INTO votes (item_id, annotator, left_side, choice, label, note, seconds, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (item_id, annotator, left_side, choice, label, note, max(now - served_at, 0.0), now))
        return {"recorded": True, "label": label}

    def progress(self, task: str, annotator: str, votes_per_item: int = 1) -> dict:
        """``{"done", "left", "items", "complete", "votes", "annotators", "votes_per_item"}``: ``done`` votes by
        ``annotator``, items ``left`` for them, and for the task as a whole its items, those with at least
        ``votes_per_item`` votes, all votes and the number of annotators."""
        _check_task(task)
        with self._read() as conn:
            done = conn.execute("SELECT COUNT(*) FROM votes v JOIN items i ON i.id = v.item_id WHERE i.task = ? "
                                "AND v.annotator = ?", (task, annotator)).fetchone()[0]
            fresh = conn.execute(f"SELECT COUNT(*) FROM items i WHERE {_ELIGIBLE}",
                                 (task, annotator, annotator, votes_per_item)).fetchone()[0]
            pending = conn.execute(
                "SELECT COUNT(*) FROM assignments s JOIN items i ON i.id = s.item_id WHERE i.task = ? AND "
                "s.annotator = ? AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = s.item_id AND "
                "v.annotator = s.annotator)", (task, annotator)).fetchone()[0]
            items, complete, votes, annotators = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(n >= ?), 0), COALESCE(SUM(n), 0), "
                "(SELECT COUNT(DISTINCT v.annotator) FROM votes v JOIN items j ON j.id = v.item_id WHERE j.task = ?) "
                "FROM (SELECT (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id) AS n FROM items i "
                "WHERE i.task = ?)", (votes_per_item, task, task)).fetchone()
        return {"done": done, "left": fresh + pending, "items": items, "complete": complete, "votes": votes,
                "annotators": annotators, "votes_per_item": votes_per_item}

    # ------------------------------------------------------------------------------------ reading back

    def count_items(self) -> dict[str, int]:
        """Items per task."""
        with self._read() as conn:
            counts = dict(conn.execute("SELECT task, COUNT(*) FROM items GROUP BY task").fetchall())
        return {task: counts.get(task, 0) for task in TASKS}

    def items(self, task: str) -> list[dict]:
        """Every item of ``task`` in load order: ``id, prompt, a, b, a_score, b_score, judge, source, line``."""
        _check_task(task)
        with self._read() as conn:
            rows = conn.execute("SELECT id, prompt, a, b, a_score, b_score, judge, source, line FROM items "
                                "WHERE task = ? ORDER BY id", (task,)).fetchall()
        return [{"id": r[0], "prompt": _loads(r[1]), "a": _loads(r[2]), "b": _loads(r[3]), "a_score": r[4],
                 "b_score": r[5], "judge": r[6], "source": r[7], "line": r[8]} for r in rows]

    def votes(self, task: str) -> list[dict]:
        """Every vote on ``task``'s items in the order cast: ``item_id, annotator, left_side, choice, label,
        note, seconds, created_at``."""
        _check_task(task)
        with self._read() as conn:
            rows = conn.execute("SELECT v.item_id, v.annotator, v.left_side, v.choice, v.label, v.note, v.seconds, "
                                "v.created_at FROM votes v JOIN items i ON i.id = v.item_id WHERE i.task = ? "
                                "ORDER BY v.id", (task,)).fetchall()
        keys = ("item_id", "annotator", "left_side", "choice", "label", "note", "seconds", "created_at")
        return [dict(zip(keys, r)) for r in rows]


# Items of task ? that annotator ? has neither voted on nor been shown, with fewer than ? votes.
_ELIGIBLE = ("i.task = ? AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = i.id AND v.annotator = ?) "
             "AND NOT EXISTS (SELECT 1 FROM assignments s WHERE s.item_id = i.id AND s.annotator = ?) "
             "AND (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id) < ?")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise Refused(400, f"task must be one of {', '.join(TASKS)}, got {task!r}")


def _label(choice: str, left_side: str) -> str:
    """The label of a click: ``left``/``right`` → the side that was there; ``tie``/``both_bad`` unchanged."""
    if choice == "left":
        return left_side
    if choice == "right":
        return "b" if left_side == "a" else "a"
    return choice
