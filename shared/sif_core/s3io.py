"""S3 adapters for the streaming scorer: the input object, the outputs, the checkpoint.

- `S3Object`: an inbox object as a ByteSource. Every read names the ETag the event announced
  (`IfMatch`), so a file replaced mid-run is noticed, never half-mixed with its successor;
  resuming a plain file is a ranged GET from the checkpoint's offset.
- `S3ResultSink`: each output (predictions.jsonl, errors.jsonl) is one multipart upload whose
  upload id lives in the checkpoint; a part written again under the same number replaces the
  old one, and completing again after a success is recognised (a token in the object's
  metadata), so a run that crashed anywhere can finish exactly once.
- `S3CheckpointStore`: the checkpoint as one gzip'd JSON object beside the outputs.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import IO, Any

from botocore.exceptions import ClientError

from sif_core.keys import OUTPUT_FILES
from sif_core.scoring import Checkpoint, Stream

MIN_PART_BYTES = 5 << 20  # S3's floor for every part but the last
UPLOAD_META_KEY = "sif-upload"
CONTENT_TYPES = {"predictions": "application/x-ndjson", "errors": "application/x-ndjson"}


class SourceChangedError(Exception):
    """The object is gone, or no longer the version (ETag) the event was about."""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


class S3Object:
    """One S3 object (at one ETag) as a ByteSource for sif_core.rows."""

    def __init__(self, s3: Any, bucket: str, key: str, etag: str | None = None, size: int | None = None) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.key = key
        self.etag = etag.strip('"') if etag else None
        self._size = size

    def _conditions(self) -> dict[str, str]:
        return {"IfMatch": quoted(self.etag)} if self.etag else {}

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.s3, method)(Bucket=self.bucket, Key=self.key, **self._conditions(), **kwargs)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise SourceChangedError(f"s3://{self.bucket}/{self.key} no longer exists") from exc
            if _code(exc) in ("PreconditionFailed", "412") or _status(exc) == 412:
                raise SourceChangedError(
                    f"s3://{self.bucket}/{self.key} was replaced (it is no longer ETag {self.etag})"
                ) from exc
            raise

    @property
    def size(self) -> int:
        if self._size is None:
            head = self._call("head_object")
            self._size = int(head["ContentLength"])
            if self.etag is None:
                self.etag = str(head["ETag"]).strip('"')
        return self._size

    def open(self, offset: int = 0) -> IO[bytes]:
        if offset >= self.size:
            return io.BytesIO(b"")  # S3 refuses a range that starts at the end (416)
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        body: IO[bytes] = self._call("get_object", **kwargs)["Body"]
        return body


class S3ResultSink:
    """predictions.jsonl and errors.jsonl as multipart uploads under `prefix`; manifest.json beside them."""

    min_part_bytes = MIN_PART_BYTES

    def __init__(self, s3: Any, bucket: str, prefix: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"

    def key(self, name: str) -> str:
        return self.prefix + name

    def location(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _upload(self, stream: Stream, state: dict[str, Any]) -> dict[str, str]:
        upload: dict[str, str] | None = state.get(stream)
        if upload is None:
            token = uuid.uuid4().hex
            resp = self.s3.create_multipart_upload(
                Bucket=self.bucket,
                Key=self.key(OUTPUT_FILES[stream]),
                ContentType=CONTENT_TYPES[stream],
                Metadata={UPLOAD_META_KEY: token},
            )
            upload = {"upload_id": str(resp["UploadId"]), "token": token}
            state[stream] = upload
        return upload

    def upload_part(self, stream: Stream, number: int, data: bytes, state: dict[str, Any]) -> dict[str, Any]:
        upload = self._upload(stream, state)
        resp = self.s3.upload_part(
            Bucket=self.bucket,
            Key=self.key(OUTPUT_FILES[stream]),
            UploadId=upload["upload_id"],
            PartNumber=number,
            Body=data,
        )
        return {"number": number, "etag": str(resp["ETag"]), "bytes": len(data)}

    def _already_completed(self, stream: Stream, token: str) -> bool:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=self.key(OUTPUT_FILES[stream]))
        except ClientError:
            return False
        return bool(head.get("Metadata", {}).get(UPLOAD_META_KEY) == token)

    def complete(self, stream: Stream, parts: list[dict[str, Any]], tail: bytes, state: dict[str, Any]) -> str:
        key = self.key(OUTPUT_FILES[stream])
        upload: dict[str, str] | None = state.get(stream)
        if upload is None:  # everything fits in one object
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=tail, ContentType=CONTENT_TYPES[stream])
            return self.location(OUTPUT_FILES[stream])
        if self._already_completed(stream, upload["token"]):
            return self.location(OUTPUT_FILES[stream])  # completed by a run that crashed right after
        refs = sorted(parts, key=lambda r: int(r["number"]))
        try:
            if tail:
                refs.append(self.upload_part(stream, len(refs) + 1, tail, state))
            self.s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload["upload_id"],
                MultipartUpload={"Parts": [{"PartNumber": int(r["number"]), "ETag": r["etag"]} for r in refs]},
            )
        except ClientError as exc:
            if _code(exc) == "NoSuchUpload" and self._already_completed(stream, upload["token"]):
                return self.location(OUTPUT_FILES[stream])  # completed meanwhile
            raise
        return self.location(OUTPUT_FILES[stream])

    def abort(self, state: dict[str, Any]) -> None:
        """Drop unfinished uploads (a file that failed as a whole)."""
        for stream, upload in list(state.items()):
            if stream not in CONTENT_TYPES or not isinstance(upload, dict):
                continue
            try:
                self.s3.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key(OUTPUT_FILES[stream]), UploadId=upload["upload_id"]
                )
            except ClientError as exc:
                if _code(exc) != "NoSuchUpload":
                    raise

    def write_manifest(self, manifest: dict[str, Any]) -> str:
        self.s3.put_object(
            Bucket=self.bucket,
            Key=self.key(OUTPUT_FILES["manifest"]),
            Body=(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
            ContentType="application/json",
        )
        return self.location(OUTPUT_FILES["manifest"])


class S3CheckpointStore:
    def __init__(self, s3: Any, bucket: str, key: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.key = key

    def load(self) -> Checkpoint | None:
        try:
            blob = self.s3.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return Checkpoint.from_bytes(blob)

    def save(self, checkpoint: Checkpoint) -> None:
        self.s3.put_object(
            Bucket=self.bucket, Key=self.key, Body=checkpoint.to_bytes(), ContentType="application/octet-stream"
        )

    def clear(self) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key)
