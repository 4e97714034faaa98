"""Drop-file batches: an inbox object -> its batch record, its route, the scored outputs, the bill.

Shared by the scorer function (files routed to CPU, in deadline-bounded segments) and the GPU
worker (files routed to the Batch queue, in one go). The scoring itself is sif_core.scoring;
this module adds what makes a file a *batch*:

- where things are: `incoming/{tenant}/{model}/{name}.{ext}` in, `results/{tenant}/{model}/{name}/`
  out (the results bucket only, so outputs can never trigger scoring);
- the batch record in the work table (created for files dropped without `POST /v1/batches`),
  its status, route, counts and progress;
- exactly-once effect: a file whose record already succeeded at this ETag is not scored again;
  the checkpoint belongs to one segment at a time, and a stale segment only re-announces the
  current one; metering is keyed on batch id + ETag, so it bills once whatever is retried;
- routing: rows estimated from the file's head x the model's per-item cost decide CPU or GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from botocore.exceptions import ClientError

from sif_core.routing import GpuJobSpec, Route, choose_route, parse_s3_uri, submit_gpu_job
from sif_core.rows import FileFormatError, Format, detect_format, strip_format
from sif_core.s3io import CHECKPOINT_NAME, S3CheckpointStore, S3Object, S3ResultSink, SourceChangedError
from sif_core.scoring import (
    OUTPUT_FILES,
    Checkpoint,
    Deadline,
    Progress,
    ScoreConfig,
    file_model,
    score_file,
)
from sif_core.settings import Settings
from sif_core.work import TERMINAL, WorkRecord, WorkStore
from sif_inference.errors import InferenceError, ModelNotFoundError
from sif_inference.manifest import ModelManifest
from sif_inference.registry import ModelRegistry
from sif_metering.ledger import Usage, UsageLedger

log = logging.getLogger("sif_core.filebatch")

INBOX_PREFIX = "incoming/"
RESULTS_PREFIX = "results/"
BATCH_ID = re.compile(r"^b_[0-9a-f]{20}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
COUNT_BYTES = 16 << 20  # routing reads at most this much of a file (raw bytes)
PROGRESS_EVERY_S = 2.0
MAX_ERROR_CHARS = 1000

OutcomeStatus = Literal["succeeded", "failed", "continued", "submitted", "skipped"]


class NotAnInboxFileError(ValueError):
    """An object that is not `incoming/{tenant}/{model}/{name}.{ext}`: never scored."""


@dataclass(frozen=True)
class InboxFile:
    """One object in the inbox, at one ETag: what to score, for whom, with which model, to where."""

    bucket: str
    key: str
    etag: str
    size: int
    tenant: str
    model: str
    name: str
    fmt: Format | None  # None: an extension we do not read

    @classmethod
    def parse(cls, bucket: str, key: str, etag: str, size: int) -> InboxFile:
        if not key.startswith(INBOX_PREFIX):
            raise NotAnInboxFileError(f"{key!r} is outside {INBOX_PREFIX}")
        parts = key[len(INBOX_PREFIX) :].split("/")
        if len(parts) < 3 or not all(parts):
            raise NotAnInboxFileError(f"{key!r} is not {INBOX_PREFIX}{{tenant}}/{{model}}/{{name}}.{{ext}}")
        tenant, model = parts[0], parts[1]
        if not _SEGMENT.match(tenant) or not _SEGMENT.match(model):
            raise NotAnInboxFileError(f"{key!r}: tenant and model must be plain names")
        filename = "/".join(parts[2:])
        fmt = detect_format(filename)
        name = strip_format(filename) if fmt else filename.rsplit(".", 1)[0] or filename
        return cls(bucket, key, etag.strip('"'), int(size), tenant, model, name, fmt)

    @property
    def output_prefix(self) -> str:
        return f"{RESULTS_PREFIX}{self.tenant}/{self.model}/{self.name}/"

    @property
    def batch_id(self) -> str:
        """The name itself for uploads made through POST /v1/batches; else derived from the object's place."""
        if BATCH_ID.match(self.name):
            return self.name
        return "b_" + hashlib.sha256(f"{self.bucket}/{self.key}".encode()).hexdigest()[:20]

    @property
    def metering_id(self) -> str:
        return f"batch#{self.batch_id}#{self.etag}"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def describe(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "etag": self.etag, "size": self.size, "format": self.fmt}


@dataclass
class BatchOutcome:
    status: OutcomeStatus
    batch_id: str
    route: Route = "cpu"
    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    segment: int = 0
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class BatchServices:
    """What running file batches needs; built once per process (cold start)."""

    settings: Settings
    s3: Any
    store: WorkStore
    registry: ModelRegistry
    ledger: UsageLedger | None = None
    batch: Any = None  # AWS Batch client, for files routed to the GPU queue
    sns: Any = None
    continue_with: Callable[[InboxFile, int], None] | None = None  # hand a file's next segment on


def _short(error: str | BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class FileBatchRunner:
    def __init__(self, services: BatchServices, *, config: ScoreConfig | None = None) -> None:
        self.s = services
        self.config = config or ScoreConfig()

    # ------------------------------------------------------------ records
    def ensure_record(self, file: InboxFile) -> WorkRecord:
        """The batch's record at this ETag: created for a direct drop, reset when the file was replaced."""
        store = self.s.store
        record = store.get(file.tenant, "batch", file.batch_id)
        if record is None:
            record = WorkRecord(
                id=file.batch_id,
                kind="batch",
                tenant=file.tenant,
                model=file.model,
                input_key=file.key,
                output_prefix=file.output_prefix,
                details={"etag": file.etag, "input": file.describe(), "origin": "inbox"},
            )
            try:
                store.create(record)
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                found = store.get(file.tenant, "batch", file.batch_id)
                assert found is not None
                record = found
        if record.details.get("etag") != file.etag:
            details = {k: v for k, v in record.details.items() if k not in ("routed", "gpu_job_id", "manifest")}
            details.update(etag=file.etag, input=file.describe())
            fields: dict[str, Any] = {
                "status": "queued",
                "rows": 0,
                "succeeded": 0,
                "failed": 0,
                "progress": 0.0,
                "error": None,
                "input_key": file.key,
                "output_prefix": file.output_prefix,
                "details": details,
            }
            store.update(file.tenant, "batch", file.batch_id, **fields)
            record = record.model_copy(update=fields)
        return record

    def _update(self, file: InboxFile, **fields: Any) -> bool:
        return self.s.store.update(file.tenant, "batch", file.batch_id, only_if_not_terminal=True, **fields)

    def fail(
        self, file: InboxFile, record: WorkRecord, error: str, *, sink: S3ResultSink | None = None
    ) -> BatchOutcome:
        """A file that cannot be scored as a whole: record failed, a manifest that says why."""
        error = _short(error)
        sink = sink or S3ResultSink(self.s.s3, self.s.settings.results_bucket, file.output_prefix)
        checkpoint = self._store(file)
        state = checkpoint.load()
        if state is not None:
            sink.abort(state.sink_state)
            checkpoint.clear()
        sink.write_manifest({"model": file.model, "input": file.describe(), "status": "failed", "error": error})
        details = {**record.details, "manifest": sink.location(OUTPUT_FILES["manifest"])}
        self._update(file, status="failed", error=error, details=details)
        self._announce(file, "failed", error=error)
        log.warning("batch %s (%s) failed: %s", file.batch_id, file.key, error)
        return BatchOutcome("failed", file.batch_id, record.route, reason=error)

    def _announce(self, file: InboxFile, status: str, **extra: Any) -> None:
        if self.s.sns is None or not self.s.settings.job_topic_arn:
            return
        message = {"kind": "batch", "id": file.batch_id, "tenant": file.tenant, "model": file.model, "status": status}
        try:
            self.s.sns.publish(TopicArn=self.s.settings.job_topic_arn, Message=json.dumps({**message, **extra}))
        except ClientError as exc:  # an announcement must not undo a finished batch
            log.warning("could not announce batch %s %s: %s", file.batch_id, status, exc)

    def _store(self, file: InboxFile) -> S3CheckpointStore:
        return S3CheckpointStore(self.s.s3, self.s.settings.results_bucket, file.output_prefix + CHECKPOINT_NAME)

    def give_up(self, file: InboxFile, error: BaseException | str, attempts: int) -> None:
        """The message's last receive failed: mark the batch failed before SQS dead-letters it."""
        record = self.ensure_record(file)
        if record.status in TERMINAL and record.details.get("etag") == file.etag:
            return
        self.fail(file, record, f"gave up after {attempts} attempts: {_short(error)}")

    # ------------------------------------------------------------ routing
    def estimate_rows(self, file: InboxFile) -> int:
        """Rows in the file: counted when its head (COUNT_BYTES of it, raw) is all of it, else scaled up."""
        if file.size == 0 or file.fmt is None:
            return 0
        source = S3Object(self.s.s3, file.bucket, file.key, file.etag, file.size)
        with source.open(0) as raw:
            counting = _CountingRead(raw)
            stream: Any = counting
            if file.fmt.endswith(".gz"):
                import gzip

                stream = gzip.GzipFile(fileobj=counting, mode="rb")  # type: ignore[call-overload]
            lines, last, eof = 0, b"\n", False
            try:
                while not eof:
                    chunk = stream.read(1 << 20)
                    eof = not chunk
                    lines += chunk.count(b"\n")
                    last = chunk[-1:] or last
                    if counting.count >= COUNT_BYTES:
                        break
            except (OSError, EOFError) as exc:
                raise FileFormatError(f"not a valid gzip file: {exc}") from exc
        lines += 0 if last == b"\n" else 1
        rows = lines if eof else math.ceil(lines * file.size / max(1, counting.count))
        return max(0, rows - 1) if file.fmt.startswith("csv") else rows  # less the header

    def decide_route(self, file: InboxFile, manifest: ModelManifest, accelerator: str) -> tuple[Route, int]:
        rows = self.estimate_rows(file)
        # An image file with more images than one API call takes is an "archive" (its archive_route).
        archive = manifest.task == "image-classification" and rows > manifest.limits.max_inputs
        return choose_route(manifest, rows, accelerator, archive=archive), rows

    def submit_to_gpu(self, file: InboxFile, record: WorkRecord, rows_estimate: int) -> BatchOutcome:
        existing = record.details.get("gpu_job_id")
        if existing and record.details.get("routed") == file.etag:
            return BatchOutcome("submitted", file.batch_id, "gpu", reason=f"already Batch job {existing}")
        spec = GpuJobSpec(
            kind="batch",
            id=file.batch_id,
            tenant=file.tenant,
            model=file.model,
            variant=record.details.get("variant"),
            input_uri=file.uri,
            input_format=file.fmt,
            output_prefix=file.output_prefix,
            request_id=file.metering_id,
            details={"etag": file.etag, "size": file.size, "rows_estimate": rows_estimate},
        )
        job_id = submit_gpu_job(self.s.batch, self.s.s3, self.s.settings, spec)
        details = {**record.details, "routed": file.etag, "gpu_job_id": job_id, "rows_estimate": rows_estimate}
        self._update(file, route="gpu", status="queued", details=details)
        log.info(
            "batch %s (%s, ~%d rows) goes to the GPU queue as Batch job %s",
            file.batch_id,
            file.key,
            rows_estimate,
            job_id,
        )
        return BatchOutcome("submitted", file.batch_id, "gpu", reason=f"Batch job {job_id}")

    # ------------------------------------------------------------ the Lambda path
    def handle(self, file: InboxFile, segment: int, deadline: Deadline) -> BatchOutcome:
        """One SQS message's worth: segment 0 routes the file; CPU segments score until the deadline."""
        record = self.ensure_record(file)
        if record.status in TERMINAL and record.details.get("etag") == file.etag:
            return BatchOutcome(record.status, file.batch_id, record.route, reason="already finished")  # type: ignore[arg-type]
        if file.fmt is None:
            return self.fail(
                file,
                record,
                f"unsupported file {file.key.rsplit('/', 1)[-1]!r}: expected .jsonl or .csv, optionally .gz",
            )
        try:
            manifest = self.s.registry.manifest(file.model)
        except ModelNotFoundError as exc:
            return self.fail(file, record, str(exc))
        if record.details.get("routed") != file.etag:
            if segment > 0:
                log.warning("batch %s: segment %d before the file was routed; starting over", file.batch_id, segment)
            try:
                route, rows = self.decide_route(file, manifest, str(record.details.get("accelerator", "auto")))
            except SourceChangedError as exc:
                return BatchOutcome("skipped", file.batch_id, reason=str(exc))
            except FileFormatError as exc:
                return self.fail(file, record, str(exc))
            limit = manifest.limits.max_batch_rows
            if rows > limit:
                exact = "" if file.size <= COUNT_BYTES else "about "
                return self.fail(
                    file, record, f"the file has {exact}{rows} rows; {manifest.name} takes at most {limit} per file"
                )
            if route == "gpu":
                return self.submit_to_gpu(file, record, rows)
            details = {**record.details, "routed": file.etag, "rows_estimate": rows}
            self._update(file, route="cpu", details=details)
            record = record.model_copy(update={"route": "cpu", "details": details})
        elif record.route == "gpu":
            return BatchOutcome("skipped", file.batch_id, "gpu", reason="the GPU queue has this file")
        return self.score(file, record, segment, deadline, route="cpu")

    # ------------------------------------------------------------ scoring (CPU or GPU)
    def score(
        self, file: InboxFile, record: WorkRecord, segment: int, deadline: Deadline, *, route: Route
    ) -> BatchOutcome:
        assert file.fmt is not None
        store = self._store(file)
        checkpoint = store.load()
        if checkpoint is not None and checkpoint.source.get("etag") != file.etag:
            log.info("batch %s: dropping the checkpoint of an earlier upload", file.batch_id)
            S3ResultSink(self.s.s3, self.s.settings.results_bucket, file.output_prefix).abort(checkpoint.sink_state)
            checkpoint = None
        if checkpoint is not None and route == "gpu":
            segment = max(segment, checkpoint.segment)  # the GPU worker takes whatever was left over
        if checkpoint is not None and checkpoint.segment > segment:
            # A stale message: a later segment owns the file. Announce it again in case that was lost.
            if self.s.continue_with is not None:
                self.s.continue_with(file, checkpoint.segment)
            return BatchOutcome(
                "skipped", file.batch_id, route, segment=segment, reason=f"segment {checkpoint.segment} owns it"
            )
        self._update(file, status="running", route=route)
        try:
            model = file_model(self.s.registry, file.model, record.details.get("variant"))
        except InferenceError as exc:
            return self.fail(file, record, str(exc))
        sink = S3ResultSink(self.s.s3, self.s.settings.results_bucket, file.output_prefix)
        source = S3Object(self.s.s3, file.bucket, file.key, file.etag, file.size)
        last = [0.0]

        def progress(p: Progress) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or p.fraction >= 1.0:
                last[0] = now
                self._update(file, rows=p.rows, succeeded=p.succeeded, failed=p.failed, progress=round(p.fraction, 4))

        started = time.monotonic()
        try:
            summary = score_file(
                source,
                file.fmt,
                model,
                sink,
                store,
                checkpoint=checkpoint,
                deadline=deadline,
                segment=segment,
                meta={**file.describe(), "batch_id": file.batch_id, "tenant": file.tenant, "route": route},
                config=self.config,
                progress=progress,
            )
        except FileFormatError as exc:
            return self.fail(file, record, str(exc), sink=sink)
        except SourceChangedError as exc:
            log.info("batch %s: %s; the newer upload's own event takes over", file.batch_id, exc)
            return BatchOutcome("skipped", file.batch_id, route, segment=segment, reason=str(exc))
        state = summary.checkpoint
        if not summary.done:
            if self.s.continue_with is None:
                raise RuntimeError("a deadline was reached but there is no way to hand the file on")
            self.s.continue_with(file, summary.next_segment)
            log.info("batch %s: %d rows so far; segment %d continues", file.batch_id, state.rows, summary.next_segment)
            return BatchOutcome(
                "continued", file.batch_id, route, state.rows, state.succeeded, state.failed, summary.next_segment
            )
        self._finish(file, record, state, summary.manifest or {}, route, time.monotonic() - started)
        store.clear()
        return BatchOutcome("succeeded", file.batch_id, route, state.rows, state.succeeded, state.failed, segment)

    def _finish(
        self,
        file: InboxFile,
        record: WorkRecord,
        state: Checkpoint,
        manifest: dict[str, Any],
        route: Route,
        wall_s: float,
    ) -> None:
        if self.s.ledger is not None:
            self.s.ledger.record(
                Usage(
                    tenant=file.tenant,
                    model=file.model,
                    request_id=file.metering_id,
                    inputs=state.succeeded,
                    tokens=state.tokens,
                    pixels=state.pixels,
                    compute_ms=int(state.compute_ms),
                    gpu_ms=int(wall_s * 1000) if route == "gpu" else 0,
                )
            )
        details = {
            **record.details,
            "tokens": state.tokens,
            "truncated": state.truncated,
            "segments": state.segment + 1,
            "manifest": f"s3://{self.s.settings.results_bucket}/{file.output_prefix}{OUTPUT_FILES['manifest']}",
            "duration_s": manifest.get("duration_s"),
        }
        self._update(
            file,
            status="succeeded",
            route=route,
            rows=state.rows,
            succeeded=state.succeeded,
            failed=state.failed,
            progress=1.0,
            details=details,
        )
        self._announce(file, "succeeded", rows=state.rows, succeeded=state.succeeded, failed=state.failed)
        log.info(
            "batch %s done: %d rows (%d failed) in %d segment(s)",
            file.batch_id,
            state.rows,
            state.failed,
            state.segment + 1,
        )


class _CountingRead:
    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n)
        self.count += len(data)
        return data


# ---------------------------------------------------------------------- the GPU worker's entry
def services_from_settings(settings: Settings, **overrides: Any) -> BatchServices:
    from sif_core.aws import client, table
    from sif_core.model_store import registry_from_settings

    values: dict[str, Any] = {
        "settings": settings,
        "s3": client("s3"),
        "store": WorkStore(table(settings.work_table)),
        "ledger": UsageLedger(client("dynamodb"), settings.usage_table) if settings.usage_table else None,
        "sns": client("sns") if settings.job_topic_arn else None,
    }
    values.update(overrides)
    if "registry" not in values:
        values["registry"] = registry_from_settings(settings)
    return BatchServices(**values)


def score_gpu_batch(spec: GpuJobSpec, settings: Settings, services: BatchServices | None = None) -> BatchOutcome:
    """A drop-file batch the router sent to the GPU queue: the whole file in one run (resumed if retried)."""
    if spec.kind != "batch" or spec.input_uri is None:
        raise ValueError(f"spec {spec.id} is not a file batch")
    services = services or services_from_settings(settings)
    bucket, key = parse_s3_uri(spec.input_uri)
    etag = str(spec.details.get("etag", ""))
    size = spec.details.get("size")
    if not etag or size is None:
        head = services.s3.head_object(Bucket=bucket, Key=key)
        etag, size = str(head["ETag"]).strip('"'), int(head["ContentLength"])
    file = InboxFile.parse(bucket, key, etag, int(size))
    runner = FileBatchRunner(services)
    record = runner.ensure_record(file)
    if record.status in TERMINAL and record.details.get("etag") == file.etag:
        return BatchOutcome(record.status, file.batch_id, "gpu", reason="already finished")  # type: ignore[arg-type]
    return runner.score(file, record, 0, Deadline.never(), route="gpu")
