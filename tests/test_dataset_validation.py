"""Readers and row checks, without gRPC."""

import gzip
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# Inputs built to hurt: each is a clear error, never an exception escaping
# the reader, and memory stays bounded by the row limit.


def buffered(data: bytes):
    # As the service's spool file: a buffered stream that can peek.
    return io.BufferedReader(io.BytesIO(data))


def read_all(data: bytes, file_name="d.jsonl", max_row_bytes=1 << 20, max_bytes=1 << 62):
    return list(readers.open_records(buffered(data), None, file_name, max_row_bytes, max_bytes))


def file_error(data: bytes, **kwargs) -> str:
    with pytest.raises(InvalidArgument) as caught:
        read_all(data, **kwargs)
    assert caught.value.violations[0].field == "file"
    return caught.value.violations[0].description


def test_deep_nesting_and_huge_integers_are_row_errors():
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    digits = b'{"prompt": ' + b"7" * 5000 + b', "completion": "b"}\n'
    out = read_all(deep + digits + b'{"prompt": "a", "completion": "b"}\n')
    assert "nested too deeply" in out[0][1].reason
    assert "more than 4300 digits" in out[1][1].reason
    assert out[2] == (3, {"prompt": "a", "completion": "b"})


def test_csv_that_cannot_be_parsed_rejects_the_file_naming_the_record():
    assert "line 3" in (m := file_error(b'prompt,completion\na,b\n"x,y\nz,w\n', file_name="d.csv")) and "never closed" in m
    assert "line 2" in file_error(b'prompt,completion\n"ab"cd,x\n', file_name="d.csv")


def test_a_line_of_commas_is_refused_before_it_becomes_cells():
    import tracemalloc

    stream = buffered(b"prompt,completion\n" + b"," * 5_000_000 + b"\n")
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument) as caught:
            list(readers.open_records(stream, None, "d.csv", 1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "runs past 2000 characters" in caught.value.violations[0].description
    assert peak < 2_000_000  # five million cells would take forty megabytes


def test_binary_files_are_named_binary():
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
    assert "binary" in file_error(png, file_name="")
    assert "binary" in file_error(png, file_name="rows.csv")
    assert "binary" in file_error(gzip.compress(png), file_name="rows.jsonl.gz")


def test_what_a_compressed_file_holds_is_bounded():
    rows = b'{"prompt": "a", "completion": "b"}\n' * 20_000
    assert len(gzip.compress(rows)) < 10_000
    assert "decompressed, the file is over 100000 bytes" in file_error(gzip.compress(rows), max_bytes=100_000)
    assert len(read_all(gzip.compress(rows), max_bytes=len(rows))) == 20_000


def test_parquet_rows_and_columns_are_bounded_uncompressed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    long_chat = [{"role": "user", "content": "x" * 3000}, {"role": "assistant", "content": "y"}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": long_chat}, {"messages": long_chat[:1] * 0 + [long_chat[1]]}]), path)
    out = read_all(path.read_bytes(), file_name="chat.parquet", max_row_bytes=1000)
    assert "over 1000 bytes" in out[0][1].reason and isinstance(out[1][1], dict)
    assert "uncompressed" in file_error(path.read_bytes(), file_name="chat.parquet", max_bytes=1000)


FRAGMENTS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b",",
    b":",
    b"\n",
    b"\r",
    b"\x00",
    b"\xff",
    b"9" * 50,
    b"prompt",
    b"completion",
    b"\\",
    b"PAR1",
    b" ",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=8)), max_size=60).map(b"".join),
    st.sampled_from(["d.jsonl", "d.csv", "d.parquet", ""]),
    st.booleans(),
)
def test_any_bytes_give_rows_row_errors_or_a_file_error(data, file_name, compress):
    """Whatever a file holds, reading it and checking its rows ends in rows,
    row errors or InvalidArgument on the file: nothing else escapes (which
    the service would answer INTERNAL)."""
    if compress:
        data = gzip.compress(data)
    try:
        out = read_all(data, file_name=file_name, max_row_bytes=200, max_bytes=10_000)
    except InvalidArgument as exc:
        assert exc.violations[0].field == "file"
        return
    for number, record in out:
        assert isinstance(number, int)
        if not isinstance(record, validation.RowError):  # any JSON value: the row checks judge it
            fmt = validation.detect_format(record) or validation.PROMPT_COMPLETION
            error = validation.check_row(record, fmt, number, frozenset())
            assert error is None or isinstance(error, validation.RowError)
