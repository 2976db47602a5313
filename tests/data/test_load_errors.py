"""Facts about reading data files: a file that cannot be read names the file and the line, and what to do."""

from __future__ import annotations

import gzip
import json

import pytest

from preftune.data import formats
from preftune.errors import DataError

ROWS = [{"prompt": f"question {i}", "chosen": f"good answer {i} ✓", "rejected": f"bad answer {i}"} for i in range(6)]


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def refused(path) -> str:
    with pytest.raises(DataError) as info:
        formats.load_rows(str(path))
    return str(info.value)


@pytest.mark.parametrize("block", [formats._SCAN_BLOCK, 5])  # 5 bytes: lines and characters span blocks
def test_a_byte_that_is_not_utf8_names_its_line(tmp_path, monkeypatch, block):
    monkeypatch.setattr(formats, "_SCAN_BLOCK", block)
    lines = jsonl(ROWS).encode().split(b"\n")
    lines[3] = lines[3].replace(b"question", b"qu\xe9stion")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines))
    message = refused(path)
    assert message.startswith(f"{path}: line 4: byte 0xe9 (byte 15 of the line) is not UTF-8")
    assert "save the file as UTF-8" in message


def test_valid_utf8_across_scan_blocks_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_SCAN_BLOCK", 3)  # "✓" is 3 bytes: a block never ends inside it (whole lines)
    path = tmp_path / "ok.jsonl"
    path.write_text(jsonl(ROWS), encoding="utf-8")
    assert formats.load_rows(str(path))["chosen"] == [r["chosen"] for r in ROWS]


def test_a_compressed_file_is_checked_too(tmp_path):
    path = tmp_path / "latin1.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(ROWS).encode().replace(b"bad answer 1", b"b\xe4d answer 1")))
    assert refused(path).startswith(f"{path}: line 2: byte 0xe4")


def test_a_csv_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,chosen,rejected\nq,good,bad\nq2,caf\xe9,bad\n")
    assert refused(path).startswith(f"{path}: line 3: byte 0xe9")


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("empty.csv", ""),
                                          ("empty.json", " \n")])
def test_an_empty_file_says_it_is_empty_and_what_is_expected(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    message = refused(path)
    assert message.startswith(f"{path}: the file is empty (no rows); expected")


def test_a_broken_json_line_names_its_line_and_column(tmp_path):
    lines = jsonl(ROWS).splitlines()
    lines[2] = lines[2][:-1]  # the closing brace is missing
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = refused(path)
    assert message.startswith(f"{path}: line 3, column {len(lines[2]) + 1}: not valid JSON")


def test_a_json_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(jsonl(ROWS[:2]) + "[1, 2]\n")
    assert refused(path).startswith(f"{path}: line 3: holds a JSON list, not an object")


def test_a_broken_json_document_names_its_line(tmp_path):
    path = tmp_path / "rows.json"
    text = json.dumps(ROWS, indent=1, ensure_ascii=False).splitlines()
    text[5] = text[5].rstrip(",")  # a missing comma between two keys
    path.write_text("\n".join(text))
    assert refused(path).startswith(f"{path}: line 7, column")


def test_a_json_document_and_json_lines_named_json_both_load(tmp_path):
    document, lines = tmp_path / "document.json", tmp_path / "lines.json"
    document.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2))
    lines.write_text(jsonl(ROWS))
    assert len(formats.load_rows(str(document))) == len(formats.load_rows(str(lines))) == len(ROWS)


def test_a_csv_error_gives_the_parsers_own_reason(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,chosen,rejected\nq,good,bad\nq2,good,bad,extra\n")
    message = refused(path)
    # Not "DatasetGenerationError: An error occurred while generating the dataset", the wrapper's message.
    assert "Expected 3 fields" in message and "DatasetGenerationError" not in message


def test_a_missing_file_is_a_data_error_and_still_a_file_not_found_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="no such file or folder") as info:
        formats.load_rows(str(path))
    assert isinstance(info.value, FileNotFoundError)
