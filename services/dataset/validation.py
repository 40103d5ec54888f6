"""Row shapes (formats) and the checks each row must pass.

A record is a dict read from the file (after column mapping). check_row names
the first problem of a record; normalise keeps only tunewire's fields, in a
fixed shape, so the content hash depends on nothing else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tunewire.services.common.text import ROLES

PROMPT_COMPLETION = "prompt_completion"
CHAT = "chat"
CLASSIFICATION = "classification"
SUMMARIZATION = "summarization"
TEXT = "text"

# Each format's fields, in order. Every field is a non-empty string, except
# chat's messages (a list of {role, content}).
FIELDS = {
    PROMPT_COMPLETION: ("prompt", "completion"),
    CHAT: ("messages",),
    CLASSIFICATION: ("text", "label"),
    SUMMARIZATION: ("document", "summary"),
    TEXT: ("text",),
}
FORMATS = tuple(FIELDS)
SPLIT_FIELD = "split"
SPLITS = ("train", "validation", "test")
MAX_REPORTED = 20


@dataclass(frozen=True)
class RowError:
    row: int  # 1-based line (JSONL) or row (CSV, Parquet) number
    field: str  # "" when the whole row is at fault
    reason: str

    def __str__(self) -> str:
        where = f"row {self.row}" + (f": {self.field}" if self.field else "")
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


def type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _check_text(record: dict, name: str, row: int, prefix: str = "") -> RowError | None:
    label = prefix + name
    if name not in record or record[name] is None:
        return RowError(row, label, "missing required field")
    value = record[name]
    if not isinstance(value, str):
        return RowError(row, label, f"must be a string, got {type_name(value)}")
    if not value.strip():
        return RowError(row, label, "must not be empty")
    if _has_invalid_utf8(value):
        return RowError(row, label, "not valid UTF-8")
    return None


# Undecodable bytes arrive as lone surrogates (errors="surrogateescape").
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _has_invalid_utf8(value: str) -> bool:
    return _ESCAPED_BYTE.search(value) is not None


def _check_messages(record: dict, row: int) -> RowError | None:
    messages = record.get("messages")
    if messages is None:
        return RowError(row, "messages", "missing required field")
    if isinstance(messages, str):  # CSV cells carry the list as JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            return RowError(row, "messages", f"must be a JSON array of {{role, content}} objects: {exc.msg}")
        record["messages"] = messages
    if not isinstance(messages, list) or not messages:
        return RowError(row, "messages", "must be a non-empty array of {role, content} objects")
    for i, message in enumerate(messages):
        prefix = f"messages[{i}]."
        if not isinstance(message, dict):
            return RowError(row, f"messages[{i}]", f"must be an object, got {type_name(message)}")
        if (error := _check_text(message, "role", row, prefix)) is not None:
            return error
        if message["role"] not in ROLES:
            return RowError(row, prefix + "role", f"unknown role {message['role']!r}: use one of {', '.join(ROLES)}")
        if (error := _check_text(message, "content", row, prefix)) is not None:
            return error
    if not any(m["role"] == "assistant" for m in messages):
        return RowError(row, "messages", "has no assistant message: nothing to learn from")
    return None


def check_row(record, fmt: str, row: int, labels: frozenset[str] = frozenset()) -> RowError | None:
    """The first problem of one record in format `fmt`, or None. Labels that
    are integers are accepted and become strings."""
    if not isinstance(record, dict):
        return RowError(row, "", f"must be a JSON object, got {type_name(record)}")
    if fmt == CHAT:
        error = _check_messages(record, row)
    elif fmt == CLASSIFICATION:
        label = record.get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            record["label"] = str(label)
        error = _check_text(record, "text", row) or _check_text(record, "label", row)
        if error is None and labels and record["label"] not in labels:
            error = RowError(row, "label", f"{record['label']!r} is not one of the declared labels {sorted(labels)}")
    else:
        error = next((e for name in FIELDS[fmt] if (e := _check_text(record, name, row))), None)
    if error is None and record.get(SPLIT_FIELD) not in (None, "", *SPLITS):
        error = RowError(row, SPLIT_FIELD, f"{record[SPLIT_FIELD]!r} is not a split: use one of {', '.join(SPLITS)}")
    return error


def normalise(record: dict, fmt: str) -> dict:
    """Only the fields tunewire uses (extra keys dropped)."""
    if fmt == CHAT:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]}
    return {name: record[name] for name in FIELDS[fmt]}


def answer_text(row: dict, fmt: str) -> str | None:
    """What a row teaches the model to answer (its completion, last assistant
    message or summary); None for formats without one."""
    if fmt == PROMPT_COMPLETION:
        return row["completion"]
    if fmt == SUMMARIZATION:
        return row["summary"]
    if fmt == CHAT:
        return next((m["content"] for m in reversed(row["messages"]) if m["role"] == "assistant"), None)
    return None


def detect_format(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return CHAT
    if "prompt" in record or "completion" in record:
        return PROMPT_COMPLETION
    if "document" in record or "summary" in record:
        return SUMMARIZATION
    if "label" in record:
        return CLASSIFICATION
    if "text" in record:
        return TEXT
    return None


def field_texts(row: dict, fmt: str) -> dict[str, str]:
    """Each field's text, for length statistics (chat: all message contents)."""
    if fmt == CHAT:
        return {"messages": "\n".join(m["content"] for m in row["messages"])}
    return {name: row[name] for name in FIELDS[fmt]}
