"""Batch and job records in the work table, always addressed through their tenant.

Keys: pk = tenant#{tenant}, sk = {kind}#{id}. A lookup needs the caller's tenant, so another
tenant's id is simply not found (404), never "forbidden". Ids are random, so newest-first lists
go through a local secondary index on `created_key` = {kind}#{created ms, 13 digits}#{id}: one
tenant's records of one kind, in creation order, read with the same strong consistency as the table.

The lifecycle: queued -> running -> succeeded | failed, or cancelled (by the caller, any time before
the end) or expired (a batch whose file never arrived: its upload URL expired, plus a grace). Expiry
is lazy: whoever reads a record past that deadline marks it, conditionally, so no scheduler is needed.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import re
import secrets
import time
from collections.abc import Collection
from decimal import Decimal
from typing import Any, Literal

from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

Kind = Literal["batch", "job"]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "expired"})
RECORD_TTL_S = 30 * 24 * 3600

CREATED_INDEX = "by_created"  # template.yaml: WorkTable's LocalSecondaryIndexes
LIST_LIMIT_MAX = 100
LIST_EVALUATE_MAX = 2000  # records one list call reads at most while filtering; past that it pages
_STORAGE_KEYS = ("pk", "sk", "expires_at", "created_key")
_CREATED_KEY = re.compile(r"^(batch|job)#(\d{13})#([A-Za-z0-9_-]{1,128})$")


class InvalidCursorError(ValueError):
    """A list cursor that is not one this store handed out (or not for this kind)."""


def new_id(kind: Kind) -> str:
    return ("b_" if kind == "batch" else "j_") + secrets.token_hex(10)


class WorkRecord(BaseModel):
    id: str
    kind: Kind
    tenant: str
    model: str
    status: Status = "queued"
    route: Literal["cpu", "gpu"] = "cpu"
    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    progress: float = 0.0
    input_key: str | None = None
    output_prefix: str | None = None
    error: str | None = None
    callback_url: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    cancelled_at: float | None = None
    started_at: float | None = None  # set by the lifecycle when a run starts (the latest run's start)
    finished_at: float | None = None  # set by the lifecycle when the work ends

    @property
    def reason(self) -> str | None:
        """Why the work ended as it did, in a word: quota_exceeded, cancelled, bad_file, row_failed, ..."""
        value = self.details.get("reason")
        return str(value) if value else None

    @property
    def has_outputs(self) -> bool:
        """Whether its results folder holds complete outputs: a success, or a run stopped part-way
        (cancelled, out of quota) whose rows scored so far were kept."""
        if not self.output_prefix:
            return False
        stopped = self.status in ("cancelled", "failed") and self.reason in (
            "cancelled",
            "quota_exceeded",
            "tenant_inactive",
        )
        return self.status == "succeeded" or (stopped and self.rows > 0)


def created_key(kind: Kind, created_at: float, id_: str) -> str:
    """The index's sort key: kind first (one index serves both kinds), then time, then the id as a tiebreak."""
    return f"{kind}#{int(created_at * 1000):013d}#{id_}"


def encode_cursor(index_key: str) -> str:
    """An opaque list cursor: base64url of a `created_key` (the tenant is the caller's, never in it)."""
    return base64.urlsafe_b64encode(index_key.encode()).decode().rstrip("=")


def cursor_of(record: WorkRecord) -> str:
    return encode_cursor(created_key(record.kind, record.created_at, record.id))


def decode_cursor(cursor: str, kind: Kind) -> tuple[str, str]:
    """(created_key, id) of a cursor from `encode_cursor`; InvalidCursorError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise InvalidCursorError("not a cursor this API returned") from exc
    m = _CREATED_KEY.match(raw)
    if m is None or m.group(1) != kind:
        raise InvalidCursorError("not a cursor this API returned")
    return raw, m.group(3)


def upload_deadline(record: WorkRecord, grace_s: float) -> float | None:
    """When a batch still waiting for its file expires: its upload URL's expiry plus the grace.

    None when it never does: not a batch, not queued, no upload URL (a file dropped straight into
    the inbox), or its file has arrived (the scorer records the ETag) and only waits for a scorer.
    """
    if record.kind != "batch" or record.status != "queued" or "etag" in record.details:
        return None
    expires = record.details.get("upload_expires_at")
    if not isinstance(expires, int | float):
        return None
    return float(expires) + grace_s


def _to_ddb(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(str(value))
    if isinstance(value, dict):
        return {k: _to_ddb(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_to_ddb(v) for v in value]
    return value


def _from_ddb(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _from_ddb(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_ddb(v) for v in value]
    return value


def _record(item: dict[str, Any]) -> WorkRecord:
    return WorkRecord.model_validate(_from_ddb({k: v for k, v in item.items() if k not in _STORAGE_KEYS}))


def _condition_failed(exc: ClientError) -> bool:
    return bool(exc.response["Error"]["Code"] == "ConditionalCheckFailedException")


class WorkStore:
    def __init__(self, table: Any) -> None:
        self.table = table  # a boto3 dynamodb Table

    @staticmethod
    def key(tenant: str, kind: Kind, id_: str) -> dict[str, str]:
        return {"pk": f"tenant#{tenant}", "sk": f"{kind}#{id_}"}

    def create(self, record: WorkRecord) -> WorkRecord:
        item = {
            **self.key(record.tenant, record.kind, record.id),
            **_to_ddb(record.model_dump()),
            "created_key": created_key(record.kind, record.created_at, record.id),
            "expires_at": int(time.time()) + RECORD_TTL_S,
        }
        self.table.put_item(Item=item, ConditionExpression=Attr("pk").not_exists())
        return record

    def get(self, tenant: str, kind: Kind, id_: str) -> WorkRecord | None:
        item = self.table.get_item(Key=self.key(tenant, kind, id_), ConsistentRead=True).get("Item")
        return None if item is None else _record(item)

    def update(
        self,
        tenant: str,
        kind: Kind,
        id_: str,
        *,
        only_if_not_terminal: bool = False,
        unless: Collection[str] = (),
        **fields: Any,
    ) -> bool:
        """Set fields; a record whose status is in `unless` (all the terminal ones with only_if_not_terminal)
        is left alone, in the same conditional write (returns False)."""
        fields["updated_at"] = time.time()
        names = {f"#{k}": k for k in fields}
        values = {f":{k}": _to_ddb(v) for k, v in fields.items()}
        kwargs: dict[str, Any] = {
            "Key": self.key(tenant, kind, id_),
            "UpdateExpression": "SET " + ", ".join(f"#{k} = :{k}" for k in fields),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }
        condition = Attr("pk").exists()
        blocked = set(unless) | (TERMINAL if only_if_not_terminal else set())
        if blocked:
            condition = condition & ~Attr("status").is_in(sorted(blocked))
        kwargs["ConditionExpression"] = condition
        try:
            self.table.update_item(**kwargs)
        except ClientError as exc:
            if _condition_failed(exc):
                return False
            raise
        return True

    def cancel(self, tenant: str, kind: Kind, id_: str) -> WorkRecord | None:
        """Mark the record cancelled unless it already ended; returns it as it now stands (None: no such record).

        The caller tells the outcomes apart by the status: `cancelled` (now, or before), or another
        terminal status when the work had already ended. Stopping the work itself is the runners' part:
        they update only records that are not terminal, so a cancellation is never overwritten.
        """
        now = time.time()
        try:
            item = self.table.update_item(
                Key=self.key(tenant, kind, id_),
                UpdateExpression="SET #status = :status, #cancelled_at = :now, #updated_at = :now",
                ConditionExpression=Attr("pk").exists() & ~Attr("status").is_in(sorted(TERMINAL)),
                ExpressionAttributeNames={
                    "#status": "status",
                    "#cancelled_at": "cancelled_at",
                    "#updated_at": "updated_at",
                },
                ExpressionAttributeValues={":status": "cancelled", ":now": _to_ddb(now)},
                ReturnValues="ALL_NEW",
            )["Attributes"]
        except ClientError as exc:
            if not _condition_failed(exc):
                raise
            return self.get(tenant, kind, id_)
        return _record(item)

    def expire_if_stale(self, record: WorkRecord, grace_s: float, *, now: float | None = None) -> WorkRecord:
        """The record as it stands once a batch that never got its file is marked expired (if it is due).

        Conditional on the record still waiting for its file, so a file that arrives meanwhile, or a
        concurrent cancel, wins; the record is then read again.
        """
        deadline = upload_deadline(record, grace_s)
        now = time.time() if now is None else now
        if deadline is None or now < deadline:
            return record
        error = "the file was never uploaded: the upload URL expired"
        try:
            item = self.table.update_item(
                Key=self.key(record.tenant, record.kind, record.id),
                UpdateExpression="SET #status = :expired, #error = :error, #updated_at = :now",
                ConditionExpression=Attr("status").eq("queued") & Attr("details.etag").not_exists(),
                ExpressionAttributeNames={"#status": "status", "#error": "error", "#updated_at": "updated_at"},
                ExpressionAttributeValues={":expired": "expired", ":error": error, ":now": _to_ddb(now)},
                ReturnValues="ALL_NEW",
            )["Attributes"]
        except ClientError as exc:
            if not _condition_failed(exc):
                raise
            return self.get(record.tenant, record.kind, record.id) or record
        return _record(item)

    def list(
        self,
        tenant: str,
        kind: Kind,
        *,
        status: str | None = None,
        after: str | None = None,
        limit: int = 20,
        upload_grace_s: float | None = None,
    ) -> tuple[builtins.list[WorkRecord], str | None]:
        """The tenant's records of one kind, newest first: (up to `limit` of them, the next page's cursor or None).

        `after` is a cursor from a previous page or the id of one of the tenant's records (as OpenAI's
        lists take it). With `upload_grace_s`, batches past their upload deadline are expired as they
        are read, so a `status` filter sees them as they now are.
        """
        limit = max(1, min(int(limit), LIST_LIMIT_MAX))
        pk = self.key(tenant, kind, "")["pk"]
        query: dict[str, Any] = {
            "IndexName": CREATED_INDEX,
            "KeyConditionExpression": Key("pk").eq(pk) & Key("created_key").begins_with(f"{kind}#"),
            "ScanIndexForward": False,
            "ConsistentRead": True,
        }
        if status is not None:
            stored = {status} | ({"queued"} if status == "expired" and upload_grace_s is not None else set())
            query["FilterExpression"] = Attr("status").is_in(sorted(stored))
        start = self._start_key(tenant, kind, after) if after else None
        now = time.time()
        found: builtins.list[WorkRecord] = []
        evaluated = 0
        while True:
            if start is not None:
                query["ExclusiveStartKey"] = start
            # Without a filter every item counts, so read just one past the page (has_more); with one, more.
            query["Limit"] = limit + 1 - len(found) if status is None else LIST_LIMIT_MAX
            page = self.table.query(**query)
            evaluated += int(page.get("ScannedCount", 0))
            for item in page.get("Items", []):
                record = _record(item)
                if upload_grace_s is not None:
                    record = self.expire_if_stale(record, upload_grace_s, now=now)
                if status is None or record.status == status:
                    found.append(record)
                    if len(found) > limit:
                        return found[:limit], cursor_of(found[limit - 1])
            start = page.get("LastEvaluatedKey")
            if start is None:
                return found, None
            if evaluated >= LIST_EVALUATE_MAX:  # a sparse filter: a short page, resumed after what was read
                return found, encode_cursor(str(start["created_key"]))

    def _start_key(self, tenant: str, kind: Kind, after: str) -> dict[str, str]:
        try:
            index_key, id_ = decode_cursor(after, kind)
        except InvalidCursorError:
            # Not a cursor: the id of one of the tenant's own records?
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", after):
                raise
            record = self.get(tenant, kind, after)
            if record is None:
                raise InvalidCursorError(f"no {kind} {after!r} to page after") from None
            index_key, id_ = created_key(kind, record.created_at, record.id), record.id
        return {**self.key(tenant, kind, id_), "created_key": index_key}
