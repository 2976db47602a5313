"""Prompts and completions → token ids, exactly as training encodes them (``preftune.data.tokenize``).

A *prompt* is either a string or a conversation: a non-empty list of ``{"role": str, "content": str}``
messages. One batch of prompts is all of one kind, as a dataset is (a JSONL file mixing the two cannot be
written back as one dataset either).

* Text prompts are encoded with the tokenizer's default special tokens, so they start with BOS where the
  tokenizer adds one; an empty prompt becomes ``[BOS]`` (or ``[EOS]`` without a BOS), so the first
  completion token always has a predictor.
* Conversations are rendered by the tokenizer's chat template with ``add_generation_prompt=True``.
* A completion (text) is encoded on its own without special tokens and ends with one EOS; after a
  conversation it is the assistant turn ``{"role": "assistant", "content": completion}`` and its ids are
  what the full conversation's template rendering adds after the prompt's.

These are the code paths of the training tokenizer itself (called, not copied), so a sample drawn here
and then trained on, or a completion scored here by a reward model, sees the ids training sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from preftune.data.tokenize import encode_conversations, encode_texts, render_conversations
from preftune.errors import DataError

Message = dict[str, str]
Prompt = str | list[Message]


def is_conversation(prompt: Any) -> bool:
    """True for a list of messages (the conversational kind), False for a string."""
    return isinstance(prompt, list)


def check_prompts(prompts: Sequence[Any], source: str = "prompts") -> bool:
    """Validate a batch of prompts; returns whether they are conversations.

    Raises :class:`DataError` naming ``source`` and the 0-based index of the first bad prompt: neither a
    string nor a list of messages, a malformed message, an empty conversation, or a prompt of the other
    kind than the first one.
    """
    if isinstance(prompts, (str, Mapping)):
        raise DataError(source, None, None, f"expected a list of prompts, got a {type(prompts).__name__}")
    if not prompts:
        raise DataError(source, None, None, "there are no prompts")
    conversational = is_conversation(prompts[0])
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, list)):
            raise DataError(source, i, "prompt", f"expected a string or a list of {{role, content}} messages, "
                            f"got {type(prompt).__name__}")
        if is_conversation(prompt) != conversational:
            kinds = ("a conversation", "a string") if conversational else ("a string", "a conversation")
            raise DataError(source, i, "prompt", f"is {kinds[1]} but prompt 0 is {kinds[0]}; all prompts of "
                            "one file must be of one kind")
        if conversational:
            _check_messages(prompt, source, i)
    return conversational


def _check_messages(messages: list, source: str, index: int) -> None:
    if not messages:
        raise DataError(source, index, "prompt", "the conversation has no messages")
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(source, index, "prompt", f"message {j} is {type(message).__name__}, expected a "
                            "{role, content} dict")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(source, index, "prompt", f"message {j}: '{key}' must be a string, got "
                                f"{type(message.get(key)).__name__}")


def encode_prompts(tokenizer, prompts: Sequence[Prompt], source: str = "prompts") -> list[list[int]]:
    """Token ids of each prompt, as training encodes a row's prompt (see the module docstring)."""
    if check_prompts(prompts, source):
        _require_template(tokenizer, source)
        return render_conversations(tokenizer, [list(p) for p in prompts], range(len(prompts)), "prompt", source,
                       add_generation_prompt=True)
    ids, _ = encode_texts({"prompt": list(prompts)}, tokenizer, ())
    return ids


def encode_completions(
    tokenizer, prompts: Sequence[Prompt], completions: Sequence[str], source: str = "completions"
) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompt_ids, completion_ids)`` of ``prompts[i] + completions[i]`` as training encodes a row.

    ``completion_ids`` always end with EOS (appended when the text does not produce one, as for a
    paired row's ``chosen``).
    """
    check_aligned(prompts, completions)
    if check_prompts(prompts, source):
        _require_template(tokenizer, source)
        batch = {"prompt": [list(p) for p in prompts],
                 "completion": [[{"role": "assistant", "content": c}] for c in completions]}
        prompt_ids, encoded, _ = encode_conversations(batch, range(len(prompts)), tokenizer, ("completion",), source)
    else:
        prompt_ids, encoded = encode_texts({"prompt": list(prompts), "completion": list(completions)}, tokenizer,
                                            ("completion",))
    return prompt_ids, encoded["completion"]


def fit_positions(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], positions: int | None,
                  source: str, prompts: Sequence[Prompt] | None = None) -> tuple[list[list[int]], int]:
    """Completions cut to the room ``positions`` leaves after their prompt, keeping their start (as training cuts a
    row at ``max_length``: the EOS is lost); returns them and how many were cut. A prompt that leaves no room is
    refused with :class:`DataError` naming ``source`` and its index (and the prompt's start, given ``prompts``)."""
    if positions is None:
        return [list(c) for c in completion_ids], 0
    out, cut = [], 0
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        room = positions - len(prompt)
        if room < 1:
            shown = f" ({prompt_text(prompts[i])[:60]!r}…)" if prompts is not None else ""
            raise DataError(source, i, "prompt", f"the prompt{shown} takes {len(prompt)} tokens of the model's "
                            f"{positions} positions, leaving no room for the completion; shorten the prompt or use "
                            "a model with more positions")
        cut += len(completion) > room
        out.append(list(completion[:room]))
    return out, cut


def prompt_text(prompt: Prompt) -> str:
    """A conversation as plain text for judges that read text only (a lexicon, a user's function): the
    messages' contents joined by blank lines; a string prompt as it is."""
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)


def check_aligned(prompts: Sequence, completions: Sequence) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; they are paired by index")


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute is spent on padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _require_template(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(source, None, "prompt", "the prompts are conversations but the tokenizer has no "
                        "chat_template; give plain-text prompts or a tokenizer with a chat template")
