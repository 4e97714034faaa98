"""Input files as streams of rows: JSONL and CSV, optionally gzipped, never read whole.

A file is read through a `ByteSource` (an S3 object, a local file) in fixed-size chunks; each
row comes out as a `Row` (index, line number, id, value) or a `BadRow` (index, line number, the
id if it could be read, and a reason). A bad row never stops the file: bad JSON, a missing or
empty field, non-UTF-8 bytes and an over-long line each fail that row only. What fails the
whole file is a `FileFormatError`: an unknown extension, a CSV header without the needed
columns, a corrupt gzip stream.

The field a row's value is read from is the task's (sif_inference.taskbase.Field):
- `text`, `b64`: a string (JSONL: the field; CSV: the column of that name);
- `features` (tabular): an object of named features. JSONL: the row's `features` object, passed
  on as it is (the task checks it). CSV: every column but `id` whose name is a declared feature
  (`features`, name -> "number" | "category"; names match the lower-cased header); a declared
  feature without a column fails the file, a number cell that is not one (or an empty cell) fails
  its row only;
- `inputs` (tensor): an object of named nested lists, JSONL only (a CSV file fails as a whole).

Reading can resume: `RowReader.position` is where the rows yielded so far end (bytes of the
decompressed stream, physical lines, rows and the CSV header), and `open_rows(..., start=pos)`
carries on from there with the same line numbers. Plain files resume with a ranged read;
gzip files are decompressed from the start and the consumed prefix skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # reading rows needs no inference core; the field names are the tasks'
    from sif_inference.taskbase import Field

Format = Literal["jsonl", "csv", "jsonl.gz", "csv.gz"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv", "jsonl.gz", "csv.gz")
OBJECT_FIELDS = ("features", "inputs")  # fields whose value is a JSON object, not a string

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
RowValue = str | dict[str, Any]


@dataclass(frozen=True, slots=True)
class Row:
    index: int  # 0-based among the file's data rows
    line: int  # 1-based line the row starts on
    id: RowId
    value: RowValue  # the text, the base64 of an image, or an object (features, inputs)
    size: int = dataclasses.field(default=0, compare=False)  # characters of the row as read (bounds a scoring window)

    @property
    def text(self) -> str:
        """The value of a `text` or `b64` row (a string; a TypeError for an object)."""
        if not isinstance(self.value, str):
            raise TypeError(f"row {self.id!r} holds an object, not a string")
        return self.value


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
        features: Mapping[str, str] | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise FileFormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.field = field
        self.features = features  # a tabular model's features (name -> "number" | "category"): CSV columns
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
        return _check_fields(
            obj.get("id", _MISSING), obj.get(field_name, _MISSING), index, line_no, field_name, len(raw)
        )

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
        if self.field == "inputs":
            raise FileFormatError("tensor inputs are read from JSONL files only: a CSV cell cannot hold a tensor")
        columns: dict[str, int] = {}
        if self.field == "features":
            columns = _feature_columns(header, self.features)
            id_col, value_col = header.index("id"), -1
            need = max([id_col, *columns.values()]) + 1
        else:
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
                    if columns and missing_name != "id":
                        feature = next(name for name, col in columns.items() if col >= len(record))
                        item = BadRow(index, first_line, row_id, f"missing feature {feature!r}")
                    else:
                        item = BadRow(index, first_line, row_id, f"missing field {missing_name!r}")
                elif self.field == "features":
                    item = _feature_row(record, id_col, columns, self.features, index, first_line)
                else:
                    size = sum(map(len, record)) + len(record)
                    item = _check_fields(record[id_col].strip(), record[value_col], index, first_line, self.field, size)
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


def _id_error(row_id: object) -> str:
    """Why `row_id` is not a row id ("" when it is one)."""
    if row_id is _MISSING or row_id is None:
        return "missing field 'id'"
    if isinstance(row_id, bool) or not isinstance(row_id, str | int):
        return f"field 'id' must be a string or an integer, not {type(row_id).__name__}"
    if isinstance(row_id, str) and not row_id.strip():
        return "field 'id' is empty"
    return ""


def _check_fields(row_id: object, value: object, index: int, line_no: int, field_name: str, size: int) -> Item:
    id_error = _id_error(row_id)
    if id_error:
        return BadRow(index, line_no, None, id_error)
    assert isinstance(row_id, str | int)
    if value is _MISSING or value is None:
        return BadRow(index, line_no, row_id, f"missing field {field_name!r}")
    if field_name in OBJECT_FIELDS:
        if not isinstance(value, dict):
            return BadRow(index, line_no, row_id, f"field {field_name!r} must be an object, not {_json_type(value)}")
        if not value:
            return BadRow(index, line_no, row_id, f"field {field_name!r} is empty")
        return Row(index, line_no, row_id, value, size)
    if not isinstance(value, str):
        return BadRow(index, line_no, row_id, f"field {field_name!r} must be a string, not {type(value).__name__}")
    if not value.strip():
        return BadRow(index, line_no, row_id, f"field {field_name!r} is empty")
    return Row(index, line_no, row_id, value, size)


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return names.get(type(value), type(value).__name__)


def _feature_columns(header: tuple[str, ...], features: Mapping[str, str] | None) -> dict[str, int]:
    """Feature name -> its column: every column but `id` that is a declared feature (all of them
    when none are declared). A declared feature without a column fails the file."""
    if "id" not in header:
        raise FileFormatError(f"CSV header has no 'id' column (columns: {', '.join(header)})")
    if features is None:
        return {name: i for i, name in enumerate(header) if name != "id"}
    missing = [name for name in features if name.lower() not in header]
    if missing:
        names = ", ".join(repr(n) for n in missing[:12]) + (
            f" and {len(missing) - 12} more" if len(missing) > 12 else ""
        )
        raise FileFormatError(f"CSV header has no column for feature(s) {names} (columns: {', '.join(header)})")
    return {name: header.index(name.lower()) for name in features}


def _feature_row(
    record: list[str],
    id_col: int,
    columns: dict[str, int],
    features: Mapping[str, str] | None,
    index: int,
    line_no: int,
) -> Item:
    """A CSV record as `{feature: value}`: number cells parsed as floats, category cells as they are."""
    row_id = record[id_col].strip()
    if not row_id:
        return BadRow(index, line_no, None, "field 'id' is empty")
    values: dict[str, Any] = {}
    for name, col in columns.items():
        cell = record[col]
        if not cell.strip():
            return BadRow(index, line_no, row_id, f"feature {name!r} is empty")
        if features is not None and features.get(name) == "number":
            try:
                values[name] = float(cell)
            except ValueError:
                return BadRow(index, line_no, row_id, f"feature {name!r} is not a number: {cell[:40]!r}")
        else:
            values[name] = cell
    return Row(index, line_no, row_id, values, sum(map(len, record)) + len(record))


def open_rows(
    source: ByteSource,
    fmt: Format,
    field: Field = "text",
    start: Position | None = None,
    *,
    max_row_bytes: int = MAX_ROW_BYTES,
    features: Mapping[str, str] | None = None,
) -> RowReader:
    """Rows of `source` read as `fmt`, from `start` (a previous reader's `position`) on; `features`:
    a tabular model's features, which a CSV file's columns are read as."""
    return RowReader(source, fmt, field, start, max_row_bytes=max_row_bytes, features=features)


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
    "RowValue",
    "detect_format",
    "open_rows",
    "strip_format",
]
