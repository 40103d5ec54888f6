"""Train/validation/test splits: seeded, reproducible, stratified by label.

Each row gets a key from a seeded hash of its content; within each stratum
rows are ordered by key and cut into test, validation and train. Identical
rows share a key, so they never straddle a cut (no exact-duplicate leakage).

Rows that teach the same answer (a fact asked several ways, one completion)
are held out evenly: the cut takes first from the answers with the most rows
left in training, so every answer keeps a row in train while it can. A
validation or test row whose answer training never shows measures nothing
the data could teach, and the fact is lost to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunewire.services.common.errors import InvalidArgument

SPLIT_NAMES = ("train", "validation", "test")
TRAIN, VALIDATION, TEST = 0, 1, 2
MAX_FRACTION = 0.5
DEFAULT_FRACTION = 0.1
MIN_ROWS_FOR_DEFAULT_SPLITS = 20


@dataclass(frozen=True)
class SplitSpec:
    validation_fraction: float | None = None
    test_fraction: float | None = None
    validation_count: int | None = None
    test_count: int | None = None
    seed: int = 0
    stratify: bool = True

    def check(self) -> None:
        for name in ("validation", "test"):
            fraction, count = getattr(self, f"{name}_fraction"), getattr(self, f"{name}_count")
            if fraction is not None and count is not None:
                raise InvalidArgument.field(f"metadata.split.{name}_count", f"set {name}_fraction or {name}_count, not both")
            if fraction is not None and not 0 <= fraction <= MAX_FRACTION:
                raise InvalidArgument.field(f"metadata.split.{name}_fraction", f"must be in [0, {MAX_FRACTION}], got {fraction}")
            if count is not None and count < 0:
                raise InvalidArgument.field(f"metadata.split.{name}_count", f"must be >= 0, got {count}")

    def describe(self) -> str:
        return f"val={self.validation_fraction},{self.validation_count};test={self.test_fraction},{self.test_count};seed={self.seed};stratify={self.stratify}"


def _wanted(spec: SplitSpec, name: str, total: int) -> float | int:
    """A fraction (float) or an exact count (int) for the split."""
    count = getattr(spec, f"{name}_count")
    if count is not None:
        return int(count)
    fraction = getattr(spec, f"{name}_fraction")
    if fraction is None:
        return DEFAULT_FRACTION if total >= MIN_ROWS_FOR_DEFAULT_SPLITS else 0.0
    return fraction


def _shares(want: float | int, sizes: list[int]) -> list[int]:
    """Rows each stratum gives the split: a fraction of each, or a count
    spread over the strata in proportion (largest remainders)."""
    total = sum(sizes)
    exact = [want * s for s in sizes] if isinstance(want, float) else [want * s / total for s in sizes]
    floors = [int(x) for x in exact]
    target = round(sum(exact))
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - floors[i], reverse=True)[: max(0, target - sum(floors))]:
        floors[i] += 1
    return floors


def _cut(keys: np.ndarray, at: int) -> int:
    """Moves a cut forward past rows equal to the one before it."""
    while 0 < at < len(keys) and keys[at] == keys[at - 1]:
        at += 1
    return at


def _spare(keys: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """For each row, how many rows of its answer come after it by key (rows
    sharing a key count once): the rows its answer keeps in training if the
    held-out splits take it and those before it."""
    order = np.lexsort((keys, answers))
    k, a = keys[order], answers[order]
    new_answer = np.ones(len(k), dtype=bool)
    new_answer[1:] = a[1:] != a[:-1]
    new_key = new_answer.copy()
    new_key[1:] |= k[1:] != k[:-1]
    distinct = np.cumsum(new_key)  # the row's key's place among all distinct keys
    answer = np.cumsum(new_answer) - 1
    first = distinct[new_answer]
    last = np.append(first[1:] - 1, distinct[-1])  # each answer's last key's place
    spare = np.empty(len(k), dtype=np.int64)
    spare[order] = last[answer] - distinct
    return spare


def assign_splits(keys: np.ndarray, strata: np.ndarray | None, spec: SplitSpec, answers: np.ndarray | None = None) -> np.ndarray:
    """Split codes (TRAIN, VALIDATION, TEST) for rows with these seeded keys;
    `answers` (a hash of each row's answer) spreads the held-out rows over
    the answers that repeat."""
    total = len(keys)
    strata = np.zeros(total, dtype=np.int64) if strata is None or not spec.stratify else strata
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    sizes = [len(g) for g in groups]
    test_want, val_want = _wanted(spec, "test", total), _wanted(spec, "validation", total)
    test_shares, val_shares = _shares(test_want, sizes), _shares(val_want, sizes)
    out = np.full(total, TRAIN, dtype=np.int8)
    for rows, n_test, n_val in zip(groups, test_shares, val_shares, strict=True):
        spare = _spare(keys[rows], answers[rows]) if answers is not None else np.zeros(len(rows), dtype=np.int64)
        ordered = rows[np.lexsort((rows, keys[rows], -spare))]
        ordered_keys = keys[ordered]
        test_end = _cut(ordered_keys, n_test)
        val_end = _cut(ordered_keys, min(len(ordered), test_end + n_val))
        out[ordered[:test_end]] = TEST
        out[ordered[test_end:val_end]] = VALIDATION
    for code, name, want in ((VALIDATION, "validation", val_want), (TEST, "test", test_want)):
        if want and not (out == code).any():
            raise InvalidArgument.field(
                f"metadata.split.{name}_fraction",
                f"the {name} split would be empty with {total} rows: add rows, raise it, or set it to 0",
            )
    if not (out == TRAIN).any():
        raise InvalidArgument.field("metadata.split", f"leaves no training rows out of {total}: lower the validation/test shares")
    return out
