"""Uploads: spool the bytes, validate every row, and store the dataset whole
or not at all."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.errors import FieldViolation, InvalidArgument, NotFound, ResourceExhausted
from tunewire.services.dataset import validation
from tunewire.services.dataset.store import DatasetInfo, DatasetStore

log = logging.getLogger(__name__)

TRAIN, VALIDATION = "train", "validation"
DATA_FILE = "data.parquet"
_WRITE_BATCH_ROWS = 4096
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

SCHEMAS = {
    validation.PROMPT_COMPLETION: pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("split", pa.string())]),
    validation.CHAT: pa.schema(
        [
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("split", pa.string()),
        ]
    ),
}


@dataclass(frozen=True)
class UploadRequest:
    name: str
    format: str | None  # None: detect from the rows
    validation_fraction: float | None = None
    split_seed: int = 0


@dataclass(frozen=True)
class UploadResult:
    dataset: DatasetInfo
    already_existed: bool


def _check_request(request: UploadRequest) -> None:
    if not _NAME.match(request.name or ""):
        raise InvalidArgument.field("metadata.name", "required: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if request.validation_fraction is not None and not 0 <= request.validation_fraction <= 0.5:
        raise InvalidArgument.field("metadata.validation_fraction", f"must be in [0, 0.5], got {request.validation_fraction}")


def _split_of(canonical_row: bytes, seed: int, fraction: float) -> str:
    """A row's split from its content: identical rows always land in the same
    split (no train/validation leakage) and the choice is reproducible."""
    digest = hashlib.sha256(seed.to_bytes(8, "little") + canonical_row).digest()
    return VALIDATION if int.from_bytes(digest[:8], "little") / 2**64 < fraction else TRAIN


class DatasetManager:
    def __init__(self, store: DatasetStore, artifacts: ArtifactStore, max_upload_bytes: int):
        self.store = store
        self.artifacts = artifacts
        self.max_upload_bytes = max_upload_bytes

    def get(self, dataset_id: str) -> DatasetInfo:
        info = self.store.get(dataset_id)
        if info is None:
            raise NotFound(f"dataset {dataset_id!r} not found: list datasets to see the ids")
        return info

    def list(self, name: str = "") -> list[DatasetInfo]:
        return self.store.list(name)

    async def upload(self, request: UploadRequest, chunks: AsyncIterator[bytes]) -> UploadResult:
        _check_request(request)
        with tempfile.TemporaryFile() as spool:
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise ResourceExhausted(
                        f"upload exceeds the maximum size of {self.max_upload_bytes} bytes: split the file or raise TUNEWIRE_MAX_UPLOAD_BYTES"
                    )
                spool.write(chunk)
            spool.seek(0)
            return await asyncio.to_thread(self._ingest, request, spool)

    def _ingest(self, request: UploadRequest, spool) -> UploadResult:
        # Pass 1 validates every row and hashes the content; nothing is written.
        report = validation.ValidationReport()
        hasher = hashlib.sha256()
        fmt = request.format  # None until detected from the first row
        for row_format, row in validation.iter_jsonl(spool, request.format, report):
            fmt = row_format
            hasher.update(_canonical(row) + b"\n")
        if report.error_count:
            raise _rejection(report)
        if report.row_count == 0:
            raise InvalidArgument.field("file", "no rows: the dataset is empty")
        fraction = request.validation_fraction
        if fraction is None:
            # Small datasets keep every row for training unless asked otherwise.
            fraction = 0.1 if report.row_count >= 20 else 0.0
        hasher.update(f"format={fmt};validation_fraction={fraction};seed={request.split_seed}".encode())
        dataset_id = "ds-" + hasher.hexdigest()[:24]
        existing = self.store.get(dataset_id)
        if existing is not None:
            return UploadResult(existing, already_existed=True)

        # Pass 2 writes the rows with their split, in batches, to a staging
        # directory that is published whole.
        spool.seek(0)
        with self.artifacts.staged_dir() as staging:
            parquet_path = staging / DATA_FILE
            counts = self._write_parquet(spool, fmt, fraction, request.split_seed, parquet_path)
            if counts[TRAIN] == 0:
                raise InvalidArgument.field("metadata.validation_fraction", "leaves no training rows: lower it or add rows")
            uri = self.artifacts.publish_dir(staging, "datasets", dataset_id)
            info = DatasetInfo(
                id=dataset_id,
                name=request.name,
                format=fmt,
                row_count=report.row_count,
                split_row_counts=counts,
                uri=f"{uri}/{DATA_FILE}",
                size_bytes=parquet_path.stat().st_size,
                created_at=dt.datetime.now(dt.UTC),
            )
        stored = self.store.add(info)
        log.info("stored dataset %s (%s, %d rows, splits %s)", dataset_id, fmt, info.row_count, counts)
        return UploadResult(stored, already_existed=stored is not info)

    def _write_parquet(self, spool, fmt: str, fraction: float, seed: int, path: Path) -> dict[str, int]:
        counts = {TRAIN: 0, VALIDATION: 0}
        batch: list[dict] = []
        with pq.ParquetWriter(path, SCHEMAS[fmt]) as writer:
            for _, row in validation.iter_jsonl(spool, fmt, validation.ValidationReport()):
                split = _split_of(_canonical(row), seed, fraction)
                counts[split] += 1
                batch.append({**row, "split": split})
                if len(batch) >= _WRITE_BATCH_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMAS[fmt]))
                    batch.clear()
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMAS[fmt]))
        return counts


def _canonical(row: dict) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False).encode()


def _rejection(report: validation.ValidationReport) -> InvalidArgument:
    shown = "; ".join(str(e) for e in report.errors[:3])
    more = f" (showing the first {len(report.errors)} in the details)" if report.error_count > 3 else ""
    message = f"dataset rejected, nothing stored: {report.error_count} bad row(s){more}: {shown}. Fix these rows and upload again."
    violations = [FieldViolation(f"line {e.line}" + (f".{e.field}" if e.field else ""), e.reason) for e in report.errors]
    return InvalidArgument(message, violations)
