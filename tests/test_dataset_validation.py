"""Readers and row checks, without gRPC."""

import gzip
import io
import json

import pytest

from tunewire.services.common.errors import InvalidArgument
from tunewire.services.dataset import readers, validation


def records(data: bytes, file_name="d.jsonl", max_row_bytes=1000):
    return list(readers.open_records(io.BytesIO(data), None, file_name, max_row_bytes))


def test_jsonl_rows_are_numbered_by_line_and_blank_lines_skipped():
    out = records(b'{"a": 1}\n\n  \n{"b": 2}\n')
    assert out == [(1, {"a": 1}), (4, {"b": 2})]


def test_gzip_is_detected_by_its_magic_bytes():
    assert records(gzip.compress(b'{"a": 1}\n'), file_name="") == [(1, {"a": 1})]
    with pytest.raises(InvalidArgument):
        records(b"\x1f\x8b\x08garbage")


def test_an_over_long_line_is_one_error_and_reading_goes_on():
    out = records(b'{"a": "' + b"x" * 5000 + b'"}\n{"b": 2}\n', max_row_bytes=100)
    assert isinstance(out[0][1], validation.RowError) and "over 100 bytes" in out[0][1].reason
    assert out[1] == (2, {"b": 2})


@pytest.mark.parametrize(
    "name, head, expected",
    [
        ("x.csv.gz", b"", "csv"),
        ("x.parquet", b"", "parquet"),
        ("", b"PAR1", "parquet"),
        ("", b'  {"a"', "jsonl"),
        ("", b"a,b", "csv"),
        ("", b"", "jsonl"),
    ],
)
def test_file_format_from_name_or_content(name, head, expected):
    assert readers.file_format_of(name, head) == expected


def test_csv_rows_keep_their_row_numbers():
    out = records(b"prompt,completion\na,b\nc,d\n", file_name="d.csv")
    assert out == [(1, {"prompt": "a", "completion": "b"}), (2, {"prompt": "c", "completion": "d"})]


@pytest.mark.parametrize(
    "record, fmt, field, reason",
    [
        ({"prompt": "a"}, "prompt_completion", "completion", "missing required field"),
        ({"prompt": 3, "completion": "b"}, "prompt_completion", "prompt", "must be a string, got number"),
        ({"prompt": " ", "completion": "b"}, "prompt_completion", "prompt", "must not be empty"),
        ({"messages": []}, "chat", "messages", "non-empty array"),
        ({"messages": [{"role": "pirate", "content": "x"}]}, "chat", "messages[0].role", "unknown role"),
        ({"messages": ["hello"]}, "chat", "messages[0]", "must be an object"),
        ({"messages": "[not json"}, "chat", "messages", "JSON array"),
        ({"text": "t", "label": True}, "classification", "label", "must be a string, got boolean"),
        ({"document": "d"}, "summarization", "summary", "missing required field"),
        ({"text": None}, "text", "text", "missing required field"),
        ([1, 2], "text", "", "must be a JSON object"),
    ],
)
def test_each_bad_row_names_its_field_and_reason(record, fmt, field, reason):
    error = validation.check_row(record, fmt, 7)
    assert (error.row, error.field) == (7, field) and reason in error.reason


def test_integer_labels_become_strings_and_declared_labels_are_enforced():
    record = {"text": "t", "label": 1}
    assert validation.check_row(record, "classification", 1) is None and record["label"] == "1"
    assert "declared labels" in validation.check_row({"text": "t", "label": "x"}, "classification", 1, frozenset({"a"})).reason


def test_normalise_keeps_only_tunewire_fields():
    row = {"prompt": "a", "completion": "b", "extra": 1, "split": "train"}
    assert validation.normalise(row, "prompt_completion") == {"prompt": "a", "completion": "b"}
    assert (
        json.dumps(validation.normalise({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "chat"))
        == '{"messages": [{"role": "user", "content": "x"}]}'
    )
