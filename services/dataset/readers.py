"""Reading uploaded files record by record: JSONL, CSV and Parquet, each
optionally gzip-compressed. Memory is bounded by one row (one batch for
Parquet), never by the file."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from tunewire.services.common.errors import InvalidArgument
from tunewire.services.dataset.validation import RowError

JSONL, CSV, PARQUET = "jsonl", "csv", "parquet"
FILE_FORMATS = (JSONL, CSV, PARQUET)
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_SKIP_CHUNK = 1 << 16

Record = tuple[int, dict | RowError]


def file_format_of(file_name: str, head: bytes) -> str:
    """The format from the file name (.jsonl/.json/.csv/.parquet, maybe .gz),
    else sniffed from the first bytes (after decompression)."""
    name = file_name.lower().removesuffix(".gz")
    for suffix, fmt in ((".jsonl", JSONL), (".ndjson", JSONL), (".json", JSONL), (".csv", CSV), (".parquet", PARQUET)):
        if name.endswith(suffix):
            return fmt
    if head.startswith(_PARQUET_MAGIC):
        return PARQUET
    first = head.lstrip()[:1]
    return CSV if first and first not in (b"{", b"[") else JSONL


def open_records(spool: BinaryIO, file_format: str, file_name: str, max_row_bytes: int) -> Iterator[Record]:
    """Yields (row number, record or RowError) for every row of the file."""
    spool.seek(0)
    compressed = spool.read(2) == _GZIP_MAGIC
    spool.seek(0)
    stream: BinaryIO = gzip.GzipFile(fileobj=spool, mode="rb") if compressed else spool
    try:
        head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
        fmt = file_format or file_format_of(file_name, head)
        if fmt == PARQUET:
            yield from _parquet_records(stream, compressed, max_row_bytes)
        elif fmt == CSV:
            yield from _csv_records(stream, max_row_bytes)
        else:
            yield from _jsonl_records(stream, max_row_bytes)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InvalidArgument.field("file", f"not a valid gzip stream: {exc}") from None


def _too_long(row: int, size: int, limit: int) -> RowError:
    return RowError(row, "", f"row is over {limit} bytes ({size}+): shorten it or raise TUNEWIRE_MAX_ROW_BYTES")


def _jsonl_records(stream: BinaryIO, max_row_bytes: int) -> Iterator[Record]:
    row = 0
    while True:
        raw = stream.readline(max_row_bytes + 1)
        if not raw:
            return
        row += 1
        if len(raw) > max_row_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while (rest := stream.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                size += len(rest)
            yield row, _too_long(row, size + len(rest), max_row_bytes)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield row, RowError(row, "", f"not valid UTF-8 (byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            yield row, json.loads(text)
        except json.JSONDecodeError as exc:
            yield row, RowError(row, "", f"invalid JSON: {exc.msg} at column {exc.colno}")


def _csv_records(stream: BinaryIO, max_row_bytes: int) -> Iterator[Record]:
    # Undecodable bytes become lone surrogates, reported per field by check_row.
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
    csv.field_size_limit(max_row_bytes)
    reader = csv.DictReader(text)
    row = 0
    try:
        for record in reader:
            row += 1
            if None in record:
                yield (
                    row,
                    RowError(
                        row,
                        "",
                        f"has {len(reader.fieldnames or []) + len(record[None])} cells, the header has {len(reader.fieldnames or [])}",
                    ),
                )
                continue
            size = sum(len(v) for v in record.values() if isinstance(v, str))
            if size > max_row_bytes:
                yield row, _too_long(row, size, max_row_bytes)
                continue
            yield row, {k: v for k, v in record.items() if v is not None}
    except csv.Error as exc:
        # The CSV cannot be read past this point: the file is rejected.
        yield row + 1, RowError(row + 1, "", f"cannot parse CSV: {exc}")
    finally:
        text.detach()


def _parquet_records(stream: BinaryIO, compressed: bool, max_row_bytes: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryFile() as plain:
        if compressed:  # Parquet needs random access: decompress to disk first.
            shutil.copyfileobj(stream, plain)
            plain.seek(0)
            source = plain
        else:
            source = stream
        try:
            parquet = pq.ParquetFile(source)
            batches = parquet.iter_batches(batch_size=1024)
            row = 0
            for batch in batches:
                for record in batch.to_pylist():
                    row += 1
                    size = sum(len(v) for v in record.values() if isinstance(v, str))
                    yield row, (_too_long(row, size, max_row_bytes) if size > max_row_bytes else record)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidArgument.field("file", f"not a readable Parquet file: {exc}") from None
