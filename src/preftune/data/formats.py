"""Load preference rows, detect their format, validate them and normalise them to canonical rows.

Accepted input formats (TRL's names), each as plain text or as conversations (lists of
``{"role", "content"}`` messages):

* ``standard``: ``prompt``, ``chosen``, ``rejected``
* ``implicit``: ``chosen``, ``rejected`` holding whole texts/conversations; the prompt is their shared start
* ``unpaired``: ``prompt``, ``completion``, ``label`` (bool-like: bool, 0/1, "true"/"false")
* ``completion`` (SFT): ``prompt``, ``completion`` — read as unpaired rows labelled desirable
* ``messages`` (SFT on conversations, TRL's conversational language modelling): ``messages``, one list of
  messages that may open with system or user turns and hold several assistant turns — the prompt is every
  message before the first assistant turn, the completion the rest (labelled desirable); a ``text``
  column holding conversations is read the same way
* ``text`` (SFT on whole texts): ``text`` — an empty prompt and the text as the completion

Canonical rows (what :func:`normalise` returns):

* paired data: ``prompt``, ``chosen``, ``rejected``; unpaired data: ``prompt``, ``completion``,
  ``label`` (bool); completions never repeat the prompt, an implicit prompt has been extracted;
* a conversational completion starts with an assistant turn and may go on with other turns (multi-turn);
  only its assistant turns are trained (see :mod:`preftune.data.tokenize`). In unpaired and SFT rows,
  leading non-assistant turns of a completion move to the end of the prompt; a paired completion must
  start with an assistant turn (chosen and rejected would otherwise not answer the same prompt);
* ``source_row`` (int): the row's 0-based index in the source, so that an error found later (say, by
  tokenization) names the row the user can open, even after invalid rows were skipped or pairs split.

Text versus conversation is a property of the whole dataset, not of a row: the text columns are either
all strings or all lists of ``{"role": str, "content": str}`` messages, and :func:`is_conversational`
reads which from the column types. Arrow needs one type per column anyway, and a dataset mixing the two
is almost always a mistake, so a row of the other kind is refused by name like any other bad row.
Columns outside the format are not carried over; :class:`NormaliseReport` lists them.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import logging
import lzma
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, Value

from preftune import digest
from preftune.errors import DataError

# Bump when normalisation output changes: it is part of the fingerprint that `datasets` caches under.
NORMALISE_VERSION = "preftune-normalise-3"  # 3: skipped rows named by their line

COLUMN_SETS: dict[str, tuple[str, ...]] = {
    "standard": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "prompt": ("prompt",),  # prompt-only (TRL's name): what online methods sample completions for
}
# Formats of one sequence per row (language modelling): SFT rows with no separate prompt column.
LM_KINDS = ("messages", "text")
PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
SOURCE_ROW = "source_row"

# Anthropic HH marks the assistant's turn this way; its completions start right after the colon.
HH_ASSISTANT_MARKER = "\n\nAssistant:"

MESSAGE_FEATURE = [{"role": Value("string"), "content": Value("string")}]

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip"}
_PATH_SUFFIXES = set(_FILE_BUILDERS) | _COMPRESSIONS | {".arrow", ".tsv", ".txt", ".pq"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# Short names of the ways a row can be bad; the report counts skipped rows by these.
MISSING = "missing field"
WRONG_TYPE = "wrong type"
MALFORMED_MESSAGE = "malformed message"
NOT_ASSISTANT = "completion not starting with an assistant turn"
NO_ASSISTANT = "no assistant turn"
EMPTY_COMPLETION = "empty completion"
EMPTY_PROMPT = "empty prompt"
IDENTICAL = "identical chosen/rejected"
BAD_LABEL = "invalid label"


@dataclass(frozen=True)
class DatasetFormat:
    """What a dataset holds: ``kind`` is ``standard``, ``implicit`` or ``unpaired``."""

    kind: str
    conversational: bool

    @property
    def paired(self) -> bool:
        return self.kind in ("standard", "implicit")

    @property
    def input_columns(self) -> tuple[str, ...]:
        return COLUMN_SETS[self.kind]

    @property
    def output_columns(self) -> tuple[str, ...]:
        if self.kind == "prompt":
            return ("prompt",)
        return PAIRED_COLUMNS if self.paired else UNPAIRED_COLUMNS

    def __str__(self) -> str:
        return f"{self.kind}, {'conversational' if self.conversational else 'text'}"


@dataclass
class NormaliseReport:
    """What :func:`normalise` did: rows in and out, skipped rows by reason, columns not carried over."""

    source: str
    format: DatasetFormat
    rows_in: int
    rows_out: int
    skipped: dict[str, int] = field(default_factory=dict)
    first_problem: dict[str, str] = field(default_factory=dict)  # reason -> full message of its first row
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        parts = [f"{self.source}: kept {self.rows_out} of {self.rows_in} rows ({self.format})"]
        if self.skipped:
            reasons = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
            counts = ", ".join(f"{n} {reason}" for reason, n in reasons)
            parts.append(f"skipped {self.rows_skipped} of {self.rows_in} rows: {counts}")
        if self.ignored_columns:
            parts.append(f"ignored columns: {', '.join(self.ignored_columns)}")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------ loading


def load_rows(source: str, split: str = "train", key: str = "split") -> Dataset:
    """Load raw rows from a local file, a ``save_to_disk`` folder, or (otherwise) the Hugging Face Hub.

    ``split`` names a split of a saved ``DatasetDict`` or a Hub dataset. A file holds one split, ``train`` (all
    its rows), as ``datasets.load_dataset`` reads it: any other split is a DataError naming ``key`` (the setting
    that asked for it), so that a test split asked of a file never silently reads the training rows.

    Files are read by extension (``.json``, ``.jsonl``, ``.parquet``, ``.csv``, optionally compressed,
    e.g. ``.jsonl.gz``). A name that looks like a path (starts with ``/``, ``.`` or ``~``, has two or more
    slashes, ends in a data-file suffix, or its folder exists locally) but does not exist raises
    :class:`MissingDataError` (a DataError and a FileNotFoundError); a Hub id such as ``Anthropic/hh-rlhf``
    (one slash) is looked up on the Hub. A text file (JSON, JSON lines, CSV) that is empty or not UTF-8, or a
    JSON line that does not parse, is a DataError naming the file and the line.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_saved_folder(path, source, split)
    if path.is_file():
        if split != "train":
            raise DataError(source, None, None, f"{key} is {split!r}, but a file has one split, 'train' (all its "
                            "rows). Evaluation rows go in a file of their own (eval_dataset), or eval_split_size "
                            f"holds out a share of the training rows; a {split!r} split needs a folder written by "
                            "DatasetDict.save_to_disk")
        return _load_file(path, source)
    if _looks_like_path(source):
        raise MissingDataError(source, None, None, f"no such file or folder (relative paths start at {Path.cwd()}); "
                               "check the dataset path")
    return _load_from_hub(source, split)


class MissingDataError(DataError, FileNotFoundError):
    """A dataset path that does not exist (also a FileNotFoundError, as it always was)."""


def _load_file(path: Path, source: str) -> Dataset:
    builder = _FILE_BUILDERS.get(_data_suffix(path))
    if builder is None:
        raise DataError(source, None, None, f"unsupported file type; expected one of "
                        f"{', '.join(sorted(_FILE_BUILDERS))} or a folder written by Dataset.save_to_disk")
    if builder in ("json", "csv"):
        _check_text_file(path, source, builder)
    content = digest.file_digest(path)
    try:
        with _builder_errors_unlogged(builder):
            # The builder caches by path and modification time: a file rewritten with the same size and mtime
            # would load the old rows. Its config's description keys that cache by the content too.
            ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                       description=f"preftune content {content}")
    except Exception as e:  # the builders raise many types; the user needs the file name, the line and the cause
        if builder == "json":
            problem = _json_problem(path, source)
            if problem is not None:
                raise problem from e
        raise DataError(source, None, None, f"could not be read as {builder}: {_root_cause(e)}") from e
    ds._fingerprint = _derived_fingerprint(builder, content)  # the rows' identity: content, not path or time
    return ds


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _builder_errors_unlogged(builder: str) -> Iterator[None]:
    """The builder logs its failure at ERROR before raising; the DataError raised here says it better (with the
    line), and the CLI's message stays the one line on stderr."""
    logger, drop = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}"), _DropErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


_SCAN_BLOCK = 1 << 24  # bytes read at a time (then up to the end of the line) when checking a text file
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_EXPECTED = {"json": "one JSON object per line (JSON lines) or a JSON list of objects, e.g. "
                     '{"prompt": "...", "chosen": "...", "rejected": "..."}',
             "csv": "a header line of column names (e.g. prompt,chosen,rejected), then one row per line"}


def _open_binary(path: Path):
    """The file's bytes, through a compression the standard library reads; None for one it does not."""
    suffix = path.suffix.lower()
    if suffix in _COMPRESSIONS and suffix not in _OPENERS:
        return None
    return _OPENERS.get(suffix, open)(path, "rb")


def _check_text_file(path: Path, source: str, builder: str) -> None:
    """Refuse a JSON/CSV file that holds no rows or is not UTF-8, naming the first bad line.

    The file is read in blocks of whole lines (a UTF-8 character never holds a newline byte), so the line
    number of a bad byte is exact and memory stays bounded."""
    stream = _open_binary(path)
    if stream is None:
        return
    lines_before, content, depth = 0, False, 0
    with stream:
        while block := stream.read(_SCAN_BLOCK):
            block += stream.readline()
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as err:
                line = lines_before + block.count(b"\n", 0, err.start) + 1
                offset = err.start - (block.rfind(b"\n", 0, err.start) + 1)
                raise DataError(source, None, None, f"line {line}: byte 0x{block[err.start]:02x} (byte {offset + 1} "
                                "of the line) is not UTF-8 text; save the file as UTF-8 (from Latin-1: "
                                "iconv -f latin1 -t utf-8)") from None
            if builder == "json":
                depth = _check_json_depth(block, depth, lines_before, source)
            content = content or bool(block.strip())
            lines_before += block.count(b"\n")
    if not content:
        raise DataError(source, None, None, f"the file is empty (no rows); expected {_EXPECTED[builder]}")


# Nesting deeper than this is refused before any parser sees it: Python's json and `datasets`' type inference
# recurse once per level (a RecursionError at a few thousand levels, a crash of the process at tens of thousands).
# Preference rows nest a few levels (a conversation: list → message → content).
MAX_JSON_DEPTH = 100
_JSON_STRING = re.compile(rb'"[^"\n]*"')
_STRUCTURE = bytes(range(256)).translate(None, b'"[]{}\n')  # the bytes that never change the nesting


def _check_json_depth(block: bytes, depth: int, lines_before: int, source: str) -> int:
    """Refuse JSON text nested more than :data:`MAX_JSON_DEPTH` levels, naming its line; return the depth open at
    the end of ``block`` (whole lines; a JSON document may span blocks). Brackets inside strings do not count.
    Escaped quotes dropped, then every byte but quotes, brackets and newlines, then the strings: a cumulative sum
    over what is left (a few ms per MiB)."""
    # Backslashes pair up from the left (\\\\ is one backslash): once the pairs are dropped, \\" is a quote inside a
    # string.
    unescaped = block.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = _JSON_STRING.sub(b"", unescaped.translate(None, _STRUCTURE))
    text = np.frombuffer(skeleton, np.uint8)
    if len(text) == 0:
        return depth
    levels = depth + np.cumsum((text == ord("[")) | (text == ord("{")), dtype=np.int64) \
        - np.cumsum((text == ord("]")) | (text == ord("}")), dtype=np.int64)
    deepest = int(np.argmax(levels))
    if levels[deepest] > MAX_JSON_DEPTH:
        line = lines_before + int(np.count_nonzero(text[:deepest] == ord("\n"))) + 1
        raise DataError(source, None, None, f"line {line}: JSON nested more than {MAX_JSON_DEPTH} levels deep; a "
                        "row holds strings, numbers and lists of {role, content} messages: flatten or drop the deep "
                        "field")
    return max(int(levels[-1]), 0)


def _json_problem(path: Path, source: str) -> DataError | None:
    """Why a JSON (lines) file did not load: its first line that is not a JSON object, or the document's
    syntax error; None when the file parses (the cause lies elsewhere)."""
    stream = _open_binary(path)
    if stream is None:
        return None
    with stream:
        text = stream.read().decode("utf-8")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if _data_suffix(path) == ".json" and not _is_json_object(first):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            return DataError(source, None, None, f"line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); "
                             f"expected {_EXPECTED['json']}")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return DataError(source, None, None, f"line {number}, column {e.colno}: not valid JSON ({e.msg}); each "
                             "line of a JSON lines file holds one whole JSON object")
        if not isinstance(value, dict):
            return DataError(source, None, None, f"line {number}: holds a JSON {type(value).__name__}, not an "
                             f"object; expected {_EXPECTED['json']}")
    return None


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _root_cause(error: BaseException) -> str:
    """The innermost cause of a loader's error (``datasets`` wraps the useful one), as ``Type: message``."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    for cause in reversed(seen):
        if str(cause).strip():
            return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    return type(seen[-1]).__name__


def _data_suffix(path: Path) -> str:
    """The data suffix, looking through one compression suffix (``x.jsonl.gz`` → ``.jsonl``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSIONS:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def _load_saved_folder(path: Path, source: str, split: str) -> Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(source, None, None, f"is a folder but not one written by Dataset.save_to_disk "
                        f"or DatasetDict.save_to_disk ({e})") from e
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DataError(source, None, None, f"has no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    # state.json's fingerprint survives arrow files replaced in place; the rows' identity is their bytes.
    loaded._fingerprint = _derived_fingerprint("arrow", [digest.file_digest(f["filename"]) for f in loaded.cache_files])
    return loaded


def _looks_like_path(source: str) -> bool:
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1:
        return True
    if "/" in source and Path(source).parent.is_dir():
        return True  # `data/prefs` where ./data exists is a local path, not the Hub id org=data
    suffix = Path(source).suffix.lower()
    if suffix in _PATH_SUFFIXES:
        return True
    # Hub ids are `name` or `org/name`; a bare `name.ext` is far more likely a missing file.
    return ("/" not in source and suffix != "") or not _HUB_ID.match(source)


def _load_from_hub(name: str, split: str) -> Dataset:
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, missing split, gated repo, ...
        raise DataError(name, None, None, f"not found locally (no such file or folder) and it could not be "
                        f"loaded from the Hugging Face Hub either ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------ detection


def detect_format(ds: Dataset, source: str) -> DatasetFormat:
    """The format of ``ds`` from its columns, and text versus conversation from the first usable value."""
    columns = set(ds.column_names)
    paired = {"chosen", "rejected"} <= columns
    unpaired = set(COLUMN_SETS["unpaired"]) <= columns
    if paired and unpaired:
        raise DataError(source, None, None, f"ambiguous columns {sorted(columns)}: they hold both a paired "
                        "(chosen, rejected) and an unpaired (completion, label) format; keep one")
    if paired:
        kind = "standard" if "prompt" in columns else "implicit"
    elif unpaired:
        kind = "unpaired"
    elif set(COLUMN_SETS["completion"]) <= columns:
        kind = "completion"
    elif "messages" in columns:
        kind = "messages"
    elif "text" in columns:
        kind = "text"
    elif "prompt" in columns:
        kind = "prompt"
    else:
        accepted = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in COLUMN_SETS.items())
        raise DataError(source, None, None, f"unknown columns {sorted(columns)}; accepted column sets are "
                        f"{accepted} (each as text or as lists of {{role, content}} messages)")
    if len(ds) == 0:
        raise DataError(source, None, None, "has no rows")
    conversational = _detect_conversational(ds, kind, source)
    if kind == "messages" and not conversational:
        raise DataError(source, None, "messages", "holds text; a messages column holds conversations (lists "
                        "of {role, content} messages). For plain text, name the column 'text'")
    return DatasetFormat(kind, conversational)


def _detect_conversational(ds: Dataset, kind: str, source: str) -> bool:
    text_columns = [c for c in COLUMN_SETS[kind] if c != "label"]
    kinds = {c: _feature_kind(ds.features[c]) for c in text_columns}
    if set(kinds.values()) == {"text"}:
        return False
    if set(kinds.values()) == {"messages"}:
        return True
    if {"text", "messages"} <= set(kinds.values()):
        described = ", ".join(f"{c} ({'text' if k == 'text' else 'messages' if k == 'messages' else 'mixed'})"
                              for c, k in kinds.items())
        raise DataError(source, None, None, f"columns {described} differ in kind; they must all hold text "
                        "or all hold lists of {role, content} messages")
    # Mixed or untyped (JSON) columns: the first string or list decides; rows of the other kind fail later.
    for row in ds.select_columns(text_columns):
        for column in text_columns:
            if isinstance(row[column], str):
                return False
            if isinstance(row[column], list):
                return True
    raise DataError(source, None, None, f"no row holds a string or a list of messages in {text_columns}")


# `datasets` >= 4 has List/LargeList classes (Sequence became a function); 3.x has the Sequence class.
_LIST_FEATURES = tuple(
    t for t in (list, *(getattr(datasets, n, None) for n in ("List", "LargeList", "Sequence")))
    if isinstance(t, type)
)


def _feature_kind(feature: Any) -> str:
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return "text"
    if isinstance(feature, _LIST_FEATURES):
        return "messages"
    return "other"


def is_conversational(ds: Dataset) -> bool:
    """Whether canonical rows hold conversations (lists of messages) rather than plain text."""
    return _feature_kind(ds.features["prompt"]) == "messages"


def is_paired(ds: Dataset) -> bool:
    """Whether canonical rows are paired (``chosen``/``rejected``) rather than unpaired."""
    return {"chosen", "rejected"} <= set(ds.column_names)


def canonical_features(fmt: DatasetFormat) -> Features:
    """Arrow types of canonical rows in format ``fmt`` (without the internal problem columns)."""
    text = MESSAGE_FEATURE if fmt.conversational else Value("string")
    columns: dict[str, Any] = {name: text for name in fmt.output_columns}
    if not fmt.paired and fmt.kind != "prompt":
        columns["label"] = Value("bool")
    columns[SOURCE_ROW] = Value("int64")
    return Features(columns)


# ------------------------------------------------------------------------------------ validation


class _RowProblem(Exception):
    """One bad row: the field and the reason (a short category) with a precise description."""

    def __init__(self, field: str, reason: str, detail: str):
        super().__init__(detail)
        self.field, self.reason, self.detail = field, reason, detail


def _type_name(value: Any) -> str:
    return "a list" if isinstance(value, list) else type(value).__name__


def _text(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        raise _RowProblem(name, MISSING, "missing (null/None)")
    if isinstance(value, list):
        raise _RowProblem(name, WRONG_TYPE, "expected a string as in the rest of this plain-text dataset, "
                          "got a list (a conversation?)")
    if not isinstance(value, str):
        raise _RowProblem(name, WRONG_TYPE, "expected a string or a list of {role, content} messages, "
                          f"got {_type_name(value)}")
    return value


def _messages(row: Mapping[str, Any], name: str) -> list[dict[str, str]]:
    value = row.get(name)
    if value is None:
        raise _RowProblem(name, MISSING, "missing (null/None)")
    if isinstance(value, str):
        raise _RowProblem(name, WRONG_TYPE, "expected a list of {role, content} messages as in the rest of "
                          "this conversational dataset, got a string")
    if not isinstance(value, list):
        raise _RowProblem(name, WRONG_TYPE, "expected a string or a list of {role, content} messages, "
                          f"got {_type_name(value)}")
    return [_message(name, i, m) for i, m in enumerate(value)]


def _message(name: str, index: int, message: Any) -> dict[str, str]:
    if not isinstance(message, Mapping):
        raise _RowProblem(name, MALFORMED_MESSAGE, f"message {index} is {_type_name(message)}, "
                          "expected a {role, content} dict")
    for key in ("role", "content"):
        if message.get(key) is None:
            raise _RowProblem(name, MALFORMED_MESSAGE, f"message {index} has no '{key}'")
        if not isinstance(message[key], str):
            raise _RowProblem(name, MALFORMED_MESSAGE, f"message {index}: '{key}' must be a string, "
                              f"got {_type_name(message[key])}")
    # Arrow fills absent struct keys with None, so only keys holding a value are extra information.
    extra = sorted(k for k, v in message.items() if k not in ("role", "content") and v is not None)
    if extra:
        raise _RowProblem(name, MALFORMED_MESSAGE, f"message {index} has keys {extra} besides role and "
                          "content; preftune keeps only role and content, so remove them first")
    return {"role": message["role"], "content": message["content"]}


def _check_text_completion(name: str, text: str) -> None:
    if not text.strip():
        raise _RowProblem(name, EMPTY_COMPLETION, f"the completion is empty or whitespace only ({text!r})")


def _check_message_completion(name: str, messages: list[dict[str, str]]) -> None:
    if messages and messages[0]["role"] != "assistant":
        raise _RowProblem(name, NOT_ASSISTANT, "the completion must start with an assistant message, "
                          f"got role {messages[0]['role']!r}")
    if not "".join(m["content"] for m in messages if m["role"] == "assistant").strip():
        raise _RowProblem(name, EMPTY_COMPLETION, "the completion has no assistant message with content")


def _label(row: Mapping[str, Any]) -> bool:
    value = row.get("label")
    if value is None:
        raise _RowProblem("label", MISSING, "missing (null/None)")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise _RowProblem("label", BAD_LABEL, f"expected a bool, 0/1 or 'true'/'false', got {value!r}")


# ------------------------------------------------------------------------------------ prompt extraction


def extract_text_prompt(chosen: str, rejected: str) -> str:
    """The prompt shared by two full texts: their common prefix, ended at a sensible boundary.

    When the common prefix contains Anthropic HH's ``"\\n\\nAssistant:"``, the prompt ends right after
    its last occurrence. Otherwise it is cut back so that no word is split: the completions then start
    with the whitespace before their first differing word (as HH completions start with ``" "``).
    """
    prefix = _common_prefix(chosen, rejected)
    marker = prefix.rfind(HH_ASSISTANT_MARKER)
    if marker >= 0:
        return prefix[: marker + len(HH_ASSISTANT_MARKER)]
    n = len(prefix)
    if n < len(chosen) and n < len(rejected) and chosen[n].isspace() and rejected[n].isspace():
        return prefix  # the texts diverge only after a complete word
    # Drop the partly shared word, then the whitespace before it, which belongs to the completions.
    return re.sub(r"\S*$", "", prefix).rstrip()


def _common_prefix(a: str, b: str) -> str:
    n = 0
    limit = min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return a[:n]


def extract_message_prompt(chosen: list[dict], rejected: list[dict]) -> list[dict]:
    """The messages two conversations share, cut back so both completions start with an assistant turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not (n < len(chosen) and n < len(rejected)
                         and chosen[n]["role"] == rejected[n]["role"] == "assistant"):
        n -= 1
    return chosen[:n]


# ------------------------------------------------------------------------------------ normalisation


def _readers(fmt: DatasetFormat):
    """The field reader and the completion check for text or for conversations."""
    if fmt.conversational:
        return _messages, _check_message_completion
    return _text, _check_text_completion


def _normalise_row(row: Mapping[str, Any], fmt: DatasetFormat) -> dict[str, Any]:
    """One input row as a canonical row; raises _RowProblem for the first problem found."""
    if fmt.paired:
        return _normalise_paired_row(row, fmt)
    read, check = _readers(fmt)
    if fmt.kind == "prompt":
        prompt = read(row, "prompt")
        if not prompt:
            raise _RowProblem("prompt", EMPTY_PROMPT, "the prompt is empty; online methods need something to answer")
        return {"prompt": prompt}
    if fmt.kind in LM_KINDS:
        if fmt.conversational:  # the prompt is what comes before the first assistant turn
            prompt, completion = _split_at_first_assistant([], read(row, fmt.kind), fmt.kind)
        else:
            prompt, completion = "", read(row, fmt.kind)
        check(fmt.kind, completion)
        return {"prompt": prompt, "completion": completion, "label": True}
    prompt, completion = read(row, "prompt"), read(row, "completion")
    label = _label(row) if fmt.kind == "unpaired" else True  # SFT rows are all desirable
    if fmt.conversational:
        prompt, completion = _split_at_first_assistant(prompt, completion, "completion")
    check("completion", completion)
    return {"prompt": prompt, "completion": completion, "label": label}


def _split_at_first_assistant(prompt: list[dict[str, str]], completion: list[dict[str, str]],
                              name: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Move the completion's turns before its first assistant turn to the end of the prompt: they are context
    the model reads, not text it writes (a conversation opening with system or user turns)."""
    first = next((i for i, m in enumerate(completion) if m["role"] == "assistant"), None)
    if first is None:
        roles = [m["role"] for m in completion]
        raise _RowProblem(name, NO_ASSISTANT, f"no assistant turn (roles {roles}), so there is nothing to "
                          "train on; SFT trains on the assistant turns of a conversation")
    return prompt + completion[:first], completion[first:]


def _normalise_paired_row(row: Mapping[str, Any], fmt: DatasetFormat) -> dict[str, Any]:
    read, check = _readers(fmt)
    prompt = read(row, "prompt") if fmt.kind == "standard" else None
    chosen, rejected = read(row, "chosen"), read(row, "rejected")
    if chosen == rejected:
        raise _RowProblem("rejected", IDENTICAL, "identical to 'chosen', so the pair carries no preference")
    if prompt is None:
        if fmt.conversational:
            prompt = extract_message_prompt(chosen, rejected)
        else:
            prompt = extract_text_prompt(chosen, rejected)
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    check("chosen", chosen)
    check("rejected", rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _normalise_batch(
    batch: dict[str, list], indices: list[int], *, fmt: DatasetFormat, source: str, skip_invalid: bool
) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in (*fmt.output_columns, SOURCE_ROW, "_problem", "_detail")}
    # Rows normalised before keep the row numbers of their original source.
    rows = batch[SOURCE_ROW] if SOURCE_ROW in batch else indices
    for offset, index in enumerate(rows):
        row = {name: values[offset] for name, values in batch.items()}
        try:
            canonical, problem, detail = _normalise_row(row, fmt), None, None
        except _RowProblem as p:
            error = DataError(source, index, p.field, p.detail)
            if not skip_invalid:
                raise error from None
            canonical, problem, detail = {}, p.reason, str(error)
        for name in fmt.output_columns:
            out[name].append(canonical.get(name))
        out[SOURCE_ROW].append(index)
        out["_problem"].append(problem)
        out["_detail"].append(detail)
    return out


def _keep_valid(problems: list[str | None]) -> list[bool]:
    return [p is None for p in problems]


def _derived_fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def normalise(ds: Dataset, source: str, *, skip_invalid: bool = False) -> tuple[Dataset, NormaliseReport]:
    """Validate ``ds`` and return its canonical rows (see the module docstring) with a report.

    By default the first bad row raises :class:`DataError` naming ``source``, the row and the field. With
    ``skip_invalid=True`` bad rows are dropped and counted by reason in the report instead.
    """
    fmt = detect_format(ds, source)
    features = canonical_features(fmt)
    features["_problem"] = Value("string")
    features["_detail"] = Value("string")
    fingerprint = _derived_fingerprint(ds._fingerprint, NORMALISE_VERSION, str(fmt), source, skip_invalid)
    rows = ds.map(
        partial(_normalise_batch, fmt=fmt, source=source, skip_invalid=skip_invalid),
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=features,
        new_fingerprint=fingerprint,
        desc="Normalising rows",
    )
    skipped, first_problem = _count_problems(rows)
    if skipped:
        rows = rows.filter(_keep_valid, input_columns="_problem", batched=True,
                           new_fingerprint=_derived_fingerprint(fingerprint, "filter"))
    rows = rows.remove_columns(["_problem", "_detail"])
    report = NormaliseReport(
        source=source,
        format=fmt,
        rows_in=len(ds),
        rows_out=len(rows),
        skipped=skipped,
        first_problem=first_problem,
        ignored_columns=sorted(set(ds.column_names) - {*fmt.input_columns, SOURCE_ROW}),
    )
    return rows, report


def _count_problems(rows: Dataset) -> tuple[dict[str, int], dict[str, str]]:
    """Skipped-row counts by reason and the first message for each, read from the problem columns."""
    table = rows.select_columns(["_problem", "_detail"]).with_format("arrow")[:]
    problems = table.column("_problem")
    if problems.null_count == len(problems):
        return {}, {}
    counts = Counter(p for p in problems.to_pylist() if p is not None)
    first: dict[str, str] = {}
    for problem, detail in zip(problems.to_pylist(), table.column("_detail").to_pylist()):
        if problem is not None and problem not in first:
            first[problem] = detail
    return dict(counts), first


# ------------------------------------------------------------------------------------ paired → unpaired


def _split_pairs(batch: dict[str, list]) -> dict[str, list]:
    def interleave(chosen: list, rejected: list) -> list:
        return [value for pair in zip(chosen, rejected) for value in pair]

    out = {
        "prompt": interleave(batch["prompt"], batch["prompt"]),
        "completion": interleave(batch["chosen"], batch["rejected"]),
        "label": [True, False] * len(batch["prompt"]),
    }
    if SOURCE_ROW in batch:
        out[SOURCE_ROW] = interleave(batch[SOURCE_ROW], batch[SOURCE_ROW])
    return out


def is_prompt_only(ds: Dataset) -> bool:
    """Whether canonical rows hold prompts only (no completions)."""
    return ds.column_names == ["prompt", SOURCE_ROW] or ds.column_names == ["prompt"]


def to_prompts(ds: Dataset) -> Dataset:
    """The prompts of canonical rows of any format (online methods sample their own completions)."""
    return ds.select_columns([c for c in ("prompt", SOURCE_ROW) if c in ds.column_names])


def paired_to_sft(ds: Dataset) -> Dataset:
    """Canonical paired rows as SFT rows: the chosen completion, labelled desirable (Preferred-FT)."""
    if not is_paired(ds) or "prompt" not in ds.column_names:
        raise ValueError(f"expected canonical paired rows (prompt, chosen, rejected), got {ds.column_names}")
    return (ds.remove_columns("rejected").rename_column("chosen", "completion")
            .map(lambda _: {"label": True}, desc="Keeping chosen completions",
                 new_fingerprint=_derived_fingerprint(ds._fingerprint, NORMALISE_VERSION, "paired_to_sft")))


def paired_to_unpaired(ds: Dataset) -> Dataset:
    """Canonical paired rows as unpaired ones (for KTO, BCO): each pair gives a chosen row labelled True
    followed by a rejected row labelled False, both keeping the pair's ``source_row``."""
    if not is_paired(ds) or "prompt" not in ds.column_names:
        raise ValueError(f"expected canonical paired rows (prompt, chosen, rejected), got {ds.column_names}")
    features = canonical_features(DatasetFormat("unpaired", is_conversational(ds)))
    if SOURCE_ROW not in ds.column_names:
        del features[SOURCE_ROW]
    return ds.map(
        _split_pairs,
        batched=True,
        remove_columns=ds.column_names,
        features=features,
        new_fingerprint=_derived_fingerprint(ds._fingerprint, NORMALISE_VERSION, "paired_to_unpaired"),
        desc="Splitting pairs",
    )
