"""Input files as streams of rows: JSONL and CSV, optionally gzipped, never read whole.

A file is read through a `ByteSource` (an S3 object, a local file) in fixed-size chunks; each
row comes out as a `Row` (index, line number, id, value) or a `BadRow` (index, line number, the
id if it could be read, and a reason). A bad row never stops the file: bad JSON, a missing or
empty field, non-UTF-8 bytes and an over-long line each fail that row only. What fails the
whole file is a `FileFormatError`: an unknown extension, a CSV header without the needed
columns, a corrupt gzip stream.

Reading can resume: `RowReader.position` is where the rows yielded so far end (bytes of the
decompressed stream, physical lines, rows and the CSV header), and `open_rows(..., start=pos)`
carries on from there with the same line numbers. Plain files resume with a ranged read;
gzip files are decompressed from the start and the consumed prefix skipped.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal, Protocol

Format = Literal["jsonl", "csv", "jsonl.gz", "csv.gz"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv", "jsonl.gz", "csv.gz")
Field = Literal["text", "b64"]

CHUNK_BYTES = 1 << 20
# One row may be this long: a base64 image at the models' 4 MB limit is ~5.4 MB of text.
MAX_ROW_BYTES = 8 << 20
_BOM = b"\xef\xbb\xbf"


class FileFormatError(ValueError):
    """The file as a whole cannot be read (unknown format, bad CSV header, corrupt gzip)."""


def detect_format(key: str) -> Format | None:
    """The format from a key's extension (case-insensitive), or None if it is not one we read."""
    lower = key.lower()
    for fmt in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith("." + fmt):
            return fmt
    return None


def strip_format(name: str) -> str:
    """`reviews.csv.gz` -> `reviews` (only a known format's extension is removed)."""
    fmt = detect_format(name)
    return name[: -len(fmt) - 1] if fmt else name


class ByteSource(Protocol):
    """Somewhere a file's bytes can be streamed from, starting at any offset."""

    @property
    def size(self) -> int | None: ...

    def open(self, offset: int = 0) -> IO[bytes]:
        """A binary stream of the raw (possibly compressed) bytes from `offset` on."""
        ...


class FileSource:
    """A local file as a ByteSource (tests, benchmarks, the GPU worker's scratch copies)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def size(self) -> int | None:
        import os

        return os.path.getsize(self.path)

    def open(self, offset: int = 0) -> IO[bytes]:
        handle = open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        handle.seek(offset)
        return handle


class BytesSource:
    """In-memory bytes as a ByteSource (unit tests)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int | None:
        return len(self.data)

    def open(self, offset: int = 0) -> IO[bytes]:
        import io

        return io.BytesIO(self.data[offset:])


@dataclass(frozen=True)
class Position:
    """Where reading stopped; rows after it start at line `line + 1`."""

    offset: int = 0  # bytes of the decompressed stream consumed
    line: int = 0  # physical lines consumed
    row: int = 0  # data rows (good or bad) consumed
    header: tuple[str, ...] | None = None  # a CSV file's column names, once read

    def to_dict(self) -> dict[str, object]:
        return {"offset": self.offset, "line": self.line, "row": self.row, "header": self.header}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Position:
        header = data.get("header")
        return cls(
            offset=int(data.get("offset", 0)),  # type: ignore[call-overload]
            line=int(data.get("line", 0)),  # type: ignore[call-overload]
            row=int(data.get("row", 0)),  # type: ignore[call-overload]
            header=tuple(str(h) for h in header) if isinstance(header, list | tuple) else None,
        )


RowId = str | int


@dataclass(frozen=True, slots=True)
class Row:
    index: int  # 0-based among the file's data rows
    line: int  # 1-based line the row starts on
    id: RowId
    value: str  # the text, or the base64 of an image


@dataclass(frozen=True, slots=True)
class BadRow:
    index: int
    line: int
    id: RowId | None
    error: str

    def to_json(self) -> str:
        data: dict[str, object] = {"line": self.line}
        if self.id is not None:
            data["id"] = self.id
        data["error"] = self.error
        return json.dumps(data, ensure_ascii=False)


Item = Row | BadRow


# ---------------------------------------------------------------------- raw lines
class _Lines:
    """Physical lines of a byte stream (b"\\n" ends a line), each at most `max_bytes` long.

    A longer line is not buffered: it is skipped to its end and reported as None. `offset`
    and `line` count what has been handed out so far.
    """

    def __init__(self, stream: IO[bytes], offset: int, line: int, max_bytes: int, chunk: int = CHUNK_BYTES) -> None:
        self.stream = stream
        self.offset = offset
        self.line = line
        self.max_bytes = max_bytes
        self.chunk = chunk
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self.stream.read(self.chunk)
        if not data:
            self._eof = True
            return False
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        return True

    def __iter__(self) -> Iterator[bytes | None]:
        return self

    def __next__(self) -> bytes | None:
        while True:
            end = self._buf.find(b"\n", self._pos)
            if end >= 0:
                if end + 1 - self._pos > self.max_bytes:
                    self._skip_long_line(end + 1 - self._pos, found_end=end)
                    return None
                line = self._buf[self._pos : end + 1]
                self._pos = end + 1
                self.offset += len(line)
                self.line += 1
                return line
            if len(self._buf) - self._pos > self.max_bytes:
                self._skip_long_line(0, found_end=None)
                return None
            if not self._fill():
                if self._pos < len(self._buf):  # last line without a newline
                    line = self._buf[self._pos :]
                    self._buf, self._pos = b"", 0
                    self.offset += len(line)
                    self.line += 1
                    return line
                raise StopIteration

    def _skip_long_line(self, length: int, found_end: int | None) -> None:
        """Skip the current line (longer than max_bytes) without keeping it."""
        if found_end is not None:
            self.offset += length
            self._pos = found_end + 1
            self.line += 1
            return
        skipped = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        while True:
            data = self.stream.read(self.chunk)
            if not data:
                self._eof = True
                break
            end = data.find(b"\n")
            if end >= 0:
                skipped += end + 1
                self._buf, self._pos = data[end + 1 :], 0
                break
            skipped += len(data)
        self.offset += skipped
        self.line += 1


def _skip(stream: IO[bytes], n: int) -> None:
    """Discard the first `n` bytes of a stream (a gzip file resumed mid-way)."""
    while n > 0:
        data = stream.read(min(n, CHUNK_BYTES))
        if not data:
            raise FileFormatError("the file is shorter than the checkpoint says: was it replaced?")
        n -= len(data)


class _Counting:
    """A raw stream that counts the bytes read through it (progress over compressed files)."""

    def __init__(self, stream: IO[bytes], start: int) -> None:
        self.stream = stream
        self.count = start

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        self.stream.close()


def _decode(line: bytes) -> str:
    return line.decode("utf-8")


def _utf8_error(exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start : exc.start + 1]
    return f"line is not valid UTF-8 (byte 0x{bad.hex()} at column {exc.start + 1})"


# ---------------------------------------------------------------------- rows
class RowReader:
    """Rows of one file, from `start` on; `position` is where the rows yielded so far end."""

    def __init__(
        self,
        source: ByteSource,
        fmt: Format,
        field: Field = "text",
        start: Position | None = None,
        *,
        max_row_bytes: int = MAX_ROW_BYTES,
    ) -> None:
        if fmt not in FORMATS:
            raise FileFormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.field = field
        self.start = start or Position()
        self.max_row_bytes = max_row_bytes
        self.position = self.start
        self._raw: _Counting | None = None
        self._source = source

    @property
    def raw_offset(self) -> int:
        """Raw (compressed, for .gz) bytes of the source read so far, read-ahead included."""
        return self._raw.count if self._raw is not None else self.start.offset

    # -- streams
    def _open(self) -> IO[bytes]:
        if self.fmt.endswith(".gz"):
            self._raw = _Counting(self._source.open(0), 0)
            stream: IO[bytes] = gzip.GzipFile(fileobj=self._raw, mode="rb")  # type: ignore[call-overload]
            try:
                _skip(stream, self.start.offset)
            except (OSError, EOFError, zlib.error) as exc:
                raise FileFormatError(f"not a valid gzip file: {exc}") from exc
            return stream
        self._raw = _Counting(self._source.open(self.start.offset), self.start.offset)
        return self._raw  # type: ignore[return-value]

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Item]:
        stream = self._open()
        lines = _Lines(stream, self.start.offset, self.start.line, self.max_row_bytes)
        rows = self._jsonl(lines) if self.fmt.startswith("jsonl") else self._csv(lines)
        try:
            yield from rows
        except (OSError, EOFError, zlib.error) as exc:
            if self.fmt.endswith(".gz"):
                raise FileFormatError(f"not a valid gzip file (after line {lines.line}): {exc}") from exc
            raise
        finally:
            self.close()

    # -- JSONL
    def _jsonl(self, lines: _Lines) -> Iterator[Item]:
        index = self.start.row
        field_name = self.field
        for raw in lines:
            line_no = lines.line
            if raw is None:
                item: Item = BadRow(index, line_no, None, f"line is longer than {self.max_row_bytes} bytes")
            else:
                if line_no == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                if not raw.strip():
                    self.position = Position(lines.offset, lines.line, index, None)
                    continue  # blank lines are not rows
                item = self._parse_json(raw, index, line_no, field_name)
            index += 1
            self.position = Position(lines.offset, lines.line, index, None)
            yield item

    @staticmethod
    def _parse_json(raw: bytes, index: int, line_no: int, field_name: str) -> Item:
        try:
            text = _decode(raw)
        except UnicodeDecodeError as exc:
            return BadRow(index, line_no, None, _utf8_error(exc))
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return BadRow(index, line_no, None, f"bad JSON: {exc.msg} at column {exc.colno}")
        except RecursionError:
            return BadRow(index, line_no, None, "bad JSON: nested too deeply")
        if not isinstance(obj, dict):
            return BadRow(index, line_no, None, f"row is a JSON {type(obj).__name__}, not an object")
        return _check_fields(obj.get("id", _MISSING), obj.get(field_name, _MISSING), index, line_no, field_name)

    # -- CSV
    def _csv(self, lines: _Lines) -> Iterator[Item]:
        oversize: list[int] = []

        def text_lines() -> Iterator[str]:
            for raw in lines:
                if raw is None:
                    oversize.append(lines.line)
                    yield "\n"  # keeps csv's state; the record is reported as too long
                    continue
                if lines.line == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                yield raw.decode("utf-8", errors="surrogateescape")

        csv.field_size_limit(max(csv.field_size_limit(), self.max_row_bytes))
        reader = csv.reader(text_lines())
        header = self.start.header
        index = self.start.row
        if header is None:
            header = self._read_header(reader, lines)
            self.position = Position(lines.offset, lines.line, index, header)
        try:
            id_col, value_col = header.index("id"), header.index(self.field)
        except ValueError:
            missing = [c for c in ("id", self.field) if c not in header]
            raise FileFormatError(
                f"CSV header has no {' or '.join(repr(c) for c in missing)} column (columns: {', '.join(header)})"
            ) from None
        need = max(id_col, value_col) + 1
        while True:
            first_line = lines.line + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                item: Item = BadRow(index, first_line, None, f"bad CSV: {exc}")
                oversize.clear()
            else:
                if oversize:
                    item = BadRow(index, first_line, None, f"line is longer than {self.max_row_bytes} bytes")
                    oversize.clear()
                elif not record or (len(record) == 1 and not record[0].strip()):
                    self.position = Position(lines.offset, lines.line, index, header)
                    continue  # blank lines are not rows
                elif _has_surrogates(record):
                    item = BadRow(index, first_line, None, "line is not valid UTF-8")
                elif len(record) < need:
                    row_id = record[id_col].strip() if len(record) > id_col and record[id_col].strip() else None
                    missing_name = "id" if len(record) <= id_col else self.field
                    item = BadRow(index, first_line, row_id, f"missing field {missing_name!r}")
                else:
                    item = _check_fields(record[id_col].strip(), record[value_col], index, first_line, self.field)
            index += 1
            self.position = Position(lines.offset, lines.line, index, header)
            yield item

    @staticmethod
    def _read_header(reader: Iterator[list[str]], lines: _Lines) -> tuple[str, ...]:
        for record in reader:
            if not record or all(not c.strip() for c in record):
                continue
            if _has_surrogates(record):
                raise FileFormatError("CSV header is not valid UTF-8")
            return tuple(c.strip().lower() for c in record)
        return ("id", "text", "b64")  # an empty file: no rows follow, any header will do


_MISSING = object()


def _has_surrogates(record: list[str]) -> bool:
    for value in record:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def _check_fields(row_id: object, value: object, index: int, line_no: int, field_name: str) -> Item:
    if row_id is _MISSING or row_id is None:
        clean_id: RowId | None = None
        id_error = "missing field 'id'"
    elif isinstance(row_id, bool) or not isinstance(row_id, str | int):
        clean_id, id_error = None, f"field 'id' must be a string or an integer, not {type(row_id).__name__}"
    elif isinstance(row_id, str) and not row_id.strip():
        clean_id, id_error = None, "field 'id' is empty"
    else:
        clean_id, id_error = row_id, ""
    if id_error:
        return BadRow(index, line_no, clean_id, id_error)
    assert clean_id is not None
    if value is _MISSING or value is None:
        return BadRow(index, line_no, clean_id, f"missing field {field_name!r}")
    if not isinstance(value, str):
        return BadRow(index, line_no, clean_id, f"field {field_name!r} must be a string, not {type(value).__name__}")
    if not value.strip():
        return BadRow(index, line_no, clean_id, f"field {field_name!r} is empty")
    return Row(index, line_no, clean_id, value)


def open_rows(
    source: ByteSource,
    fmt: Format,
    field: Field = "text",
    start: Position | None = None,
    *,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> RowReader:
    """Rows of `source` read as `fmt`, from `start` (a previous reader's `position`) on."""
    return RowReader(source, fmt, field, start, max_row_bytes=max_row_bytes)


def __getattr__(name: str) -> Any:
    # The one base64 decoder is the inference core's (sif_inference.b64); re-exported for callers
    # that import it from here, on first use: reading rows needs no inference core.
    if name == "decode_b64":
        from sif_inference.b64 import decode_b64

        return decode_b64
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "MAX_ROW_BYTES",
    "BadRow",
    "ByteSource",
    "BytesSource",
    "FileFormatError",
    "FileSource",
    "Format",
    "Item",
    "Position",
    "Row",
    "RowReader",
    "detect_format",
    "open_rows",
    "strip_format",
]
