"""Canonical rows → token ids, truncated to the configured lengths and cached on disk.

Output columns: ``prompt_ids`` with ``chosen_ids`` and ``rejected_ids`` (paired rows) or with
``completion_ids`` and ``label`` (unpaired rows), all lists of ints; ``source_row`` is carried over when
the input has it. ``prompt_ids + chosen_ids`` is exactly the sequence the model is trained on.
Conversational rows add ``chosen_mask``/``rejected_mask`` or ``completion_mask``: one bool per completion
token, True where the token belongs to an assistant turn — the only tokens scored (trained on).
With ``kl_completions=True`` (KTO) unpaired rows also get ``kl_completion_ids`` (and
``kl_completion_mask``): the fixed mismatched completion of KTO's reference point, see
:func:`mismatched_partners`.

* Text rows: the prompt is encoded with the tokenizer's default special tokens (so it starts with BOS
  where the tokenizer adds one); each completion is encoded on its own without special tokens; every
  completion token is scored.
* Conversational rows: the prompt is rendered by the chat template with ``add_generation_prompt=True``,
  the full conversation (prompt + completion) without; the completion ids are what follows the prompt
  ids. Assistant turn t spans the tokens from the end of ``conversation[:t]`` rendered with
  ``add_generation_prompt=True`` to the end of ``conversation[:t+1]`` rendered without; each of these
  renderings must be a token prefix of the whole conversation, or the row raises :class:`DataError` naming
  the row and the turn — slicing by length anyway would silently train on the wrong tokens. Tokens between
  assistant turns (user, system, tool turns and the template's headers) stay in the sequence, unscored;
  turns after the last assistant turn are left out (they cannot change a scored token's log-prob).
* Every completion ends at an EOS: appended to the last assistant turn when missing; when the template
  closes the turn with EOS followed only by whitespace (Qwen's ``<|im_end|>\\n``), the whitespace is dropped
  from the last turn and left unscored in earlier ones, since generation stops at EOS and would never
  produce it.
* Truncation: a prompt longer than ``max_prompt_length`` keeps its end (and its leading BOS, which
  models expect at position 0); completions are then cut, keeping their start, to ``max_completion_length``
  tokens and so that prompt plus the longest completion fit ``max_length``; a row whose prompt leaves no
  room for one completion token is dropped. :class:`TokenizeReport` counts all three. A KL completion is
  cut to fit its row's prompt.
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
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Value

from preftune.data.formats import SOURCE_ROW, DataError, is_conversational, is_paired

log = logging.getLogger(__name__)

# Bump whenever the ids produced for the same inputs change: it is part of the cache key.
TOKENIZE_VERSION = "preftune-tokenize-3"
NO_ROOM = "prompt leaves no room for a completion within max_length"
IDS_FEATURE = [Value("int32")]
MASK_FEATURE = [Value("bool")]
CHECKSUM_FILE = "checksum.json"  # row count and table_checksum of the cached ids, checked on every load
_HELPER_COLUMNS = ["_prompt_truncated", "_completion_truncated", "_drop"]


@dataclass
class TokenizeReport:
    """What :func:`tokenize_rows` did; stored beside the cached ids so a cache hit reports the same."""

    rows_in: int
    rows_out: int
    prompt_truncated: int = 0
    completion_truncated: int = 0  # rows where a completion was cut (max_completion_length, max_length), losing EOS
    dropped: dict[str, int] = field(default_factory=dict)
    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
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
            limits = ([f"max_completion_length={self.max_completion_length}"] if self.max_completion_length else []) \
                + ([f"max_length={self.max_length}"] if self.max_length else [])
            parts.append(f"{self.completion_truncated} rows with completions cut to fit {' and '.join(limits)} "
                         "(EOS lost)")
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
    kl_completions: bool = False,
    max_completion_length: int | None = None,
) -> tuple[Dataset, TokenizeReport]:
    """Tokenize canonical rows (from :func:`preftune.data.formats.normalise`); see the module docstring.

    ``source`` names the data in errors (rows are named by their ``source_row`` when present). A second
    call with the same dataset, tokenizer and lengths loads the ids from the cache without tokenizing.
    ``kl_completions`` (unpaired rows only) adds KTO's fixed mismatched completions.
    """
    _check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; completions must end with one")
    conversational = is_conversational(ds)
    if conversational and not tokenizer.chat_template:
        raise DataError(source or "the dataset", None, None, "the rows are conversations (lists of {role, content} "
                        "messages) but the tokenizer has no chat template to render them; set the config key "
                        "chat_template to a Jinja file or the template text (chat_template: template.jinja), or use a "
                        "tokenizer that has one")

    if kl_completions and is_paired(ds):
        raise ValueError("kl_completions is for unpaired rows (prompt, completion, label); these rows are paired")
    key = cache_key(ds, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                    kl_completions=kl_completions, max_completion_length=max_completion_length)
    directory = resolve_cache_dir(cache_dir) / key
    cached = _load_cached(directory)
    if cached is not None:
        return cached
    encode = partial(
        _tokenize_batch,
        tokenizer=tokenizer,
        conversational=conversational,
        completion_fields=completion_fields(ds),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        source=source or "dataset",
    )
    return _tokenize_into_cache(ds, encode, directory, key, max_length, max_prompt_length, num_proc,
                                kl_completions, max_completion_length)


def truncate_ids(
    prompt_ids: list[int],
    completion_ids: Sequence[list[int]],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    bos_token_id: int | None,
    max_completion_length: int | None = None,
) -> Truncation:
    """Fit one row into the lengths: left-truncate the prompt, then cut completions keeping their start, to
    ``max_completion_length`` tokens and to the room ``max_length`` leaves after the prompt."""
    prompt_truncated = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = _keep_end(prompt_ids, max_prompt_length, bos_token_id)
    completions = [list(c) for c in completion_ids]
    room = None if max_length is None else max_length - len(prompt_ids)
    if room is not None and room < 1:
        return Truncation(prompt_ids, completions, prompt_truncated, False, drop_reason=NO_ROOM)
    if max_completion_length is not None:
        room = max_completion_length if room is None else min(room, max_completion_length)
    if room is None:
        return Truncation(prompt_ids, completions, prompt_truncated, False)
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


def cache_key(ds: Dataset, tokenizer, *, max_length: int | None, max_prompt_length: int | None,
              kl_completions: bool = False, max_completion_length: int | None = None) -> str:
    """The cache folder name (and the fingerprint of the result) for tokenizing ``ds`` with ``tokenizer``."""
    parts = {
        "version": TOKENIZE_VERSION,
        "dataset": ds._fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "kl_completions": kl_completions,
    }
    if max_completion_length is not None:  # absent when unset: the caches written before it existed stay valid
        parts["max_completion_length"] = max_completion_length
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


def _whitespace_after_eos(ids: list[int], eos_id: int, tokenizer) -> int:
    """How many tokens follow the last EOS of ``ids`` when they are whitespace only (else 0)."""
    if not ids or ids[-1] == eos_id or eos_id not in ids:
        return 0
    last = len(ids) - 1 - ids[::-1].index(eos_id)
    return 0 if tokenizer.decode(ids[last + 1:], skip_special_tokens=False).strip() else len(ids) - last - 1


def _ending_with_eos(ids: list[int], eos_id: int, tokenizer) -> list[int]:
    """``ids`` ending at an EOS: append one, or cut whitespace-only tokens after the last one."""
    if ids and ids[-1] == eos_id:
        return ids
    after = _whitespace_after_eos(ids, eos_id, tokenizer)
    return ids[: len(ids) - after] if after else ids + [eos_id]


def encode_texts(batch: dict[str, list], tokenizer, fields: Sequence[str]) -> tuple[list, dict[str, list]]:
    prompts = tokenizer(batch["prompt"], return_attention_mask=False)["input_ids"]
    eos_id = tokenizer.eos_token_id  # a property lookup per row is measurably slow
    completions = {}
    for name in fields:
        encoded = tokenizer(batch[name], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        completions[name] = [_ending_with_eos(list(ids), eos_id, tokenizer) for ids in encoded]
    # An empty prompt (SFT on whole texts) still needs one token to predict the first completion token.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    return [list(p) or [start] for p in prompts], completions


def encode_conversations(
    batch: dict[str, list], rows: Sequence[int], tokenizer, fields: Sequence[str], source: str
) -> tuple[list, dict[str, list], dict[str, list]]:
    """Prompt ids, and per completion field its ids and assistant-token masks (see the module docstring)."""
    prompts = render_conversations(tokenizer, batch["prompt"], rows, "prompt", source, add_generation_prompt=True)
    completions, masks = {}, {}
    for name in fields:
        conversations = [p + c for p, c in zip(batch["prompt"], batch[name])]
        full = render_conversations(tokenizer, conversations, rows, name, source, add_generation_prompt=False)
        located = [
            _assistant_tokens(conversation, len(p), prompt_ids, full_ids, tokenizer, row, name, source)
            for conversation, p, prompt_ids, full_ids, row in zip(conversations, batch["prompt"], prompts, full, rows)
        ]
        completions[name] = [ids for ids, _ in located]
        masks[name] = [mask for _, mask in located]
    return prompts, completions, masks


def render_conversations(tokenizer, conversations: list, rows: Sequence[int], field: str, source: str,
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


def _assistant_tokens(conversation: list[dict], first_turn: int, prompt_ids: list[int], full_ids: list[int],
                      tokenizer, row: int, field: str, source: str) -> tuple[list[int], list[bool]]:
    """The completion's ids — what follows the prompt, through the last assistant turn — and its mask, True on
    the tokens of assistant turns. ``conversation`` is prompt + completion; its turn ``first_turn`` opens the
    completion. Each turn is located by rendering the conversation up to it (see the module docstring)."""
    spans = []  # [start, stop) of each assistant turn in full_ids
    for turn in range(first_turn, len(conversation)):
        if conversation[turn]["role"] != "assistant":
            continue
        before = prompt_ids if turn == first_turn else render_conversations(
            tokenizer, [conversation[:turn]], [row], field, source, add_generation_prompt=True)[0]
        through = full_ids if turn == len(conversation) - 1 else render_conversations(
            tokenizer, [conversation[: turn + 1]], [row], field, source, add_generation_prompt=False)[0]
        for part, label in ((before, f"conversation[:{turn}] + generation prompt"),
                            (through, f"conversation[:{turn + 1}]")):
            if full_ids[: len(part)] != part:
                raise DataError(source, row, field, _prefix_mismatch(part, full_ids, tokenizer, field, turn, label))
        spans.append((len(before), len(through)))
    if not spans:
        raise DataError(source, row, field, "the completion has no assistant turn, so nothing would be trained")

    eos_id, offset = tokenizer.eos_token_id, len(prompt_ids)
    ids = full_ids[offset : spans[-1][0]]
    mask = [False] * len(ids)
    for start, stop in spans[:-1]:
        # Whitespace after an earlier turn's EOS stays in the sequence but is never generated: not scored.
        scored = (stop - start) - _whitespace_after_eos(full_ids[start:stop], eos_id, tokenizer)
        mask[start - offset : start - offset + scored] = [True] * scored
    last = _ending_with_eos(full_ids[slice(*spans[-1])], eos_id, tokenizer)
    return ids + last, mask + [True] * len(last)


def _prefix_mismatch(part_ids: list[int], full_ids: list[int], tokenizer, field: str, turn: int,
                     label: str) -> str:
    first = next((i for i, (a, b) in enumerate(zip(part_ids, full_ids)) if a != b),
                 min(len(part_ids), len(full_ids)))
    # Long sequences are shown around the first difference; short ones whole.
    start = 0 if max(len(part_ids), len(full_ids)) <= 64 else max(0, first - 16)
    stop = start + 64 if start else None

    def show(ids: list[int]) -> str:
        window = ids[start:stop]
        head = f"[{start}:] …" if start else ""
        tail = " …" if stop is not None and stop < len(ids) else ""
        return f"{head}{window}{tail}  text: {tokenizer.decode(window, skip_special_tokens=False)!r}"

    return (f"assistant turn {turn} (counting the messages of prompt + {field} from 0) cannot be located: the "
            f"chat template renders the conversation up to it differently from the start of the whole "
            f"conversation, so those tokens are not a prefix of the whole conversation's tokens (first "
            f"difference at token {first}).\n"
            f"  {label}: {show(part_ids)}\n"
            f"  whole conversation (prompt + {field}): {show(full_ids)}\n"
            "Fix the chat template so that earlier turns and the generation prompt render the same whatever "
            "follows them.")


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
    max_completion_length: int | None = None,
) -> dict[str, list]:
    rows = batch[SOURCE_ROW] if SOURCE_ROW in batch else indices
    if conversational:
        prompts, completions, masks = encode_conversations(batch, rows, tokenizer, completion_fields, source)
    else:
        (prompts, completions), masks = encode_texts(batch, tokenizer, completion_fields), {}
    out: dict[str, list] = {"prompt_ids": [], **{f"{name}_ids": [] for name in completion_fields}}
    out.update({f"{name}_mask": [] for name in masks})
    out.update({name: [] for name in _HELPER_COLUMNS})
    for i, prompt in enumerate(prompts):
        fitted = truncate_ids(prompt, [completions[name][i] for name in completion_fields],
                              max_length=max_length, max_prompt_length=max_prompt_length,
                              bos_token_id=tokenizer.bos_token_id, max_completion_length=max_completion_length)
        out["prompt_ids"].append(fitted.prompt_ids)
        for name, ids in zip(completion_fields, fitted.completion_ids):
            out[f"{name}_ids"].append(ids)
            if name in masks:
                out[f"{name}_mask"].append(masks[name][i][: len(ids)])
        out["_prompt_truncated"].append(fitted.prompt_truncated)
        out["_completion_truncated"].append(fitted.completion_truncated)
        out["_drop"].append(fitted.drop_reason)
    for carried in ("label", SOURCE_ROW) + (() if completion_fields else ("prompt",)):
        if carried in batch:
            out[carried] = batch[carried]
    return out


def completion_fields(ds: Dataset) -> tuple[str, ...]:
    """The completion columns of canonical rows: chosen and rejected, the completion, or none (prompt-only)."""
    if is_paired(ds):
        return ("chosen", "rejected")
    return ("completion",) if "completion" in ds.column_names else ()


def _output_features(ds: Dataset) -> Features:
    names = completion_fields(ds)
    features: dict[str, Any] = {"prompt_ids": IDS_FEATURE, **{f"{n}_ids": IDS_FEATURE for n in names}}
    if not names:  # prompt-only rows keep their prompt: online methods' judges read it
        features["prompt"] = ds.features["prompt"]
    if is_conversational(ds):
        features.update({f"{n}_mask": MASK_FEATURE for n in names})
    if "label" in ds.column_names:
        features["label"] = Value("bool")
    if SOURCE_ROW in ds.column_names:
        features[SOURCE_ROW] = Value("int64")
    features.update({"_prompt_truncated": Value("bool"), "_completion_truncated": Value("bool"),
                     "_drop": Value("string")})
    return Features(features)


# ------------------------------------------------------------------------------------ KTO's mismatched pairs


def mismatched_partners(prompts: Sequence[Hashable]) -> list[int]:
    """For each row i, the row j whose completion KTO pairs with prompt i to estimate its reference point.

    KTO's z₀ (Ethayarajh et al. 2024, arXiv 2402.01306, §4) is the KL between policy and reference,
    estimated on mismatched pairs (x_i, y_j). The pair is fixed here, once, so that the precomputed
    reference and the live one score the same (x_i, y_j) whatever the batch order. Rule, deterministic and
    cyclic over rows in order: j = i + s, with s the longest run of consecutive rows sharing a prompt — a
    shift, so every completion is used once (pairs split for KTO, chosen then rejected under one prompt,
    give s = 2: chosen with the next chosen, rejected with the next rejected); if row i + s still has
    prompt i (the prompt recurs), j is the first row after it with another prompt. When all rows share one
    prompt, j = i + 1 (another completion of that prompt); a single row is its own partner.
    ``prompts`` holds one hashable key per row (equal keys ⇔ equal prompts).
    """
    n = len(prompts)
    if len(set(prompts)) <= 1:
        return [(i + 1) % n for i in range(n)]
    # change[k] (k < n): the first position k' > k, read cyclically, whose prompt differs from row k's run;
    # it exists within n steps because not all prompts are equal.
    doubled = list(prompts) * 2
    change = [2 * n] * (2 * n)
    for k in range(2 * n - 2, -1, -1):
        change[k] = k + 1 if doubled[k + 1] != doubled[k] else change[k + 1]
    shift = max(change[i] - i for i in range(n))  # the longest run (< n)
    partners = []
    for i in range(n):
        j = i + shift
        if doubled[j] == prompts[i]:
            j = change[j % n] + (j - j % n)
        partners.append(j % n)
    return partners


def _prompt_keys(tokenized: Dataset) -> list[int]:
    keys: list[int] = []
    for table in tokenized.select_columns(["prompt_ids"]).with_format("arrow").iter(batch_size=4096):
        # Python hashes tuples of ints deterministically (PYTHONHASHSEED salts only str and bytes).
        keys.extend(hash(tuple(ids)) for ids in table.column("prompt_ids").to_pylist())
    return keys


def _with_kl_completions(tokenized: Dataset, max_length: int | None, cache_file: Path,
                         fingerprint: str) -> Dataset:
    """Add ``kl_completion_ids`` (and ``kl_completion_mask``): the completion of row
    :func:`mismatched_partners` [i], cut so that it fits after prompt i within ``max_length``."""
    partners = mismatched_partners(_prompt_keys(tokenized))
    names = [n for n in ("completion_ids", "completion_mask") if n in tokenized.column_names]
    completions = tokenized.select_columns(names).with_format("arrow")

    def add(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        taken = completions[[partners[i] for i in indices]]
        return {
            f"kl_{name}": [ids if max_length is None else ids[: max_length - len(prompt)]
                           for ids, prompt in zip(taken.column(name).to_pylist(), batch["prompt_ids"])]
            for name in names
        }

    features = tokenized.features.copy()
    features.update({f"kl_{name}": tokenized.features[name] for name in names})
    return tokenized.map(add, batched=True, with_indices=True, features=features,
                         cache_file_name=str(cache_file), new_fingerprint=fingerprint,
                         desc="Fixing KTO's mismatched completions")


# ------------------------------------------------------------------------------------ caching


def _tokenize_into_cache(
    ds: Dataset, encode, directory: Path, key: str, max_length: int | None, max_prompt_length: int | None,
    num_proc: int | None, kl_completions: bool, max_completion_length: int | None = None,
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
        report.max_completion_length = max_completion_length
        if report.rows_dropped:
            tokenized = tokenized.filter(_keep_row, input_columns="_drop", batched=True,
                                         cache_file_name=str(tmp / "kept.arrow"),
                                         new_fingerprint=f"{key}-kept")
        tokenized = tokenized.remove_columns(_HELPER_COLUMNS)
        if kl_completions:  # after dropping rows: a partner is always a kept row
            tokenized = _with_kl_completions(tokenized, max_length, tmp / "kl.arrow", f"{key}-kl")
        tokenized.save_to_disk(str(tmp / "dataset"))
        (tmp / "report.json").write_text(report.to_json())
        (tmp / CHECKSUM_FILE).write_text(json.dumps({"rows": len(tokenized), "checksum": table_checksum(tokenized)}))
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
    """The cached ids and report in ``directory``, or None when absent or not to be trusted — unreadable, or
    their row count or checksum differ from what was recorded when they were written (then removed, saying so)."""
    if not directory.is_dir():
        return None
    try:
        tokenized = datasets.load_from_disk(str(directory / "dataset"))
        report = TokenizeReport.from_json((directory / "report.json").read_text())
        recorded = json.loads((directory / CHECKSUM_FILE).read_text())
    except Exception as e:  # a damaged cache is rebuilt rather than trusted
        log.warning("ignoring unreadable tokenized cache %s (%s: %s); tokenizing again", directory,
                    type(e).__name__, e)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    if recorded.get("rows") != len(tokenized) or recorded.get("checksum") != table_checksum(tokenized):
        log.warning("ignoring tokenized cache %s: its ids are not those written (row count or checksum differ); "
                    "tokenizing again", directory)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    report.from_cache, report.cache_path = from_cache, str(directory)
    return tokenized, report


def table_checksum(ds: Dataset) -> str:
    """A hash of every value of every column (names sorted), independent of how Arrow chunks or slices them."""
    import pyarrow as pa

    digest = hashlib.blake2b(digest_size=16)
    table = ds.with_format("arrow")[:]
    for name in sorted(table.column_names):
        digest.update(name.encode())
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            offsets = column.offsets.to_numpy()
            digest.update((offsets - offsets[0]).tobytes())
            digest.update(column.flatten().to_numpy(zero_copy_only=False).tobytes())
        else:
            digest.update(json.dumps(column.to_pylist(), default=str).encode())
    return digest.hexdigest()
