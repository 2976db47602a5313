"""Canonical rows → token ids, truncated to the configured lengths and cached on disk.

Output columns: ``prompt_ids`` with ``chosen_ids`` and ``rejected_ids`` (paired rows) or with
``completion_ids`` and ``label`` (unpaired rows), all lists of ints; ``source_row`` is carried over when
the input has it. ``prompt_ids + chosen_ids`` is exactly the sequence the model is trained on.

* Text rows: the prompt is encoded with the tokenizer's default special tokens (so it starts with BOS
  where the tokenizer adds one); each completion is encoded on its own without special tokens.
* Conversational rows: the prompt is rendered by the chat template with ``add_generation_prompt=True``,
  the full conversation (prompt + completion) without; the completion ids are what follows the prompt
  ids. If the prompt ids are not a prefix of the conversation ids, the row raises :class:`DataError` —
  slicing by length anyway would silently train on the wrong tokens.
* Every completion ends at an EOS: appended when missing; when the template closes the turn with EOS
  followed only by whitespace (Qwen's ``<|im_end|>\\n``), the whitespace is dropped, since generation
  stops at EOS and would never produce it.
* Truncation: a prompt longer than ``max_prompt_length`` keeps its end (and its leading BOS, which
  models expect at position 0); completions are then cut, keeping their start, so that prompt plus the
  longest completion fit ``max_length``; a row whose prompt leaves no room for one completion token is
  dropped. :class:`TokenizeReport` counts all three.
* Cache: results are stored under ``cache_dir`` (default ``$PREFTUNE_CACHE/tokenized``, else
  ``~/.cache/preftune/tokenized``) in a folder named by a fingerprint of the dataset, the tokenizer, the
  lengths and :data:`TOKENIZE_VERSION`. The folder is written under a temporary name and renamed when
  complete, so an interrupted run never leaves something that looks like a finished cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Value

from preftune.data.formats import SOURCE_ROW, DataError, is_conversational, is_paired

log = logging.getLogger(__name__)

# Bump whenever the ids produced for the same inputs change: it is part of the cache key.
TOKENIZE_VERSION = "preftune-tokenize-1"
NO_ROOM = "prompt leaves no room for a completion within max_length"
IDS_FEATURE = [Value("int32")]
_HELPER_COLUMNS = ["_prompt_truncated", "_completion_truncated", "_drop"]


@dataclass
class TokenizeReport:
    """What :func:`tokenize_rows` did; stored beside the cached ids so a cache hit reports the same."""

    rows_in: int
    rows_out: int
    prompt_truncated: int = 0
    completion_truncated: int = 0  # rows where a completion was cut at max_length, losing its EOS
    dropped: dict[str, int] = field(default_factory=dict)
    max_length: int | None = None
    max_prompt_length: int | None = None
    from_cache: bool = False
    cache_path: str | None = None

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def __str__(self) -> str:
        parts = [f"tokenized {self.rows_out} of {self.rows_in} rows"]
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated} prompts left-truncated to max_prompt_length="
                         f"{self.max_prompt_length}")
        if self.completion_truncated:
            parts.append(f"{self.completion_truncated} rows with completions cut to fit max_length="
                         f"{self.max_length} (EOS lost)")
        if self.dropped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
            parts.append(f"dropped {self.rows_dropped}: {reasons}")
        if self.from_cache:
            parts.append(f"loaded from cache {self.cache_path}")
        return "; ".join(parts)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k not in ("from_cache", "cache_path")},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TokenizeReport:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Truncation:
    """One row after truncation: ``drop_reason`` is set when the row cannot be kept."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    prompt_truncated: bool
    completion_truncated: bool
    drop_reason: str | None = None


# ------------------------------------------------------------------------------------ public API


def tokenize_rows(
    ds: Dataset,
    tokenizer,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    source: str | None = None,
) -> tuple[Dataset, TokenizeReport]:
    """Tokenize canonical rows (from :func:`preftune.data.formats.normalise`); see the module docstring.

    ``source`` names the data in errors (rows are named by their ``source_row`` when present). A second
    call with the same dataset, tokenizer and lengths loads the ids from the cache without tokenizing.
    """
    _check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; completions must end with one")
    conversational = is_conversational(ds)
    if conversational and not tokenizer.chat_template:
        raise ValueError("the rows are conversations but the tokenizer has no chat_template")

    key = cache_key(ds, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    directory = resolve_cache_dir(cache_dir) / key
    cached = _load_cached(directory)
    if cached is not None:
        return cached
    encode = partial(
        _tokenize_batch,
        tokenizer=tokenizer,
        conversational=conversational,
        completion_fields=("chosen", "rejected") if is_paired(ds) else ("completion",),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        source=source or "dataset",
    )
    return _tokenize_into_cache(ds, encode, directory, key, max_length, max_prompt_length, num_proc)


def truncate_ids(
    prompt_ids: list[int],
    completion_ids: Sequence[list[int]],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    bos_token_id: int | None,
) -> Truncation:
    """Fit one row into the lengths: left-truncate the prompt, then cut completions keeping their start."""
    prompt_truncated = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = _keep_end(prompt_ids, max_prompt_length, bos_token_id)
    completions = [list(c) for c in completion_ids]
    if max_length is None:
        return Truncation(prompt_ids, completions, prompt_truncated, False)
    room = max_length - len(prompt_ids)
    if room < 1:
        return Truncation(prompt_ids, completions, prompt_truncated, False, drop_reason=NO_ROOM)
    completion_truncated = any(len(c) > room for c in completions)
    return Truncation(prompt_ids, [c[:room] for c in completions], prompt_truncated, completion_truncated)


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` if given, else ``$PREFTUNE_CACHE/tokenized``, else ``~/.cache/preftune/tokenized``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("PREFTUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "preftune") / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes the ids: vocabulary, merges, normaliser,
    pre-/post-processor (all in the backend JSON), the chat template and the special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary is the best identity available
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    identity = {
        "class": type(tokenizer).__name__,
        "chat_template": tokenizer.chat_template,
        "special_tokens": [str(getattr(tokenizer, n, None)) for n in ("bos_token", "eos_token", "pad_token")],
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "all_special_tokens": list(tokenizer.all_special_tokens),
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(ds: Dataset, tokenizer, *, max_length: int | None, max_prompt_length: int | None) -> str:
    """The cache folder name for tokenizing ``ds`` with ``tokenizer`` at these lengths."""
    parts = {
        "version": TOKENIZE_VERSION,
        "dataset": ds._fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------ encoding


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer or None, got {value}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length "
                         f"({max_length}), or every long prompt leaves no room for a completion")


def _keep_end(ids: list[int], n: int, bos_token_id: int | None) -> list[int]:
    if bos_token_id is not None and n >= 2 and ids and ids[0] == bos_token_id:
        return [bos_token_id] + ids[len(ids) - (n - 1):]
    return ids[len(ids) - n:]


def _ending_with_eos(ids: list[int], eos_id: int, tokenizer) -> list[int]:
    """``ids`` ending at an EOS: append one, or cut whitespace-only tokens after the last one."""
    if ids and ids[-1] == eos_id:
        return ids
    if eos_id in ids:
        last = len(ids) - 1 - ids[::-1].index(eos_id)
        if not tokenizer.decode(ids[last + 1:], skip_special_tokens=False).strip():
            return ids[: last + 1]
    return ids + [eos_id]


def _encode_texts(batch: dict[str, list], tokenizer, fields: Sequence[str]) -> tuple[list, dict[str, list]]:
    prompts = tokenizer(batch["prompt"], return_attention_mask=False)["input_ids"]
    eos_id = tokenizer.eos_token_id  # a property lookup per row is measurably slow
    completions = {}
    for name in fields:
        encoded = tokenizer(batch[name], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        completions[name] = [_ending_with_eos(list(ids), eos_id, tokenizer) for ids in encoded]
    # An empty prompt (SFT on whole texts) still needs one token to predict the first completion token.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    return [list(p) or [start] for p in prompts], completions


def _encode_conversations(
    batch: dict[str, list], rows: Sequence[int], tokenizer, fields: Sequence[str], source: str
) -> tuple[list, dict[str, list]]:
    prompts = _render(tokenizer, batch["prompt"], rows, "prompt", source, add_generation_prompt=True)
    completions = {}
    for name in fields:
        conversations = [p + c for p, c in zip(batch["prompt"], batch[name])]
        full = _render(tokenizer, conversations, rows, name, source, add_generation_prompt=False)
        completions[name] = [
            _completion_after_prompt(p, ids, tokenizer, row, name, source)
            for p, ids, row in zip(prompts, full, rows)
        ]
    return prompts, completions


def _render(tokenizer, conversations: list, rows: Sequence[int], field: str, source: str,
            add_generation_prompt: bool) -> list[list[int]]:
    """Token ids of each conversation through the chat template; a failing row is named."""
    kwargs = dict(add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True)
    try:
        return [list(ids) for ids in tokenizer.apply_chat_template(conversations, **kwargs)["input_ids"]]
    except Exception:
        pass  # render one by one below to say which row the template rejects
    ids = []
    for conversation, row in zip(conversations, rows):
        try:
            ids.append(list(tokenizer.apply_chat_template(conversation, **kwargs)["input_ids"]))
        except Exception as e:
            raise DataError(source, row, field, f"the chat template failed on this conversation: "
                            f"{type(e).__name__}: {e}") from e
    return ids


def _completion_after_prompt(prompt_ids: list[int], full_ids: list[int], tokenizer, row: int, field: str,
                             source: str) -> list[int]:
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(source, row, field, _prefix_mismatch(prompt_ids, full_ids, tokenizer, field))
    return _ending_with_eos(full_ids[len(prompt_ids):], tokenizer.eos_token_id, tokenizer)


def _prefix_mismatch(prompt_ids: list[int], full_ids: list[int], tokenizer, field: str) -> str:
    first = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b),
                 min(len(prompt_ids), len(full_ids)))
    # Long sequences are shown around the first difference; short ones whole.
    start = 0 if max(len(prompt_ids), len(full_ids)) <= 64 else max(0, first - 16)
    stop = start + 64 if start else None

    def show(ids: list[int]) -> str:
        window = ids[start:stop]
        head = f"[{start}:] …" if start else ""
        tail = " …" if stop is not None and stop < len(ids) else ""
        return f"{head}{window}{tail}  text: {tokenizer.decode(window, skip_special_tokens=False)!r}"

    return (f"the chat template renders the prompt differently when the '{field}' turn follows, so the "
            f"prompt's tokens are not a prefix of the whole conversation's tokens (first difference at "
            f"token {first}); the completion cannot be located.\n"
            f"  prompt (add_generation_prompt=True): {show(prompt_ids)}\n"
            f"  prompt + {field}:                     {show(full_ids)}\n"
            "Fix the chat template so that the generation prompt is rendered identically in both cases.")


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer,
    conversational: bool,
    completion_fields: Sequence[str],
    max_length: int | None,
    max_prompt_length: int | None,
    source: str,
) -> dict[str, list]:
    rows = batch[SOURCE_ROW] if SOURCE_ROW in batch else indices
    if conversational:
        prompts, completions = _encode_conversations(batch, rows, tokenizer, completion_fields, source)
    else:
        prompts, completions = _encode_texts(batch, tokenizer, completion_fields)
    out: dict[str, list] = {"prompt_ids": [], **{f"{name}_ids": [] for name in completion_fields}}
    out.update({name: [] for name in _HELPER_COLUMNS})
    for i, prompt in enumerate(prompts):
        fitted = truncate_ids(prompt, [completions[name][i] for name in completion_fields],
                              max_length=max_length, max_prompt_length=max_prompt_length,
                              bos_token_id=tokenizer.bos_token_id)
        out["prompt_ids"].append(fitted.prompt_ids)
        for name, ids in zip(completion_fields, fitted.completion_ids):
            out[f"{name}_ids"].append(ids)
        out["_prompt_truncated"].append(fitted.prompt_truncated)
        out["_completion_truncated"].append(fitted.completion_truncated)
        out["_drop"].append(fitted.drop_reason)
    for carried in ("label", SOURCE_ROW):
        if carried in batch:
            out[carried] = batch[carried]
    return out


def _output_features(ds: Dataset) -> Features:
    names = ("chosen", "rejected") if is_paired(ds) else ("completion",)
    features: dict[str, Any] = {"prompt_ids": IDS_FEATURE, **{f"{n}_ids": IDS_FEATURE for n in names}}
    if "label" in ds.column_names:
        features["label"] = Value("bool")
    if SOURCE_ROW in ds.column_names:
        features[SOURCE_ROW] = Value("int64")
    features.update({"_prompt_truncated": Value("bool"), "_completion_truncated": Value("bool"),
                     "_drop": Value("string")})
    return Features(features)


# ------------------------------------------------------------------------------------ caching


def _tokenize_into_cache(
    ds: Dataset, encode, directory: Path, key: str, max_length: int | None, max_prompt_length: int | None,
    num_proc: int | None,
) -> tuple[Dataset, TokenizeReport]:
    """Tokenize into a temporary folder beside ``directory`` and rename it into place when complete."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tokenized = ds.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=ds.column_names,
            features=_output_features(ds),
            num_proc=num_proc,
            # Intermediate files live in the temporary folder, not in the `datasets` cache.
            cache_file_name=str(tmp / "encoded.arrow"),
            new_fingerprint=key,
            desc="Tokenizing",
        )
        report = _count(tokenized, len(ds), max_length, max_prompt_length)
        if report.rows_dropped:
            tokenized = tokenized.filter(_keep_row, input_columns="_drop", batched=True,
                                         cache_file_name=str(tmp / "kept.arrow"),
                                         new_fingerprint=f"{key}-kept")
        tokenized = tokenized.remove_columns(_HELPER_COLUMNS)
        tokenized.save_to_disk(str(tmp / "dataset"))
        (tmp / "report.json").write_text(report.to_json())
        del tokenized
        for intermediate in tmp.glob("*.arrow"):
            intermediate.unlink(missing_ok=True)
        _publish(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loaded = _load_cached(directory, from_cache=False)
    if loaded is None:
        raise RuntimeError(f"the tokenized cache {directory} could not be read back right after writing it")
    return loaded


def _publish(tmp: Path, directory: Path) -> None:
    try:
        os.rename(tmp, directory)
    except OSError:
        if not directory.is_dir():
            raise
        # Another process finished the same work first; its result is equivalent, keep it.
        log.info("tokenized cache %s was written concurrently; using the existing one", directory)


def _keep_row(drop_reasons: list[str | None]) -> list[bool]:
    return [reason is None for reason in drop_reasons]


def _count(tokenized: Dataset, rows_in: int, max_length: int | None,
           max_prompt_length: int | None) -> TokenizeReport:
    table = tokenized.select_columns(_HELPER_COLUMNS).with_format("arrow")[:]
    dropped = Counter(r for r in table.column("_drop").to_pylist() if r is not None)
    return TokenizeReport(
        rows_in=rows_in,
        rows_out=rows_in - sum(dropped.values()),
        prompt_truncated=sum(table.column("_prompt_truncated").to_pylist()),
        completion_truncated=sum(table.column("_completion_truncated").to_pylist()),
        dropped=dict(dropped),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )


def _load_cached(directory: Path, from_cache: bool = True) -> tuple[Dataset, TokenizeReport] | None:
    """The cached ids and report in ``directory``, or None when absent or unreadable (then removed)."""
    if not directory.is_dir():
        return None
    try:
        tokenized = datasets.load_from_disk(str(directory / "dataset"))
        report = TokenizeReport.from_json((directory / "report.json").read_text())
    except Exception as e:  # a damaged cache is rebuilt rather than trusted
        log.warning("ignoring unreadable tokenized cache %s (%s: %s)", directory, type(e).__name__, e)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    report.from_cache, report.cache_path = from_cache, str(directory)
    return tokenized, report
