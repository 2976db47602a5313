"""What can go wrong that the user can fix, one class per kind, each with its own exit code.

The CLI prints any :class:`PreftuneError` as one line, ``preftune: <what is wrong, where, what to do>``,
and exits with the class's ``exit_code``; anything else is a bug and keeps its traceback. Library users
catch the classes (``ConfigError`` and ``DataError`` are also ``ValueError`` s, as they always were).
This module imports nothing from preftune: every layer may raise these.
"""

from __future__ import annotations


class PreftuneError(Exception):
    """A problem the user can fix; the message says what, where and what to do."""

    exit_code = 1


class ConfigError(PreftuneError, ValueError):
    """A config key, value or combination that cannot work (names the key, and the file when there is one)."""

    exit_code = 2


class DataError(PreftuneError, ValueError):
    """Bad input data, named precisely: ``source, row N, field 'x': problem``.

    ``row`` is the 0-based row index in the source and ``field`` the column; both are None for
    problems of the whole dataset (unknown columns, unreadable file). ``DataError("whole message")``
    (no ``problem``) takes an already complete message.
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
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}")

    def __reduce__(self):
        # Default exception pickling replays only the message; `datasets` workers (num_proc) pickle errors.
        return (type(self), (self.source, self.row, self.field, self.problem))


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
