"""Reading JSONL / JSON / CSV files: records, and locations that point at the right line."""

from __future__ import annotations

import json

import pytest

from lmtune.data import tokenize_records
from lmtune.data.read import read_records
from lmtune.errors import LmtuneError

RECORDS = [{"prompt": "What is two plus two?", "completion": "It is four."},
           {"prompt": "Name three colors.", "completion": "red,\ngreen\nand blue"},
           {"prompt": "Hi", "completion": "Hello there"}]


def read_error(path) -> str:
    with pytest.raises(LmtuneError) as info:
        read_records(path)
    assert "\n" not in str(info.value)
    return str(info.value).replace(str(path), "FILE")


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert read_records(path) == [(f"{path}:1", RECORDS[0]), (f"{path}:3", RECORDS[1])]


def test_json_list_of_records(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    assert [record for _, record in read_records(path)] == RECORDS
    path.write_text(json.dumps([RECORDS[0], {"prompt": "Hi"}]))
    with pytest.raises(LmtuneError, match="record 2: field 'completion' is missing"):
        tokenize_records(str(path), _tokenizer(), 64)


def test_json_that_is_not_a_list_or_not_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS[0]))
    assert read_error(path) == "FILE: a .json data file must hold a list of records"
    path.write_text('[\n  {"prompt": "Hi",\n  "completion" "x"}\n]')
    assert read_error(path).startswith("FILE:3: not valid JSON")


def test_csv_rows_and_multiline_fields_keep_their_first_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nWhat is two plus two?,It is four.\nName three colors.,"red,\ngreen\n'
                    'and blue"\nHi,Hello there\n,\n')
    rows = read_records(path)
    assert [record for _, record in rows[:3]] == RECORDS
    assert [where for where, _ in rows] == [f"{path}:{n}" for n in (2, 3, 6, 7)]
    with pytest.raises(LmtuneError, match=f"{path}:7: field 'completion' is empty"):
        tokenize_records(str(path), _tokenizer(), 64)


def test_csv_exported_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffprompt,completion\nHi,Hello there\n".encode())
    assert read_records(path) == [(f"{path}:2", RECORDS[2])]


@pytest.mark.parametrize("name, content", [("d.jsonl", ""), ("d.jsonl", "\n  \n"), ("d.csv", ""),
                                           ("d.csv", "prompt,completion\n"), ("d.json", "[]")])
def test_an_empty_file_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert read_error(path) == "FILE: no records"


def test_missing_file_unknown_suffix_and_non_utf8(tmp_path):
    assert read_error(tmp_path / "nope.jsonl") == "data file not found: FILE"
    (tmp_path / "d.xml").write_text("hello")
    assert read_error(tmp_path / "d.xml").startswith("FILE: unknown data format '.xml'")
    (tmp_path / "d.csv").write_bytes("prompt,completion\nCaf\xe9,ol\xe9\n".encode("latin-1"))
    assert read_error(tmp_path / "d.csv").startswith("FILE: not UTF-8 text")


def _tokenizer():
    from conftest import build_tokenizer

    return build_tokenizer()
