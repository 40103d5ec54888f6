"""Row-by-row parsing and validation of uploaded files.

Rows are read one line at a time from the spooled upload, so memory stays
bounded by the row, not the file. Each bad row is recorded with its line
number, field and reason; the first MAX_REPORTED are kept, all are counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from tunewire.services.common.text import ROLES

PROMPT_COMPLETION = "prompt_completion"
CHAT = "chat"
FORMATS = (PROMPT_COMPLETION, CHAT)
MAX_REPORTED = 20


@dataclass(frozen=True)
class RowError:
    line: int
    field: str  # "" when the whole row is at fault
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f": {self.field}" if self.field else "")
        return f"{where}: {self.reason}"


@dataclass
class ValidationReport:
    errors: list[RowError] = field(default_factory=list)
    error_count: int = 0
    row_count: int = 0

    def add(self, error: RowError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED:
            self.errors.append(error)


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _check_text(row: dict, name: str, line: int, prefix: str = "") -> RowError | None:
    label = prefix + name
    if name not in row:
        return RowError(line, label, "missing required field")
    value = row[name]
    if not isinstance(value, str):
        return RowError(line, label, f"must be a string, got {_type_name(value)}")
    if not value.strip():
        return RowError(line, label, "must not be empty")
    return None


def check_row(row, fmt: str, line: int) -> RowError | None:
    """The first problem of one parsed row in format `fmt`, or None."""
    if not isinstance(row, dict):
        return RowError(line, "", f"must be a JSON object, got {_type_name(row)}")
    if fmt == PROMPT_COMPLETION:
        return _check_text(row, "prompt", line) or _check_text(row, "completion", line)
    messages = row.get("messages")
    if messages is None:
        return RowError(line, "messages", "missing required field")
    if not isinstance(messages, list) or not messages:
        return RowError(line, "messages", "must be a non-empty array of {role, content} objects")
    for i, message in enumerate(messages):
        prefix = f"messages[{i}]."
        if not isinstance(message, dict):
            return RowError(line, f"messages[{i}]", f"must be an object, got {_type_name(message)}")
        if (error := _check_text(message, "role", line, prefix)) is not None:
            return error
        if message["role"] not in ROLES:
            return RowError(line, prefix + "role", f"unknown role {message['role']!r}: use one of {', '.join(ROLES)}")
        if (error := _check_text(message, "content", line, prefix)) is not None:
            return error
    if not any(m["role"] == "assistant" for m in messages):
        return RowError(line, "messages", "has no assistant message: nothing to learn from")
    return None


def normalise(row: dict, fmt: str) -> dict:
    """Only the fields tunewire uses, in a fixed shape (extra keys dropped)."""
    if fmt == PROMPT_COMPLETION:
        return {"prompt": row["prompt"], "completion": row["completion"]}
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


def detect_format(row) -> str | None:
    if isinstance(row, dict):
        if "messages" in row:
            return CHAT
        if "prompt" in row or "completion" in row:
            return PROMPT_COMPLETION
    return None


def iter_jsonl(stream: BinaryIO, fmt: str | None, report: ValidationReport) -> Iterator[tuple[str, dict]]:
    """Yields (format, normalised row) for each good row; records bad ones in
    `report`. `fmt` None detects the format from the first JSON object."""
    for line_number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.add(RowError(line_number, "", f"not valid UTF-8 (byte {exc.start})"))
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            report.add(RowError(line_number, "", f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if fmt is None:
            fmt = detect_format(row)
            if fmt is None:
                report.add(RowError(line_number, "", "cannot tell the format: expected 'prompt'/'completion' or 'messages' fields"))
                continue
        error = check_row(row, fmt, line_number)
        if error is not None:
            report.add(error)
            continue
        report.row_count += 1
        yield fmt, normalise(row, fmt)
