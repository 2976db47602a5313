"""What ``preftune annotate load | serve | export | report`` do, as functions over paths (the CLI only parses)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from preftune.annotate.guidelines import read_guidelines
from preftune.annotate.items import read_items
from preftune.annotate.results import annotation_report, export_preferences, format_report
from preftune.annotate.store import AnnotationStore, database_path, is_postgres
from preftune.errors import ConfigError

TOKEN_ENV = "PREFTUNE_ANNOTATE_TOKEN"
ADMIN_TOKEN_ENV = "PREFTUNE_ANNOTATE_ADMIN_TOKEN"


def load_files(store: AnnotationStore, pairs: Sequence[str] = (), samples: Sequence[str] = ()) -> list[str]:
    """Load pairs files and evaluation samples files (each read whole and checked before anything is stored);
    returns one line per file."""
    batches = [read_items(p, "pairs") for p in pairs] + [read_items(s, "eval") for s in samples]
    return [str(store.add_items(items)) for items in batches]


def load_command(db: str, pairs: Sequence[str] = (), samples: Sequence[str] = ()) -> str:
    if not pairs and not samples:
        raise ConfigError("give files to load: --pairs FILE (as `preftune pairs` writes) and/or --samples FILE "
                          "(as `preftune eval --samples-out` writes)")
    with AnnotationStore(db) as store:
        lines = load_files(store, pairs, samples)
        counts = store.count_items()
    return "\n".join([*lines, f"{store.name}: {counts['pairs']} pairs items, {counts['eval']} evaluation items"])


def serve_command(db: str, pairs: Sequence[str] = (), samples: Sequence[str] = (), host: str = "127.0.0.1",
                  port: int = 8765, token: str | None = None, votes_per_item: int = 1, admin_token: str | None = None,
                  guidelines: str | None = None) -> None:
    """Read the guidelines (if any) and load the given files, then serve until interrupted."""
    from preftune.annotate.server import serve

    blocks = read_guidelines(guidelines) if guidelines else None  # before the database: a wrong file changes nothing
    with AnnotationStore(db) as store:
        for line in load_files(store, pairs, samples):
            print(line, flush=True)
        counts = store.count_items()
        print(f"{store.name}: {counts['pairs']} pairs items, {counts['eval']} evaluation items; {votes_per_item} "
              "vote(s) wanted per item", flush=True)
        serve(store, host=host, port=port, token=token or os.environ.get(TOKEN_ENV) or None,
              admin_token=admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None, votes_per_item=votes_per_item,
              guidelines=blocks, announce=lambda line: print(line, flush=True))


def export_command(db: str, out: str, task: str = "pairs", source: str | None = None, overwrite: bool = False
                   ) -> str:
    check_export_target(db, out, overwrite)
    with AnnotationStore(db, create=False) as store:
        return str(export_preferences(store, out, task, source))


def check_export_target(db: str, out: str, overwrite: bool = False) -> None:
    """Refuse, before anything is read or written, an ``--out`` that is a folder, that is the annotation database
    (or one of SQLite's files beside it), or that exists (without ``overwrite``): each would lose a user's file."""
    target = Path(out).expanduser()
    if target.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the JSON Lines file to write (e.g. "
                          f"{Path(out) / 'preferences.jsonl'})")
    if not is_postgres(db):
        database = database_path(db).expanduser().resolve()
        beside = {database, *(database.with_name(database.name + end) for end in ("-wal", "-shm", "-journal"))}
        if target.resolve() in beside:
            raise ConfigError(f"--out {out} is the annotation database (--db {db}); exporting there would replace "
                              "every vote with the exported rows: give another --out")
    if target.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it, or give another --out")


def report_command(db: str, out: str | None = None) -> str:
    with AnnotationStore(db, create=False) as store:
        report = annotation_report(store)
    if out:
        Path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return format_report(report)
