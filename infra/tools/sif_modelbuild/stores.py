"""Where the publisher writes: the models bucket (S3) or a local folder laid out the same way.

    models/{name}/{version}/{files..., manifest.json}     (S3; a folder: {root}/{name}/{version}/...)
    models/{name}/aliases.json                           (the model's index: aliases, retired versions)

Two operators publishing the same model at once must not get the same version, and two changing
aliases at once must not lose each other's change. So every write that decides something is
conditional, and the loser retries:

- a version number is claimed before any file is written: S3 `PutObject` of `{version}/.claim` with
  `If-None-Match: *` (a folder: `mkdir`). The claim is dropped once the manifest is in; a publish that
  fails after its claim removes what it wrote, claim included (nothing under that number was ever
  published, so the number may be handed out again).
- the manifest, written last, is also `If-None-Match: *`: a version, once published, never changes.
- the index is read with its ETag and written back with `If-Match` (`If-None-Match: *` when there was
  none); a folder does the same under an exclusive lock (fcntl) on `{name}/.aliases.lock`.

S3 has supported these conditional writes since 2024 (If-None-Match in August, If-Match in
November); moto's server honours both, so the local stack behaves as AWS does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from sif_inference.sources import INDEX_FILE, MANIFEST_FILE, LocalDirSource, ModelSource
from sif_inference.versions import ModelIndex

CLAIM_FILE = ".claim"
LOCK_FILE = ".aliases.lock"
_VERSION_DIR = re.compile(r"^[1-9][0-9]{0,8}$")


class ModelStore(Protocol):
    """What publish and the catalogue need from a store; `source()` reads it as the registry does."""

    where: str

    def source(self) -> ModelSource: ...

    def version_numbers(self, name: str) -> set[int]:
        """Every version number in use under the model, published, being published or abandoned."""
        ...

    def claim(self, name: str, version: str, note: dict[str, Any]) -> bool:
        """Take `version` for one publish; False when someone else has it."""
        ...

    def put_file(self, name: str, version: str, filename: str, data: bytes) -> None: ...

    def put_manifest(self, name: str, version: str, body: bytes) -> bool:
        """Write the manifest only if the version has none; False when it has one already."""
        ...

    def release(self, name: str, version: str, *, published: bool) -> None:
        """Drop the claim; when the publish failed, drop the files written so far as well."""
        ...

    def read_index(self, name: str) -> tuple[ModelIndex | None, str | None]:
        """(the index or None, a token naming what was read: an ETag, a hash)."""
        ...

    def write_index(self, name: str, index: ModelIndex, token: str | None) -> bool:
        """Write the index only if it is still what `token` names; False when it changed meanwhile."""
        ...


def index_body(index: ModelIndex) -> bytes:
    return (json.dumps(index.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------------- S3
class S3Store:
    """The models bucket, through a boto3 S3 client (the operator's credentials, or the local stack's)."""

    def __init__(self, s3: Any, bucket: str, prefix: str = "models/") -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.where = f"s3://{bucket}/{prefix}"

    def source(self) -> ModelSource:
        from sif_core.model_store import S3ModelSource

        return S3ModelSource(self.s3, self.bucket, self.prefix)

    def _key(self, name: str, *parts: str) -> str:
        return self.prefix + "/".join((name, *parts))

    def _keys(self, prefix: str) -> Iterator[str]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield str(obj["Key"])

    def version_numbers(self, name: str) -> set[int]:
        prefix = self._key(name) + "/"
        found = set()
        for key in self._keys(prefix):
            head = key[len(prefix) :].split("/", 1)[0]
            if _VERSION_DIR.match(head) and "/" in key[len(prefix) :]:
                found.add(int(head))
        return found

    def _put_if_absent(self, key: str, body: bytes, content_type: str) -> bool:
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, IfNoneMatch="*")
        except self.s3.exceptions.ClientError as exc:
            if _lost_race(exc):
                return False
            raise
        return True

    def claim(self, name: str, version: str, note: dict[str, Any]) -> bool:
        return self._put_if_absent(self._key(name, version, CLAIM_FILE), json.dumps(note).encode(), "application/json")

    def put_file(self, name: str, version: str, filename: str, data: bytes) -> None:
        extra = {"ContentType": "application/json" if filename.endswith(".json") else "application/octet-stream"}
        self.s3.upload_fileobj(io.BytesIO(data), self.bucket, self._key(name, version, filename), ExtraArgs=extra)

    def put_manifest(self, name: str, version: str, body: bytes) -> bool:
        return self._put_if_absent(self._key(name, version, MANIFEST_FILE), body, "application/json")

    def release(self, name: str, version: str, *, published: bool) -> None:
        # a failed publish wrote no manifest: nobody can be reading its files
        keys = [self._key(name, version, CLAIM_FILE)] if published else list(self._keys(self._key(name, version) + "/"))
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    def read_index(self, name: str) -> tuple[ModelIndex | None, str | None]:
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(name, INDEX_FILE))
        except self.s3.exceptions.NoSuchKey:
            return None, None
        return ModelIndex.model_validate_json(obj["Body"].read()), str(obj["ETag"])

    def write_index(self, name: str, index: ModelIndex, token: str | None) -> bool:
        condition = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=self._key(name, INDEX_FILE),
                Body=index_body(index),
                ContentType="application/json",
                **condition,
            )
        except self.s3.exceptions.ClientError as exc:
            if _lost_race(exc) or _code(exc) == "NoSuchKey":  # changed, or deleted, since we read it
                return False
            raise
        return True


def _code(exc: Any) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _lost_race(exc: Any) -> bool:
    """412 PreconditionFailed: the object exists / changed; 409 ConditionalRequestConflict: a concurrent write."""
    return _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


# ---------------------------------------------------------------------- a folder
class LocalStore:
    """A folder laid out like the models bucket (what LocalDirSource reads): tests, `make models`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.where = str(self.root)

    def source(self) -> ModelSource:
        return LocalDirSource(self.root)

    def version_numbers(self, name: str) -> set[int]:
        folder = self.root / name
        if not folder.is_dir():
            return set()
        return {int(p.name) for p in folder.iterdir() if p.is_dir() and _VERSION_DIR.match(p.name)}

    def claim(self, name: str, version: str, note: dict[str, Any]) -> bool:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        try:
            (self.root / name / version).mkdir()  # atomic: exactly one mkdir of a path succeeds
        except FileExistsError:
            return False
        (self.root / name / version / CLAIM_FILE).write_text(json.dumps(note))
        return True

    def put_file(self, name: str, version: str, filename: str, data: bytes) -> None:
        path = self.root / name / version / filename
        partial = path.with_name(f".{filename}.{os.getpid()}.part")
        partial.write_bytes(data)
        partial.replace(path)

    def put_manifest(self, name: str, version: str, body: bytes) -> bool:
        path = self.root / name / version / MANIFEST_FILE
        partial = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.part")
        partial.write_bytes(body)
        try:
            os.link(partial, path)  # fails if the manifest exists: a published version never changes
        except FileExistsError:
            return False
        finally:
            partial.unlink(missing_ok=True)
        return True

    def release(self, name: str, version: str, *, published: bool) -> None:
        folder = self.root / name / version
        if published:
            (folder / CLAIM_FILE).unlink(missing_ok=True)
            return
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            if not [p for p in (self.root / name).iterdir() if p.name != LOCK_FILE]:
                shutil.rmtree(self.root / name)  # the model's first publish failed: leave no trace

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        with (self.root / name / LOCK_FILE).open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read_index(self, name: str) -> tuple[ModelIndex | None, str | None]:
        path = self.root / name / INDEX_FILE
        if not path.is_file():
            return None, None
        data = path.read_bytes()
        return ModelIndex.model_validate_json(data), hashlib.sha256(data).hexdigest()

    def write_index(self, name: str, index: ModelIndex, token: str | None) -> bool:
        path = self.root / name / INDEX_FILE
        with self._locked(name):
            current = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            if current != token:
                return False
            partial = path.with_name(f".{INDEX_FILE}.{os.getpid()}.{time.monotonic_ns()}.part")
            partial.write_bytes(index_body(index))
            partial.replace(path)
        return True
