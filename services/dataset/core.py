"""Uploads and imports: spool the bytes, validate every row, split, report,
and store the dataset whole or not at all. Also reads, deletes and pins."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import tempfile
from array import array
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tunewire.services.common import paging
from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.db import exclusive
from tunewire.services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, ResourceExhausted
from tunewire.services.common.models import check_requested_model
from tunewire.services.common.sources import Source, check_source, roots_for
from tunewire.services.dataset import readers, validation
from tunewire.services.dataset.report import QualityAccumulator, QualityReport, TokenCounter
from tunewire.services.dataset.splits import SPLIT_NAMES, SplitSpec, assign_splits
from tunewire.services.dataset.store import HOLDER_LENGTH, DatasetInfo, DatasetStore

log = logging.getLogger(__name__)

DATA_FILE = "data.parquet"
REPORT_FILE = "report.json"
_WRITE_BATCH_ROWS = 4096
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_PAGE_SIZE = 1000

_STRING = pa.string()
SCHEMAS = {
    fmt: pa.schema([(name, _STRING) for name in names] + [("split", _STRING)])
    for fmt, names in validation.FIELDS.items()
    if fmt != validation.CHAT
}
SCHEMAS[validation.CHAT] = pa.schema([("messages", pa.list_(pa.struct([("role", _STRING), ("content", _STRING)]))), ("split", _STRING)])


@dataclass(frozen=True)
class UploadRequest:
    name: str
    format: str | None = None  # None: detect from the rows
    file_format: str | None = None  # None: from file_name, else sniffed
    file_name: str = ""
    column_mapping: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    split: SplitSpec = SplitSpec()
    drop_invalid_rows: bool = False
    token_stats_model: str = ""


@dataclass(frozen=True)
class UploadResult:
    dataset: DatasetInfo
    already_existed: bool
    report: QualityReport


@dataclass
class _Scan:
    """What the validating pass learns; a few numbers per row."""

    fmt: str | None
    report: validation.ValidationReport
    quality: QualityAccumulator | None = None
    keys: array = field(default_factory=lambda: array("Q"))  # seeded content keys, for splits
    answers: array = field(default_factory=lambda: array("Q"))  # what each row teaches, hashed (splits spread repeats)
    label_codes: array = field(default_factory=lambda: array("i"))
    label_names: dict[str, int] = field(default_factory=dict)
    given_splits: array = field(default_factory=lambda: array("b"))
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)


def _check_request(request: UploadRequest) -> None:
    if not _NAME.match(request.name or ""):
        raise InvalidArgument.field("metadata.name", "required: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    known = {name for names in validation.FIELDS.values() for name in names} | {validation.SPLIT_FIELD}
    for ours, theirs in request.column_mapping.items():
        if ours not in known:
            raise InvalidArgument.field(f"metadata.column_mapping[{ours}]", f"not a tunewire field: use one of {sorted(known)}")
        if not theirs:
            raise InvalidArgument.field(f"metadata.column_mapping[{ours}]", "names no column")
    request.split.check()


def _canonical(row: dict) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False).encode()


def _key(canonical: bytes, seed: int = 0) -> int:
    """A 64-bit hash of a row's content (seeded for splits)."""
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8, key=seed.to_bytes(8, "little")).digest(), "little")


class DatasetManager:
    def __init__(
        self,
        store: DatasetStore,
        artifacts: ArtifactStore,
        max_upload_bytes: int,
        max_row_bytes: int = 1 << 20,
        import_roots: tuple[str, ...] = (),
        model_cache: Path | None = None,
        max_project_bytes: int | None = None,
        model_roots: tuple[str, ...] = (),
    ):
        self.store = store
        self.model_roots = model_roots
        self.max_project_bytes = max_project_bytes
        self.artifacts = artifacts
        self.max_upload_bytes = max_upload_bytes
        self.max_row_bytes = max_row_bytes
        self.import_roots = import_roots
        self.model_cache = model_cache

    # Reads

    def get(self, project: str, dataset_id: str) -> DatasetInfo:
        info = self.store.get(dataset_id)
        # Another project's dataset is as unknown as one that never existed.
        if info is None or info.project != project:
            raise NotFound(f"dataset {dataset_id!r} not found: list datasets to see the ids")
        return info

    def list(self, project: str, name: str = "") -> list[DatasetInfo]:
        return self.store.list(project, name)

    def report(self, project: str, dataset_id: str) -> QualityReport:
        return QualityReport.from_dict(self.get(project, dataset_id).report)

    def _row_batches(self, info: DatasetInfo, split: str, start: int = 0) -> Iterator[list[tuple[int, dict]]]:
        """(index, row) batches of the split from row index `start` on. The
        row groups before the one holding `start` are skipped unread (from
        their metadata), so a late page costs what an early one does."""
        if split and split not in SPLIT_NAMES:
            raise InvalidArgument.field("split", f"{split!r} is not a split: use one of {', '.join(SPLIT_NAMES)}")
        fs, path = self.artifacts.fs, info.uri
        with fs.open(path.removeprefix("file://"), "rb") as f:
            parquet = pq.ParquetFile(f)
            index, first_group = 0, 0
            while first_group < parquet.num_row_groups and index + parquet.metadata.row_group(first_group).num_rows <= start:
                index += parquet.metadata.row_group(first_group).num_rows
                first_group += 1
            if first_group == parquet.num_row_groups:
                return
            for batch in parquet.iter_batches(batch_size=256, row_groups=range(first_group, parquet.num_row_groups)):
                out = []
                for row in batch.to_pylist():
                    if index >= start and (not split or row["split"] == split):
                        out.append((index, row))
                    index += 1
                if out:
                    yield out

    def list_rows(self, project: str, dataset_id: str, split: str, page_size: int, page_token: str) -> tuple[list[tuple[int, dict]], str]:
        """A page of (index, row); the token names the next page ('' at the end)."""
        info = self.get(project, dataset_id)
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument.field("page_size", f"must be in [0, {MAX_PAGE_SIZE}], got {page_size}")
        size = page_size or 100
        after = paging.page_position(page_token, default=-1)
        page: list[tuple[int, dict]] = []
        for batch in self._row_batches(info, split, start=after + 1):
            for index, row in batch:
                if len(page) == size:
                    return page, paging.page_token(page[-1][0])
                page.append((index, row))
        return page, ""

    def stream_rows(self, project: str, dataset_id: str, split: str) -> Iterator[list[tuple[int, dict]]]:
        return self._row_batches(self.get(project, dataset_id), split)

    # Pins and deletion

    def pin(self, project: str, dataset_id: str, holder: str) -> DatasetInfo:
        if not holder:
            raise InvalidArgument.field("holder", "required: who uses the dataset (a job id)")
        if len(holder) > HOLDER_LENGTH:
            raise InvalidArgument.field("holder", f"at most {HOLDER_LENGTH} characters, got {len(holder)}")
        with self._exclusive(project):  # not between a delete's check of the pins and its removal
            info = self.get(project, dataset_id)
            self.store.pin(dataset_id, holder)
        log.info("dataset %s pinned for %s", dataset_id, holder)
        return info

    def unpin(self, project: str, dataset_id: str, holder: str) -> None:
        self.get(project, dataset_id)
        self.store.unpin(dataset_id, holder)

    def delete(self, project: str, dataset_id: str) -> None:
        with self._exclusive(project):  # not while the same content is being uploaded again, or pinned
            self.get(project, dataset_id)
            holders = self.store.delete(dataset_id)
            if holders:
                raise FailedPrecondition(
                    f"dataset {dataset_id} is used by {', '.join(sorted(holders))}: it can be deleted once they no longer need it"
                )
            self.artifacts.delete("datasets", dataset_id)
        log.info("deleted dataset %s", dataset_id)

    # Uploads

    def _check_upload(self, request: UploadRequest) -> None:
        _check_request(request)
        if request.token_stats_model:
            check_requested_model(request.token_stats_model, "metadata.token_stats_model", self.model_roots)

    def _size_check(self, project: str):
        """A check of the bytes received so far against the upload limit
        (ResourceExhausted past it), once the project is known to have room
        left under its quota: the quota itself is checked on the dataset as
        stored (_check_quota)."""
        self._check_quota(project, 0)

        def check(size: int) -> None:
            if size > self.max_upload_bytes:
                raise ResourceExhausted(
                    f"upload exceeds the maximum size of {self.max_upload_bytes} bytes: split the file or raise TUNEWIRE_MAX_UPLOAD_BYTES"
                )

        return check

    def _check_quota(self, project: str, adding: int) -> None:
        """ResourceExhausted if the project's stored datasets and `adding`
        more bytes pass its quota (at 0: if it is full already)."""
        if not self.max_project_bytes:
            return
        used = self.store.project_bytes(project)
        if used + adding > self.max_project_bytes or used >= self.max_project_bytes:
            what = f"this upload ({adding} bytes as stored) would pass" if adding else "that is"
            raise ResourceExhausted(
                f"project {project} stores {used} bytes of datasets; {what} its quota of {self.max_project_bytes}: "
                "delete datasets it no longer needs, or ask an operator to raise TUNEWIRE_PROJECT_MAX_DATASET_BYTES"
            )

    async def upload(self, project: str, request: UploadRequest, chunks: AsyncIterator[bytes]) -> UploadResult:
        self._check_upload(request)
        check_size = await asyncio.to_thread(self._size_check, project)
        with tempfile.TemporaryFile() as spool:
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                check_size(size)
                spool.write(chunk)
            return await asyncio.to_thread(self._ingest, project, request, spool)

    async def import_from(self, project: str, request: UploadRequest, source_uri: str) -> UploadResult:
        self._check_upload(request)
        source = self._check_import_source(project, source_uri)
        check_size = await asyncio.to_thread(self._size_check, project)

        def copy_in(spool) -> UploadResult:
            try:
                with source.open("rb") as f:
                    copied = 0
                    while chunk := f.read(1 << 20):
                        copied += len(chunk)
                        check_size(copied)
                        spool.write(chunk)
            except FileNotFoundError:
                raise NotFound(f"source_uri {source_uri!r}: no such file") from None
            except IsADirectoryError:
                raise InvalidArgument.field("source_uri", f"{source_uri!r} is a directory: give the file to import") from None
            name = request.file_name or source.path.rsplit("/", 1)[-1]
            return self._ingest(project, UploadRequest(**{**request.__dict__, "file_name": name}), spool)

        with tempfile.TemporaryFile() as spool:
            return await asyncio.to_thread(copy_in, spool)

    def _check_import_source(self, project: str, source_uri: str) -> Source:
        """The source if it lies under one of the project's import roots, and
        not in the artifact store (every project's datasets and adapters)."""
        if not self.import_roots:
            raise FailedPrecondition("imports are disabled on this service: set TUNEWIRE_IMPORT_ROOTS to the paths or URLs it may read")
        return check_source(source_uri, roots_for(self.import_roots, project), outside=(self.artifacts.root,))

    def _ingest(self, project: str, request: UploadRequest, spool) -> UploadResult:
        scan = self._scan(request, spool)
        report, fmt = scan.report, scan.fmt
        if report.error_count and not request.drop_invalid_rows:
            raise _rejection(report)
        if report.row_count == 0:
            raise InvalidArgument.field(
                "file", "no valid rows: the dataset is empty" if report.error_count else "no rows: the dataset is empty"
            )
        labels = sorted(scan.label_names)
        if fmt == validation.CLASSIFICATION and len(labels) < 2:
            raise InvalidArgument.field("label", f"classification needs at least two labels, found {labels}")
        splits = self._splits(scan, request.split)
        # Content-addressed within the project: the same file uploaded by
        # another project is another dataset, and says nothing of this one.
        scan.digest.update(f"project={project};format={fmt};".encode() + splits.tobytes())
        dataset_id = "ds-" + scan.digest.hexdigest()[:24]
        dropped = [{"row": e.row, "field": e.field, "reason": e.reason} for e in report.errors]
        quality = scan.quality.finish(splits, SPLIT_NAMES, report.error_count, dropped)
        with self._exclusive(project):
            existing = self.store.get(dataset_id)
            if existing is not None:  # nothing to write
                return self._named(existing, request.name)

        with self.artifacts.staged_dir() as staging:
            parquet_path = staging / DATA_FILE
            self._write(request, spool, fmt, splits, parquet_path, quality)
            (staging / REPORT_FILE).write_text(json.dumps(quality.to_dict(), indent=2))
            # One at a time per project from here: the same content uploaded
            # twice at once, a delete of it, and the quota's check and use.
            with self._exclusive(project):
                existing = self.store.get(dataset_id)
                if existing is not None:
                    return self._named(existing, request.name)
                # The quota counts what is stored: a small compressed upload can hold far more.
                self._check_quota(project, parquet_path.stat().st_size)
                uri = self.artifacts.publish_dir(staging, "datasets", dataset_id)
                info = DatasetInfo(
                    id=dataset_id,
                    name=request.name,
                    format=fmt,
                    row_count=report.row_count,
                    split_row_counts=quality.split_row_counts,
                    uri=f"{uri}/{DATA_FILE}",
                    size_bytes=parquet_path.stat().st_size,
                    created_at=dt.datetime.now(dt.UTC),
                    labels=labels,
                    report=quality.to_dict(),
                    project=project,
                )
                stored, existed = self.store.add(info)
        log.info("stored dataset %s (%s, %d rows, splits %s)", dataset_id, fmt, info.row_count, quality.split_row_counts)
        return UploadResult(stored, existed, QualityReport.from_dict(stored.report))

    def _named(self, existing: DatasetInfo, name: str) -> UploadResult:
        """The upload of a version already stored (call under _exclusive):
        only the name is added."""
        self.store.add_name(existing.id, name)
        return UploadResult(DatasetInfo(**{**existing.__dict__, "name": name}), True, QualityReport.from_dict(existing.report))

    def _exclusive(self, project: str):
        return exclusive(self.store.engine, f"datasets of {project}")

    def _rows(
        self, request: UploadRequest, spool, fmt: str | None, report: validation.ValidationReport, on_empty=None
    ) -> Iterator[tuple[str, dict, str | None]]:
        """(format, normalised row, given split) for each good row; bad rows go to report."""
        mapping = {theirs: ours for ours, theirs in request.column_mapping.items()}
        allowed = frozenset(request.labels)
        for row_number, record in readers.open_records(
            spool, request.file_format, request.file_name, self.max_row_bytes, self.max_upload_bytes
        ):
            if isinstance(record, validation.RowError):
                report.add(record)
                continue
            if mapping and isinstance(record, dict):
                record = {mapping.get(k, k): v for k, v in record.items()}
            if fmt is None:
                fmt = validation.detect_format(record)
                if fmt is None:
                    report.add(
                        validation.RowError(
                            row_number,
                            "",
                            "cannot tell the format: name it, or map columns to prompt/completion, messages, text/label, document/summary or text",
                        )
                    )
                    continue
            error = validation.check_row(record, fmt, row_number, allowed)
            if error is not None:
                if on_empty is not None and error.reason == "must not be empty":
                    on_empty(error.field)
                report.add(error)
                continue
            report.row_count += 1
            yield fmt, validation.normalise(record, fmt), record.get(validation.SPLIT_FIELD) or None

    def _scan(self, request: UploadRequest, spool) -> _Scan:
        scan = _Scan(fmt=request.format, report=validation.ValidationReport())
        empties: list[str] = []
        for fmt, row, given in self._rows(request, spool, request.format, scan.report, empties.append):
            if scan.quality is None:
                scan.fmt, scan.quality = fmt, QualityAccumulator(fmt)
            canonical = _canonical(row)
            scan.digest.update(canonical + f"\x1e{given or ''}\n".encode())
            scan.keys.append(_key(canonical, request.split.seed))
            answer = validation.answer_text(row, fmt)
            scan.answers.append(_key(answer.encode()) if answer is not None else scan.keys[-1])
            scan.quality.add(row, _key(canonical))
            scan.given_splits.append(SPLIT_NAMES.index(given) if given else -1)
            if "label" in row:
                scan.label_codes.append(scan.label_names.setdefault(row["label"], len(scan.label_names)))
        if scan.quality is not None:
            for name in empties:
                scan.quality.add_empty(name)
        return scan

    def _splits(self, scan: _Scan, spec: SplitSpec) -> np.ndarray:
        given = np.frombuffer(scan.given_splits, dtype=np.int8)
        if (given >= 0).any():
            if (given < 0).any():
                raise InvalidArgument.field(
                    "split", f"{int((given < 0).sum())} rows have no split while others do: give every row a split, or none"
                )
            return given
        strata = np.frombuffer(scan.label_codes, dtype=np.int32) if scan.label_codes else None
        return assign_splits(np.frombuffer(scan.keys, dtype=np.uint64), strata, spec, np.frombuffer(scan.answers, dtype=np.uint64))

    def _write(self, request: UploadRequest, spool, fmt: str, splits: np.ndarray, path: Path, quality: QualityReport) -> None:
        """The second pass: good rows with their split, in batches, to Parquet."""
        schema = SCHEMAS[fmt]
        names = [SPLIT_NAMES[s] for s in splits.tolist()]
        tokens = self._token_counter(request.token_stats_model, fmt) if request.token_stats_model else None
        batch: list[dict] = []

        def flush(writer) -> None:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            if tokens is not None:
                tokens.add(batch)
            batch.clear()

        with pq.ParquetWriter(path, schema) as writer:
            for i, (_, row, _) in enumerate(self._rows(request, spool, fmt, validation.ValidationReport())):
                batch.append({**row, "split": names[i]})
                if len(batch) >= _WRITE_BATCH_ROWS:
                    flush(writer)
            if batch:
                flush(writer)
        if tokens is not None:
            tokens.finish(quality)

    def _token_counter(self, model: str, fmt: str) -> TokenCounter:
        from transformers import AutoConfig, AutoTokenizer

        from tunewire.services.common.models import loading_requested_model, resolve_model

        with loading_requested_model(model, "metadata.token_stats_model"):
            path = resolve_model(model, self.model_cache or Path(tempfile.gettempdir()) / "tunewire-models")
            tokenizer = AutoTokenizer.from_pretrained(path)
            model_config = AutoConfig.from_pretrained(path)
        context = getattr(model_config, "max_position_embeddings", 0) or tokenizer.model_max_length
        return TokenCounter(tokenizer, fmt, int(context), model)


def _rejection(report: validation.ValidationReport) -> InvalidArgument:
    shown = "; ".join(str(e) for e in report.errors[:3])
    more = f" (the first {len(report.errors)} are in the details)" if report.error_count > 3 else ""
    message = (
        f"dataset rejected, nothing stored: {report.error_count} bad row(s){more}: {shown}. "
        "Fix these rows and upload again, or set drop_invalid_rows to store the good ones."
    )
    violations = [FieldViolation(f"row {e.row}" + (f".{e.field}" if e.field else ""), e.reason) for e in report.errors]
    return InvalidArgument(message, violations)
