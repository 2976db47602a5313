"""Format detection, validation, normalisation and loading of preference rows."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset, DatasetDict

from preftune.data.formats import (
    DataError,
    extract_text_prompt,
    is_conversational,
    load_rows,
    normalise,
    paired_to_unpaired,
)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory, monkeypatch):
    """`load_dataset` caches what it reads; keep that out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def canonical(ds):
    return [{k: v for k, v in row.items() if k != "source_row"} for row in ds.to_list()]


# ------------------------------------------------------------------------------------------ formats

CASES = {
    "standard text": (
        [{"prompt": "Q1?", "chosen": " yes", "rejected": " no"}],
        [{"prompt": "Q1?", "chosen": " yes", "rejected": " no"}],
        "standard", False,
    ),
    "standard conversational": (
        [{"prompt": [user("Q1?")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}],
        [{"prompt": [user("Q1?")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}],
        "standard", True,
    ),
    "implicit text": (
        [{"chosen": "Q: is it? A: yes it is", "rejected": "Q: is it? A: no"}],
        [{"prompt": "Q: is it? A:", "chosen": " yes it is", "rejected": " no"}],
        "implicit", False,
    ),
    "implicit conversational": (
        [{"chosen": [user("Q1?"), assistant("yes")], "rejected": [user("Q1?"), assistant("no")]}],
        [{"prompt": [user("Q1?")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}],
        "implicit", True,
    ),
    "unpaired text": (
        [{"prompt": "Q1?", "completion": " yes", "label": True},
         {"prompt": "Q2?", "completion": " no", "label": 0}],
        [{"prompt": "Q1?", "completion": " yes", "label": True},
         {"prompt": "Q2?", "completion": " no", "label": False}],
        "unpaired", False,
    ),
    "unpaired conversational": (
        [{"prompt": [user("Q1?")], "completion": [assistant("yes")], "label": "false"}],
        [{"prompt": [user("Q1?")], "completion": [assistant("yes")], "label": False}],
        "unpaired", True,
    ),
    "messages, opening with a system turn, multi-turn": (
        [{"messages": [system("S"), user("Q1?"), assistant("yes"), user("sure?"), assistant("yes!")]}],
        [{"prompt": [system("S"), user("Q1?")], "completion": [assistant("yes"), user("sure?"), assistant("yes!")],
          "label": True}],
        "messages", True,
    ),
    "text holding conversations": (
        [{"text": [user("Q1?"), assistant("yes")]}],
        [{"prompt": [user("Q1?")], "completion": [assistant("yes")], "label": True}],
        "text", True,
    ),
    "completion opening with a user turn": (  # the turns before the first assistant turn join the prompt
        [{"prompt": [system("S")], "completion": [user("Q1?"), assistant("yes")]}],
        [{"prompt": [system("S"), user("Q1?")], "completion": [assistant("yes")], "label": True}],
        "completion", True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_is_detected_and_normalised(case, tmp_path):
    rows, expected, kind, conversational = CASES[case]
    source = write_jsonl(tmp_path / "prefs.jsonl", rows)
    ds, report = normalise(load_rows(source), source)
    assert canonical(ds) == expected
    assert (report.format.kind, report.format.conversational) == (kind, conversational)
    assert is_conversational(ds) is conversational
    assert ds["source_row"][:] == list(range(len(rows)))


def test_hh_style_prompt_ends_at_the_last_assistant_marker():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why not"
    ds, _ = normalise(Dataset.from_dict({"chosen": [chosen], "rejected": [rejected]}), "hh")
    row = ds[0]
    assert row["prompt"].endswith("\n\nHuman: Tell me a joke\n\nAssistant:")
    assert (row["chosen"], row["rejected"]) == (" Why did the chicken", " Why not")
    assert row["prompt"] + row["chosen"] == chosen


@pytest.mark.parametrize(("chosen", "rejected", "prompt"), [
    ("The cat sat", "The car sat", "The"),           # never split the shared word "ca"
    ("Hello world", "Hello world!", "Hello"),         # one text is a prefix of the other
    ("a b\nc", "a b d", "a b"),                       # divergence right after a whole word
    ("yes", "no", ""),                                # nothing shared
])
def test_implicit_text_prompt_ends_on_a_word_boundary(chosen, rejected, prompt):
    assert extract_text_prompt(chosen, rejected) == prompt


def test_implicit_conversation_prompt_ends_before_an_assistant_turn():
    chosen = [user("a"), assistant("b"), user("c"), assistant("d")]
    rejected = [user("a"), assistant("b"), user("x"), assistant("y")]
    ds, _ = normalise(Dataset.from_dict({"chosen": [chosen], "rejected": [rejected]}), "conv")
    assert ds[0]["prompt"] == [user("a")]
    assert ds[0]["chosen"] == chosen[1:] and ds[0]["rejected"] == rejected[1:]


def test_normalising_canonical_rows_again_changes_nothing():
    rows = Dataset.from_dict({"chosen": ["x: a b", "x: c", "x: d"], "rejected": ["x: e", "x: c", "x: f"]})
    once, _ = normalise(rows, "x", skip_invalid=True)
    twice, report = normalise(once, "x")
    assert twice.to_list() == once.to_list()
    assert once["source_row"][:] == [0, 2] and report.ignored_columns == []


def test_paired_to_unpaired_labels_chosen_true_and_rejected_false():
    rows = Dataset.from_dict({"prompt": ["p", "q"], "chosen": ["a", "c"], "rejected": ["b", "d"]})
    ds, _ = normalise(rows, "x")
    unpaired = paired_to_unpaired(ds)
    assert unpaired.to_list() == [
        {"prompt": "p", "completion": "a", "label": True, "source_row": 0},
        {"prompt": "p", "completion": "b", "label": False, "source_row": 0},
        {"prompt": "q", "completion": "c", "label": True, "source_row": 1},
        {"prompt": "q", "completion": "d", "label": False, "source_row": 1},
    ]


def test_extra_columns_are_reported_not_silently_carried_or_lost(tmp_path):
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "score": 3}
    source = write_jsonl(tmp_path / "prefs.jsonl", [row])
    ds, report = normalise(load_rows(source), source)
    assert "score" not in ds.column_names
    assert report.ignored_columns == ["score"]
    assert "ignored columns: score" in str(report)


# ------------------------------------------------------------------------------------------ bad input

GOOD = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
GOOD_CONV = {"prompt": [user("Q?")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}
GOOD_UNPAIRED = {"prompt": "Q?", "completion": " yes", "label": True}

BAD_ROWS = {
    "missing field": (GOOD, {"prompt": "Q?", "chosen": None, "rejected": " no"}, "chosen", "missing"),
    "absent key": (GOOD, {"prompt": "Q?", "rejected": " no"}, "chosen", "missing"),
    "wrong type": (GOOD, {"prompt": "Q?", "chosen": 17, "rejected": " no"}, "chosen", "got int"),
    "conversation in a text dataset": (GOOD, {**GOOD, "rejected": [assistant("no")]}, "rejected", "a list"),
    "empty completion": (GOOD, {**GOOD, "chosen": "  \n"}, "chosen", "empty"),
    "identical": (GOOD, {**GOOD, "rejected": " yes"}, "rejected", "identical"),
    "message without role": (GOOD_CONV, {**GOOD_CONV, "chosen": [{"content": "yes"}]}, "chosen", "no 'role'"),
    "message without content": (GOOD_CONV, {**GOOD_CONV, "prompt": [{"role": "user"}]}, "prompt", "content"),
    "completion from the user": (GOOD_CONV, {**GOOD_CONV, "rejected": [user("no")]}, "rejected", "assistant"),
    "label not bool-like": (GOOD_UNPAIRED, {**GOOD_UNPAIRED, "label": "maybe"}, "label", "'maybe'"),
    "label out of range": (GOOD_UNPAIRED, {**GOOD_UNPAIRED, "label": 2}, "label", "got 2"),
    "conversation without an assistant turn": ({"messages": [user("Q?"), assistant("A")]},
                                               {"messages": [system("S"), user("Q?")]}, "messages",
                                               "no assistant turn (roles ['system', 'user'])"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_row_and_field(case, tmp_path):
    good, bad, field, detail = BAD_ROWS[case]
    source = write_jsonl(tmp_path / "prefs.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as caught:
        normalise(load_rows(source), source)
    message = str(caught.value)
    assert "prefs.jsonl" in message and "line 3" in message and f"field '{field}'" in message
    assert detail in message
    assert (caught.value.row, caught.value.field) == (2, field)


def test_skip_invalid_drops_exactly_the_bad_rows_and_counts_them(tmp_path):
    rows = [dict(GOOD, prompt=f"Q{i}?") for i in range(10)]
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[7]["rejected"] = rows[7]["chosen"]
    rows[8]["chosen"] = " "
    source = write_jsonl(tmp_path / "prefs.jsonl", rows)
    ds, report = normalise(load_rows(source), source, skip_invalid=True)
    assert ds["source_row"][:] == [0, 1, 2, 4, 5, 6, 9]
    assert ds["prompt"][:] == [f"Q{i}?" for i in (0, 1, 2, 4, 5, 6, 9)]
    assert report.skipped == {"identical chosen/rejected": 2, "empty completion": 1}
    assert "skipped 3 of 10 rows: 2 identical chosen/rejected, 1 empty completion" in str(report)
    assert "line 4" in report.first_problem["identical chosen/rejected"]


def test_unknown_columns_list_what_was_found_and_what_is_accepted(tmp_path):
    source = write_jsonl(tmp_path / "prefs.jsonl", [{"question": "Q?", "answer": "A"}])
    with pytest.raises(DataError, match=r"prefs\.jsonl: unknown columns \['answer', 'question'\]") as caught:
        normalise(load_rows(source), source)
    for accepted in ("standard: prompt, chosen, rejected", "implicit: chosen, rejected",
                     "unpaired: prompt, completion, label"):
        assert accepted in str(caught.value)


def test_text_and_conversation_columns_cannot_be_mixed():
    ds = Dataset.from_dict({"prompt": ["Q?"], "chosen": [[assistant("a")]], "rejected": [[assistant("b")]]})
    with pytest.raises(DataError, match="differ in kind"):
        normalise(ds, "mixed")


# ------------------------------------------------------------------------------------------ loading

ROWS = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(5)]


def save_as(kind, tmp_path):
    ds = Dataset.from_list(ROWS)
    if kind == "jsonl":
        return write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    if kind == "json":
        (tmp_path / "prefs.json").write_text(json.dumps(ROWS))
        return str(tmp_path / "prefs.json")
    if kind == "csv":
        ds.to_csv(tmp_path / "prefs.csv")
        return str(tmp_path / "prefs.csv")
    if kind == "parquet":
        ds.to_parquet(tmp_path / "prefs.parquet")
        return str(tmp_path / "prefs.parquet")
    if kind == "saved dataset":
        ds.save_to_disk(tmp_path / "saved")
        return str(tmp_path / "saved")
    DatasetDict({"train": Dataset.from_list(ROWS[:1]), "test": ds}).save_to_disk(tmp_path / "saved_dict")
    return str(tmp_path / "saved_dict")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved dataset", "saved dataset dict"])
def test_every_local_source_loads_the_same_rows(kind, tmp_path):
    source = save_as(kind, tmp_path)
    # A file is one split, "train" (all its rows); the saved dict holds ROWS under "test".
    rows = load_rows(source, split="test" if kind == "saved dataset dict" else "train")
    assert rows.select_columns(["prompt", "chosen", "rejected"]).to_list() == ROWS


def test_missing_split_of_a_saved_dataset_dict_is_named(tmp_path):
    source = save_as("saved dataset dict", tmp_path)
    with pytest.raises(DataError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        load_rows(source, split="validation")


@pytest.mark.parametrize("name", ["missing.jsonl", "data/missing", "./missing", "a/b/c"])
def test_a_missing_local_path_raises_file_not_found_naming_it(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # so `data/missing` is a local path, not the Hub id of an org "data"
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        load_rows(name)


def test_an_unknown_hub_name_says_it_is_neither_local_nor_reachable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as caught:
        load_rows("no-such-org/no-such-dataset")
    message = str(caught.value)
    assert message.startswith("no-such-org/no-such-dataset: not found locally")
    assert "Hugging Face Hub" in message
