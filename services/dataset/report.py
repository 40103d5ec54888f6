"""The quality report computed at upload: duplicates, leakage across splits,
label balance, lengths in characters (and tokens on request), empty fields."""

from __future__ import annotations

import hashlib
import re
import string
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from tunewire.services.dataset.validation import FIELDS, field_texts

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalised_key(row: dict, fmt: str) -> int:
    """A 64-bit key equal for rows that differ only in case, whitespace and punctuation."""
    text = "\x1f".join(field_texts(row, fmt).values())
    text = _SPACE.sub(" ", _PUNCTUATION.sub("", text.lower())).strip()
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def length_stats(values) -> dict:
    if len(values) == 0:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {
        "min": float(a.min()),
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
    }


@dataclass
class QualityReport:
    row_count: int = 0
    split_row_counts: dict[str, int] = field(default_factory=dict)
    dropped_rows: int = 0
    dropped_examples: list[dict] = field(default_factory=list)  # {row, field, reason}
    exact_duplicate_rows: int = 0
    near_duplicate_rows: int = 0
    rows_leaked_from_train: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)
    imbalance_ratio: float = 0.0
    fields: list[dict] = field(default_factory=list)  # {field, chars, tokens, empty_rows}
    token_model: str = ""
    token_context: int = 0
    rows_over_context: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QualityReport:
        return cls(**data)


class QualityAccumulator:
    """Fed every stored row once, in file order. Keeps a few fixed-size
    numbers per row (arrays, not Python objects), so a million rows cost
    tens of megabytes whatever their length."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.exact_keys = array("Q")
        self.near_keys = array("Q")
        self.labels: Counter[str] = Counter()
        self.chars: dict[str, array] = {name: array("I") for name in FIELDS[fmt]}
        self.empty: Counter[str] = Counter()

    def add(self, row: dict, exact_key: int) -> None:
        self.exact_keys.append(exact_key)
        self.near_keys.append(normalised_key(row, self.fmt))
        if "label" in row:
            self.labels[row["label"]] += 1
        for name, text in field_texts(row, self.fmt).items():
            self.chars[name].append(len(text))

    def add_empty(self, field_name: str) -> None:
        self.empty[field_name] += 1

    def finish(self, splits: np.ndarray, split_names: tuple[str, ...], dropped: int, dropped_examples: list[dict]) -> QualityReport:
        exact = np.frombuffer(self.exact_keys, dtype=np.uint64)
        near = np.frombuffer(self.near_keys, dtype=np.uint64)
        exact_duplicates = len(exact) - len(np.unique(exact))
        # Exact duplicates are near duplicates too; count only the others.
        near_duplicates = len(near) - len(np.unique(near)) - exact_duplicates
        train = near[splits == 0]
        leaked = {name: int(np.isin(near[splits == i], train).sum()) for i, name in enumerate(split_names) if i > 0}
        counts = {name: int((splits == i).sum()) for i, name in enumerate(split_names)}
        report = QualityReport(
            row_count=len(exact),
            split_row_counts=counts,
            dropped_rows=dropped,
            dropped_examples=dropped_examples,
            exact_duplicate_rows=exact_duplicates,
            near_duplicate_rows=near_duplicates,
            rows_leaked_from_train={k: v for k, v in leaked.items() if counts.get(k)},
            label_counts=dict(sorted(self.labels.items())),
            imbalance_ratio=(max(self.labels.values()) / min(self.labels.values())) if self.labels else 0.0,
            fields=[
                {"field": name, "chars": length_stats(v), "tokens": {}, "empty_rows": self.empty[name]} for name, v in self.chars.items()
            ],
        )
        report.warnings = warnings_for(report)
        return report


def warnings_for(report: QualityReport) -> list[str]:
    out = []
    n = max(report.row_count, 1)
    if report.exact_duplicate_rows:
        out.append(f"{report.exact_duplicate_rows} rows ({report.exact_duplicate_rows / n:.0%}) are exact duplicates of earlier rows")
    if report.near_duplicate_rows:
        out.append(f"{report.near_duplicate_rows} rows differ from an earlier row only in case, spacing or punctuation")
    for split, count in report.rows_leaked_from_train.items():
        if count:
            out.append(f"{count} {split} rows also appear in train (after normalising): their metrics will flatter the model")
    if report.imbalance_ratio >= 5:
        out.append(f"labels are imbalanced: the most common is {report.imbalance_ratio:.1f}x the least common")
    if report.dropped_rows:
        out.append(f"{report.dropped_rows} invalid rows were dropped")
    if report.rows_over_context:
        out.append(
            f"{report.rows_over_context} rows are longer than {report.token_model}'s context of {report.token_context} tokens and will be truncated"
        )
    return out


class TokenCounter:
    """Token lengths per field and rows over the model's context, measured
    the way training will see each row; fed batch by batch."""

    def __init__(self, tokenizer, fmt: str, context: int, model_name: str):
        self.tokenizer, self.fmt, self.context, self.model_name = tokenizer, fmt, context, model_name
        self.per_field: dict[str, list[int]] = {name: [] for name in FIELDS[fmt]}
        self.over = 0

    def add(self, rows: list[dict]) -> None:
        from tunewire.services.common.text import row_to_messages, tokenize_for_training

        texts = [field_texts(r, self.fmt) for r in rows]
        for name in self.per_field:
            self.per_field[name] += [len(ids) for ids in self.tokenizer([t[name] for t in texts], add_special_tokens=False)["input_ids"]]
        for row, fields in zip(rows, texts, strict=True):
            if self.fmt in ("prompt_completion", "chat"):
                total = len(tokenize_for_training(self.tokenizer, row_to_messages(row), max_length=10**9).input_ids)
            else:
                total = sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in fields.values())
            self.over += total > self.context

    def finish(self, report: QualityReport) -> None:
        for entry in report.fields:
            entry["tokens"] = length_stats(self.per_field[entry["field"]])
        report.token_model, report.token_context, report.rows_over_context = self.model_name, self.context, self.over
        report.warnings = warnings_for(report)
