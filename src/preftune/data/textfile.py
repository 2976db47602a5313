"""Reading a user's text file line by line, with errors that name the file and line (no heavy imports: the CLI's
prompt files and the annotation app's JSON Lines files both read through here)."""

from __future__ import annotations

from pathlib import Path

from preftune.errors import DataError


def nonblank_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines of a UTF-8 file (1-based numbers, as editors show)."""
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file" if not path.exists() else "not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte {data[e.start]:#x} at offset {e.start}); "
                        "save the file as UTF-8") from e
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
