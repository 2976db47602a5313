"""Tokenization of canonical rows: special tokens, the prompt-prefix property, truncation and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from preftune.data.formats import DataError, normalise
from preftune.data.tokenize import tokenize_rows, truncate_ids

# The tiny tokenizer's chat template with the generation prompt of a "thinking" model: the prompt rendered
# alone ends in "<think>", which the rendered conversation does not contain.
THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
)
# Closes assistant turns with EOS and a newline, like Qwen's "<|im_end|>\n".
EOS_NEWLINE_TEMPLATE = THINKING_TEMPLATE.replace("<|eos|>", "<|eos|>\n").replace("<think>", "")
# Closes assistant turns with ".\n" and no EOS.
NO_EOS_TEMPLATE = EOS_NEWLINE_TEMPLATE.replace("<|eos|>", ".")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def canonical(rows, source="prefs.jsonl", skip_invalid=False):
    ds, _ = normalise(Dataset.from_list(rows), source, skip_invalid=skip_invalid)
    return ds


def tokenize(ds, tokenizer, tmp_path, max_length=None, max_prompt_length=None, **kwargs):
    return tokenize_rows(ds, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                         cache_dir=tmp_path / "cache", **kwargs)


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


# ------------------------------------------------------------------------------------------ text rows


def test_text_row_is_bos_prompt_then_completion_then_eos(tokenizer, tmp_path):
    ds = canonical([{"prompt": "What is the capital of France?", "chosen": " Paris", "rejected": " Lyon"}])
    row = tokenize(ds, tokenizer, tmp_path)[0][0]
    assert decode(tokenizer, row["prompt_ids"] + row["chosen_ids"]) == \
        "<|bos|>What is the capital of France? Paris<|eos|>"
    assert decode(tokenizer, row["rejected_ids"]) == " Lyon<|eos|>"
    everything = row["prompt_ids"] + row["chosen_ids"] + row["rejected_ids"]
    assert everything.count(tokenizer.bos_token_id) == 1 and row["prompt_ids"][0] == tokenizer.bos_token_id
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.eos_token_id


def test_eos_already_at_the_end_of_the_text_is_not_doubled(tokenizer, tmp_path):
    ds = canonical([{"prompt": "Q?", "chosen": " yes<|eos|>", "rejected": " no"}])
    row = tokenize(ds, tokenizer, tmp_path)[0][0]
    assert row["chosen_ids"].count(tokenizer.eos_token_id) == 1
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id


def test_unpaired_rows_keep_their_label(tokenizer, tmp_path):
    ds = canonical([{"prompt": "Q?", "completion": " yes", "label": 1},
                    {"prompt": "Q?", "completion": " no", "label": 0}])
    rows = tokenize(ds, tokenizer, tmp_path)[0].to_list()
    assert [r["label"] for r in rows] == [True, False]
    assert [decode(tokenizer, r["completion_ids"]) for r in rows] == [" yes<|eos|>", " no<|eos|>"]


# ------------------------------------------------------------------------------------------ conversations


def test_conversation_prompt_ids_are_a_prefix_of_the_whole_conversation(tokenizer, tmp_path):
    prompt = [user("What is the capital of France?")]
    ds = canonical([{"prompt": prompt, "chosen": [assistant("Paris")], "rejected": [assistant("Lyon")]}])
    row = tokenize(ds, tokenizer, tmp_path)[0][0]
    full = tokenizer.apply_chat_template(prompt + [assistant("Paris")], tokenize=True, return_dict=True)
    assert row["prompt_ids"] + row["chosen_ids"] == full["input_ids"]
    assert decode(tokenizer, row["prompt_ids"]) == \
        "<|bos|><|user|>What is the capital of France?<|assistant|>"
    assert decode(tokenizer, row["chosen_ids"]) == "Paris<|eos|>"
    assert decode(tokenizer, row["rejected_ids"]) == "Lyon<|eos|>"


def test_template_that_changes_the_prompt_raises_data_error_with_both_token_lists(tokenizer, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", THINKING_TEMPLATE)
    good = {"prompt": [user("hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}
    # Row 1 is skipped as invalid, so the bad row is row 2 of the file but row 1 of the canonical rows.
    ds = canonical([good, {**good, "rejected": good["chosen"]}, good], skip_invalid=True)
    prompt_ids = tokenizer.apply_chat_template([user("hi")], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template([user("hi"), assistant("yes")], tokenize=True,
                                             return_dict=True)["input_ids"]
    with pytest.raises(DataError) as caught:
        tokenize(ds, tokenizer, tmp_path, source="prefs.jsonl")
    message = str(caught.value)
    assert message.startswith("prefs.jsonl, row 0 (0-based), field 'chosen': ")
    assert str(list(prompt_ids)) in message and str(list(full_ids)) in message
    assert "<|assistant|><think>" in message and "<|assistant|>yes<|eos|>" in message
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written left behind


def test_template_without_eos_gets_one_appended(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", NO_EOS_TEMPLATE)
    ds = canonical([{"prompt": [user("hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}])
    row = tokenize(ds, tokenizer, tmp_path)[0][0]
    assert decode(tokenizer, row["chosen_ids"]) == "yes.\n<|eos|>"


def test_whitespace_after_the_templates_eos_is_not_trained(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", EOS_NEWLINE_TEMPLATE)
    ds = canonical([{"prompt": [user("hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}])
    row = tokenize(ds, tokenizer, tmp_path)[0][0]
    assert decode(tokenizer, row["chosen_ids"]) == "yes<|eos|>"


# ------------------------------------------------------------------------------------------ truncation


def test_truncate_ids_keeps_bos_and_the_prompt_end_then_the_completion_start():
    bos = 1
    fitted = truncate_ids([bos, 10, 11, 12, 13, 14], [[20, 21, 22, 2], [30, 2]], max_length=6,
                          max_prompt_length=4, bos_token_id=bos)
    assert fitted.prompt_ids == [bos, 12, 13, 14]
    assert fitted.completion_ids == [[20, 21], [30, 2]]
    assert (fitted.prompt_truncated, fitted.completion_truncated, fitted.drop_reason) == (True, True, None)


def test_truncation_is_counted_and_rows_without_room_are_dropped(tokenizer, tmp_path):
    long_prompt = "The movie was good and the acting was great. " * 4
    rows = [
        {"prompt": "Q?", "chosen": " yes", "rejected": " no"},                           # fits
        {"prompt": long_prompt, "chosen": " yes", "rejected": " no"},                    # prompt cut
        {"prompt": "Q?", "chosen": " the plot was slow and dull" * 4, "rejected": " no"},  # completion cut
    ]
    ds = canonical(rows)
    full = tokenize(ds, tokenizer, tmp_path)[0]
    assert len(full[1]["prompt_ids"]) > 24 and len(full[2]["prompt_ids"] + full[2]["chosen_ids"]) > 24
    out, report = tokenize(ds, tokenizer, tmp_path, max_length=24, max_prompt_length=12)
    counts = (report.rows_in, report.rows_out, report.prompt_truncated, report.completion_truncated)
    assert counts == (3, 3, 1, 1)
    cut = out[1]["prompt_ids"]
    assert len(cut) == 12 and cut[0] == tokenizer.bos_token_id and cut[1:] == full[1]["prompt_ids"][-11:]
    assert out[2]["chosen_ids"] == full[2]["chosen_ids"][: 24 - len(full[2]["prompt_ids"])]
    assert out[0] == full[0]
    assert str(report) == ("tokenized 3 of 3 rows; 1 prompts left-truncated to max_prompt_length=12; "
                           "1 rows with completions cut to fit max_length=24 (EOS lost)")

    # Without max_prompt_length the long prompt alone exceeds max_length: its row is dropped and counted.
    out, report = tokenize(ds, tokenizer, tmp_path, max_length=24)
    assert out["source_row"][:] == [0, 2]
    assert report.dropped == {"prompt leaves no room for a completion within max_length": 1}
    assert "dropped 1: 1 prompt leaves no room" in str(report)


def test_max_prompt_length_must_leave_room_for_a_completion(tokenizer, tmp_path):
    ds = canonical([{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize(ds, tokenizer, tmp_path, max_length=8, max_prompt_length=8)


# ------------------------------------------------------------------------------------------ cache

ROWS = [{"prompt": f"Q{i}?", "chosen": " yes " * (i + 1), "rejected": " no"} for i in range(6)]


def test_second_call_loads_the_cache_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    ds = canonical(ROWS)
    first, first_report = tokenize(ds, tokenizer, tmp_path, max_length=10, max_prompt_length=4)
    assert not first_report.from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenizer was called on a cache hit")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    second, second_report = tokenize(ds, tokenizer, tmp_path, max_length=10, max_prompt_length=4)
    assert second_report.from_cache and second_report.cache_path == first_report.cache_path
    assert second.to_list() == first.to_list()
    assert str(second_report).startswith(str(first_report))  # the counts survive the cache
    stored = json.loads((Path(second_report.cache_path) / "report.json").read_text())
    assert stored["completion_truncated"] == first_report.completion_truncated > 0


def test_cache_key_changes_with_lengths_and_template(tokenizer, tmp_path, monkeypatch):
    ds = canonical(ROWS)
    _, base = tokenize(ds, tokenizer, tmp_path, max_length=10)
    _, longer = tokenize(ds, tokenizer, tmp_path, max_length=11)
    assert not longer.from_cache and longer.cache_path != base.cache_path
    monkeypatch.setattr(tokenizer, "chat_template", NO_EOS_TEMPLATE)
    _, other_template = tokenize(ds, tokenizer, tmp_path, max_length=10)
    assert not other_template.from_cache and other_template.cache_path != base.cache_path


def test_an_interrupted_write_leaves_no_cache_that_looks_complete(tokenizer, tmp_path, monkeypatch):
    ds = canonical(ROWS)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Dataset, "save_to_disk", crash)
        with pytest.raises(KeyboardInterrupt):
            tokenize(ds, tokenizer, tmp_path)
    assert not list((tmp_path / "cache").iterdir())
    # A temporary folder left by a killed process is never read as a cache.
    (tmp_path / "cache" / ".tmp-leftover").mkdir()
    out, report = tokenize(ds, tokenizer, tmp_path)
    assert not report.from_cache and len(out) == len(ROWS)


def test_default_cache_dir_follows_preftune_cache(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "root"))
    ds = canonical(ROWS)
    _, report = tokenize_rows(ds, tokenizer, max_length=None, max_prompt_length=None)
    assert report.cache_path.startswith(str(tmp_path / "root" / "tokenized"))
