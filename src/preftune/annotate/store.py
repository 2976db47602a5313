"""Where annotations live: a SQLite file (WAL mode, the default) or a shared PostgreSQL database.

Tables: ``items`` (what is compared, :class:`preftune.annotate.items.Item`), ``assignments`` (which item was
shown to which annotator, and which side — ``a`` or ``b`` — was on the left: drawn at random when the item is
first shown, kept for that annotator, so the order is recorded and position bias can be measured) and
``votes`` (one per item and annotator: the ``choice`` as clicked — left, right, tie, both_bad — and the
``label`` it means — a, b, tie, both_bad —, an optional note, the seconds between showing and voting, and the
page ``session`` that cast it). Two logs keep what a team changes its mind about, never erased: ``retractions``
(a vote its annotator undid — :meth:`AnnotationStore.undo` moves the row there, so ``votes`` holds only live
votes and every count, export and report reads live votes alone) and ``skips`` (an item an annotator put back —
:meth:`AnnotationStore.skip` moves their assignment there: the item goes to others first and comes back to them
last).

Durability: every write is one transaction that has committed before the method returns, so the server
acknowledges only votes that are on disk. One connection serves all the server's threads behind a lock (a vote
costs one short transaction; annotators are people), and write transactions are serialised across processes too
— ``preftune annotate export`` while the server runs, or several servers on one shared database — so the
read-then-write of :meth:`AnnotationStore.next_item` and :meth:`AnnotationStore.vote` never races. The two
backends differ only in a :class:`_Dialect` (connecting, placeholders, id columns, how a write transaction
starts); every query and rule is written once:

* **SQLite** (a file path or ``sqlite:///path``): ``BEGIN IMMEDIATE`` takes the write lock, ``busy_timeout``
  lets another process wait its turn, WAL lets readers read while it writes, ``synchronous=FULL`` makes the
  commit survive a power cut too, not only a killed process.
* **PostgreSQL** (``postgresql://user@host:port/dbname`` or ``postgres://…``, through psycopg 3, the
  ``annotate-postgres`` extra): a write transaction first takes a transaction-level advisory lock
  (``pg_advisory_xact_lock``), the same one-writer-at-a-time rule as SQLite's; ``synchronous_commit=on`` for
  the session, so a commit has reached the server's write-ahead log before it returns. The tables live in the
  connection's schema (``public`` unless the URL's ``options=-csearch_path=…`` says otherwise).
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from preftune.annotate.items import FIELDS, TASKS, Item
from preftune.errors import ConfigError, DataError

SCHEMA_VERSION = "1"
CHOICES = ("left", "right", "tie", "both_bad")  # what the annotator clicked
LABELS = ("a", "b", "tie", "both_bad")  # what it means for the item
OPEN_SECONDS = 30 * 60  # an item shown to someone this recently, and not yet voted on, counts as taken

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id {id},
    task TEXT NOT NULL CHECK (task IN ('pairs', 'eval')),
    key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,              -- JSON: a string or a list of messages
    a TEXT NOT NULL,                   -- JSON: the file's chosen (pairs), the policy's completion (eval)
    b TEXT NOT NULL,                   -- JSON: the file's rejected (pairs), the reference's completion (eval)
    a_score {real}, b_score {real}, judge TEXT,
    source TEXT NOT NULL, line INTEGER NOT NULL,
    created_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    served_at {real} NOT NULL,
    PRIMARY KEY (item_id, annotator)
);
CREATE TABLE IF NOT EXISTS votes (
    id {id},
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),
    label TEXT NOT NULL CHECK (label IN ('a', 'b', 'tie', 'both_bad')),
    note TEXT NOT NULL DEFAULT '',
    seconds {real},
    created_at {real} NOT NULL,
    session TEXT NOT NULL DEFAULT '',  -- the page's session id ('' when cast outside the page)
    UNIQUE (item_id, annotator)
);
CREATE TABLE IF NOT EXISTS retractions (
    id {id},
    vote_id INTEGER NOT NULL,          -- the id it had in votes
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    left_side TEXT NOT NULL,
    choice TEXT NOT NULL,
    label TEXT NOT NULL,
    note TEXT NOT NULL,
    seconds {real},
    created_at {real} NOT NULL,
    session TEXT NOT NULL,
    retracted_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS skips (
    id {id},
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    left_side TEXT NOT NULL,           -- the side shown on the left when it was skipped
    served_at {real} NOT NULL,
    session TEXT NOT NULL,
    created_at {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS items_task ON items (task, id);
CREATE INDEX IF NOT EXISTS skips_item ON skips (item_id, annotator);
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


POSTGRES_SCHEMES = ("postgresql", "postgres")
POSTGRES_LOCK = 0x7072_6566_7475_6E65  # the advisory lock of write transactions: "preftune" in ASCII


def database_path(db: str | Path) -> Path:
    """The SQLite file of ``db``: a path or ``sqlite:///path``; a URL of another database than PostgreSQL is a
    :class:`ConfigError`."""
    text = str(db)
    if text.startswith("sqlite:///"):
        return Path(text.removeprefix("sqlite:///"))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(f"--db {scheme}://…: not a supported database; give a SQLite file (a path or "
                          "sqlite:///path) or a PostgreSQL URL (postgresql://user@host:port/dbname)")
    return Path(text)


def is_postgres(db: str | Path) -> bool:
    """Whether ``db`` is a PostgreSQL URL (``postgresql://…`` or ``postgres://…``)."""
    scheme, sep, _ = str(db).partition("://")
    return bool(sep) and scheme.lower() in POSTGRES_SCHEMES


def shown_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: safe to print and to write into reports."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class _Dialect:
    """What SQLite and PostgreSQL do differently; the queries are written once, with ``?`` placeholders."""

    name: str  # the database as shown in messages and reports (a path, or a URL without its password)
    id_column: str  # an integer primary key the database numbers 1, 2, … in insertion order
    real_column: str  # a 64-bit float (PostgreSQL's REAL has 24 bits: seconds since 1970 would lose minutes)
    begin: Sequence[str]  # the statements that open a write transaction and make it the only one
    errors: tuple[type[BaseException], ...]  # the driver's errors

    def connect(self, create: bool) -> Any:
        raise NotImplementedError

    def sql(self, query: str) -> str:
        return query

    def has_tables(self, conn: _Connection) -> bool:
        raise NotImplementedError

    def columns(self, conn: _Connection, table: str) -> set[str]:
        raise NotImplementedError


class _SQLite(_Dialect):
    id_column = "INTEGER PRIMARY KEY"
    real_column = "REAL"
    begin = ("BEGIN IMMEDIATE",)  # takes the write lock now, not at the first write: no upgrade deadlock
    errors = (sqlite3.DatabaseError,)

    def __init__(self, db: str | Path):
        self.path = database_path(db).expanduser()
        self.name = str(self.path)
        if self.path.is_dir():
            raise ConfigError(f"--db {db} is a folder; give the annotation database's file (e.g. "
                              f"{self.path / 'annotations.sqlite'})")

    def connect(self, create: bool) -> sqlite3.Connection:
        if not create and not self.path.is_file():
            raise DataError(self.name, None, None, "no such annotation database; give the --db that "
                            "`preftune annotate serve` used")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise DataError(self.name, None, None, f"not a usable SQLite database ({e})") from e
        if mode.lower() != "wal":
            conn.close()
            raise ConfigError(f"{self.name}: SQLite cannot use WAL mode there (journal mode {mode}); put the "
                              "database on a local disk")
        return conn

    def has_tables(self, conn: _Connection) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is not None

    def columns(self, conn: _Connection, table: str) -> set[str]:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}


class _Postgres(_Dialect):
    id_column = "INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    real_column = "DOUBLE PRECISION"
    begin = ("BEGIN", f"SELECT pg_advisory_xact_lock({POSTGRES_LOCK})")  # released by COMMIT or ROLLBACK

    def __init__(self, url: str):
        self.url, self.name = url, shown_url(url)
        try:
            import psycopg
        except ImportError as e:
            raise ConfigError(f"--db {self.name}: PostgreSQL needs psycopg 3: pip install "
                              "'preftune[annotate-postgres]' (or 'psycopg[binary]')") from e
        self._psycopg = psycopg
        self.errors = (psycopg.Error,)

    def connect(self, create: bool) -> Any:
        try:
            # autocommit: the driver opens no transaction of its own; ours are the explicit BEGIN … COMMIT.
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=15)
            conn.execute("SET synchronous_commit = on")  # a commit returns once it is in the write-ahead log
            conn.execute("SET lock_timeout = '30s'")  # as SQLite's busy_timeout: wait for another writer, not forever
        except self._psycopg.Error as e:
            raise ConfigError(f"--db {self.name}: cannot use this PostgreSQL database ({str(e).strip()})") from e
        return conn

    def sql(self, query: str) -> str:
        return query.replace("?", "%s")  # psycopg's placeholder; no query here holds a literal ? or %

    def has_tables(self, conn: _Connection) -> bool:
        return conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0]

    def columns(self, conn: _Connection, table: str) -> set[str]:
        return {row[0] for row in conn.execute("SELECT column_name FROM information_schema.columns WHERE "
                                               "table_schema = current_schema() AND table_name = ?", (table,))}


class _Connection:
    """The driver's connection, speaking the dialect: ``execute(query, params)`` with ``?`` placeholders."""

    def __init__(self, dialect: _Dialect, raw: Any):
        self.dialect, self.raw = dialect, raw

    def execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(self.dialect.sql(query), tuple(params))


class AnnotationStore:
    """The annotation database (see the module docstring). Safe to share between threads.

    ``db`` is a SQLite file (a path or ``sqlite:///path``) or a PostgreSQL URL (``postgresql://`` or
    ``postgres://``); :attr:`name` shows it (without a password). ``create=False`` (export, report) refuses a
    database that holds no annotation tables."""

    def __init__(self, db: str | Path, *, create: bool = True):
        self._db: _Dialect = _Postgres(str(db)) if is_postgres(db) else _SQLite(db)
        self.name = self._db.name
        self._lock = threading.Lock()
        self._conn = _Connection(self._db, self._db.connect(create))
        try:
            if not create and not self._db.has_tables(self._conn):
                raise DataError(self.name, None, None, "holds no annotations; give the --db that "
                                "`preftune annotate serve` used")
            version = self._init_schema()
            if version != SCHEMA_VERSION:
                raise DataError(self.name, None, None, f"annotation schema version {version}, this preftune "
                                f"reads version {SCHEMA_VERSION}")
        except self._db.errors as e:
            self._conn.raw.close()
            raise DataError(self.name, None, None, f"not a usable annotation database ({e})") from e
        except BaseException:
            self._conn.raw.close()
            raise

    def _init_schema(self) -> str:
        schema = SCHEMA.format(id=self._db.id_column, real=self._db.real_column)
        with self._transaction() as conn:
            for statement in filter(str.strip, schema.split(";")):
                conn.execute(statement)
            if "session" not in self._db.columns(conn, "votes"):  # a database from before undo: votes of no session
                conn.execute("ALTER TABLE votes ADD COLUMN session TEXT NOT NULL DEFAULT ''")
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?) ON CONFLICT DO NOTHING",
                         (SCHEMA_VERSION,))
            return conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.raw.close()

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[_Connection]:
        """One write transaction, the only one in the database while it runs, committed (on disk) when the
        block ends, rolled back if it raises."""
        with self._lock:
            self._conn.execute(self._db.begin[0])
            try:
                for statement in self._db.begin[1:]:  # PostgreSQL's lock, inside the transaction it lasts for
                    self._conn.execute(statement)
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[_Connection]:
        with self._lock:
            yield self._conn

    # ------------------------------------------------------------------------------------ loading

    def add_items(self, items: Iterable[Item]) -> LoadReport:
        """Insert items not yet present (by :attr:`Item.key`); one transaction for the whole file."""
        items = list(items)
        for item in items:  # before the transaction: a bad row leaves the database as it was
            _check_encodable(item)
        report = LoadReport(source=items[0].source if items else "", task=items[0].task if items else "")
        now = time.time()
        with self._transaction() as conn:
            for item in items:
                report.read += 1
                cursor = conn.execute(
                    "INSERT INTO items (task, key, prompt, a, b, a_score, b_score, judge, source, line, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
        open assignments, so that concurrent annotators spread out), then in file order — but the items they
        skipped last of all; its left side is drawn at random (a fair coin) and recorded. Responses only: never
        scores, judge, or which side is which.
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
                    "(SELECT COUNT(*) FROM skips k WHERE k.item_id = i.id AND k.annotator = ?), "
                    "(SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id) + "
                    "(SELECT COUNT(*) FROM assignments s WHERE s.item_id = i.id AND s.served_at > ? AND NOT EXISTS "
                    " (SELECT 1 FROM votes v WHERE v.item_id = s.item_id AND v.annotator = s.annotator)), i.id "
                    "LIMIT 1", (task, annotator, annotator, votes_per_item, annotator, now - OPEN_SECONDS)).fetchone()
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
    def _show(conn: _Connection, item_id: int, annotator: str, now: float) -> dict:
        found = conn.execute("SELECT prompt, a, b FROM items WHERE id = ?", (item_id,)).fetchone()
        if found is None:
            raise Refused(404, f"no item {item_id}")
        conn.execute("INSERT INTO assignments (item_id, annotator, left_side, served_at) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT DO NOTHING", (item_id, annotator, "a" if secrets.randbelow(2) == 0 else "b", now))
        left_side = conn.execute("SELECT left_side FROM assignments WHERE item_id = ? AND annotator = ?",
                                 (item_id, annotator)).fetchone()[0]
        prompt, a, b = found
        left, right = (a, b) if left_side == "a" else (b, a)
        return {"id": item_id, "prompt": _loads(prompt), "left": _loads(left), "right": _loads(right)}

    def vote(self, item_id: int, annotator: str, choice: str, note: str = "", *, session: str = "",
             now: float | None = None) -> dict:
        """Record ``annotator``'s ``choice`` on an item shown to them; returns ``{"recorded", "label"}``.

        The label is read off the recorded sides: ``left`` means the response that was on the left. Voting the
        same choice again (a retried request) records nothing and answers ``recorded: False``; another choice
        on an item already voted on is refused (409): the first vote stands.
        """
        if choice not in CHOICES:
            raise Refused(400, f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        now = time.time() if now is None else now
        with self._transaction() as conn:
            shown = _shown(conn, item_id, annotator)
            left_side, served_at = shown
            earlier = conn.execute("SELECT choice FROM votes WHERE item_id = ? AND annotator = ?",
                                   (item_id, annotator)).fetchone()
            label = _label(choice, left_side)
            if earlier is not None:
                if earlier[0] == choice:
                    return {"recorded": False, "label": label}
                raise Refused(409, f"{annotator!r} already voted {earlier[0]!r} on item {item_id}; the first vote "
                              "stands")
            conn.execute("INSERT INTO votes (item_id, annotator, left_side, choice, label, note, seconds, created_at, "
                         "session) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (item_id, annotator, left_side, choice, label, note, max(now - served_at, 0.0), now, session))
        return {"recorded": True, "label": label}

    def undo(self, task: str, annotator: str, session: str, *, now: float | None = None) -> dict:
        """Retract ``annotator``'s last vote on ``task`` if ``session`` cast it; returns the item shown again (same
        sides) with the vote's ``choice`` and ``note``: ``{"item": {id, prompt, left, right}, "choice", "note"}``.

        Only the last one (an earlier vote stands once another follows it), and only from the page session that
        cast it (not another tab, another person under the same name, or a vote from before a reload): else 409.
        The vote moves to ``retractions`` with the time of the undo; its item is open for them again, shown anew.
        """
        _check_task(task)
        if not session:
            raise Refused(400, "an undo needs the page's session id")
        now = time.time() if now is None else now
        with self._transaction() as conn:
            last = conn.execute(
                "SELECT v.id, v.item_id, v.left_side, v.choice, v.label, v.note, v.seconds, v.created_at, v.session "
                "FROM votes v JOIN items i ON i.id = v.item_id WHERE i.task = ? AND v.annotator = ? "
                "ORDER BY v.id DESC LIMIT 1", (task, annotator)).fetchone()
            if last is None:
                raise Refused(409, f"{annotator!r} has no vote on {task} items to undo")
            vote_id, item_id, left_side, choice, label, note, seconds, created_at, cast_in = last
            if cast_in != session:
                raise Refused(409, f"{annotator!r}'s last vote (item {item_id}) was cast in another session (another "
                              "tab, or before the page was reloaded); only a vote from this page can be undone")
            conn.execute("INSERT INTO retractions (vote_id, item_id, annotator, left_side, choice, label, note, "
                         "seconds, created_at, session, retracted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (vote_id, item_id, annotator, left_side, choice, label, note, seconds, created_at, session,
                          now))
            conn.execute("DELETE FROM votes WHERE id = ?", (vote_id,))
            conn.execute("UPDATE assignments SET served_at = ? WHERE item_id = ? AND annotator = ?",
                         (now, item_id, annotator))  # shown again now: a new vote's seconds count from here
            item = self._show(conn, item_id, annotator, now)
        return {"item": item, "choice": choice, "note": note}

    def skip(self, item_id: int, annotator: str, session: str = "", *, now: float | None = None) -> None:
        """Put back an item shown to ``annotator`` and not voted on: the skip is logged (``skips``, with the side
        that was on the left), the item is open to others at once and comes back to them after every other item.
        """
        now = time.time() if now is None else now
        with self._transaction() as conn:
            shown = _shown(conn, item_id, annotator)
            if conn.execute("SELECT 1 FROM votes WHERE item_id = ? AND annotator = ?",
                            (item_id, annotator)).fetchone() is not None:
                raise Refused(409, f"{annotator!r} already voted on item {item_id}; undo the vote to change it")
            conn.execute("INSERT INTO skips (item_id, annotator, left_side, served_at, session, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (item_id, annotator, shown[0], shown[1], session, now))
            conn.execute("DELETE FROM assignments WHERE item_id = ? AND annotator = ?", (item_id, annotator))

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
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN n >= ? THEN 1 ELSE 0 END), 0), COALESCE(SUM(n), 0), "
                "(SELECT COUNT(DISTINCT v.annotator) FROM votes v JOIN items j ON j.id = v.item_id WHERE j.task = ?) "
                "FROM (SELECT (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id) AS n FROM items i "
                "WHERE i.task = ?) AS counted", (votes_per_item, task, task)).fetchone()
        # int(): PostgreSQL's SUM of counts is a NUMERIC, which the driver reads as a Decimal.
        return {"done": done, "left": fresh + pending, "items": items, "complete": int(complete), "votes": int(votes),
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

    def changes(self, task: str) -> dict[str, dict[str, int]]:
        """Per annotator, how often they changed course on ``task``'s items: ``{name: {"retracted", "skipped"}}``
        (undone votes and skips, from their logs)."""
        _check_task(task)
        found: dict[str, dict[str, int]] = {}
        with self._read() as conn:
            for table, key in (("retractions", "retracted"), ("skips", "skipped")):
                for name, n in conn.execute(f"SELECT t.annotator, COUNT(*) FROM {table} t JOIN items i ON "
                                            "i.id = t.item_id WHERE i.task = ? GROUP BY t.annotator", (task,)):
                    found.setdefault(name, {"retracted": 0, "skipped": 0})[key] = n
        return found


# Items of task ? that annotator ? has neither voted on nor been shown, with fewer than ? votes.
_ELIGIBLE = ("i.task = ? AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = i.id AND v.annotator = ?) "
             "AND NOT EXISTS (SELECT 1 FROM assignments s WHERE s.item_id = i.id AND s.annotator = ?) "
             "AND (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id) < ?")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _shown(conn: _Connection, item_id: int, annotator: str) -> tuple:
    """``(left_side, served_at)`` of the item as it was shown to ``annotator``; 409 when it never was."""
    shown = conn.execute("SELECT left_side, served_at FROM assignments WHERE item_id = ? AND annotator = ?",
                         (item_id, annotator)).fetchone()
    if shown is None:
        raise Refused(409, f"item {item_id} was not shown to {annotator!r}; ask for the next item first")
    return shown


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a code point U+D800–U+DFFF: JSON's ``\\ud800`` escapes give them, but they are not
    text, UTF-8 cannot encode them and no database stores them."""
    return _SURROGATE.search(text) is not None


def _check_encodable(item: Item) -> None:
    """Refuse an item whose text holds a lone surrogate, naming its file, line and field."""
    prompt_f, a_f, b_f, *_ = FIELDS[item.task]
    for field, value in ((prompt_f, item.prompt), (a_f, item.a), (b_f, item.b), ("judge", item.judge)):
        if value is not None and has_lone_surrogate(json.dumps(value, ensure_ascii=False)):
            raise DataError(f"{item.source}, line {item.line}, field '{field}': holds a lone UTF-16 surrogate "
                            "(an escape \\ud800–\\udfff that is not part of a pair), which is not text; fix the "
                            "file's text (it must be valid UTF-8 once decoded)")


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
