"""The emulator's state on disk, so a restart keeps it: S3 objects, DynamoDB items and SQS messages.

moto keeps everything in memory. `EmulatorState.save` writes what the emulator holds to a folder
(the local stack's `.local/state/`) and `restore` puts it back into a fresh emulator in which the
same buckets, tables and queues exist again (the local stack creates them from template.yaml first).
S3 and DynamoDB go through their APIs (list + get, scan; put, batch write); SQS has no way to read a
queue without receiving it (which would hide in-flight messages and count a receive), so its
messages are read from the in-process emulator (`awsemu_internals.queued_messages`) and sent again on
restore, visible at once, as SQS redelivers what was in flight. Restored objects do not notify:
each bucket's notification configuration is lifted while its objects go back (a dropped file is not
scored twice). A bucket made by hand is made again; tables and queues that are gone are skipped.

Not moto's recorder: it replays every request, presigned ones with their old times and every
receive and delete included, which is neither reliable nor quick. Saving is incremental (an
object whose ETag and size did not change is not read again) and atomic: object bodies are files
named by their sha256 under `blobs/`, written before `snapshot.json`, which is replaced in one step;
bodies no snapshot names any more are removed after it. `PeriodicSnapshot` saves every
`interval_s` and once more when it stops, so a killed stack loses at most the last interval.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from sif_emulator.moto_patches import queued_messages, requeue, set_object_etag

log = logging.getLogger("sif_emulator.moto_server")

FORMAT_VERSION = 1
SNAPSHOT_FILE = "snapshot.json"
BLOBS_DIR = "blobs"
OBJECT_FIELDS = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl")
NOTIFICATION_KINDS = (
    "TopicConfigurations",
    "QueueConfigurations",
    "LambdaFunctionConfigurations",
    "EventBridgeConfiguration",
)


class StateRestoreError(RuntimeError):
    """The saved state could not be put back (starting empty would overwrite it at the next save)."""


def _item(item: dict[str, Any], convert: Callable[[Any], Any]) -> dict[str, Any]:
    """A DynamoDB item (low-level typed format) with its binary values passed through `convert`
    (bytes <-> base64 text: JSON has no bytes)."""
    return {name: _value(value, convert) for name, value in item.items()}


def _value(value: dict[str, Any], convert: Callable[[Any], Any]) -> dict[str, Any]:
    kind, inner = next(iter(value.items()))
    if kind == "B":
        return {"B": convert(inner)}
    if kind == "BS":
        return {"BS": [convert(v) for v in inner]}
    if kind == "M":
        return {"M": _item(inner, convert)}
    if kind == "L":
        return {"L": [_value(v, convert) for v in inner]}
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):  # e.g. a binary SQS message attribute
        return _b64(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


class EmulatorState:
    """Save and restore the emulator's S3 objects, DynamoDB items and SQS messages under `root`.

    `session`: a boto3 session with the emulator's credentials; `skip_buckets`: buckets rebuilt on
    every start (the published models); `prefix`: only buckets, tables and queues whose names start
    with it; `in_process`: the emulator runs in this process, so SQS messages (and multipart ETags)
    can be kept too. Buckets made by hand come back (plain); tables and queues must exist already.
    """

    def __init__(
        self,
        root: str | Path,
        session: Any,
        endpoint_url: str,
        *,
        region: str,
        skip_buckets: Iterable[str] = (),
        prefix: str = "",
        in_process: bool = True,
    ) -> None:
        self.root = Path(root)
        self.prefix = prefix
        self.region = region
        self.skip_buckets = set(skip_buckets)
        self.in_process = in_process
        self.s3 = session.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.dynamodb = session.client("dynamodb", endpoint_url=endpoint_url, region_name=region)
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}  # what the last save/restore knew
        self._last_saved: str | None = None

    @property
    def snapshot_path(self) -> Path:
        return self.root / SNAPSHOT_FILE

    def exists(self) -> bool:
        return self.snapshot_path.is_file()

    def _blob(self, digest: str) -> Path:
        return self.root / BLOBS_DIR / digest

    # ------------------------------------------------------------ save
    def save(self) -> dict[str, int]:
        """Write the emulator's state; returns what it holds (objects, items, messages)."""
        with self._lock:
            s3 = self._save_s3()
            snapshot: dict[str, Any] = {
                "version": FORMAT_VERSION,
                "s3": s3,
                "dynamodb": self._save_dynamodb(),
                "sqs": self._save_sqs(),
            }
            text = json.dumps(snapshot, sort_keys=True, separators=(",", ":"), default=_json_default)
            if text != self._last_saved:
                self.root.mkdir(parents=True, exist_ok=True)
                tmp = self.snapshot_path.with_name(SNAPSHOT_FILE + ".tmp")
                tmp.write_text(text)
                tmp.replace(self.snapshot_path)  # readers and a restart never see half a snapshot
                self._last_saved = text
                self._collect_garbage(s3)
            return self._counts(snapshot)

    @staticmethod
    def _counts(snapshot: dict[str, Any]) -> dict[str, int]:
        return {
            "objects": sum(len(v) for v in snapshot.get("s3", {}).values()),
            "items": sum(len(v) for v in snapshot.get("dynamodb", {}).values()),
            "messages": sum(len(v) for v in snapshot.get("sqs", {}).values()),
        }

    def _save_s3(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        seen: set[tuple[str, str]] = set()
        for bucket in sorted(b["Name"] for b in self.s3.list_buckets().get("Buckets", [])):
            if bucket in self.skip_buckets or not bucket.startswith(self.prefix):
                continue
            objects: dict[str, Any] = {}
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for listed in page.get("Contents", []):
                    key = listed["Key"]
                    known = self._objects.get((bucket, key))
                    if (
                        known is not None
                        and known["etag"] == listed["ETag"]
                        and known["size"] == listed["Size"]
                        and self._blob(known["blob"]).is_file()
                    ):
                        entry = known
                    else:
                        try:
                            entry = self._save_object(bucket, key)
                        except ClientError as exc:  # deleted since it was listed
                            log.debug("state: s3://%s/%s not saved: %s", bucket, key, exc)
                            continue
                    objects[key] = entry
                    seen.add((bucket, key))
                    self._objects[(bucket, key)] = entry
            out[bucket] = objects
        for gone in set(self._objects) - seen:
            del self._objects[gone]
        return out

    def _save_object(self, bucket: str, key: str) -> dict[str, Any]:
        resp = self.s3.get_object(Bucket=bucket, Key=key)
        (self.root / BLOBS_DIR).mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / BLOBS_DIR, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in resp["Body"].iter_chunks(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            target = self._blob(digest.hexdigest())
            if target.is_file():
                os.unlink(tmp_name)
            else:
                os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        entry: dict[str, Any] = {"blob": digest.hexdigest(), "etag": resp["ETag"], "size": size}
        entry.update({field: resp[field] for field in OBJECT_FIELDS if resp.get(field)})
        if resp.get("Metadata"):
            entry["Metadata"] = resp["Metadata"]
        return entry

    def _collect_garbage(self, s3: dict[str, dict[str, Any]]) -> None:
        blobs = self.root / BLOBS_DIR
        if not blobs.is_dir():
            return
        wanted = {entry["blob"] for objects in s3.values() for entry in objects.values()}
        for path in blobs.iterdir():  # a `.part-` file here is left by a save that was killed
            if path.name not in wanted:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _save_dynamodb(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for page in self.dynamodb.get_paginator("list_tables").paginate():
            for table in page.get("TableNames", []):
                if not table.startswith(self.prefix):
                    continue
                items: list[dict[str, Any]] = []
                for scanned in self.dynamodb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
                    items.extend(_item(item, _b64) for item in scanned.get("Items", []))
                out[table] = items
        return out

    def _save_sqs(self) -> dict[str, list[dict[str, Any]]]:
        if not self.in_process:
            return {}
        return {
            name: messages for name, messages in queued_messages(self.region).items() if name.startswith(self.prefix)
        }

    # ------------------------------------------------------------ restore
    def restore(self) -> dict[str, int]:
        """Put the saved state back (into buckets, tables and queues that exist); what it restored."""
        if not self.exists():
            return {"objects": 0, "items": 0, "messages": 0}
        with self._lock:
            try:
                snapshot = json.loads(self.snapshot_path.read_text())
                if snapshot.get("version") != FORMAT_VERSION:
                    raise ValueError(f"format {snapshot.get('version')!r}, this version reads {FORMAT_VERSION}")
                counts = {
                    "objects": self._restore_s3(snapshot.get("s3", {})),
                    "items": self._restore_dynamodb(snapshot.get("dynamodb", {})),
                    "messages": self._restore_sqs(snapshot.get("sqs", {})),
                }
            except (OSError, ValueError, KeyError, TypeError, AttributeError, ClientError) as exc:
                raise StateRestoreError(
                    f"could not restore the local state from {self.root} ({exc}); move it away "
                    "(or `make clean`) to start afresh"
                ) from exc
        log.info(
            "restored the emulator's state from %s: %d objects, %d items, %d messages",
            self.root,
            counts["objects"],
            counts["items"],
            counts["messages"],
        )
        return counts

    def _restore_s3(self, s3: dict[str, dict[str, Any]]) -> int:
        restored = 0
        for bucket, objects in s3.items():
            if bucket in self.skip_buckets or not objects:
                continue
            try:
                notifications = self.s3.get_bucket_notification_configuration(Bucket=bucket)
            except ClientError:  # not in the template: a bucket made by hand, made again
                kwargs: dict[str, Any] = {"Bucket": bucket}
                if self.region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
                self.s3.create_bucket(**kwargs)
                notifications = {}
            config = {k: v for k, v in notifications.items() if k in NOTIFICATION_KINDS}
            if config:  # restored objects are not new uploads: nobody is told about them
                self.s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={})
            try:
                for key, entry in objects.items():
                    restored += self._restore_object(bucket, key, entry)
            finally:
                if config:
                    self.s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=config)
        return restored

    def _restore_object(self, bucket: str, key: str, entry: dict[str, Any]) -> int:
        blob = self._blob(entry["blob"])
        if not blob.is_file():
            log.warning("state: the body of s3://%s/%s is missing (%s); not restored", bucket, key, blob)
            return 0
        extra = {field: entry[field] for field in OBJECT_FIELDS if entry.get(field)}
        if entry.get("Metadata"):
            extra["Metadata"] = entry["Metadata"]
        with blob.open("rb") as body:
            resp = self.s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)
        if resp.get("ETag") != entry["etag"] and self.in_process:
            set_object_etag(bucket, key, entry["etag"])
        self._objects[(bucket, key)] = entry
        return 1

    def _restore_dynamodb(self, tables: dict[str, list[dict[str, Any]]]) -> int:
        restored = 0
        existing = {t for page in self.dynamodb.get_paginator("list_tables").paginate() for t in page["TableNames"]}
        for table, items in tables.items():
            if table not in existing:
                if items:
                    log.warning("state: table %s is gone; its %d items are not restored", table, len(items))
                continue
            for start in range(0, len(items), 25):
                requests = [
                    {"PutRequest": {"Item": _item(item, base64.b64decode)}} for item in items[start : start + 25]
                ]
                pending: dict[str, Any] = {table: requests}
                for attempt in range(10):
                    pending = self.dynamodb.batch_write_item(RequestItems=pending).get("UnprocessedItems") or {}
                    if not pending:
                        break
                    time.sleep(0.05 * (attempt + 1))
                restored += len(requests) - len(pending.get(table, []))
        return restored

    def _restore_sqs(self, queues: dict[str, list[dict[str, Any]]]) -> int:
        if not self.in_process:
            return 0
        restored = 0
        for name, messages in queues.items():
            sent = requeue(self.region, name, messages)
            if sent < len(messages):
                log.warning("state: queue %s is gone; its %d messages are not restored", name, len(messages))
            restored += sent
        return restored


class PeriodicSnapshot:
    """Saves `state` every `interval_s` seconds (0: only when stopped) and once more on `stop`."""

    def __init__(self, state: EmulatorState, interval_s: float) -> None:
        self.state = state
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeriodicSnapshot:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="sif-state-snapshot", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.state.save()
            except Exception as exc:  # noqa: BLE001 - keep trying; the final save on stop reports too
                log.warning("state: saving to %s failed: %s", self.state.root, exc)

    def stop(self) -> None:
        """Stop saving periodically, then save once more (what is there when the stack stops)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        counts = self.state.save()
        log.info(
            "saved the emulator's state to %s: %d objects, %d items, %d messages",
            self.state.root,
            counts["objects"],
            counts["items"],
            counts["messages"],
        )
