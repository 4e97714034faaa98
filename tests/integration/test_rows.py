"""Row readers and the S3 adapters against moto's server: streaming reads, resumes, outputs, checkpoints."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from sif_core.rows import (
    BadRow,
    BytesSource,
    FileFormatError,
    Position,
    Row,
    decode_b64,
    detect_format,
    open_rows,
    strip_format,
)
from sif_core.s3io import MIN_PART_BYTES, S3CheckpointStore, S3Object, S3ResultSink, SourceChangedError
from sif_core.scoring import Checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(aws_server: Any) -> Any:
    return boto3.client("s3", endpoint_url=aws_server.endpoint_url, region_name="us-east-1")


@pytest.fixture
def bucket(s3: Any) -> Iterator[str]:
    name = f"rows-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name


def put(s3: Any, bucket: str, key: str, body: bytes) -> S3Object:
    etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
    return S3Object(s3, bucket, key, etag)


def read_all(source: Any, fmt: str, **kwargs: Any) -> list[tuple[Row | BadRow, Position]]:
    reader = open_rows(source, fmt, **kwargs)  # type: ignore[arg-type]
    return [(item, reader.position) for item in reader]


def lines(n: int) -> bytes:
    return b"".join(json.dumps({"id": i, "text": f"row {i} " + "w" * (i % 40)}).encode() + b"\n" for i in range(n))


# ---------------------------------------------------------------------- formats
@pytest.mark.parametrize(
    ("key", "fmt", "name"),
    [
        ("a/b/reviews.jsonl", "jsonl", "a/b/reviews"),
        ("x.CSV", "csv", "x"),
        ("data.jsonl.gz", "jsonl.gz", "data"),
        ("sheet.csv.gz", "csv.gz", "sheet"),
        ("notes.txt", None, "notes.txt"),
        ("archive.gz", None, "archive.gz"),
    ],
)
def test_formats_come_from_the_extension(key: str, fmt: str | None, name: str) -> None:
    assert detect_format(key) == fmt
    assert strip_format(key) == name


def test_jsonl_streams_from_s3_and_resumes_with_a_ranged_read(s3: Any, bucket: str) -> None:
    obj = put(s3, bucket, "in/file.jsonl", lines(5000))
    items = read_all(obj, "jsonl", field="text")
    assert [i.id for i, _ in items] == list(range(5000))
    assert all(isinstance(i, Row) for i, _ in items)
    for cut in (1, 1234, 4999):
        pos = items[cut - 1][1]
        rest = [i for i, _ in read_all(obj, "jsonl", start=pos)]
        assert rest == [i for i, _ in items[cut:]]
        assert rest[0].line == cut + 1 if rest else True
    assert read_all(obj, "jsonl", start=items[-1][1]) == []  # a resume at the very end reads nothing


def test_gzip_resumes_by_skipping_the_decompressed_prefix(s3: Any, bucket: str) -> None:
    obj = put(s3, bucket, "in/file.jsonl.gz", gzip.compress(lines(3000)))
    items = read_all(obj, "jsonl.gz")
    rest = read_all(obj, "jsonl.gz", start=items[1999][1])
    assert [i for i, _ in rest] == [i for i, _ in items[2000:]]


def test_csv_with_bom_crlf_quotes_and_multiline_fields(s3: Any, bucket: str) -> None:
    body = (
        "\ufeffId , TEXT,extra\r\n"
        '1,"plain",x\r\n'
        '2,"with ""quotes"", and a comma",y\r\n'
        '3,"two\r\nlines",z\r\n'
        "\r\n"
        "4,,w\r\n"
        "5\r\n"
        "6,last,v"
    ).encode()
    obj = put(s3, bucket, "in/sheet.csv", body)
    items = read_all(obj, "csv")
    got = [(i.line, i.id, i.value if isinstance(i, Row) else i.error) for i, _ in items]
    assert got == [
        (2, "1", "plain"),
        (3, "2", 'with "quotes", and a comma'),
        (4, "3", "two\r\nlines"),
        (7, "4", "field 'text' is empty"),
        (8, "5", "missing field 'text'"),
        (9, "6", "last"),
    ]
    resumed = read_all(obj, "csv", start=items[2][1])  # after the multi-line row; the header is remembered
    assert [i for i, _ in resumed] == [i for i, _ in items[3:]]


def test_crlf_jsonl_and_unicode_survive(s3: Any, bucket: str) -> None:
    body = '{"id": "é", "text": "naïve café ☕"}\r\n{"id": 2, "text": "日本語"}\r\n'.encode()
    items = [i for i, _ in read_all(put(s3, bucket, "in/u.jsonl", body), "jsonl")]
    assert items == [Row(0, 1, "é", "naïve café ☕"), Row(1, 2, 2, "日本語")]


def test_an_overlong_line_fails_alone_without_being_buffered() -> None:
    body = b'{"id": 1, "text": "ok"}\n{"id": 2, "text": "' + b"x" * 5000 + b'"}\n{"id": 3, "text": "ok too"}\n'
    items = [i for i, _ in read_all(BytesSource(body), "jsonl", max_row_bytes=1000)]
    assert [type(i).__name__ for i in items] == ["Row", "BadRow", "Row"]
    assert items[1] == BadRow(1, 2, None, "line is longer than 1000 bytes")
    # also when the long line is the last, with no newline, and longer than a read chunk
    body = b'{"id": 1, "text": "ok"}\n' + b"y" * (3 << 20)
    items = [i for i, _ in read_all(BytesSource(body), "jsonl", max_row_bytes=1 << 20)]
    assert items[1] == BadRow(1, 2, None, f"line is longer than {1 << 20} bytes")


def test_whole_file_errors() -> None:
    with pytest.raises(FileFormatError, match="CSV header has no 'text' column"):
        list(open_rows(BytesSource(b"id,body\n1,x\n"), "csv"))
    with pytest.raises(FileFormatError, match="not a valid gzip file"):
        list(open_rows(BytesSource(b"this is not gzip at all"), "jsonl.gz"))
    with pytest.raises(FileFormatError, match="not a valid gzip file"):
        list(open_rows(BytesSource(gzip.compress(lines(100))[:-30]), "jsonl.gz"))
    with pytest.raises(FileFormatError, match="unknown format"):
        open_rows(BytesSource(b""), "xlsx")  # type: ignore[arg-type]


def test_image_rows_and_base64() -> None:
    body = b'{"id": "a", "b64": "aGVsbG8="}\n{"id": "b", "text": "not an image row"}\n'
    items = [i for i, _ in read_all(BytesSource(body), "jsonl", field="b64")]
    assert items[0] == Row(0, 1, "a", "aGVsbG8=")
    assert items[1] == BadRow(1, 2, "b", "missing field 'b64'")
    assert decode_b64("aGVsbG8") == b"hello"  # padding optional
    assert decode_b64("data:image/png;base64,aGVsbG8=") == b"hello"
    assert decode_b64("-_8=") == b"\xfb\xff"  # URL-safe alphabet
    with pytest.raises(ValueError, match="not valid base64"):
        decode_b64("@@@@")


# ---------------------------------------------------------------------- the S3 adapters
def test_a_replaced_or_deleted_object_is_noticed(s3: Any, bucket: str) -> None:
    obj = put(s3, bucket, "in/f.jsonl", lines(10))
    assert obj.size > 0
    s3.put_object(Bucket=bucket, Key="in/f.jsonl", Body=lines(11))
    with pytest.raises(SourceChangedError, match="was replaced"):
        list(open_rows(S3Object(s3, bucket, "in/f.jsonl", obj.etag), "jsonl"))
    s3.delete_object(Bucket=bucket, Key="in/f.jsonl")
    with pytest.raises(SourceChangedError, match="no longer exists"):
        S3Object(s3, bucket, "in/f.jsonl", obj.etag).open(0)


def test_result_sink_joins_parts_and_tail_and_completing_twice_is_harmless(s3: Any, bucket: str) -> None:
    sink = S3ResultSink(s3, bucket, "results/t/m/name")
    state: dict[str, Any] = {}
    part = b"p" * MIN_PART_BYTES
    refs = [sink.upload_part("predictions", 1, part, state)]
    refs.append(sink.upload_part("predictions", 2, b"q" * MIN_PART_BYTES, state))
    refs[1] = sink.upload_part("predictions", 2, b"r" * MIN_PART_BYTES, state)  # rewritten after a crash
    location = sink.complete("predictions", refs, b"tail", state)
    assert location == f"s3://{bucket}/results/t/m/name/predictions.jsonl"
    body = s3.get_object(Bucket=bucket, Key="results/t/m/name/predictions.jsonl")["Body"].read()
    assert body == part + b"r" * MIN_PART_BYTES + b"tail"
    assert sink.complete("predictions", refs, b"tail", state) == location  # a retried finish
    assert s3.get_object(Bucket=bucket, Key="results/t/m/name/predictions.jsonl")["Body"].read() == body
    sink.complete("errors", [], b'{"line": 1, "error": "x"}\n', state)  # no parts: one put
    assert s3.get_object(Bucket=bucket, Key="results/t/m/name/errors.jsonl")["Body"].read().startswith(b'{"line"')
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_result_sink_aborts_unfinished_uploads(s3: Any, bucket: str) -> None:
    sink = S3ResultSink(s3, bucket, "results/t/m/other/")
    state: dict[str, Any] = {}
    sink.upload_part("predictions", 1, b"x" * MIN_PART_BYTES, state)
    assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    sink.abort(state)
    sink.abort(state)  # twice is fine
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_checkpoint_store_round_trip(s3: Any, bucket: str) -> None:
    store = S3CheckpointStore(s3, bucket, "results/t/m/n/_state/checkpoint.json.gz")
    assert store.load() is None
    checkpoint = Checkpoint(position=Position(120, 3, 3, ("id", "text")), segment=2, succeeded=3)
    checkpoint.pending["errors"] = '{"line": 2, "error": "bad"}\n'
    store.save(checkpoint)
    assert store.load() == checkpoint
    store.clear()
    assert store.load() is None


def test_s3_body_is_read_in_chunks_not_whole(s3: Any, bucket: str) -> None:
    """The reader asks the stream for bounded chunks, whatever the object's size."""
    obj = put(s3, bucket, "in/big.jsonl", lines(40000))
    sizes: list[int] = []

    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def read(self, n: int = -1) -> bytes:
            sizes.append(n)
            return bytes(self.inner.read(n))

        def close(self) -> None:
            self.inner.close()

    class SpySource:
        size = obj.size

        def open(self, offset: int = 0) -> Any:
            return Spy(obj.open(offset))

    assert sum(1 for _ in open_rows(SpySource(), "jsonl")) == 40000
    assert len(sizes) > 1 and all(0 < n <= 1 << 20 for n in sizes)
