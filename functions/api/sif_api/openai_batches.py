"""OpenAI's Batch API on sif's batches: `POST /v1/batches` with an `input_file_id`, the batch object.

The official openai client's `files.create(purpose="batch")` -> `batches.create(input_file_id=...,
endpoint="/v1/embeddings", completion_window="24h")` -> `batches.retrieve` -> `files.content` works
unchanged. An OpenAI batch is a sif batch (one work record of kind `batch`, `details.origin ==
"openai"`, an id `batch_...`), scored by the same scorer and file engine (`sif_core.openai_batch`
says how a row is a request), metered and quota-checked in texts like every other path:

- create: the input file (an upload of the caller's, `sif_api.routes_files`) is read and checked
  line by line here, as POST /v1/embeddings checks a body (`EmbeddingsRequest`): a bad line (not
  JSON, no or a duplicate custom_id, another url or method, a bad body, another model) is staged as
  the error it is and fails only itself; the texts of the others are the batch's quota units (429
  when the month cannot hold them). The staged rows go to `incoming/{tenant}/{model}/{batch id}.jsonl`,
  which starts the scoring (S3 -> SQS -> the scorer, or the GPU queue), the model version pinned now;
- the batch object is the work record in OpenAI's words: queued -> `validating`, running ->
  `in_progress`, succeeded -> `completed` (a file with bad lines still completes, with an error
  file), `failed` (errors.data says why: quota_exceeded, ...), cancelled -> `cancelling` until the run
  has stopped, then `cancelled`; its output and error files are the results folder's
  predictions.jsonl and errors.jsonl (`file-{batch id}-output` / `-errors`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sif_api.caller import Caller
from sif_api.errors import ApiError, BadRequestError, PayloadTooLargeError
from sif_api.schemas import EmbeddingsRequest
from sif_api.service import ApiService
from sif_core.keys import RESULTS_PREFIX, inbox_key
from sif_core.openai_batch import (
    COMPLETION_WINDOW,
    ENDPOINT,
    ORIGIN,
    LineError,
    RequestSpec,
    output_file_id,
    staged_row,
)
from sif_core.settings import Settings
from sif_core.work import WorkRecord, WorkStore
from sif_inference.errors import WrongTaskError

logger = Logger(child=True)

EXPIRES_AFTER_S = 24 * 3600  # the completion window
OpenAIStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class StagingError(ApiError):
    status, type = 503, "unavailable"


# ---------------------------------------------------------------- bodies (as the openai client parses them)
class OpenAIBatchRequest(BaseModel):
    """POST /v1/batches with an `input_file_id` (OpenAI's form; sif's own has `model` and no file)."""

    model_config = ConfigDict(extra="ignore")  # e.g. `output_expires_after`: results live as long as sif's

    input_file_id: str = Field(max_length=128, description="a file uploaded with POST /v1/files, purpose batch")
    endpoint: Literal["/v1/embeddings"] = Field(description="the one endpoint a sif batch may call")
    completion_window: Literal["24h"] = "24h"
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class OpenAIBatch(BaseModel):
    """OpenAI's batch object (what `client.batches.retrieve` parses)."""

    id: str = Field(examples=["batch_4f0c2a9e1b7d3c5a6e8f"])
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: OpenAIStatus
    output_file_id: str | None = Field(default=None, description="the successes' lines (`file-{id}-output`)")
    error_file_id: str | None = Field(default=None, description="the failed lines (`file-{id}-errors`)")
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None


# ---------------------------------------------------------------- checking the input file
@dataclass
class StagedInput:
    """An input file checked line by line: the staged rows, and what the batch is."""

    specs: list[tuple[int, RequestSpec]] = field(default_factory=list)  # (line, spec), blank lines left out
    dimensions: dict[int, int] = field(default_factory=dict)  # line -> the `dimensions` it asked for
    model: str | None = None  # the first good request's model (every request must name it)
    variant: str | None = None

    @property
    def units(self) -> int:
        """Texts in the runnable requests: what the batch reserves of the quota."""
        return sum(len(spec.input) for _, spec in self.specs if spec.error is None)

    def rows(self) -> bytes:
        return "".join(staged_row(line, spec) for line, spec in self.specs).encode("utf-8")


def _validation_message(exc: ValidationError) -> str:
    """`body.input: Input should be ...` (and N more), as the API's 422 says it."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(["body", *(str(p) for p in first.get("loc", ()))])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def _line_error(code: str, message: str) -> LineError:
    return LineError(code=code, message=message)


def check_line(raw: bytes, line: int, seen: set[str], staged: StagedInput) -> RequestSpec:
    """One input line as a request spec (with its error when it cannot be run as it stands)."""
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return RequestSpec(error=_line_error("invalid_json", f"line {line} is not UTF-8 (byte {exc.start + 1})"))
    except (ValueError, RecursionError) as exc:
        return RequestSpec(error=_line_error("invalid_json", f"line {line} is not JSON: {exc}"[:500]))
    if not isinstance(obj, dict):
        return RequestSpec(error=_line_error("invalid_request", f"line {line} is not a JSON object"))
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        what = "missing" if custom_id is None else "not a string of 1 to 512 characters"
        return RequestSpec(error=_line_error("invalid_request", f"line {line}: custom_id is {what}"))
    try:
        custom_id.encode("utf-8")
    except UnicodeEncodeError:
        return RequestSpec(error=_line_error("invalid_request", f"line {line}: custom_id is not valid Unicode"))
    if custom_id in seen:
        message = f"line {line}: custom_id {custom_id!r} is used by an earlier line; each request needs its own"
        return RequestSpec(custom_id=custom_id, error=_line_error("duplicate_custom_id", message))
    seen.add(custom_id)
    if obj.get("method") != "POST":
        message = f"line {line}: method must be POST, not {obj.get('method')!r}"
        return RequestSpec(custom_id=custom_id, error=_line_error("invalid_method", message))
    if obj.get("url") != ENDPOINT:
        message = f"line {line}: url {obj.get('url')!r} is not this batch's endpoint {ENDPOINT}"
        return RequestSpec(custom_id=custom_id, error=_line_error("invalid_url", message))
    try:
        body = EmbeddingsRequest.model_validate(obj.get("body"))
    except ValidationError as exc:  # what POST /v1/embeddings answers: 422 with the one error body
        message = _validation_message(exc)
        error = LineError(code="validation_error", message=message, status=422, type="validation_error")
        return RequestSpec(custom_id=custom_id, error=error)
    if staged.model is None:
        staged.model, staged.variant = body.model, body.variant
    if (body.model, body.variant) != (staged.model, staged.variant):
        which = f"{staged.model!r}" + (f" (variant {staged.variant!r})" if staged.variant else "")
        message = f"line {line}: a batch runs one model, {which} (its first request's); this request names another"
        return RequestSpec(custom_id=custom_id, error=_line_error("model_mismatch", message))
    if body.dimensions is not None:
        staged.dimensions[line] = body.dimensions
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    return RequestSpec(custom_id=custom_id, model=body.model, input=texts, encoding_format=body.encoding_format)


def check_input(data: bytes) -> StagedInput:
    """Every non-blank line of an input file as a request spec."""
    staged = StagedInput()
    seen: set[str] = set()
    for line, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if raw.strip():
            staged.specs.append((line, check_line(raw, line, seen, staged)))
    return staged


def check_dimensions(staged: StagedInput, dim: int) -> None:
    """A request asking for other `dimensions` than the model's fails as the API answers it (400)."""
    for k, (line, spec) in enumerate(staged.specs):
        asked = staged.dimensions.get(line)
        if spec.error is None and asked is not None and asked != dim:
            message = f"model {spec.model!r} has {dim} dimensions, not {asked}"
            error = LineError(code="bad_request", message=message, status=400, type="bad_request")
            staged.specs[k] = (line, spec.model_copy(update={"error": error}))


# ---------------------------------------------------------------- the batch object
def openai_status(record: WorkRecord) -> OpenAIStatus:
    if record.status == "queued":
        return "validating"
    if record.status == "running":
        return "in_progress"
    if record.status == "succeeded":
        return "completed"
    if record.status == "cancelled":
        # accepted by a scorer and not yet stopped by it (it records why it ended): still cancelling
        return "cancelling" if record.details.get("routed") and not record.reason else "cancelled"
    return "expired" if record.status == "expired" else "failed"


def _ts(value: float | None) -> int | None:
    return int(value) if value is not None else None


def describe(record: WorkRecord) -> OpenAIBatch:
    """The work record of an OpenAI batch as OpenAI's batch object."""
    details = record.details
    status = openai_status(record)
    ended = record.finished_at or record.updated_at
    outputs = record.has_outputs and record.output_prefix is not None
    outputs = outputs and str(record.output_prefix).startswith(f"{RESULTS_PREFIX}{record.tenant}/")
    batch = OpenAIBatch(
        id=record.id,
        endpoint=str(details.get("endpoint", ENDPOINT)),
        input_file_id=str(details.get("input_file_id", "")),
        completion_window=str(details.get("completion_window", COMPLETION_WINDOW)),
        status=status,
        created_at=int(record.created_at),
        expires_at=int(record.created_at) + EXPIRES_AFTER_S,
        in_progress_at=_ts(record.started_at),
        request_counts=BatchRequestCounts(
            total=int(details.get("requests", 0)), completed=record.succeeded, failed=record.failed
        ),
        metadata=details.get("metadata") or None,
        model=record.model,
    )
    if outputs and record.succeeded:
        batch.output_file_id = output_file_id(record.id, "output")
    if outputs and record.failed:
        batch.error_file_id = output_file_id(record.id, "errors")
    if status == "completed":
        batch.finalizing_at = batch.completed_at = _ts(ended)
        tokens = int(details.get("tokens", 0))
        batch.usage = BatchUsage(input_tokens=tokens, total_tokens=tokens)
    elif status == "failed":
        batch.failed_at = _ts(ended)
        reason = record.reason or "failed"
        batch.errors = BatchErrors(data=[BatchError(code=reason, message=record.error or reason)])
    elif status in ("cancelling", "cancelled"):
        batch.cancelling_at = _ts(record.cancelled_at)
        if status == "cancelled":
            batch.cancelled_at = _ts(record.finished_at or record.cancelled_at)
    elif status == "expired":
        batch.expired_at = _ts(ended)
    return batch


# ---------------------------------------------------------------- creating one
class OpenAIBatches:
    """Creates OpenAI batches (the other routes are sif's batch routes, which describe them with `describe`)."""

    def __init__(self, settings: Settings, s3: Any, store: WorkStore) -> None:
        self.settings = settings
        self.s3 = s3
        self.store = store

    def create(self, caller: Caller, req: OpenAIBatchRequest, data: bytes, api: ApiService) -> OpenAIBatch:
        """`data`: the input file's bytes (the caller's own upload, read by the files routes)."""
        staged = check_input(data)
        if not staged.specs:
            raise BadRequestError(f"file {req.input_file_id!r} holds no requests (one JSON request per line)")
        if staged.model is None:
            first = next(spec.error for _, spec in staged.specs if spec.error is not None)
            raise BadRequestError(
                f"no line of file {req.input_file_id!r} is a {ENDPOINT} request; the first error: {first.message}"
            )
        batch_id = "batch_" + secrets.token_hex(10)
        # 404 for an unknown model (or another tenant's), 400 for an unknown variant; the version is pinned
        # now (a canary alias picks by the batch id): every request of the batch runs it
        served = api.resolve(caller, staged.model, batch_id, staged.variant)
        manifest, variant = served.manifest, served.variant
        if manifest.task != "embedding":
            raise WrongTaskError(f"model {manifest.name!r} does {manifest.task}, not embeddings")
        check_dimensions(staged, manifest.output.dim)
        limit = manifest.limits.max_batch_rows
        if staged.units > limit or len(staged.specs) > limit:
            raise PayloadTooLargeError(
                f"file {req.input_file_id!r} holds {len(staged.specs)} requests of {staged.units} texts; "
                f"{manifest.name} takes at most {limit} per batch"
            )
        api.check_quota(caller, max(1, staged.units))  # 429 now; the texts are reserved when scoring starts
        tenant = caller.tenant_id
        key = inbox_key(tenant, manifest.name, f"{batch_id}.jsonl")
        record = WorkRecord(
            id=batch_id,
            kind="batch",
            tenant=tenant,
            model=manifest.name,
            input_key=key,
            details={
                "origin": ORIGIN,
                "endpoint": req.endpoint,
                "completion_window": req.completion_window,
                "input_file_id": req.input_file_id,
                "metadata": req.metadata or {},
                "requests": len(staged.specs),
                "units": staged.units,
                "version": manifest.version,  # pinned now: every request of the batch runs this version
                "variant": variant,
            },
        )
        self.store.create(record)
        try:
            self.s3.put_object(
                Bucket=self.settings.inbox_bucket, Key=key, Body=staged.rows(), ContentType="application/x-ndjson"
            )
        except ClientError as exc:
            logger.exception("could not stage the batch's requests", extra={"batch_id": batch_id})
            error = "its requests could not be staged; create the batch again"
            self.store.update(tenant, "batch", batch_id, only_if_not_terminal=True, status="failed", error=error)
            raise StagingError("the batch could not be started; try again") from exc
        logger.info(
            "openai batch created",
            extra={"batch_id": batch_id, "tenant": tenant, "requests": len(staged.specs), "texts": staged.units},
        )
        return describe(record)
