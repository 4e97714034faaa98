"""One lifecycle for jobs and batches: create, reserve, run, progress, succeed, fail, give up, announce.

Jobs and batches differ in where their input comes from, not in what happens to them, so both go
through this one class:

- **create** with the race handled (two deliveries creating one record keep the first);
- **reserve** the work's estimated size against the tenant's monthly quota when it is accepted
  (QuotaExceededError when it does not fit: nothing runs, nothing is billed); the reservation is
  extended while scoring and settled to the exact count at the end, so billed never exceeds the quota
  (work that scored no row is released instead: nothing billed, not even a call);
- **running / progress** on one cadence (every PROGRESS_EVERY_S, and at the end);
- **succeed**: metered first (a crash after it re-runs, and the ledger keeps the first bill), then
  the record, then the announcement;
- **fail**: never over a finished record; what was reserved and not scored is released;
- **give up** on the queue's last receive, before SQS dead-letters the message;
- **announce**: one event schema for both kinds (`sif_core.announce`), and the callback if one was given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sif_core.announce import Announcer, WorkEvent
from sif_core.keys import OUTPUT_FILES, s3_uri
from sif_core.settings import Settings
from sif_core.work import WorkRecord, WorkStore
from sif_metering.ledger import NO_QUOTA, QuotaExceededError, Usage, UsageLedger, seconds_to_next_month

if TYPE_CHECKING:  # the Batch-events function runs the lifecycle without numpy or onnxruntime
    from sif_inference.registry import ModelRegistry

log = logging.getLogger("sif.lifecycle")

PROGRESS_EVERY_S = 2.0
MAX_ERROR_CHARS = 1000
QUOTA_EXCEEDED = "quota_exceeded"
TENANT_INACTIVE = "tenant_inactive"  # disabled or deleted tenant (or revoked key): nothing may be billed
# Counted on the record by other deliveries while the work runs (a refused conflicting message): a
# run writing its own copy of `details` carries the stored value over instead of resetting it.
COUNTED_DETAILS = ("conflicts",)


class WorkFailedError(Exception):
    """The work cannot succeed as submitted (retrying would not help): it fails with this message."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def metering_id(kind: str, work_id: str, etag: str | None = None) -> str:
    """The id a job or batch is billed (and its quota reserved) under: job#{id}, batch#{id}#{etag}."""
    return f"job#{work_id}" if kind == "job" else f"batch#{work_id}#{etag or ''}"


def short_error(error: str | BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


@dataclass
class CoreServices:
    """What running jobs and batches needs; built once per process (cold start) by a handler."""

    settings: Settings
    s3: Any
    store: WorkStore
    registry: ModelRegistry | None = None  # None only where no model runs (the Batch-events function)
    ledger: UsageLedger | None = None
    batch: Any = None  # AWS Batch client, for work routed to the GPU queue
    announcer: Announcer = field(default_factory=Announcer)
    quota_of: Callable[[str], int | None] = lambda tenant: 0  # the tenant's monthly units (0: unlimited)
    continue_with: Callable[[Any, int], None] | None = None  # hand a file's next segment on (the scorer)

    @property
    def models(self) -> ModelRegistry:
        if self.registry is None:
            raise RuntimeError("these services were built without a model registry")
        return self.registry


class Lifecycle:
    def __init__(self, services: CoreServices) -> None:
        self.s = services
        self._last_progress: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ records
    def ensure(self, record: WorkRecord) -> WorkRecord:
        """The record as stored: `record` when it is new, the existing one when someone was first."""
        found = self.s.store.get(record.tenant, record.kind, record.id)
        if found is not None:
            return found
        try:
            return self.s.store.create(record)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
        found = self.s.store.get(record.tenant, record.kind, record.id)
        assert found is not None
        return found

    def get(self, record: WorkRecord) -> WorkRecord | None:
        return self.s.store.get(record.tenant, record.kind, record.id)

    def update(self, record: WorkRecord, **fields: Any) -> bool:
        """Set fields on a record that has not finished (False: it had)."""
        if "details" in fields:
            fields["details"] = self._with_counted(record, fields["details"])
        return self.s.store.update(record.tenant, record.kind, record.id, only_if_not_terminal=True, **fields)

    def _with_counted(self, record: WorkRecord, details: dict[str, Any]) -> dict[str, Any]:
        stored = self.get(record)
        counted = {k: stored.details[k] for k in COUNTED_DETAILS if stored is not None and k in stored.details}
        return {**details, **counted} if counted else details

    def count(self, record: WorkRecord, name: str) -> int:
        """Add one to `details[name]` of the record, finished or not (e.g. `conflicts`); returns the new count."""
        stored = self.get(record) or record
        value = int(stored.details.get(name, 0)) + 1
        self.s.store.update(record.tenant, record.kind, record.id, details={**stored.details, name: value})
        return value

    def running(self, record: WorkRecord, route: str, **details: Any) -> bool:
        merged = {**record.details, **details, "runs": int(record.details.get("runs", 0)) + 1}
        record.details.update(merged)
        return self.update(record, status="running", route=route, error=None, started_at=time.time(), details=merged)

    def progress(self, record: WorkRecord, rows: int, succeeded: int, failed: int, fraction: float) -> None:
        """At most every PROGRESS_EVERY_S per record (both kinds, both routes)."""
        key = (record.kind, record.id)
        now = time.monotonic()
        with self._lock:
            if now - self._last_progress.get(key, 0.0) < PROGRESS_EVERY_S:
                return
            self._last_progress[key] = now
        self.update(record, rows=rows, succeeded=succeeded, failed=failed, progress=round(min(fraction, 0.99), 4))

    def status(self, record: WorkRecord) -> str | None:
        found = self.get(record)
        return found.status if found else None

    # ------------------------------------------------------------ quota
    def quota(self, tenant: str) -> int:
        limit = self.s.quota_of(tenant)
        return NO_QUOTA if limit is None else limit

    def reserve(self, record: WorkRecord, units: int, metering_id: str) -> None:
        """Reserve `units` of the tenant's month for this work (idempotent on the metering id)."""
        if self.s.ledger is None:
            return
        limit = self.quota(record.tenant)
        if limit < 0:  # no quota on record: refused, never unlimited
            raise QuotaExceededError(record.tenant, NO_QUOTA, seconds_to_next_month())
        self.s.ledger.reserve(record.tenant, metering_id, max(1, units), limit)

    def extend(self, record: WorkRecord, units: int, metering_id: str) -> None:
        if self.s.ledger is None:
            return
        limit = self.quota(record.tenant)
        if limit < 0:
            raise QuotaExceededError(record.tenant, NO_QUOTA, seconds_to_next_month())
        self.s.ledger.extend(record.tenant, metering_id, units, limit)

    def settle(self, usage: Usage) -> None:
        """Bill exactly `usage` against its reservation (the rest goes back); once, whatever is retried.

        No row scored (an empty or header-only file, work stopped before its first row): the
        reservation is released and nothing is billed, not even a call."""
        if self.s.ledger is None:
            return
        if usage.inputs <= 0:
            self.s.ledger.release(usage.tenant, usage.request_id)
        else:
            self.s.ledger.settle(usage, usage.request_id)

    def release(self, record: WorkRecord, metering_id: str) -> None:
        if self.s.ledger is not None:
            self.s.ledger.release(record.tenant, metering_id)

    # ------------------------------------------------------------ endings
    def succeed(
        self,
        record: WorkRecord,
        usage: Usage,
        *,
        output_prefix: str,
        rows: int,
        succeeded: int,
        failed: int,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.settle(usage)  # metered first: a crash after this re-runs, and the ledger keeps the first bill
        merged = {**record.details, **(details or {})}
        done = self.update(
            record,
            status="succeeded",
            progress=1.0,
            output_prefix=output_prefix,
            rows=rows,
            succeeded=succeeded,
            failed=failed,
            finished_at=time.time(),
            details=merged,
        )
        if done:
            self.announce(record, "succeeded", rows=rows, succeeded=succeeded, failed=failed, prefix=output_prefix)

    def stopped(
        self,
        record: WorkRecord,
        usage: Usage,
        *,
        status: str,
        error: str | None,
        reason: str,
        output_prefix: str,
        rows: int,
        succeeded: int,
        failed: int,
    ) -> None:
        """Work stopped part-way (cancelled, or out of quota): outputs kept, billed for what was scored."""
        self.settle(usage)
        fields: dict[str, Any] = {
            "output_prefix": output_prefix,
            "rows": rows,
            "succeeded": succeeded,
            "failed": failed,
            "finished_at": time.time(),
            "details": self._with_counted(record, {**record.details, "reason": reason}),
        }
        if status == "cancelled":  # the record already says cancelled: only the counts change
            self.s.store.update(record.tenant, record.kind, record.id, **fields)
        elif not self.update(record, status=status, error=error, **fields):
            return
        self.announce(
            record,
            status,
            rows=rows,
            succeeded=succeeded,
            failed=failed,
            prefix=output_prefix,
            error=error,
            reason=reason,
        )

    def fail(
        self,
        record: WorkRecord,
        error: str | BaseException,
        *,
        reason: str | None = None,
        metering_id: str | None = None,
        again: bool = False,
    ) -> bool:
        """Mark the work failed with `error` unless it already ended; what it reserved goes back.

        `again`: a failed record may fail anew (a redriven message given up on once more); a success
        or a cancellation never turns into a failure."""
        message = short_error(error)
        if metering_id is not None:
            self.release(record, metering_id)
        details = {**record.details, **({"reason": reason} if reason else {})}
        fields: dict[str, Any] = {"status": "failed", "error": message, "finished_at": time.time(), "details": details}
        if again and self.status(record) == "failed":
            self.s.store.update(record.tenant, record.kind, record.id, **fields)
        elif not self.update(record, **fields):
            return False
        log.warning("%s %s failed: %s", record.kind, record.id, message)
        prefix = record.output_prefix
        self.announce(
            record, "failed", error=message, reason=reason, prefix=prefix if prefix else None, has_output=False
        )
        return True

    def give_up(self, record: WorkRecord, error: str | BaseException, attempts: int, metering_id: str | None) -> None:
        """The message's last receive failed: mark the work failed before SQS dead-letters it."""
        message = f"gave up after {attempts} attempts: {short_error(error)}"
        self.fail(record, message, metering_id=metering_id, again=True)

    # ------------------------------------------------------------ announcements
    def announce(
        self,
        record: WorkRecord,
        status: str,
        *,
        prefix: str | None = None,
        has_output: bool = True,
        **fields: Any,
    ) -> None:
        with self._lock:  # the work ended: its progress clock goes (a warm process sees many ids)
            self._last_progress.pop((record.kind, record.id), None)
        output = s3_uri(self.s.settings.results_bucket, prefix) if prefix else None
        event = WorkEvent.of(
            record.kind,
            status,
            id=record.id,
            tenant=record.tenant,
            model=record.model,
            route=record.route,
            output=output,
            **{k: v for k, v in fields.items() if v is not None},
        )
        self.s.announcer.publish(event)
        if record.callback_url:
            # Queued, never delivered here: a slow receiver must not hold this work's worker (the callback
            # function delivers it and records `callback_delivered`; a callback not queued is recorded now).
            key = prefix + OUTPUT_FILES["predictions"] if prefix and has_output else None
            if not self.s.announcer.queue_callback(record.callback_url, event, key):
                self.s.store.update(record.tenant, record.kind, record.id, callback_delivered=False)
