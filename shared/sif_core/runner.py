"""Running one job or batch through the file engine: the same outputs, bill and events on every path.

A `Work` is what to score (a byte source in a known format), for whom, with which model, into
which results folder, billed under which id. The worker function (jobs), the scorer function (dropped
files) and the GPU worker (either, routed to AWS Batch) all call `WorkRunner.score`, which drives
`sif_core.scoring.score_file` with S3 outputs and an S3 checkpoint, and asks before every window
whether to go on: not when the work was cancelled, not past the quota reserved for it (extended as
it grows, while the tenant's quota allows), not after a bad row when the work is all-or-nothing,
not once its S3 input is no longer the version being scored. A replaced (or deleted) input stops
the run: its outputs are aborted and its reservation released, nothing of it is billed, and
`SourceChangedError` tells the caller, which decides what the record says.

Work that scored no row (an empty or header-only file, stopped before its first row) bills nothing:
its reservation is released, not settled (`Lifecycle.settle`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from sif_core import openai_batch
from sif_core.keys import OUTPUT_FILES, checkpoint_key, s3_uri
from sif_core.lifecycle import QUOTA_EXCEEDED, TENANT_INACTIVE, Lifecycle, WorkFailedError, short_error
from sif_core.rows import ByteSource, FileFormatError, Format
from sif_core.s3io import S3CheckpointStore, S3Object, S3ResultSink, SourceChangedError
from sif_core.scoring import Checkpoint, Deadline, FileModel, Progress, ScoreConfig, file_model, score_file
from sif_core.work import WorkRecord
from sif_inference.errors import InferenceError
from sif_inference.rounding import Encoding
from sif_metering.ledger import QuotaExceededError, TenantInactiveError, Usage

log = logging.getLogger("sif.runner")

OnError = Literal["continue", "fail"]
WorkProtocol = Literal["sif", "openai"]
CANCEL_CHECK_EVERY_S = 2.0
ROW_FAILED = "row_failed"


@dataclass(frozen=True)
class Work:
    """One unit of work for the file engine."""

    record: WorkRecord
    source: ByteSource
    fmt: Format
    output_prefix: str
    metering_id: str
    variant: str | None = None
    version: str | None = None  # pinned when the work was accepted, so all of it runs one version
    on_error: OnError = "continue"
    describe: dict[str, Any] = field(default_factory=dict)  # the input, as the manifest states it
    encoding: Encoding = "float"  # how vectors are written: JSON floats, or float32 base64 (OpenAI's)
    protocol: WorkProtocol = "sif"  # "openai": each row is a staged OpenAI Batch request (sif_core.openai_batch)

    @property
    def kind(self) -> str:
        return self.record.kind


@dataclass
class Outcome:
    status: Literal["succeeded", "failed", "cancelled", "continued", "skipped", "submitted"]
    id: str
    route: str = "cpu"
    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    segment: int = 0
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class DeadlineReached(Exception):
    """The invocation is about to time out with the work unfinished; its checkpoint is saved."""

    def __init__(self, next_segment: int, rows: int) -> None:
        super().__init__(f"the invocation's time ran out after {rows} rows")
        self.next_segment = next_segment


class _Gate:
    """Asked before each window: go on, or why to stop."""

    def __init__(self, lifecycle: Lifecycle, work: Work) -> None:
        self.lc = lifecycle
        self.work = work
        self.reserved = int(work.record.details.get("reserved", 0))
        self.checked = 0.0  # the first window asks at once: a run resumed after a cancellation stops there

    def __call__(self, state: Checkpoint, rows: int) -> str | None:
        if self.work.on_error == "fail" and state.failed:
            return ROW_FAILED
        now = time.monotonic()
        if now - self.checked >= CANCEL_CHECK_EVERY_S:
            self.checked = now
            if self.lc.status(self.work.record) == "cancelled":
                return "cancelled"
            still_current(self.work.source)
        need = state.inputs + rows  # rows: the window's quota units (its texts)
        if self.lc.s.ledger is not None and need > self.reserved:
            more = max(need - self.reserved, self.reserved // 4, rows)
            try:
                self.lc.extend(self.work.record, more, self.work.metering_id)
            except TenantInactiveError:
                return TENANT_INACTIVE
            except QuotaExceededError:
                return QUOTA_EXCEEDED
            self.reserved += more
            self.work.record.details["reserved"] = self.reserved
            self.lc.update(self.work.record, details=self.work.record.details)
        return None


class WorkRunner:
    def __init__(self, lifecycle: Lifecycle, config: ScoreConfig | None = None) -> None:
        self.lc = lifecycle
        self.s = lifecycle.s
        self.config = config or ScoreConfig()

    def sink(self, work: Work) -> S3ResultSink:
        return S3ResultSink(self.s.s3, self.s.settings.results_bucket, work.output_prefix)

    def checkpoints(self, work: Work) -> S3CheckpointStore:
        return S3CheckpointStore(self.s.s3, self.s.settings.results_bucket, checkpoint_key(work.output_prefix))

    def discard(self, work: Work) -> None:
        """Drop an unfinished run: its multipart outputs aborted, its checkpoint cleared, its reservation
        released (nothing of it is billed). Idempotent."""
        store = self.checkpoints(work)
        state = store.load()
        if state is not None:
            self.sink(work).abort(state.sink_state)
            store.clear()
        self.lc.release(work.record, work.metering_id)

    def fail(self, work: Work, error: str | BaseException, *, reason: str | None = None) -> Outcome:
        """The work failed as a whole: unfinished outputs dropped, a manifest that says why, nothing billed."""
        message = short_error(error)
        store = self.checkpoints(work)
        state = store.load()
        sink = self.sink(work)
        if state is not None:
            sink.abort(state.sink_state)
            store.clear()
        sink.write_manifest(
            {
                "kind": work.kind,
                "id": work.record.id,
                "tenant": work.record.tenant,
                "status": "failed",
                "reason": reason,
                "error": message,
                "model": work.record.model,
                "version": work.version,
                "variant": work.variant,
                "input": work.describe,
            }
        )
        work.record.output_prefix = work.output_prefix
        self.lc.fail(work.record, message, reason=reason, metering_id=work.metering_id)
        return Outcome("failed", work.record.id, work.record.route, reason=reason or message)

    def score(self, work: Work, segment: int, deadline: Deadline, *, route: str) -> Outcome:
        """Score `work` from its checkpoint until done or `deadline` (then DeadlineReached, checkpoint saved).

        Work cancelled meanwhile stops before its next window: the outputs are completed with the rows
        scored so far and billed for them (a cancellation before the first row bills nothing). An input
        replaced or deleted meanwhile: the run is discarded and SourceChangedError raised."""
        record = work.record
        store = self.checkpoints(work)
        checkpoint = store.load()
        if checkpoint is not None and route == "gpu":
            segment = max(segment, checkpoint.segment)  # the GPU worker takes whatever was left over
        if checkpoint is not None and checkpoint.segment > segment:
            return Outcome("skipped", record.id, route, segment=segment, reason=f"segment {checkpoint.segment} owns it")
        current = self.lc.get(record)
        if current is not None and current.status == "cancelled" and checkpoint is None:
            return self._cancelled_before_start(work)
        self.lc.running(record, route)
        try:
            model = self._file_model(work)
        except InferenceError as exc:
            return self.fail(work, exc)
        provider = self.s.models.get(record.model, work.variant, version=work.version).session.get_providers()[0]
        meta = {"kind": work.kind, "id": record.id, "tenant": record.tenant, "route": route, "provider": provider}
        meta.update(work.describe)

        def progress(p: Progress) -> None:
            self.lc.progress(record, p.rows, p.succeeded, p.failed, p.fraction)

        started = time.monotonic()
        try:
            summary = score_file(
                work.source,
                work.fmt,
                model,
                self.sink(work),
                store,
                checkpoint=checkpoint,
                deadline=deadline,
                segment=segment,
                meta=meta,
                config=self.config,
                progress=progress,
                gate=_Gate(self.lc, work),
            )
        except FileFormatError as exc:
            return self.fail(work, exc, reason="bad_file")
        except WorkFailedError as exc:
            return self.fail(work, exc, reason=exc.reason)
        except InferenceError as exc:  # raised on purpose by the core for what it was given: no retry helps
            return self.fail(work, exc, reason="bad_input")
        except SourceChangedError:
            self.discard(work)
            raise
        state = summary.checkpoint
        if not summary.done:
            raise DeadlineReached(summary.next_segment, state.rows)
        wall_s = time.monotonic() - started
        usage = Usage(
            tenant=record.tenant,
            model=record.model,
            request_id=work.metering_id,
            inputs=state.inputs,
            tokens=state.tokens,
            pixels=state.pixels,
            compute_ms=int(state.compute_ms),
            gpu_ms=int(wall_s * 1000) if route == "gpu" else 0,
        )
        counts = {"rows": state.rows, "succeeded": state.succeeded, "failed": state.failed}
        outcome = Outcome("succeeded", record.id, route, state.rows, state.succeeded, state.failed, segment)
        if work.on_error == "fail" and state.failed:
            first = _first_error(self.s.s3, self.s.settings.results_bucket, work.output_prefix)
            outcome = self.fail(work, f"{state.failed} row(s) failed and on_error is 'fail'; first: {first}")
            outcome.reason = ROW_FAILED
        elif state.stopped == "cancelled":
            self.lc.stopped(
                record,
                usage,
                status="cancelled",
                error=None,
                reason="cancelled",
                output_prefix=work.output_prefix,
                **counts,
            )
            outcome.status, outcome.reason = "cancelled", "cancelled"
        elif state.stopped:
            error = f"stopped after {state.rows} rows: {state.stopped}"
            self.lc.stopped(
                record,
                usage,
                status="failed",
                error=error,
                reason=state.stopped,
                output_prefix=work.output_prefix,
                **counts,
            )
            outcome.status, outcome.reason = "failed", state.stopped
        else:
            details = {
                "tokens": state.tokens,
                "truncated": state.truncated,
                "segments": state.segment + 1,
                "inputs": state.inputs,
                "manifest": s3_uri(self.s.settings.results_bucket, work.output_prefix + OUTPUT_FILES["manifest"]),
                "duration_s": (summary.manifest or {}).get("duration_s"),
            }
            self.lc.succeed(record, usage, output_prefix=work.output_prefix, details=details, **counts)
        store.clear()
        log.info("%s %s: %s (%d rows, %d failed)", work.kind, record.id, outcome.status, state.rows, state.failed)
        return outcome

    def _file_model(self, work: Work) -> FileModel:
        record = work.record
        if work.protocol == "openai":
            return openai_batch.file_model(self.s.models, record.id, record.model, work.variant, version=work.version)
        return file_model(self.s.models, record.model, work.variant, version=work.version, encoding=work.encoding)

    def _cancelled_before_start(self, work: Work) -> Outcome:
        """Cancelled before any row was scored: what was reserved goes back, nothing is written or billed."""
        self.lc.release(work.record, work.metering_id)
        stored = self.lc.get(work.record)
        if stored is not None and not stored.reason:  # the record says why it ended, as a run's end would
            self.s.store.update(
                stored.tenant, stored.kind, stored.id, details={**stored.details, "reason": "cancelled"}
            )
        return Outcome("cancelled", work.record.id, work.record.route, reason="cancelled before it ran")


def still_current(source: ByteSource) -> None:
    """SourceChangedError when an S3 input is no longer the version (ETag) being scored.

    A GET already streaming keeps serving the old version, so a replacement is only seen by asking:
    a HEAD with IfMatch (`S3Object.size` of a fresh view of the same object and ETag)."""
    if isinstance(source, S3Object) and source.etag:
        _ = S3Object(source.s3, source.bucket, source.key, source.etag).size


def _first_error(s3: Any, bucket: str, prefix: str) -> str:
    try:
        body = s3.get_object(Bucket=bucket, Key=prefix + OUTPUT_FILES["errors"], Range="bytes=0-2047")["Body"].read()
    except Exception:  # noqa: BLE001 - only a hint for the error message
        return "see errors.jsonl"
    return body.decode("utf-8", "replace").split("\n", 1)[0] or "see errors.jsonl"


__all__ = ["DeadlineReached", "Outcome", "SourceChangedError", "Work", "WorkRunner"]
