"""Reading uploaded files record by record: JSONL, CSV and Parquet, each
optionally gzip-compressed. Memory is bounded by one row (one batch for
Parquet), never by the file."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import sys
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


class _Decompressed(io.RawIOBase):
    """A gzip stream's contents, at most `limit` bytes of them: a small file
    can hold gigabytes of repeated bytes."""

    def __init__(self, compressed: BinaryIO, limit: int):
        self.inner, self.limit, self.read_bytes = gzip.GzipFile(fileobj=compressed, mode="rb"), limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.inner.readinto(buffer)
        self.read_bytes += n
        if self.read_bytes > self.limit:
            raise InvalidArgument.field(
                "file", f"decompressed, the file is over {self.limit} bytes: split it or ask an operator to raise TUNEWIRE_MAX_UPLOAD_BYTES"
            )
        return n


def open_records(spool: BinaryIO, file_format: str, file_name: str, max_row_bytes: int, max_bytes: int = 1 << 62) -> Iterator[Record]:
    """Yields (row number, record or RowError) for every row of the file,
    reading at most max_bytes of a compressed file's contents."""
    spool.seek(0)
    compressed = spool.read(2) == _GZIP_MAGIC
    spool.seek(0)
    stream: BinaryIO = io.BufferedReader(_Decompressed(spool, max_bytes)) if compressed else spool  # type: ignore[assignment]
    try:
        head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
        fmt = file_format or file_format_of(file_name, head)
        if fmt != PARQUET:
            _check_text(head, fmt)
        if fmt == PARQUET:
            yield from _parquet_records(stream, compressed, max_row_bytes, max_bytes)
        elif fmt == CSV:
            yield from _csv_records(stream, max_row_bytes)
        else:
            yield from _jsonl_records(stream, max_row_bytes)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InvalidArgument.field("file", f"not a valid gzip stream: {exc}") from None


def _check_text(head: bytes, fmt: str) -> None:
    """InvalidArgument when the file's first bytes are not text: a NUL byte,
    or a tenth of them not UTF-8, is binary data (an image, an archive, a
    spreadsheet), which would otherwise read as rows of garbage or none."""
    nul = head.find(b"\x00")
    undecodable = head.decode("utf-8", errors="replace").count("\ufffd")
    if nul >= 0 or undecodable > len(head) // 10:
        where = f"byte {nul} is NUL" if nul >= 0 else f"{undecodable} of its first {len(head)} bytes are not UTF-8"
        raise InvalidArgument.field(
            "file",
            f"is binary data, not {fmt.upper()} text ({where}): JSONL and CSV files are UTF-8 text, a Parquet file starts with "
            "'PAR1'; a gzip-compressed file is read as what it contains",
        )


def _text_size(value) -> int:
    """Characters of the strings in a record, nested ones (chat messages) included."""
    size, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, dict):
            pending += item.values()
        elif isinstance(item, list | tuple):
            pending += item
    return size


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
        except RecursionError:
            yield row, RowError(row, "", "invalid JSON: nested too deeply (objects and arrays within each other)")
        except ValueError:  # the only other failure: an integer of more digits than Python converts
            yield row, RowError(row, "", f"invalid JSON: an integer of more than {sys.get_int_max_str_digits()} digits")


class _RecordLines:
    """The lines of a CSV file for csv.reader, at most `limit` characters
    for the record being read: csv bounds each field but not how many there
    are, and a line of commas would otherwise become millions of cells."""

    def __init__(self, text: io.TextIOWrapper, limit: int):
        self.text, self.limit, self.used, self.line = text, limit, 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.limit + 1 - self.used)
        if not line:
            raise StopIteration
        self.used += len(line)
        self.line += 1
        if self.used > self.limit:
            raise InvalidArgument.field(
                "file",
                f"line {self.line}: a CSV record runs past {self.limit} characters: shorten it or raise TUNEWIRE_MAX_ROW_BYTES",
            )
        return line


def _csv_records(stream: BinaryIO, max_row_bytes: int) -> Iterator[Record]:
    # Undecodable bytes become lone surrogates, reported per field by check_row.
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
    # A record (and a field) up to twice the row limit is read and reported as
    # a row too long; beyond that the file is rejected.
    csv.field_size_limit(2 * max_row_bytes)
    lines = _RecordLines(text, 2 * max_row_bytes)
    # strict: a quote left open or a stray one after a quoted field is an
    # error, not a field that swallows the rows after it.
    reader = csv.DictReader(lines, strict=True)
    row, record_start = 0, 1
    try:
        header = reader.fieldnames or []
        lines.used, record_start = 0, lines.line + 1
        for record in reader:
            lines.used, record_start = 0, lines.line + 1
            row += 1
            if None in record:
                yield row, RowError(row, "", f"has {len(header) + len(record[None])} cells, the header has {len(header)}")
                continue
            size = sum(len(v) for v in record.values() if isinstance(v, str))
            if size > max_row_bytes:
                yield row, _too_long(row, size, max_row_bytes)
                continue
            yield row, {k: v for k, v in record.items() if v is not None}
    except csv.Error as exc:
        # The CSV cannot be read past this point: the whole file is rejected
        # (dropping "invalid rows" would silently lose the rest of it).
        hint = ": a quoted field is never closed" if "unexpected end of data" in str(exc) else ""
        raise InvalidArgument.field("file", f"the record starting on line {record_start}: cannot parse CSV: {exc}{hint}") from None
    finally:
        text.detach()


def _parquet_records(stream: BinaryIO, compressed: bool, max_row_bytes: int, max_bytes: int) -> Iterator[Record]:
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
            metadata = parquet.metadata
            unpacked = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
            if unpacked > max_bytes:
                raise InvalidArgument.field(
                    "file",
                    f"its columns hold {unpacked} bytes uncompressed, over {max_bytes}: "
                    "split it or ask an operator to raise TUNEWIRE_MAX_UPLOAD_BYTES",
                )
            row = 0
            for batch in parquet.iter_batches(batch_size=256):
                for record in batch.to_pylist():
                    row += 1
                    size = _text_size(record)
                    yield row, (_too_long(row, size, max_row_bytes) if size > max_row_bytes else record)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidArgument.field("file", f"not a readable Parquet file: {exc}") from None
