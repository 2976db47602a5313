"""What can go wrong that the user can fix, one class per kind, each with its own exit code.

The CLI prints any :class:`PreftuneError` as one line, ``preftune: <what is wrong, where, what to do>``,
and exits with the class's ``exit_code``; anything else is a bug and keeps its traceback. Library users
catch the classes (``ConfigError`` and ``DataError`` are also ``ValueError`` s, as they always were).
This module imports nothing from preftune: every layer may raise these.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import io
import lzma
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PreftuneError(Exception):
    """A problem the user can fix; the message says what, where and what to do."""

    exit_code = 1


class ConfigError(PreftuneError, ValueError):
    """A config key, value or combination that cannot work (names the key, and the file when there is one)."""

    exit_code = 2


def config_error(keys: str | tuple[str, ...], message: str) -> ConfigError:
    """A ConfigError about ``keys``; ``preftune.config.load_config`` prefixes the file and line each key was read
    from."""
    err = ConfigError(message)
    err.config_keys = (keys,) if isinstance(keys, str) else tuple(keys)
    return err


Bound = tuple[float, bool]  # (value, inclusive)


@dataclass(frozen=True)
class Range:
    """The values a numeric config key accepts: above ``low`` (and below ``high``), each bound inclusive or not;
    ``hint`` says what the key means or what to give instead. None is not checked (the key's "unset")."""

    low: Bound | None
    high: Bound | None = None
    hint: str = ""

    def check(self, key: str, value: float | None) -> None:
        """Raise a ConfigError naming ``key`` when ``value`` lies outside the range (or is not finite)."""
        if value is not None and not self.holds(value):
            raise config_error(key, f"{key} must be {self.describe()}, got {value!r}{self.hint}")

    def holds(self, value: float) -> bool:
        low, high = self.low, self.high
        if not math.isfinite(value):
            return False
        if low is not None and (value < low[0] or (value == low[0] and not low[1])):
            return False
        return high is None or value < high[0] or (value == high[0] and high[1])

    def describe(self) -> str:
        low, high = self.low, self.high
        if high is None:
            return f"{'>=' if low[1] else '>'} {low[0]}"
        return f"in {'[' if low[1] else '('}{low[0]}, {high[0]}{']' if high[1] else ')'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = (0, False), (0, True), (1, True)

# Values echoed in error messages are cut to a few hundred characters: a 50 MB value makes no readable message.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 200, 200, 3, 8, 8


def shown(value: Any, quote: bool = True) -> str:
    """``repr(value)`` for an error message, at most a few hundred characters (long parts elided with ``...``);
    ``quote=False`` shows a string as it is (a path), cut the same way."""
    text = _SHOWN.repr(value) if quote or not isinstance(value, str) else value
    return text if len(text) <= 300 else text[:300] + "..."


class DataError(PreftuneError, ValueError):
    """Bad input data, named precisely: ``source, line N, field 'x': problem``.

    ``row`` is the 0-based row index in the source and ``field`` the column; both are None for
    problems of the whole dataset (unknown columns, unreadable file). The message names the row where the user
    can find it: by its line (1-based, as editors show) in a JSON Lines or CSV file (:func:`line_of_row`), by its
    0-based index elsewhere (``row 5 (0-based)``: a Hub dataset, Parquet, a list in memory).
    ``DataError("whole message")`` (no ``problem``) takes an already complete message.
    """

    exit_code = 3

    def __init__(
        self, source: str, row: int | None = None, field: str | None = None, problem: str | None = None
    ):
        self.source, self.row, self.field, self.problem = source, row, field, problem
        if problem is None:
            super().__init__(source)
            return
        where = [str(source)]
        if row is not None:
            line = line_of_row(source, row)
            where.append(f"line {line}" if line is not None else f"row {row} (0-based)")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}")

    def __reduce__(self):
        # Default exception pickling replays only the message; `datasets` workers (num_proc) pickle errors.
        return (type(self), (self.source, self.row, self.field, self.problem))


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def line_of_row(source: str, row: int) -> int | None:
    """The 1-based line where row ``row`` (0-based, as ``datasets`` reads the file) starts, for a JSON Lines, CSV or
    text (one prompt a line) file, also ``.gz``, ``.bz2``, ``.xz``; None for any other source, or a row the file
    does not hold.

    Blank lines are not rows (``datasets`` skips them), nor is a CSV's header line; a quoted CSV field may span lines.
    """
    try:
        path = Path(source).expanduser()
        if not path.is_file():
            return None
        stat = path.stat()
        starts = _row_lines(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except (OSError, ValueError, csv.Error):  # an unreadable file: the 0-based index still names the row
        return None
    return starts[row] if 0 <= row < len(starts) else None


@functools.lru_cache(maxsize=4)  # one read per file version, however many rows a skip report names
def _row_lines(path: str, size: int, mtime_ns: int) -> tuple[int, ...]:
    """The first line of each row of a line-based file (empty for a file whose rows are not lines)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    opener = _OPENERS.get(suffixes[-1] if suffixes else "")
    kind = suffixes[-2] if opener is not None and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if kind not in (".jsonl", ".json", ".csv", ".txt"):
        return ()
    with (opener or open)(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        if kind == ".csv":
            reader, starts, line, header = csv.reader(text), [], 0, False
            for record in reader:
                if record:  # pandas skips blank lines, and the first record is the header, not a row
                    if header:
                        starts.append(line + 1)
                    header = True
                line = reader.line_num
            return tuple(starts)
        starts = []
        for n, line in enumerate(text, start=1):
            if not line.strip():
                continue
            if not starts and kind == ".json" and line.lstrip().startswith("["):  # a JSON list: rows are not lines
                return ()
            starts.append(n)
        return tuple(starts)


class RunDirError(PreftuneError):
    """The output folder cannot be used: a finished run, another run's lock, the run's own inputs inside it."""

    exit_code = 4


class ResumeError(PreftuneError):
    """A checkpoint that cannot be resumed: incomplete, unreadable, or from another run (names what changed)."""

    exit_code = 5


class ModelError(PreftuneError, ValueError):
    """A model, tokenizer, reference or judge that cannot be loaded or does not fit the run."""

    exit_code = 6


class TrainingError(PreftuneError):
    """Training cannot go on: a non-finite loss or gradient, or a run with nothing to train on."""

    exit_code = 7


class HubError(PreftuneError):
    """The Hugging Face Hub cannot be reached or refuses the upload (offline, no token, no network, no rights);
    the message says what to do, and where the local copy of the model is."""

    exit_code = 11  # 8–10 are the CLI's own OS-error codes
