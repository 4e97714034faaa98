"""Async jobs: the jobs-queue message schema and what running a job means (no handler code here).

A job is `{"model", "input": {"instances": [...]} or {"s3_uri": ...}, "accelerator", "callback_url"}`
for one tenant. It arrives on the jobs queue from POST /v1/jobs or from any producer (the
message schema is `JobMessage`; events/sqs_job_*.json are samples) and is either run here, on
CPU inside the worker function, or handed to the AWS Batch GPU queue (`sif_core.routing`).

Status moves queued -> running -> succeeded | failed in the work table, with progress. On
completion the job is metered once (the ledger is idempotent on "job#{id}"), announced on the SNS
topic and, when a callback_url was given, POSTed there with an HMAC-SHA256 signature; a failing
callback is retried with backoff and never fails the job.

Two kinds of failure: `JobFailedError` (the job itself is wrong: unknown model, unreadable input,
bad rows) fails the job at once with that reason; anything else is raised to the caller so the
queue retries it, and on the last receive (`give_up`) the job is marked failed with the error
before the message moves to the dead-letter queue.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal
from urllib.parse import urlsplit

import numpy as np
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sif_core.routing import (
    SPEC_PARAMETER,
    SPECS_DIR,
    Accelerator,
    GpuJobSpec,
    Route,
    choose_route,
    parse_s3_uri,
    submit_gpu_job,
)
from sif_core.rows import BadRow, FileFormatError, decode_b64, detect_format, open_rows
from sif_core.s3io import presign_get
from sif_core.scoring import Deadline, round_significant
from sif_core.settings import Settings
from sif_core.work import TERMINAL, WorkRecord, WorkStore
from sif_inference.errors import InferenceError, ModelNotFoundError
from sif_inference.manifest import ModelManifest
from sif_inference.registry import ModelRegistry
from sif_metering.ledger import Usage, UsageLedger

log = logging.getLogger("sif.jobs")

ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
SIGNATURE_HEADER = "X-Sif-Signature"
TIMESTAMP_HEADER = "X-Sif-Timestamp"
EVENT_HEADER = "X-Sif-Event"
CHUNK_ITEMS = 1024  # items per inference call (length-sorted inside: bigger chunks pad less)
PROGRESS_EVERY_S = 1.0
MAX_ERROR_CHARS = 1000
MAX_INLINE_MESSAGE_BYTES = 240 * 1024  # SQS takes 256 KiB; bigger instance lists are staged in S3
OUTPUT_FILES = ("predictions.jsonl", "errors.jsonl", "manifest.json")


# ---------------------------------------------------------------------- errors
class JobFailedError(Exception):
    """The job cannot succeed as submitted (retrying would not help): it fails with this message."""


class JobInputError(JobFailedError):
    """The job's input is missing, unreadable or has bad rows."""


class DeadlineReached(Exception):
    """The worker function is about to time out: the job goes on the GPU queue instead."""


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
            parse_s3_uri(self.s3_uri)
        return self


class JobMessage(BaseModel):
    """One async job on the jobs queue (the body of the SQS message, JSON)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    id: str = Field(pattern=ID_PATTERN, description="job id; POST /v1/jobs makes j_<hex>")
    tenant: str = Field(pattern=ID_PATTERN, description="the owning tenant's id")
    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    input: JobInput
    accelerator: Accelerator = "auto"
    route: Route | None = Field(default=None, description="decided by the API; the worker routes when absent")
    variant: str | None = None
    callback_url: str | None = Field(default=None, max_length=2048)
    submitted_at: float | None = None

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return check_callback_url(value)

    @property
    def metering_id(self) -> str:
        return f"job#{self.id}"


def check_callback_url(value: str | None) -> str | None:
    """A callback_url must be http(s) with a host (where it points is checked again at delivery)."""
    if value is not None and not re.match(r"^https?://[^\s/?#]+", value):
        raise ValueError("callback_url must be an http(s) URL")
    return value


def output_prefix(tenant: str, model: str, job_id: str) -> str:
    return f"results/{tenant}/{model}/{job_id}/"


def staged_input_key(tenant: str, job_id: str) -> str:
    """Where the API stages an instance list too big for one SQS message."""
    return f"results/{tenant}/_inputs/{job_id}.jsonl"


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


def check_input_uri(uri: str, tenant: str, settings: Settings) -> tuple[str, str]:
    """A job may read only its tenant's own inbox or results prefix: (bucket, key) or JobInputError."""
    try:
        bucket, key = parse_s3_uri(uri)
    except ValueError as exc:
        raise JobInputError(str(exc)) from exc
    allowed = [(settings.inbox_bucket, f"incoming/{tenant}/"), (settings.results_bucket, f"results/{tenant}/")]
    if not any(bucket == b and key.startswith(p) for b, p in allowed if b):
        raise JobInputError(
            f"s3_uri must be under s3://{settings.inbox_bucket}/incoming/{tenant}/ "
            f"or s3://{settings.results_bucket}/results/{tenant}/"
        )
    return bucket, key


# ---------------------------------------------------------------------- input rows
@dataclass(frozen=True)
class InputRow:
    id: Any
    value: Any  # a str for text models, bytes for image models


def _row_value(manifest: ModelManifest, raw: Any, where: str) -> Any:
    if manifest.task == "embedding":
        if isinstance(raw, dict):
            raw = raw.get("text")
        if not isinstance(raw, str):
            raise JobInputError(f'{where}: expected a string (or a row with "text")')
        limit = manifest.limits.max_text_chars
        if limit is not None and len(raw) > limit:
            raise JobInputError(f"{where}: {len(raw)} characters; the limit is {limit}")
        return raw
    b64 = raw.get("b64") if isinstance(raw, dict) else None
    if not isinstance(b64, str):
        raise JobInputError(f'{where}: expected {{"b64": "..."}}')
    try:
        data = decode_b64(b64)
    except ValueError as exc:
        raise JobInputError(f"{where}: b64 is not valid base64") from exc
    return _image_bytes(manifest, data, where)


def _image_bytes(manifest: ModelManifest, data: bytes, where: str) -> bytes:
    limit = manifest.limits.max_image_bytes
    if limit is not None and len(data) > limit:
        raise JobInputError(f"{where}: image is {len(data)} bytes; the limit is {limit}")
    return data


def instance_rows(manifest: ModelManifest, instances: list[Any]) -> list[InputRow]:
    """Inline instances -> rows with their index as id; the first bad instance fails the job."""
    if len(instances) > manifest.limits.max_batch_rows:
        raise JobInputError(
            f"{len(instances)} instances; {manifest.name} takes at most {manifest.limits.max_batch_rows}"
        )
    return [InputRow(i, _row_value(manifest, raw, f"instances[{i}]")) for i, raw in enumerate(instances)]


class _StreamSource:
    """An already-open stream as the rows reader's ByteSource (read once, from the start)."""

    def __init__(self, stream: IO[bytes], size: int | None) -> None:
        self.stream = stream
        self._size = size

    @property
    def size(self) -> int | None:
        return self._size

    def open(self, offset: int = 0) -> IO[bytes]:
        if offset:
            raise ValueError("a job's input is read once, from the start")
        return self.stream


def iter_file_rows(manifest: ModelManifest, stream: IO[bytes], key: str, size: int | None = None) -> Iterator[InputRow]:
    """Rows of a JSONL ({"id", "text"} or {"id", "b64"}) or CSV (id and text columns) file, optionally .gz,
    read by the batch scorer's row reader. A job is all-or-nothing: the first bad row fails it."""
    fmt = detect_format(key)
    if fmt is None:
        raise JobInputError(f"{key}: unknown format (use .jsonl or .csv, optionally .gz)")
    text = manifest.task == "embedding"
    count = 0
    try:
        with open_rows(_StreamSource(stream, size), fmt, "text" if text else "b64") as reader:
            for item in reader:
                if isinstance(item, BadRow):
                    raise JobInputError(f"line {item.line}: {item.error}")
                where = f"line {item.line}"
                if text:
                    value: Any = _row_value(manifest, item.value, where)
                else:
                    try:
                        value = _image_bytes(manifest, decode_b64(item.value), where)
                    except ValueError as exc:
                        raise JobInputError(f"{where}: {exc}") from exc
                count += 1
                if count > manifest.limits.max_batch_rows:
                    raise JobInputError(f"more than {manifest.limits.max_batch_rows} rows; {manifest.name}'s limit")
                yield InputRow(item.id, value)
    except FileFormatError as exc:
        raise JobInputError(f"{key}: {exc}") from exc
    if count == 0:
        raise JobInputError(f"{key} has no rows")


def open_input(s3: Any, bucket: str, key: str) -> tuple[IO[bytes], int]:
    """The input object's body stream and its size; a missing or forbidden object fails the job."""
    try:
        resp = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404", "AccessDenied", "403"):
            raise JobInputError(f"cannot read s3://{bucket}/{key}: {code}") from exc
        raise
    return resp["Body"], int(resp.get("ContentLength") or 0)


# ---------------------------------------------------------------------- compute
@dataclass
class ChunkResult:
    predictions: list[Any]
    tokens: int = 0
    pixels: int = 0


class Predictor:
    """One model's inference for job rows: embeddings as float lists, image scores by label."""

    def __init__(self, registry: ModelRegistry, model: str, variant: str | None = None) -> None:
        try:
            self.loaded = registry.get(model, variant)
        except ModelNotFoundError as exc:
            raise JobFailedError(str(exc)) from exc
        self.manifest = self.loaded.manifest
        self.provider = self.loaded.session.get_providers()[0]

    def predict(self, values: list[Any]) -> ChunkResult:
        try:
            if self.loaded.embedder is not None:
                result = self.loaded.embedder.embed(values)
                return ChunkResult(rounded_vectors(result.vectors), tokens=result.total_tokens)
            assert self.loaded.classifier is not None
            clf = self.loaded.classifier
            decoded = [clf.decode(v) for v in values]
            scores = clf.score_arrays([clf.preprocess(img) for img in decoded])
            labels = clf.labels or [str(i) for i in range(scores.shape[1])]
            rounded = round_significant(scores, 7).tolist()
            preds = [dict(zip(labels, row, strict=True)) for row in rounded]
            return ChunkResult(preds, pixels=sum(img.width * img.height for img in decoded))
        except InferenceError as exc:
            raise JobInputError(str(exc)) from exc


def rounded_vectors(vectors: np.ndarray) -> list[list[float]]:
    # As the batch scorer writes them: 7 significant digits keep float32's precision at half the JSON.
    rounded: list[list[float]] = round_significant(vectors, 7).tolist()
    return rounded


def iter_chunks(rows: Iterable[InputRow], size: int) -> Iterator[list[InputRow]]:
    chunk: list[InputRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------- output
class OutputWriter:
    """predictions.jsonl into a temp file as rows come, uploaded with manifest.json at the end."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 - closed in upload()/close()
        self.rows = 0

    def write(self, ids: list[Any], predictions: list[Any]) -> None:
        lines = [
            json.dumps({"id": i, "prediction": p}, separators=(",", ":")) for i, p in zip(ids, predictions, strict=True)
        ]
        if lines:
            self._file.write(("\n".join(lines) + "\n").encode("utf-8"))
        self.rows += len(lines)

    def upload(self, s3: Any, bucket: str, prefix: str, manifest: dict[str, Any]) -> None:
        self._file.seek(0)
        s3.upload_fileobj(
            self._file, bucket, prefix + "predictions.jsonl", ExtraArgs={"ContentType": "application/x-ndjson"}
        )
        s3.put_object(Bucket=bucket, Key=prefix + "errors.jsonl", Body=b"", ContentType="application/x-ndjson")
        s3.put_object(
            Bucket=bucket,
            Key=prefix + "manifest.json",
            Body=json.dumps(manifest, indent=2).encode("utf-8"),
            ContentType="application/json",
        )
        self.close()

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------- callbacks
def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The callback signature: hex HMAC-SHA256 of "{timestamp}.{body}" under the callback secret."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(secret: str, headers: dict[str, str], body: bytes, *, max_age_s: float = 300) -> bool:
    """What a receiver does: recompute the signature and reject stale timestamps (replays)."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp, signature = lower.get(TIMESTAMP_HEADER.lower(), ""), lower.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


HttpPost = Callable[[str, bytes, dict[str, str], float], int]


def urllib_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 - http(s) checked
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@dataclass
class CallbackPolicy:
    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 4.0
    timeout_s: float = 5.0
    # Off in AWS: a callback must not reach the function's own network (127.0.0.1, 169.254.x, the VPC).
    allow_private_hosts: bool = False


def callback_policy_for(settings: Settings) -> CallbackPolicy | None:
    """Callbacks are signed, so they go out only with a configured secret (None: no callbacks); on the
    local stack (settings.local) they may call back to 127.0.0.1."""
    if settings.secret() is None:
        return None
    return CallbackPolicy(allow_private_hosts=settings.local)


def public_host(url: str) -> bool:
    """Whether every address the URL's host resolves to is a public one."""
    host = urlsplit(url).hostname
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    return bool(addresses) and all(a.is_global for a in addresses)


def deliver_callback(
    url: str,
    payload: dict[str, Any],
    secret: str,
    *,
    post: HttpPost = urllib_post,
    policy: CallbackPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """POST the payload, signed; retry network errors, 408, 429 and 5xx with exponential backoff.

    Returns whether the receiver took it (2xx). Never raises: a callback cannot fail a job.
    """
    policy = policy or CallbackPolicy()
    if not policy.allow_private_hosts and not public_host(url):
        log.warning("callback to %s refused: its host is not a public address", url)
        return False
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    for attempt in range(1, policy.attempts + 1):
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sif-jobs/1",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, timestamp, body),
            EVENT_HEADER: f"job.{payload.get('status', 'unknown')}",
        }
        try:
            status = post(url, body, headers, policy.timeout_s)
        except Exception as exc:  # noqa: BLE001 - any transport error is a retry, never a job failure
            log.warning("callback to %s failed (attempt %d/%d): %s", url, attempt, policy.attempts, exc)
        else:
            if 200 <= status < 300:
                return True
            retryable = status in (408, 429) or status >= 500
            log.warning("callback to %s answered %d (attempt %d/%d)", url, status, attempt, policy.attempts)
            if not retryable:
                return False
        if attempt < policy.attempts:
            sleep(min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1)))
    return False


# ---------------------------------------------------------------------- the service
@dataclass
class JobServices:
    """What running jobs needs; built once per process by the handler (or the GPU worker)."""

    settings: Settings
    s3: Any
    store: WorkStore
    ledger: UsageLedger
    registry: ModelRegistry
    sns: Any = None
    batch: Any = None
    post: HttpPost = urllib_post
    callback_policy: CallbackPolicy | None = field(default_factory=CallbackPolicy)  # None: no callbacks
    presign_ttl_s: int = 3600


@dataclass
class JobOutcome:
    status: Literal["succeeded", "failed", "submitted", "skipped"]
    route: Route
    rows: int = 0
    error: str | None = None
    batch_job_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def describe_error(error: str | BaseException) -> str:
    """A readable one-paragraph error for a job record (pydantic's errors without their doc links)."""
    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in error.errors()]
        text = "invalid job message: " + "; ".join(parts)
    else:
        text = str(error) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class JobRunner:
    """Runs jobs and records their life; shared by the worker function and the GPU worker."""

    def __init__(self, services: JobServices) -> None:
        self.s = services

    # ------------------------------------------------------------ records
    def ensure_record(self, job: JobMessage, route: Route) -> WorkRecord:
        """The job's record, created if a producer put the job straight on the queue."""
        record = self.s.store.get(job.tenant, "job", job.id)
        if record is not None:
            return record
        record = WorkRecord(
            id=job.id,
            kind="job",
            tenant=job.tenant,
            model=job.model,
            route=route,
            input_key=job.input.s3_uri,
            callback_url=job.callback_url,
            rows=len(job.input.instances or []),
            details={"source": "queue"},
        )
        try:
            return self.s.store.create(record)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            existing = self.s.store.get(job.tenant, "job", job.id)
            assert existing is not None
            return existing

    def route_for(self, job: JobMessage) -> Route:
        if job.route is not None:
            return job.route
        try:
            manifest = self.s.registry.manifest(job.model)
        except ModelNotFoundError as exc:
            raise JobFailedError(str(exc)) from exc
        items = len(job.input.instances) if job.input.instances is not None else manifest.limits.max_batch_rows
        if job.input.s3_uri is not None and job.accelerator == "auto":
            items = self._estimate_rows(job.input.s3_uri)
        return choose_route(manifest, items, job.accelerator)

    def _estimate_rows(self, uri: str) -> int:
        """A cheap row estimate for routing: object size / 100 bytes a row (unknown size: one row)."""
        try:
            bucket, key = parse_s3_uri(uri)
            size = int(self.s.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except (ValueError, ClientError):
            return 1  # unreadable: the CPU path fails it with the reason
        return max(1, size // (30 if key.endswith(".gz") else 100))

    # ------------------------------------------------------------ the one entry point
    def handle(self, job: JobMessage, deadline: Deadline | None = None) -> JobOutcome:
        """Run (cpu) or submit (gpu) one job; JobFailedError marks it failed, other errors propagate.

        A cpu job still running when `deadline` (the invocation's time left) nears is handed to the
        GPU queue rather than killed by the Lambda timeout: the router's estimate was off.
        """
        try:
            route = self.route_for(job)
        except JobFailedError as exc:
            self.ensure_record(job, "cpu")
            self.fail(job.tenant, job.id, describe_error(exc), job=job)
            return JobOutcome("failed", "cpu", error=describe_error(exc))
        record = self.ensure_record(job, route)
        if record.status == "succeeded":
            log.info("job %s already succeeded; nothing to do", job.id)
            return JobOutcome("skipped", record.route)
        if route == "gpu":
            return self.submit_gpu(job, record)
        try:
            return self.run_cpu(job, record, deadline or Deadline.never())
        except DeadlineReached as exc:
            log.warning("job %s: %s; handing it to the GPU queue", job.id, exc)
            details = {**record.details, "handed_off": str(exc)}
            self.s.store.update(job.tenant, "job", job.id, status="queued", progress=0.0, details=details)
            return self.submit_gpu(job, record.model_copy(update={"details": details}))

    def submit_gpu(self, job: JobMessage, record: WorkRecord) -> JobOutcome:
        existing = record.details.get("batch_job_id")
        if existing:
            return JobOutcome("submitted", "gpu", batch_job_id=str(existing))
        spec = GpuJobSpec(
            kind="job",
            id=job.id,
            tenant=job.tenant,
            model=job.model,
            variant=job.variant,
            instances=job.input.instances,
            input_uri=job.input.s3_uri,
            output_prefix=output_prefix(job.tenant, job.model, job.id),
            callback_url=job.callback_url,
            request_id=job.metering_id,
        )
        batch_job_id = submit_gpu_job(self.s.batch, self.s.s3, self.s.settings, spec)
        self.s.store.update(
            job.tenant,
            "job",
            job.id,
            route="gpu",
            details={**record.details, "batch_job_id": batch_job_id},
        )
        log.info("job %s submitted to the GPU queue as Batch job %s", job.id, batch_job_id)
        return JobOutcome("submitted", "gpu", batch_job_id=batch_job_id)

    def rows_of(self, job: JobMessage | GpuJobSpec, manifest: ModelManifest) -> Iterator[InputRow]:
        instances = job.instances if isinstance(job, GpuJobSpec) else job.input.instances
        uri = job.input_uri if isinstance(job, GpuJobSpec) else job.input.s3_uri
        if instances is not None:
            yield from instance_rows(manifest, instances)
            return
        assert uri is not None
        bucket, key = check_input_uri(uri, job.tenant, self.s.settings)
        stream, size = open_input(self.s.s3, bucket, key)
        with stream:
            yield from iter_file_rows(manifest, stream, key, size)

    def run_cpu(self, job: JobMessage, record: WorkRecord, deadline: Deadline) -> JobOutcome:
        started = time.monotonic()
        self.mark_running(job.tenant, job.id, route="cpu", runs=int(record.details.get("runs", 0)) + 1)
        try:
            predictor = Predictor(self.s.registry, job.model, job.variant)
            total = len(job.input.instances) if job.input.instances is not None else 0
            writer = OutputWriter()
            tokens = pixels = 0
            last_progress = time.monotonic()
            try:
                chunk_ms = 0.0
                for chunk in iter_chunks(self.rows_of(job, predictor.manifest), CHUNK_ITEMS):
                    # One chunk always runs, so the small jobs after a long one in the batch still do.
                    if writer.rows and deadline.expired(next_step_ms=chunk_ms):
                        raise DeadlineReached(f"the worker function's time ran out after {writer.rows} rows")
                    chunk_started = time.monotonic()
                    result = predictor.predict([r.value for r in chunk])
                    chunk_ms = (time.monotonic() - chunk_started) * 1000
                    writer.write([r.id for r in chunk], result.predictions)
                    tokens += result.tokens
                    pixels += result.pixels
                    if total and time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                        self.progress(job.tenant, job.id, writer.rows / total)
                        last_progress = time.monotonic()
                compute_ms = int((time.monotonic() - started) * 1000)
                prefix = output_prefix(job.tenant, job.model, job.id)
                writer.upload(
                    self.s.s3,
                    self.s.settings.results_bucket,
                    prefix,
                    self.output_manifest(job.id, predictor, writer.rows, compute_ms, route="cpu"),
                )
            finally:
                writer.close()
        except JobFailedError as exc:
            self.fail(job.tenant, job.id, describe_error(exc), job=job)
            return JobOutcome("failed", "cpu", error=describe_error(exc))
        usage = Usage(
            tenant=job.tenant,
            model=job.model,
            request_id=job.metering_id,
            inputs=writer.rows,
            tokens=tokens,
            pixels=pixels,
            compute_ms=compute_ms,
        )
        self.succeed(job.tenant, job.id, prefix, writer.rows, usage, callback_url=job.callback_url, model=job.model)
        return JobOutcome("succeeded", "cpu", rows=writer.rows)

    # ------------------------------------------------------------ status transitions
    def mark_running(self, tenant: str, job_id: str, *, route: Route, **details: Any) -> None:
        fields: dict[str, Any] = {"status": "running", "route": route, "progress": 0.0, "error": None}
        if details:
            record = self.s.store.get(tenant, "job", job_id)
            fields["details"] = {**(record.details if record else {}), **details}
        self.s.store.update(tenant, "job", job_id, started_at=time.time(), **fields)

    def progress(self, tenant: str, job_id: str, fraction: float) -> None:
        self.s.store.update(tenant, "job", job_id, only_if_not_terminal=True, progress=round(min(fraction, 0.99), 4))

    def output_manifest(
        self, job_id: str, predictor: Predictor, rows: int, compute_ms: int, *, route: Route
    ) -> dict[str, Any]:
        m = predictor.manifest
        return {
            "id": job_id,
            "model": m.name,
            "model_version": m.version,
            "variant": predictor.loaded.variant,
            "sha256": m.files[m.variant_file(predictor.loaded.variant)].sha256
            if m.variant_file(predictor.loaded.variant) in m.files
            else None,
            "route": route,
            "provider": predictor.provider,
            "rows": rows,
            "succeeded": rows,
            "failed": 0,
            "compute_ms": compute_ms,
            "files": list(OUTPUT_FILES),
        }

    def succeed(
        self,
        tenant: str,
        job_id: str,
        prefix: str,
        rows: int,
        usage: Usage,
        *,
        callback_url: str | None,
        model: str,
    ) -> None:
        # Meter first: a crash after this re-runs the job, and the ledger keeps the first bill only.
        self.s.ledger.record(usage)
        self.s.store.update(
            tenant,
            "job",
            job_id,
            status="succeeded",
            progress=1.0,
            output_prefix=prefix,
            rows=rows,
            succeeded=rows,
            failed=0,
            finished_at=time.time(),
        )
        self.announce(tenant, job_id, "succeeded", model=model, prefix=prefix, rows=rows, callback_url=callback_url)

    def fail(self, tenant: str, job_id: str, error: str, *, job: JobMessage | None = None) -> None:
        record = self.s.store.get(tenant, "job", job_id)
        if record is None or record.status == "succeeded":
            return  # never overwrite a success (a late duplicate failing must not undo it)
        self.s.store.update(
            tenant, "job", job_id, status="failed", error=describe_error(error), finished_at=time.time()
        )
        self.announce(
            tenant,
            job_id,
            "failed",
            model=record.model,
            error=describe_error(error),
            callback_url=job.callback_url if job else record.callback_url,
        )

    def give_up(self, body: str, error: BaseException | str, attempts: int) -> None:
        """The message's last receive failed: mark the job failed before SQS moves it to the DLQ."""
        identity = loose_identity(body)
        if identity is None:
            log.error(
                "unidentifiable job message failed %d times; it goes to the DLQ: %s", attempts, describe_error(error)
            )
            return
        job_id, tenant = identity
        message = f"gave up after {attempts} attempts: {describe_error(error)}"
        try:
            job = JobMessage.model_validate_json(body)
        except ValidationError:
            job = None
            if self.s.store.get(tenant, "job", job_id) is None:
                self._create_failed_record(job_id, tenant, body)
        self.fail(tenant, job_id, message, job=job)

    def _create_failed_record(self, job_id: str, tenant: str, body: str) -> None:
        data = json.loads(body)
        model = data.get("model") if isinstance(data.get("model"), str) else "unknown"
        record = WorkRecord(id=job_id, kind="job", tenant=tenant, model=model, details={"source": "queue"})
        try:
            self.s.store.create(record)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    # ------------------------------------------------------------ notifications
    def result_url(self, prefix: str) -> str:
        return presign_get(
            self.s.s3, self.s.settings.results_bucket, prefix + "predictions.jsonl", self.s.presign_ttl_s
        )

    def announce(
        self,
        tenant: str,
        job_id: str,
        status: str,
        *,
        model: str,
        prefix: str | None = None,
        rows: int | None = None,
        error: str | None = None,
        callback_url: str | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "type": f"job.{status}",
            "id": job_id,
            "tenant": tenant,
            "model": model,
            "status": status,
        }
        if prefix is not None:
            event["output"] = f"s3://{self.s.settings.results_bucket}/{prefix}"
            event["rows"] = rows
        if error is not None:
            event["error"] = error
        if self.s.sns is not None and self.s.settings.job_topic_arn:
            try:
                self.s.sns.publish(
                    TopicArn=self.s.settings.job_topic_arn,
                    Message=json.dumps(event),
                    MessageAttributes={
                        "tenant": {"DataType": "String", "StringValue": tenant},
                        "status": {"DataType": "String", "StringValue": status},
                        "kind": {"DataType": "String", "StringValue": "job"},
                    },
                )
            except ClientError as exc:  # an announcement must not undo a finished job
                log.warning("could not publish job %s %s to SNS: %s", job_id, status, exc)
        if callback_url and self.s.callback_policy is None:
            log.error("job %s has a callback_url but no CallbackSigningSecret is configured: not called back", job_id)
        elif callback_url:
            payload: dict[str, Any] = {"id": job_id, "status": status, "model": model}
            if prefix is not None:
                payload["output_url"] = self.result_url(prefix)
                payload["rows"] = rows
            if error is not None:
                payload["error"] = error
            delivered = deliver_callback(
                callback_url, payload, self.s.settings.secret() or "", post=self.s.post, policy=self.s.callback_policy
            )
            self.s.store.update(tenant, "job", job_id, callback_delivered=delivered)


def services_from_settings(settings: Settings, **overrides: Any) -> JobServices:
    """The services built from the environment's settings (once per process, at cold start)."""
    from sif_core.aws import client, table
    from sif_core.model_store import registry_from_settings

    values: dict[str, Any] = {
        "settings": settings,
        "s3": client("s3"),
        "store": WorkStore(table(settings.work_table)),
        "ledger": UsageLedger(client("dynamodb"), settings.usage_table),
        "sns": client("sns"),
        "batch": client("batch"),
        "presign_ttl_s": settings.presign_ttl_s,
    }
    values.update(overrides)
    if "registry" not in values:
        values["registry"] = registry_from_settings(settings)
    return JobServices(**values)


# ---------------------------------------------------------------------- dead letters
def max_receive_count(sqs: Any, queue_url: str, default: int = 5) -> int:
    """The queue's RedrivePolicy maxReceiveCount: the receive after which SQS dead-letters a message."""
    try:
        attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])["Attributes"]
        return int(json.loads(attrs["RedrivePolicy"])["maxReceiveCount"])
    except (ClientError, KeyError, ValueError, TypeError) as exc:
        log.warning("cannot read the redrive policy of %s (%s); assuming maxReceiveCount=%d", queue_url, exc, default)
        return default


def redrive(sqs: Any, dlq_url: str, queue_url: str, *, limit: int | None = None, wait_s: int = 1) -> int:
    """Move messages from the dead-letter queue back to the source queue (body and attributes kept).

    Each message is sent before it is deleted from the DLQ, so a crash duplicates rather than loses
    one (the worker is idempotent on the job id). Returns how many were moved.
    """
    moved = 0
    while limit is None or moved < limit:
        batch = 10 if limit is None else max(1, min(10, limit - moved))
        resp = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=batch,
            WaitTimeSeconds=wait_s,
            MessageAttributeNames=["All"],
            VisibilityTimeout=60,
        )
        messages = resp.get("Messages", [])
        if not messages:
            break
        for msg in messages:
            kwargs: dict[str, Any] = {"QueueUrl": queue_url, "MessageBody": msg["Body"]}
            if msg.get("MessageAttributes"):
                kwargs["MessageAttributes"] = msg["MessageAttributes"]
            sqs.send_message(**kwargs)
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=msg["ReceiptHandle"])
            moved += 1
    return moved


# ---------------------------------------------------------------------- Batch state changes
class BatchJobDetail(BaseModel):
    """The part of a "Batch Job State Change" event's detail that names our work."""

    jobId: str
    jobName: str = ""
    jobQueue: str = ""
    status: str
    statusReason: str = ""
    parameters: dict[str, str] = Field(default_factory=dict)


class BatchJobStateChange(EventBridgeModel):
    detail: BatchJobDetail


_SPEC_KEY = re.compile(
    rf"^results/(?P<tenant>[A-Za-z0-9_-]+)/{SPECS_DIR}/(?P<kind>job|batch)-(?P<id>[A-Za-z0-9_-]+)\.json$"
)


def work_from_spec_uri(uri: str) -> tuple[str, Literal["job", "batch"], str] | None:
    """(tenant, kind, id) from a spec URI that `submit_gpu_job` wrote, without reading it."""
    try:
        _, key = parse_s3_uri(uri)
    except ValueError:
        return None
    m = _SPEC_KEY.match(key)
    if m is None:
        return None
    kind: Literal["job", "batch"] = "job" if m["kind"] == "job" else "batch"
    return m["tenant"], kind, m["id"]


def fail_from_batch_event(runner: JobRunner, event: BatchJobStateChange) -> dict[str, Any]:
    """A GPU job that ended FAILED in Batch: its job/batch record becomes failed (if not finished)."""
    detail = event.detail
    if detail.status != "FAILED":
        return {"action": "ignored", "status": detail.status}
    work = work_from_spec_uri(detail.parameters.get(SPEC_PARAMETER, ""))
    if work is None:
        return {"action": "ignored", "reason": "no sif spec parameter"}
    tenant, kind, work_id = work
    error = f"the GPU job failed in AWS Batch ({detail.statusReason or 'no reason given'}; Batch job {detail.jobId})"
    if kind == "job":
        record = runner.s.store.get(tenant, "job", work_id)
        if record is None or record.status in TERMINAL:
            return {"action": "unchanged", "id": work_id, "status": record.status if record else None}
        runner.fail(tenant, work_id, error)
    elif not runner.s.store.update(tenant, "batch", work_id, only_if_not_terminal=True, status="failed", error=error):
        return {"action": "unchanged", "id": work_id}
    return {"action": "marked_failed", "kind": kind, "id": work_id}
