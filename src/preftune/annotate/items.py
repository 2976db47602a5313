"""What people annotate, read from the files preftune writes: pairs (``preftune pairs``) and evaluation samples
(``preftune eval --samples-out``).

An :class:`Item` is one comparison of two responses ``a`` and ``b`` to one prompt:

* task ``"pairs"`` — a row ``{prompt, chosen, rejected[, score_chosen, score_rejected]}``: ``a`` is the file's
  ``chosen``, ``b`` its ``rejected`` (the judge's order, which the annotators never see);
* task ``"eval"`` — a row ``{prompt, policy, reference[, policy_score, reference_score, judge]}``: ``a`` is the
  policy's completion, ``b`` the reference's (a blind comparison: the page never says which is which).

A prompt is a string or a conversation (a list of ``{"role", "content"}`` messages); a response is a string or
a list of messages (conversational pairs hold ``[{"role": "assistant", "content": …}]``). Values are kept as
they are in the file, so an export writes conversational rows back as conversational rows. Nothing here
imports torch: the annotation server starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.textfile import nonblank_lines
from preftune.errors import DataError

TASKS = ("pairs", "eval")
FIELDS = {  # task → (prompt, a, b, a's score, b's score)
    "pairs": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
    "eval": ("prompt", "policy", "reference", "policy_score", "reference_score"),
}


@dataclass(frozen=True)
class Item:
    """One comparison: ``prompt`` and two responses ``a`` and ``b`` as read (see the module docstring)."""

    task: str
    prompt: Any
    a: Any
    b: Any
    a_score: float | None
    b_score: float | None
    judge: str | None
    source: str
    line: int

    @property
    def key(self) -> str:
        """The comparison's identity: task, prompt and the unordered pair of responses (a pair loaded twice, or
        with its sides swapped, is one item)."""
        sides = sorted(json.dumps(x, sort_keys=True, ensure_ascii=False) for x in (self.a, self.b))
        text = json.dumps([self.task, self.prompt, sides], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of a JSON Lines file (numbers 1-based, as editors show)."""
    for n, line in nonblank_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                            "one JSON object") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def _check_text(value: Any, where: str, field: str, *, allow_empty: bool) -> None:
    """A string, or a non-empty list of ``{"role": str, "content": str}`` messages."""
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise DataError(f"{where}, field '{field}': empty; preftune train refuses empty completions")
        return
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}, field '{field}': expected a string or a list of {{role, content}} messages, got "
                        f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise DataError(f"{where}, field '{field}': message {i} must be an object with string 'role' and "
                            f"'content', got {json.dumps(message, ensure_ascii=False)[:80]}")


def _score(row: dict, name: str, where: str) -> float | None:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}, field '{name}': expected a finite number, got {value!r}")
    return float(value)


def read_items(path: str | Path, task: str) -> list[Item]:
    """The items of a pairs file (``task="pairs"``) or an evaluation samples file (``task="eval"``), in file
    order; a bad row raises :class:`DataError` naming the file, the line and the field."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(path)
    prompt_f, a_f, b_f, a_score_f, b_score_f = FIELDS[task]
    items = []
    for n, row in _json_lines(path):
        where = f"{path}, line {n}"
        missing = [f for f in (prompt_f, a_f, b_f) if f not in row]
        if missing:
            what = ("pairs need prompt, chosen and rejected (as `preftune pairs` writes them)" if task == "pairs"
                    else "evaluation samples need prompt, policy and reference (as `preftune eval --samples-out` "
                    "writes them)")
            raise DataError(f"{where}, field '{missing[0]}': missing (keys {sorted(row)}); {what}")
        _check_text(row[prompt_f], where, prompt_f, allow_empty=True)
        for field in (a_f, b_f):  # evaluation samples may be empty (an immediate EOS is a real answer)
            _check_text(row[field], where, field, allow_empty=task == "eval")
        judge = row.get("judge")
        if judge is not None and not isinstance(judge, str):
            raise DataError(f"{where}, field 'judge': expected the judge's name (a string), got {judge!r}")
        items.append(Item(task, row[prompt_f], row[a_f], row[b_f], _score(row, a_score_f, where),
                          _score(row, b_score_f, where), judge, str(path), n))
    if not items:
        raise DataError(str(path), None, None, "the file holds no rows")
    return items
