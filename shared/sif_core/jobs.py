"""Async jobs: the jobs-queue message and what running one means (no handler code here).

A job is `{"model", "input": {"instances": [...]} or {"s3_uri": ...}, "accelerator", "on_error",
"callback_url"}` for one tenant. It arrives on the jobs queue from POST /v1/jobs or from any
producer (`JobMessage`; events/sqs_job_*.json are samples). It runs through the same file engine,
lifecycle, quota and events as a dropped file (`WorkRunner`, `Lifecycle`): inline instances are
read as the JSONL file they describe, an `s3_uri` as the file it names, so the same rows give the
same predictions.jsonl, errors.jsonl and manifest.json either way. A bad row goes to errors.jsonl
(`on_error: "fail"` makes the job all-or-nothing instead).

An error that is a property of the data is never retried: a message that names a job but does not
validate (`refuse`), an unknown model, an unreadable, unreadable-as-a-whole, too large or replaced
input (`WorkFailedError` and friends) fail the job at once and the message is consumed. Anything
else is raised to the caller so the queue retries it, and on the last receive (`give_up`) the job
is marked failed before the message moves to the dead-letter queue; a message that names no job
at all can only go there.

A job id is one job: a message reusing an id for different content (`JobMessage.content_hash`,
kept in the record's `details.content`) is refused as a conflict (`conflict`): logged and counted
in the job's `details.conflicts`, the job itself left as it is.

A job runs one model version from its first row to its last: `model` may be `name`, `name@version`
or `name@alias`, resolved once when the job is accepted (by the API, else on its first receive, a
canary alias picking by the job id) and pinned in the message's `model_version` and the record's
`details.version`, which every later receive, segment and GPU hand-off reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any, Literal

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sif_core import keys
from sif_core.callbacks import check_callback_url
from sif_core.lifecycle import QUOTA_EXCEEDED, TENANT_INACTIVE, Lifecycle, WorkFailedError, metering_id, short_error
from sif_core.routing import Accelerator, GpuJobSpec, Route, choose_route, estimate_rows, submit_gpu_job
from sif_core.rows import OBJECT_FIELDS, ByteSource, BytesSource, FileFormatError, Format, detect_format
from sif_core.runner import DeadlineReached, OnError, Outcome, Work, WorkRunner
from sif_core.s3io import S3Object, SourceChangedError
from sif_core.scoring import Deadline
from sif_core.work import TERMINAL, WorkRecord
from sif_inference.errors import ModelNotFoundError, UnknownVariantError
from sif_inference.manifest import VERSION_PATTERN, ModelManifest
from sif_inference.rounding import Encoding
from sif_inference.tasks import task_class
from sif_metering.ledger import QuotaExceededError, TenantInactiveError

log = logging.getLogger("sif.jobs")

ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
# What a job *is* (its id aside): two messages with one id and different values here are a conflict.
CONTENT_FIELDS = ("model", "variant", "input", "on_error", "accelerator", "callback_url")
INVALID_MESSAGE = "invalid_message"
MAX_INLINE_MESSAGE_BYTES = 240 * 1024  # SQS takes 256 KiB; bigger instance lists are staged in S3
# `name`, `name@version` or `name@alias` (the registry checks the parts)
MODEL_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9_-]{1,63})?$"


def model_name(ref: str) -> str:
    """The model's name in a reference (`name@tag` -> `name`): what keys and the usage ledger use."""
    return ref.partition("@")[0]


class JobInputError(WorkFailedError):
    """The job's input is missing, unreadable or not allowed."""


# ---------------------------------------------------------------------- the message
class JobInput(BaseModel):
    """Exactly one of: inline `instances`, or an `s3_uri` of a JSONL/CSV file (optionally .gz)."""

    model_config = ConfigDict(extra="forbid")

    instances: list[Any] | None = Field(default=None, min_length=1)
    s3_uri: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> JobInput:
        if (self.instances is None) == (self.s3_uri is None):
            raise ValueError('input needs exactly one of "instances" or "s3_uri"')
        if self.s3_uri is not None:
            keys.parse_s3_uri(self.s3_uri)
        return self


class JobMessage(BaseModel):
    """One async job on the jobs queue (the body of the SQS message, JSON)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    id: str = Field(pattern=ID_PATTERN, description="job id; POST /v1/jobs makes j_<hex>")
    tenant: str = Field(pattern=ID_PATTERN, description="the owning tenant's id")
    model: str = Field(pattern=MODEL_REF_PATTERN, description="`name`, `name@version` or `name@alias`")
    model_version: str | None = Field(
        default=None, pattern=VERSION_PATTERN, description="the version pinned at acceptance (the API sets it)"
    )
    input: JobInput
    accelerator: Accelerator = "auto"
    route: Route | None = Field(default=None, description="decided by the API; the worker routes when absent")
    variant: str | None = None
    on_error: OnError = Field(
        default="continue", description='"fail": all-or-nothing; else bad rows go to errors.jsonl'
    )
    callback_url: str | None = Field(default=None, max_length=2048)
    encoding_format: Encoding = Field(
        default="float", description='embeddings only: "base64" writes each vector as OpenAI does (float32, base64)'
    )
    submitted_at: float | None = None

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return check_callback_url(value)

    @property
    def metering_id(self) -> str:
        return metering_id("job", self.id)

    def content_hash(self) -> str:
        """sha256 of what the job is (CONTENT_FIELDS): the same for every delivery of one message."""
        content = self.model_dump(mode="json", include=set(CONTENT_FIELDS))
        if self.model_version is not None:  # only when pinned: the hash of a message without one is unchanged
            content["model_version"] = self.model_version
        if self.encoding_format != "float":  # likewise: only when asked for
            content["encoding_format"] = self.encoding_format
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_jmespath() -> str:
    """CONTENT_FIELDS for powertools' `payload_validation_jmespath` (the worker's idempotency)."""
    return "[" + ", ".join(CONTENT_FIELDS) + "]"


def body_hash(body: str) -> str:
    """What a message that does not validate is: its raw body."""
    return "body:" + hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


def loose_identity(body: str) -> tuple[str, str] | None:
    """(id, tenant) from a message that may not validate, so even a malformed job can be marked failed."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    job_id, tenant = data.get("id"), data.get("tenant")
    valid = [isinstance(v, str) and re.match(ID_PATTERN, v) is not None for v in (job_id, tenant)]
    return (str(job_id), str(tenant)) if all(valid) else None


def describe_error(error: str | BaseException) -> str:
    """A readable one-paragraph error for a job record (pydantic's errors without their doc links)."""
    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in error.errors()]
        return short_error("invalid job message: " + "; ".join(parts))
    return short_error(error)


def instances_jsonl(instances: list[Any]) -> bytes:
    """Inline instances as the JSONL file they describe: `{"id": index, <field>: value}` (a string is
    a text; an object is a row carrying its task's field, as `check_instances` makes it)."""
    lines = []
    for i, value in enumerate(instances):
        row: dict[str, Any] = (
            {"text": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else {}
        )
        if not row:
            row = {"value": value}  # neither a text nor an object: the row fails with the reason
        lines.append(json.dumps({"id": i, **{k: v for k, v in row.items() if k != "id"}}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


_EXPECTED = {
    "text": 'a string (or a row with "text")',
    "b64": '{"b64": "..."}',
    "features": 'an object of named features (or {"features": {...}})',
    "inputs": 'an object of named tensors (or {"inputs": {...}})',
}


def check_instances(manifest: ModelManifest, instances: list[Any]) -> list[dict[str, Any]]:
    """What the API refuses at the door (422): too many, or instances of the wrong kind for the model's
    task. Returns them as rows carrying the task's field (`text`, `b64`, `features`, `inputs`): a
    tabular or tensor instance may be the bare object of features / tensors, as predict takes it."""
    limit = manifest.limits.max_batch_rows
    if len(instances) > limit:
        raise JobInputError(f"instances: {len(instances)}; {manifest.name} takes at most {limit}")
    field = task_class(manifest).field
    rows: list[dict[str, Any]] = []
    for i, value in enumerate(instances):
        if field == "text" and isinstance(value, str):
            value = {"text": value}
        elif field in OBJECT_FIELDS and isinstance(value, dict) and field not in value:
            value = {field: value}
        carried = value.get(field) if isinstance(value, dict) else None
        wanted = dict if field in OBJECT_FIELDS else str
        if not isinstance(carried, wanted):
            raise JobInputError(f"instances[{i}]: expected {_EXPECTED[field]}")
        if isinstance(carried, str):
            try:
                carried.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise JobInputError(
                    f"instances[{i}]: text is not valid Unicode (a lone surrogate at {exc.start})"
                ) from exc
        rows.append(value)
    return rows


def check_input_uri(uri: str, tenant: str, *, inbox_bucket: str, results_bucket: str) -> tuple[str, str]:
    """(bucket, key) of an s3_uri the tenant's job may read, or JobInputError saying why not."""
    try:
        bucket, key = keys.parse_s3_uri(uri)
    except ValueError as exc:
        raise JobInputError(str(exc)) from exc
    why = keys.job_input_allowed(bucket, key, tenant, inbox_bucket=inbox_bucket, results_bucket=results_bucket)
    if why is not None:
        raise JobInputError(why)
    return bucket, key


class Jobs:
    """Runs jobs (worker function and GPU worker) through the one lifecycle and file engine."""

    def __init__(self, lifecycle: Lifecycle, runner: WorkRunner | None = None) -> None:
        self.lc = lifecycle
        self.s = lifecycle.s
        self.runner = runner or WorkRunner(lifecycle)

    # ------------------------------------------------------------ records and inputs
    def record(self, job: JobMessage | GpuJobSpec, route: Route) -> WorkRecord:
        """The job's record, created if a producer put the job straight on the queue."""
        if isinstance(job, JobMessage):
            uri, rows = job.input.s3_uri, len(job.input.instances or [])
        else:
            uri, rows = job.input_uri, len(job.instances or [])
        details: dict[str, Any] = {"source": "queue"}
        if isinstance(job, JobMessage):
            details["content"] = job.content_hash()
            if job.encoding_format != "float":  # kept for a GPU hand-off, whose spec does not carry it
                details["encoding_format"] = job.encoding_format
        if job.model_version is not None:
            details.update(version=job.model_version, variant=job.variant)
        return self.lc.ensure(
            WorkRecord(
                id=job.id,
                kind="job",
                tenant=job.tenant,
                model=model_name(job.model),
                route=route,
                input_key=uri,
                callback_url=job.callback_url,
                rows=rows,
                details=details,
            )
        )

    def source(
        self, tenant: str, instances: list[Any] | None, uri: str | None
    ) -> tuple[ByteSource, Format, dict[str, Any]]:
        if instances is not None:
            return BytesSource(instances_jsonl(instances)), "jsonl", {"instances": len(instances)}
        assert uri is not None
        bucket, key = check_input_uri(
            uri, tenant, inbox_bucket=self.s.settings.inbox_bucket, results_bucket=self.s.settings.results_bucket
        )
        fmt = detect_format(key)
        if fmt is None:
            raise JobInputError(f"{key}: unknown format (use .jsonl or .csv, optionally .gz)")
        try:
            head = self.s.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "NoSuchBucket", "404", "AccessDenied", "403"):
                raise JobInputError(f"cannot read {uri}: {code}") from exc
            raise
        etag, size = str(head["ETag"]).strip('"'), int(head.get("ContentLength") or 0)
        describe = {"bucket": bucket, "key": key, "etag": etag, "size": size, "format": fmt}
        return S3Object(self.s.s3, bucket, key, etag, size), fmt, describe

    def work(self, job: JobMessage | GpuJobSpec, record: WorkRecord) -> Work:
        if isinstance(job, JobMessage):
            source, fmt, describe = self.source(job.tenant, job.input.instances, job.input.s3_uri)
            on_error: OnError = job.on_error
            encoding: Encoding = job.encoding_format
        else:
            source, fmt, describe = self.source(job.tenant, job.instances, job.input_uri)
            on_error = job.on_error
            encoding = "base64" if record.details.get("encoding_format") == "base64" else "float"
        return Work(
            record=record,
            source=source,
            fmt=fmt,
            output_prefix=keys.job_results_prefix(job.tenant, model_name(job.model), job.id),
            metering_id=metering_id("job", job.id),
            variant=record.details.get("variant") or job.variant,
            version=record.details.get("version") or job.model_version,
            on_error=on_error,
            describe=describe,
            encoding=encoding,
        )

    def pin(self, job: JobMessage, record: WorkRecord) -> ModelManifest:
        """The version the job runs: the one pinned at acceptance, else what its model reference means
        now for this job (a canary picks by the job id), pinned in the record for every later receive.

        ModelNotFoundError: unknown (or another tenant's private model); UnknownVariantError: no such variant."""
        name = model_name(job.model)
        pinned = record.details.get("version") or job.model_version
        if pinned:
            manifest = self.s.models.manifest(name, str(pinned))
            if not manifest.visible_to(job.tenant):
                raise ModelNotFoundError(f"unknown model {name!r}")
        else:
            manifest = self.s.models.resolve(job.model, routing_key=job.id, tenant=job.tenant)
        variant = record.details.get("variant") or job.variant or manifest.default_variant
        manifest.variant_file(variant)
        if record.details.get("version") != manifest.version or record.details.get("variant") != variant:
            record.details.update(version=manifest.version, variant=variant)
            self.lc.update(record, details=record.details)
        return manifest

    def route_for(self, job: JobMessage, manifest: ModelManifest, rows: int) -> Route:
        return job.route or choose_route(manifest, rows, job.accelerator)

    # ------------------------------------------------------------ the one entry point
    def handle(self, job: JobMessage, deadline: Deadline | None = None) -> Outcome:
        """Run (cpu) or submit (gpu) one job; WorkFailedError marks it failed, other errors propagate.

        A cpu job still running when `deadline` nears is handed to the GPU queue, which resumes it
        from its checkpoint, rather than killed by the Lambda timeout: the router's estimate was off.
        """
        record = self.record(job, job.route or "cpu")
        content = job.content_hash()
        if record.details.setdefault("content", content) != content:  # kept by the first write of details
            return self.conflict(job.tenant, job.id, "the job id was already used for a different job")
        if record.status == "cancelled":
            return self._cancelled(job, record)
        if record.status in TERMINAL:
            log.info("job %s already %s; nothing to do", job.id, record.status)
            return Outcome("skipped", job.id, record.route, reason=f"already {record.status}")
        try:
            manifest = self.pin(job, record)
            work = self.work(job, record)
            rows = len(job.input.instances) if job.input.instances is not None else estimate_rows(work.source, work.fmt)
        except ModelNotFoundError as exc:
            return self._fail(job, record, exc, "unknown_model")
        except UnknownVariantError as exc:
            return self._fail(job, record, exc, "unknown_variant")
        except WorkFailedError as exc:
            return self._fail(job, record, exc, exc.reason or "bad_input")
        except FileFormatError as exc:
            return self._fail(job, record, exc, "bad_file")
        except SourceChangedError as exc:
            return self._fail(job, record, f"the input changed while it was read: {exc}", "input_changed")
        limit = manifest.limits.max_batch_rows
        if rows > limit:
            return self._fail(
                job, record, f"the input has about {rows} rows; {manifest.name} takes at most {limit}", "too_large"
            )
        if "reserved" not in record.details:  # a job put straight on the queue: reserved here, not by the API
            try:
                self.lc.reserve(record, rows, job.metering_id)
            except TenantInactiveError as exc:
                return self._fail(job, record, f"{TENANT_INACTIVE}: {exc}", TENANT_INACTIVE)
            except QuotaExceededError as exc:
                return self._fail(job, record, f"{QUOTA_EXCEEDED}: {exc}", QUOTA_EXCEEDED)
            record.details.update(reserved=rows)
            self.lc.update(record, details=record.details)
        route = self.route_for(job, manifest, rows)
        if route == "gpu":
            return self.submit_gpu(job, record)
        try:
            return self.runner.score(work, 0, deadline or Deadline.never(), route="cpu")
        except SourceChangedError as exc:
            return self.runner.fail(work, f"the input changed while it was read: {exc}", reason="input_changed")
        except DeadlineReached as exc:
            log.warning("job %s: %s; handing it to the GPU queue", job.id, exc)
            record.details.update(handed_off=str(exc))
            self.lc.update(record, status="queued", details=record.details)
            return self.submit_gpu(job, record)

    def _cancelled(self, job: JobMessage | GpuJobSpec, record: WorkRecord) -> Outcome:
        """A cancelled job: its partial outputs (if it had started) are completed and billed, else nothing is."""
        try:
            return self.runner.score(self.work(job, record), 0, Deadline.never(), route=record.route)
        except (WorkFailedError, SourceChangedError):
            self.lc.release(record, metering_id("job", job.id))
            return Outcome("cancelled", job.id, record.route, reason="cancelled")

    def _fail(self, job: JobMessage, record: WorkRecord, error: str | BaseException, reason: str) -> Outcome:
        self.lc.fail(record, describe_error(error), reason=reason, metering_id=job.metering_id)
        return Outcome("failed", job.id, record.route, reason=describe_error(error))

    def submit_gpu(self, job: JobMessage, record: WorkRecord) -> Outcome:
        existing = record.details.get("batch_job_id")
        if existing:
            return Outcome("submitted", job.id, "gpu", reason=f"already Batch job {existing}")
        spec = GpuJobSpec(
            kind="job",
            id=job.id,
            tenant=job.tenant,
            model=model_name(job.model),
            model_version=record.details.get("version") or job.model_version,
            variant=record.details.get("variant") or job.variant,
            instances=job.input.instances,
            input_uri=job.input.s3_uri,
            output_prefix=keys.job_results_prefix(job.tenant, model_name(job.model), job.id),
            callback_url=job.callback_url,
            on_error=job.on_error,
            request_id=job.metering_id,
        )
        batch_job_id = submit_gpu_job(self.s.batch, self.s.s3, self.s.settings, spec)
        record.details.update(batch_job_id=batch_job_id)
        self.lc.update(record, route="gpu", details=record.details)
        log.info("job %s submitted to the GPU queue as Batch job %s", job.id, batch_job_id)
        return Outcome("submitted", job.id, "gpu", reason=f"Batch job {batch_job_id}")

    def run_gpu(self, spec: GpuJobSpec) -> Outcome:
        """A job the router (or a worker near its deadline) sent to AWS Batch: resumed from its checkpoint."""
        record = self.record(spec, "gpu")
        if record.status == "cancelled":
            return self._cancelled(spec, record)
        if record.status in TERMINAL:
            return Outcome("skipped", spec.id, "gpu", reason=f"already {record.status}")
        try:
            work = self.work(spec, record)
        except WorkFailedError as exc:
            self.lc.fail(
                record, describe_error(exc), reason=exc.reason or "bad_input", metering_id=metering_id("job", spec.id)
            )
            return Outcome("failed", spec.id, "gpu", reason=describe_error(exc))
        try:
            return self.runner.score(work, 0, Deadline.never(), route="gpu")
        except SourceChangedError as exc:
            return self.runner.fail(work, f"the input changed while it was read: {exc}", reason="input_changed")

    def refuse(self, body: str, error: ValidationError) -> Outcome | None:
        """A message that names a job but is not a valid one: the job fails now with the validation error
        (no receive would make it valid) and the message is consumed. None: it names no job."""
        identity = loose_identity(body)
        if identity is None:
            return None
        job_id, tenant = identity
        data = json.loads(body)
        model = model_name(data["model"]) if isinstance(data.get("model"), str) else "unknown"
        content = body_hash(body)
        record = self.lc.ensure(
            WorkRecord(
                id=job_id, kind="job", tenant=tenant, model=model, details={"source": "queue", "content": content}
            )
        )
        if record.details.get("content") != content:
            return self.conflict(tenant, job_id, "an invalid message reuses the id of another job")
        if record.status in TERMINAL:
            return Outcome("skipped", job_id, record.route, reason=f"already {record.status}")
        message = describe_error(error)
        self.lc.fail(record, message, reason=INVALID_MESSAGE)
        return Outcome("failed", job_id, record.route, reason=message)

    def conflict(self, tenant: str, job_id: str, why: str) -> Outcome:
        """A message reusing a job's id for different content: refused, logged and counted on the job
        (`details.conflicts`), the job itself left as it is."""
        record = self.s.store.get(tenant, "job", job_id)
        count = self.lc.count(record, "conflicts") if record is not None else 0
        log.warning("job %s of tenant %s: %s; the message is refused (conflict %d)", job_id, tenant, why, count)
        return Outcome("skipped", job_id, record.route if record else "cpu", reason=f"conflict: {why}")

    def give_up(self, body: str, error: BaseException | str, attempts: int) -> None:
        """The message's last receive failed: mark the job failed before SQS moves it to the DLQ."""
        identity = loose_identity(body)
        if identity is None:
            log.error(
                "unidentifiable job message failed %d times; it goes to the DLQ: %s", attempts, describe_error(error)
            )
            return
        job_id, tenant = identity
        try:
            job: JobMessage | None = JobMessage.model_validate_json(body)
        except ValidationError:
            job = None
        if job is not None:
            record = self.record(job, job.route or "cpu")
        else:
            data = json.loads(body)
            model = model_name(data["model"]) if isinstance(data.get("model"), str) else "unknown"
            record = self.lc.ensure(
                WorkRecord(id=job_id, kind="job", tenant=tenant, model=model, details={"source": "queue"})
            )
        if record.status in TERMINAL and record.status != "failed":
            return
        self.lc.give_up(record, describe_error(error), attempts, metering_id("job", job_id))
