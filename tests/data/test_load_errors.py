"""Facts about reading data files: a file that cannot be read names the file and the line, and what to do."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

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


def deeply_nested(levels: int) -> str:
    return '{"prompt": "q", "chosen": "a", "rejected": "b", "meta": ' + "[" * levels + "]" * levels + "}"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_is_refused_by_its_line_before_parsing(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    if suffix == ".jsonl":
        path.write_text(jsonl(ROWS[:2]) + deeply_nested(5_000) + "\n")
    else:  # a JSON document over several lines: the depth carries from line to line
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in ROWS[:2]) + ",\n" + deeply_nested(5_000) + "\n]\n")
    line = 3 if suffix == ".jsonl" else 4
    assert refused(path) == (f"{path}: line {line}: JSON nested more than {formats.MAX_JSON_DEPTH} levels deep; a row "
                             "holds strings, numbers and lists of {role, content} messages: flatten or drop the deep "
                             "field")


def test_brackets_and_escaped_quotes_inside_strings_do_not_count_as_nesting(tmp_path):
    rows = [dict(ROWS[0], prompt="[" * 500 + ' \\" {{{ \\\\'), dict(ROWS[1], chosen='"]]]]"' + "\\" * 3)]
    path = tmp_path / "brackets.jsonl"
    path.write_text(jsonl(rows))
    assert formats.load_rows(str(path))["prompt"][0] == rows[0]["prompt"]


LOAD_IN_A_PROCESS = """
import sys
from preftune.data import formats
from preftune.errors import DataError
try:
    formats.load_rows(sys.argv[1])
except DataError as err:
    sys.exit(f"refused: {err}")
"""


def test_fifty_thousand_levels_end_in_a_message_not_a_crash(tmp_path):
    """At 50,000 levels `datasets` crashed the process (a segmentation fault): loaded in a process of its own."""
    path = tmp_path / "deep.jsonl"
    path.write_text(jsonl(ROWS) + deeply_nested(50_000) + "\n")
    done = subprocess.run([sys.executable, "-c", LOAD_IN_A_PROCESS, str(path)], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"PYTHONPATH": str(Path(formats.__file__).parents[2])})
    assert done.returncode == 1, done.stderr[-2000:]  # sys.exit(message): not -11, a segmentation fault
    assert done.stderr.strip().splitlines()[-1] == (
        f"refused: {path}: line {len(ROWS) + 1}: JSON nested more than {formats.MAX_JSON_DEPTH} levels deep; a row "
        "holds strings, numbers and lists of {role, content} messages: flatten or drop the deep field")


# ------------------------------------------------------------------------------------ a bad row, where to find it


def bad_row_message(path) -> str:
    with pytest.raises(DataError) as info:
        formats.normalise(formats.load_rows(str(path)), str(path))  # what `preftune train` does with a dataset
    return str(info.value)


def rows_with_row_5_bad() -> list[dict]:
    rows = [dict(r) for r in ROWS]
    rows[5]["rejected"] = rows[5]["chosen"]
    return rows


def test_a_bad_row_of_a_json_lines_file_is_named_by_the_line_an_editor_shows(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(jsonl(rows_with_row_5_bad()))
    assert bad_row_message(path).startswith(f"{path}, line 6, field 'rejected': identical")  # row 5 is line 6
    # Blank lines are not rows: with two of them before it, row 5 sits on line 8.
    lines = jsonl(rows_with_row_5_bad()).splitlines()
    path.write_text("\n".join(lines[:2] + ["", "  "] + lines[2:]) + "\n")
    assert bad_row_message(path).startswith(f"{path}, line 8, field 'rejected'")
    gz = tmp_path / "prefs.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl(rows_with_row_5_bad()).encode()))
    assert bad_row_message(gz).startswith(f"{gz}, line 6, field 'rejected'")


def test_a_bad_row_of_a_csv_file_counts_the_header_and_multi_line_fields(tmp_path):
    import csv

    rows = rows_with_row_5_bad()
    rows[1]["chosen"] = "first line\nsecond line"  # a quoted field over two lines
    path = tmp_path / "prefs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    # Line 1 the header, rows 0-4 on lines 2-7 (row 1 takes two), row 5 on line 8.
    assert bad_row_message(path).startswith(f"{path}, line 8, field 'rejected'")


def test_a_bad_row_of_a_file_without_lines_is_named_by_its_0_based_index(tmp_path):
    import datasets

    parquet = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list(rows_with_row_5_bad()).to_parquet(str(parquet))
    assert bad_row_message(parquet).startswith(f"{parquet}, row 5 (0-based), field 'rejected'")
    document = tmp_path / "prefs.json"  # a JSON list of objects, one object over several lines
    document.write_text(json.dumps(rows_with_row_5_bad(), indent=2))
    assert bad_row_message(document).startswith(f"{document}, row 5 (0-based), field 'rejected'")
