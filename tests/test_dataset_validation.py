"""Row validation, without gRPC."""

import io
import json

import pytest

from tunewire.services.dataset import validation


def _validate(lines: list[bytes], fmt=None):
    report = validation.ValidationReport()
    rows = list(validation.iter_jsonl(io.BytesIO(b"\n".join(lines) + b"\n"), fmt, report))
    return rows, report


def test_good_prompt_completion_rows_are_normalised():
    rows, report = _validate([json.dumps({"prompt": "a", "completion": "b", "extra": 1}).encode(), b"", b"  "])
    assert report.error_count == 0
    assert rows == [("prompt_completion", {"prompt": "a", "completion": "b"})]


def test_chat_rows_are_detected():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"}]}
    rows, report = _validate([json.dumps(row).encode()])
    assert report.error_count == 0 and rows[0][0] == "chat"


@pytest.mark.parametrize(
    "line, field, reason",
    [
        (b"{not json", "", "invalid JSON"),
        (b"[1, 2]", "", "must be a JSON object"),
        (b'{"prompt": "a"}', "completion", "missing required field"),
        (b'{"prompt": 3, "completion": "b"}', "prompt", "must be a string, got number"),
        (b'{"prompt": " ", "completion": "b"}', "prompt", "must not be empty"),
        (b'{"prompt": "\xff\xfe", "completion": "b"}', "", "not valid UTF-8"),
    ],
)
def test_each_bad_prompt_completion_row_names_line_field_and_reason(line, field, reason):
    good = json.dumps({"prompt": "a", "completion": "b"}).encode()
    _, report = _validate([good, line], fmt=validation.PROMPT_COMPLETION)
    assert report.error_count == 1
    error = report.errors[0]
    assert (error.line, error.field) == (2, field)
    assert reason in error.reason


@pytest.mark.parametrize(
    "messages, field, reason",
    [
        ([], "messages", "non-empty array"),
        ([{"role": "pirate", "content": "x"}], "messages[0].role", "unknown role"),
        ([{"role": "user"}], "messages[0].content", "missing"),
        ([{"role": "user", "content": "hi"}], "messages", "no assistant message"),
        (["hello"], "messages[0]", "must be an object"),
    ],
)
def test_bad_chat_rows(messages, field, reason):
    _, report = _validate([json.dumps({"messages": messages}).encode()], fmt=validation.CHAT)
    assert report.error_count == 1
    assert report.errors[0].field == field and reason in report.errors[0].reason


def test_errors_are_capped_but_all_counted():
    lines = [b"bad"] * (validation.MAX_REPORTED + 5)
    _, report = _validate(lines, fmt=validation.PROMPT_COMPLETION)
    assert report.error_count == validation.MAX_REPORTED + 5
    assert len(report.errors) == validation.MAX_REPORTED
