"""POST /v1/jobs (202 + id), GET /v1/jobs/{id}, GET /v1/jobs, POST /v1/jobs/{id}/cancel: async jobs.

Submission resolves the model reference (`name`, `name@version`, `name@alias`: a canary alias picks
by the job id) once and pins that version (and variant) in the message and the record, so the whole
job runs one version; it validates the job against that version's manifest (task, limits, the
tenant's own S3 prefixes), decides the route with the shared router, records the job (queued) in the work table
and puts a `JobMessage` on the jobs queue; the worker runs cpu jobs itself and hands gpu jobs to
AWS Batch. An instance list too big for one SQS message is staged in the results bucket first.
A job id is looked up under the caller's tenant only, so another tenant's job is a 404. The list is
the caller's own jobs, newest first, a page at a time; cancelling flips a job that has not ended to
`cancelled` (the runners stop at their next checkpoint), and is a 409 once it has ended.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Annotated, Any, Literal

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends
from aws_lambda_powertools.event_handler.openapi.params import Body, Query
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sif_api.caller import Caller, current_caller
from sif_api.errors import ApiError, BadRequestError, ConflictError, NotFoundError
from sif_api.routes_meta import SECURITY
from sif_api.schemas import ModelName, Variant, error_responses
from sif_api.service import ApiService, get_service
from sif_core.aws import presign_get
from sif_core.callbacks import check_callback_url
from sif_core.jobs import (
    MAX_INLINE_MESSAGE_BYTES,
    JobInput,
    JobMessage,
    check_input_uri,
    check_instances,
    instances_jsonl,
)
from sif_core.keys import OUTPUT_FILES, staged_input_key
from sif_core.lifecycle import WorkFailedError, metering_id
from sif_core.routing import Accelerator, Route, choose_route, estimate_rows
from sif_core.rows import FileFormatError, detect_format
from sif_core.runner import OnError
from sif_core.s3io import S3Object
from sif_core.settings import Settings, get_settings
from sif_core.work import LIST_LIMIT_MAX, InvalidCursorError, Status, WorkRecord, WorkStore, new_id
from sif_inference.rounding import Encoding

logger = Logger(child=True)
router = Router()


class JobValidationError(ApiError):
    status, type = 422, "validation_error"


class JobEnqueueError(ApiError):
    status, type = 503, "unavailable"


# ---------------------------------------------------------------- bodies
class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName
    variant: Variant | None = None
    input: JobInput = Field(
        description='`{"instances": [...]}` (texts, or `{"b64": ...}` images) or `{"s3_uri": "s3://..."}` '
        "(a JSONL/CSV file under `uploads/{tenant}/` in the inbox bucket, or in your results prefix)",
        examples=[{"instances": ["The battery lasts all day.", "Shipping took three weeks."]}],
    )
    accelerator: Accelerator = Field(default="auto", description="auto: the router decides from the model's costs")
    on_error: OnError = Field(
        default="continue",
        description='"continue": a bad row goes to errors.jsonl and the others are scored; "fail": all-or-nothing',
    )
    encoding_format: Encoding = Field(
        default="float",
        description='embedding models: "base64" writes each vector as the OpenAI API does (little-endian '
        "float32, base64): exact, and under half the size of the 7-digit floats",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="POSTed when the job ends, signed: X-Sif-Signature = sha256=HMAC(secret, timestamp + '.' + body)",
    )

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return check_callback_url(value)


class CreateJobResponse(BaseModel):
    id: str = Field(examples=["j_4f0c2a9e1b7d3c5a6e8f"])
    status: Literal["queued"] = "queued"
    route: Route


class JobStatusResponse(BaseModel):
    id: str
    status: Status
    progress: float = Field(description="0..1")
    route: Route
    model: str
    model_version: str | None = Field(default=None, description="the version the job runs (pinned when accepted)")
    variant: str | None = None
    rows: int | None = Field(default=None, description="rows read (good and bad) once the job has outputs")
    succeeded: int | None = None
    failed: int | None = Field(default=None, description="rows that failed; each is in errors.jsonl")
    output_url: str | None = Field(
        default=None, description="presigned GET of predictions.jsonl, once there are outputs"
    )
    errors_url: str | None = Field(default=None, description="presigned GET of errors.jsonl")
    manifest_url: str | None = None
    error: str | None = None
    reason: str | None = Field(default=None, description="why it ended so: quota_exceeded, cancelled, row_failed, ...")
    created_at: float
    updated_at: float
    cancelled_at: float | None = None


class JobList(BaseModel):
    """A page of the caller's jobs, newest first (shaped like OpenAI's list objects)."""

    object: Literal["list"] = "list"
    data: list[JobStatusResponse]
    has_more: bool
    next_cursor: str | None = Field(default=None, description="pass as `after` for the next page")
    first_id: str | None = None
    last_id: str | None = None


# ---------------------------------------------------------------- the service
class JobsApi:
    """What the job routes need, built once per process on first use."""

    def __init__(self, settings: Settings, s3: Any, sqs: Any, store: WorkStore) -> None:
        self.settings = settings
        self.s3 = s3
        self.sqs = sqs
        self.store = store

    def submit(self, caller: Caller, req: CreateJobRequest, api: ApiService) -> CreateJobResponse:
        """Validate, estimate, reserve the estimate on the tenant's quota (429 when it does not fit), record, queue."""
        tenant = caller.tenant_id
        job_id = new_id("job")
        served = api.resolve(caller, req.model, job_id, req.variant)  # the version the whole job runs
        manifest = served.manifest
        job_input = req.input
        if job_input.instances is not None:
            try:
                rows = check_instances(manifest, job_input.instances)
            except WorkFailedError as exc:
                raise JobValidationError(f"input.{exc}") from exc
            job_input = JobInput(instances=rows)
            items = len(rows)
        else:
            assert job_input.s3_uri is not None
            items = self._rows_in(tenant, job_input.s3_uri)
        if req.encoding_format == "base64" and manifest.task != "embedding":
            raise JobValidationError(
                f'encoding_format "base64" is for embedding models; {manifest.name!r} does {manifest.task}'
            )
        route = choose_route(manifest, items, req.accelerator)
        api.reserve(caller, metering_id("job", job_id), items)
        message = JobMessage(
            id=job_id,
            tenant=tenant,
            model=manifest.name,
            model_version=manifest.version,
            variant=served.variant,
            input=job_input,
            accelerator=req.accelerator,
            route=route,
            on_error=req.on_error,
            callback_url=req.callback_url,
            encoding_format=req.encoding_format,
            submitted_at=time.time(),
        )
        body = message.model_dump_json(exclude_none=True)
        if len(body.encode("utf-8")) > MAX_INLINE_MESSAGE_BYTES:
            message.input = JobInput(s3_uri=self._stage(tenant, job_id, job_input.instances or []))
            body = message.model_dump_json(exclude_none=True)
        record = WorkRecord(
            id=job_id,
            kind="job",
            tenant=tenant,
            model=manifest.name,
            route=route,
            rows=items if job_input.instances is not None else 0,
            input_key=message.input.s3_uri,
            callback_url=req.callback_url,
            details={
                "source": "api",
                "accelerator": req.accelerator,
                "reserved": items,
                "on_error": req.on_error,
                "version": manifest.version,
                "variant": served.variant,
                **({"encoding_format": "base64"} if req.encoding_format == "base64" else {}),
            },
        )
        self.store.create(record)
        try:
            self.sqs.send_message(
                QueueUrl=self.settings.jobs_queue_url,
                MessageBody=body,
                MessageAttributes={
                    "tenant": {"DataType": "String", "StringValue": tenant},
                    "route": {"DataType": "String", "StringValue": route},
                },
            )
        except ClientError as exc:
            logger.exception("could not enqueue job", extra={"job_id": job_id})
            api.release(caller, metering_id("job", job_id))
            self.store.update(
                tenant,
                "job",
                job_id,
                only_if_not_terminal=True,
                status="failed",
                error="could not be queued; submit it again",
            )
            raise JobEnqueueError("the job could not be queued; try again") from exc
        logger.info("job queued", extra={"job_id": job_id, "tenant": tenant, "route": route, "items": items})
        return CreateJobResponse(id=job_id, route=route)

    def _rows_in(self, tenant: str, uri: str) -> int:
        """The s3_uri must be the tenant's own, readable, and not a dropped file; rows estimated the one way."""
        try:
            bucket, key = check_input_uri(
                uri, tenant, inbox_bucket=self.settings.inbox_bucket, results_bucket=self.settings.results_bucket
            )
        except WorkFailedError as exc:
            raise JobValidationError(f"input.s3_uri: {exc}") from exc
        fmt = detect_format(key)
        if fmt is None:
            raise JobValidationError("input.s3_uri: unknown format (use .jsonl or .csv, optionally .gz)")
        try:
            head = self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise JobValidationError(f"input.s3_uri: no such object {uri}") from exc
            raise
        source = S3Object(self.s3, bucket, key, str(head["ETag"]), int(head.get("ContentLength", 0)))
        try:
            return estimate_rows(source, fmt)
        except FileFormatError as exc:
            raise JobValidationError(f"input.s3_uri: {exc}") from exc

    def _stage(self, tenant: str, job_id: str, instances: list[Any]) -> str:
        key = staged_input_key(tenant, job_id)
        self.s3.put_object(
            Bucket=self.settings.results_bucket,
            Key=key,
            Body=instances_jsonl(instances),
            ContentType="application/x-ndjson",
        )
        return f"s3://{self.settings.results_bucket}/{key}"

    def status(self, caller: Caller, job_id: str) -> JobStatusResponse:
        record = self.store.get(caller.tenant_id, "job", job_id) if len(job_id) <= 128 else None
        if record is None:
            raise NotFoundError(f"no job {job_id!r}")
        return self.describe(record)

    def list(self, caller: Caller, status: Status | None, after: str | None, limit: int) -> JobList:
        try:
            records, cursor = self.store.list(caller.tenant_id, "job", status=status, after=after, limit=limit)
        except InvalidCursorError as exc:
            raise BadRequestError(f"after: {exc}") from exc
        data = [self.describe(r) for r in records]
        return JobList(
            data=data,
            has_more=cursor is not None,
            next_cursor=cursor,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    def cancel(self, caller: Caller, job_id: str) -> JobStatusResponse:
        record = self.store.cancel(caller.tenant_id, "job", job_id) if len(job_id) <= 128 else None
        if record is None:
            raise NotFoundError(f"no job {job_id!r}")
        if record.status != "cancelled":
            raise ConflictError(f"job {job_id!r} has already ended ({record.status}); it cannot be cancelled")
        logger.info("job cancelled", extra={"job_id": job_id, "tenant": caller.tenant_id})
        return self.describe(record)

    def describe(self, record: WorkRecord) -> JobStatusResponse:
        response = JobStatusResponse(
            id=record.id,
            status=record.status,
            progress=1.0 if record.status == "succeeded" else record.progress,
            route=record.route,
            model=record.model,
            model_version=record.details.get("version"),
            variant=record.details.get("variant"),
            rows=record.rows if record.has_outputs else None,
            succeeded=record.succeeded if record.has_outputs else None,
            failed=record.failed if record.has_outputs else None,
            error=record.error if record.status == "failed" else None,
            reason=record.reason,
            created_at=record.created_at,
            updated_at=record.updated_at,
            cancelled_at=record.cancelled_at,
        )
        if record.has_outputs and record.output_prefix:
            response.output_url = self._presign(record.output_prefix + OUTPUT_FILES["predictions"])
            response.errors_url = self._presign(record.output_prefix + OUTPUT_FILES["errors"])
        if record.output_prefix and (record.has_outputs or record.status == "failed"):
            response.manifest_url = self._presign(record.output_prefix + OUTPUT_FILES["manifest"])
        return response

    def _presign(self, key: str) -> str:
        return presign_get(self.s3, self.settings.results_bucket, key, self.settings.presign_ttl_s)


@cache
def get_jobs() -> JobsApi:
    """A Depends() provider: clients and settings built on first use, then reused while warm."""
    from sif_core.aws import client, table

    settings = get_settings()
    return JobsApi(settings, client("s3"), client("sqs"), WorkStore(table(settings.work_table)))


# ---------------------------------------------------------------- routes
@router.post(
    "/v1/jobs",
    status_code=202,
    summary="Submit an async job",
    description=(
        "Returns at once with the job id and its route (`cpu`: the worker function, `gpu`: the AWS Batch "
        "GPU queue). Poll `GET /v1/jobs/{id}`, subscribe to the job events topic, or pass `callback_url`."
    ),
    tags=["jobs"],
    security=SECURITY,
    responses=error_responses(400, 401, 404, 422, 429, 500, ok=202),
)
def create_job(
    body: Annotated[CreateJobRequest, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    jobs: Annotated[JobsApi, Depends(get_jobs)],
) -> CreateJobResponse:
    return jobs.submit(caller, body, service)


@router.get(
    "/v1/jobs",
    summary="Your jobs, newest first",
    description=(
        "A page of the caller's own jobs as `GET /v1/jobs/{id}` describes them, newest first. `status` "
        "keeps one status; pass `next_cursor` as `after` for the next page (or a job id, as OpenAI's lists take it)."
    ),
    tags=["jobs"],
    security=SECURITY,
    responses=error_responses(400, 401, 422, 500, ok=200),
)
def list_jobs(
    caller: Annotated[Caller, Depends(current_caller)],
    jobs: Annotated[JobsApi, Depends(get_jobs)],
    status: Annotated[Status | None, Query(description="only jobs with this status")] = None,
    after: Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX, description="page size")] = 20,
) -> JobList:
    return jobs.list(caller, status, after, limit)


@router.get(
    "/v1/jobs/<job_id>",
    summary="A job's status, progress and result",
    description="Only the caller's own jobs: any other id is 404.",
    tags=["jobs"],
    security=SECURITY,
    responses=error_responses(401, 404, 500, ok=200),
)
def get_job(
    job_id: str,
    caller: Annotated[Caller, Depends(current_caller)],
    jobs: Annotated[JobsApi, Depends(get_jobs)],
) -> JobStatusResponse:
    return jobs.status(caller, job_id)


@router.post(
    "/v1/jobs/<job_id>/cancel",
    summary="Cancel a job",
    description=(
        "A queued or running job becomes `cancelled` (a running one stops at its next checkpoint; what it "
        "scored is kept and billed). Cancelling a cancelled job returns it unchanged; one that has already "
        "ended (succeeded or failed) is a 409. Only the caller's own jobs: any other id is 404."
    ),
    tags=["jobs"],
    security=SECURITY,
    responses=error_responses(401, 404, 409, 500, ok=200),
)
def cancel_job(
    job_id: str,
    caller: Annotated[Caller, Depends(current_caller)],
    jobs: Annotated[JobsApi, Depends(get_jobs)],
) -> JobStatusResponse:
    return jobs.cancel(caller, job_id)
