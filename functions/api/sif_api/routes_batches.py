"""POST /v1/batches (a presigned upload into the caller's inbox prefix), GET /v1/batches/{id},
GET /v1/batches (the caller's, newest first) and POST /v1/batches/{id}/cancel.

The same routes serve OpenAI's Batch API (`sif_api.openai_batches`): a POST body with an
`input_file_id` is OpenAI's form (the other has a `model`), an OpenAI batch's id is `batch_...` (sif's
are `b_...`) and its record says `details.origin == "openai"`; such a batch reads, lists and cancels
as OpenAI's batch object, sif's as before. Both are records of kind `batch` in the one work table, so
one list (newest first, OpenAI's list fields) holds both, each item as its own GET returns it.

Creating a batch records it (queued) in the work table and returns a presigned PUT for
`incoming/{tenant}/{model}/{id}.{format}` that expires; the upload itself triggers scoring
(S3 -> SQS -> the scorer function, or the GPU queue when the router says so). The status route
gives counts and progress, and, once the batch is done, presigned GETs for its predictions,
errors and manifest in the results bucket. A batch id is looked up under the caller's tenant only,
so another tenant's batch is a 404; no URL ever points outside the caller's own prefixes. A batch
whose file never arrives expires once its upload URL has expired plus `upload_grace_s`: lazily, when
its record is read (one or in a list), so nothing has to run on a schedule.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Annotated, Any, Literal

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends
from aws_lambda_powertools.event_handler.openapi.params import Body, Query
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from sif_api import openai_batches
from sif_api.caller import Caller, current_caller
from sif_api.errors import ApiError, BadRequestError, ConflictError, NotFoundError
from sif_api.openai_batches import OpenAIBatch, OpenAIBatches, OpenAIBatchRequest
from sif_api.routes_files import FilesApi, get_files
from sif_api.routes_meta import SECURITY
from sif_api.schemas import ModelName, Variant, error_responses
from sif_api.service import ApiService, get_service
from sif_core import openai_batch
from sif_core.aws import presign_get
from sif_core.callbacks import check_callback_url
from sif_core.keys import BATCH_ID, OPENAI_BATCH_ID, OUTPUT_FILES, RESULTS_PREFIX, inbox_key
from sif_core.routing import Accelerator, Route
from sif_core.rows import Format
from sif_core.settings import Settings, get_settings
from sif_core.work import LIST_LIMIT_MAX, InvalidCursorError, Status, WorkRecord, WorkStore, new_id
from sif_inference.rounding import Encoding

logger = Logger(child=True)
router = Router()


class BatchValidationError(ApiError):
    status, type = 422, "validation_error"


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName
    variant: Variant | None = None
    format: Format = Field(default="jsonl", description="the file you will upload")
    accelerator: Accelerator = Field(default="auto", description="auto: the router decides from the file's size")
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="POSTed when the batch ends (the job events' schema), signed like job callbacks",
    )
    encoding_format: Encoding = Field(
        default="float",
        description='embedding models: "base64" writes each vector as the OpenAI API does (little-endian '
        "float32, base64): exact, and under half the size of the 7-digit floats",
    )

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return check_callback_url(value)


def _body_kind(value: Any) -> str:
    """Which form a POST /v1/batches body is: OpenAI's names an uploaded file, sif's a model."""
    return "openai" if isinstance(value, dict) and "input_file_id" in value else "sif"


# sif's form or OpenAI's (a validation error's location names the form: body.sif.format, body.openai.endpoint)
CreateBatchBody = Annotated[
    Annotated[CreateBatchRequest, Tag("sif")] | Annotated[OpenAIBatchRequest, Tag("openai")],
    Discriminator(_body_kind),
]


class CreateBatchResponse(BaseModel):
    id: str = Field(examples=["b_4f0c2a9e1b7d3c5a6e8f"])
    status: Literal["queued"] = "queued"
    upload_url: str = Field(description="PUT the file here (no extra headers needed) before expires_at")
    upload_method: Literal["PUT"] = "PUT"
    expires_at: int = Field(description="when upload_url stops working (Unix seconds)")
    key: str = Field(description="where the upload lands in the inbox bucket")


class BatchStatusResponse(BaseModel):
    id: str
    status: Status = Field(description="expired: the file never arrived before the upload URL expired")
    route: Route
    model: str
    model_version: str | None = Field(default=None, description="the version the batch scores with (pinned)")
    variant: str | None = None
    rows: int = Field(description="rows read so far (all of them once finished)")
    succeeded: int
    failed: int = Field(description="rows that failed; each is in errors.jsonl with its line and reason")
    progress: float = Field(description="0..1, of the file's bytes")
    result_url: str | None = Field(default=None, description="presigned GET of predictions.jsonl, once it has outputs")
    errors_url: str | None = Field(default=None, description="presigned GET of errors.jsonl, once it has outputs")
    manifest_url: str | None = None
    error: str | None = Field(default=None, description="why the file as a whole failed (or expired)")
    reason: str | None = Field(default=None, description="why it ended so: quota_exceeded, cancelled, bad_file, ...")
    created_at: float
    updated_at: float
    cancelled_at: float | None = None
    encoding_format: Encoding = Field(default="float", description="how predictions.jsonl writes vectors")


class BatchList(BaseModel):
    """A page of the caller's batches, newest first, as OpenAI's list objects are: sif's batches as
    `GET /v1/batches/{id}` describes them, OpenAI batches (`batch_...`) as OpenAI's batch objects."""

    object: Literal["list"] = "list"
    data: list[BatchStatusResponse | OpenAIBatch]
    has_more: bool
    next_cursor: str | None = Field(default=None, description="pass as `after` for the next page")
    first_id: str | None = None
    last_id: str | None = None


class BatchesApi:
    """What the batch routes need, built once per process on first use."""

    def __init__(self, settings: Settings, s3: Any, store: WorkStore) -> None:
        self.settings = settings
        self.s3 = s3
        self.store = store

    def create(self, caller: Caller, req: CreateBatchRequest, api: ApiService) -> CreateBatchResponse:
        batch_id = new_id("batch")
        # an unknown model (or variant) is a 404 (400) now, not a failed batch later; the version is
        # pinned here (a canary alias picks by the batch id), so the whole file scores with it
        served = api.resolve(caller, req.model, batch_id, req.variant)
        manifest = served.manifest
        if req.encoding_format == "base64" and manifest.task != "embedding":
            raise BatchValidationError(
                f'encoding_format "base64" is for embedding models; {manifest.name!r} does {manifest.task}'
            )
        api.check_quota(caller)  # out of quota is a 429 now; the file's rows are reserved when it arrives
        tenant = caller.tenant_id
        key = inbox_key(tenant, manifest.name, f"{batch_id}.{req.format}")
        ttl = self.settings.presign_ttl_s
        expires_at = int(time.time()) + ttl
        record = WorkRecord(
            id=batch_id,
            kind="batch",
            tenant=tenant,
            model=manifest.name,
            input_key=key,
            callback_url=req.callback_url,
            details={
                "origin": "api",
                "format": req.format,
                "accelerator": req.accelerator,
                "upload_expires_at": expires_at,
                "version": manifest.version,
                "variant": served.variant,
                **({"encoding_format": "base64"} if req.encoding_format == "base64" else {}),
            },
        )
        self.store.create(record)
        url: str = self.s3.generate_presigned_url(
            "put_object", Params={"Bucket": self.settings.inbox_bucket, "Key": key}, ExpiresIn=ttl
        )
        logger.info("batch created", extra={"batch_id": batch_id, "tenant": tenant, "model": req.model})
        return CreateBatchResponse(id=batch_id, upload_url=url, expires_at=expires_at, key=key)

    def create_openai(self, caller: Caller, req: OpenAIBatchRequest, api: ApiService, files: FilesApi) -> OpenAIBatch:
        data = files.read_input(caller, req.input_file_id)  # the caller's own upload, else 404
        return OpenAIBatches(self.settings, self.s3, self.store).create(caller, req, data, api)

    def status(self, caller: Caller, batch_id: str) -> BatchStatusResponse | OpenAIBatch:
        return self.describe(caller, self._record(caller, batch_id))

    def list(self, caller: Caller, status: Status | None, after: str | None, limit: int) -> BatchList:
        try:
            records, cursor = self.store.list(
                caller.tenant_id,
                "batch",
                status=status,
                after=after,
                limit=limit,
                upload_grace_s=self.settings.upload_grace_s,
            )
        except InvalidCursorError as exc:
            raise BadRequestError(f"after: {exc}") from exc
        data = [self.describe(caller, r) for r in records]
        return BatchList(
            data=data,
            has_more=cursor is not None,
            next_cursor=cursor,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    def cancel(self, caller: Caller, batch_id: str) -> BatchStatusResponse | OpenAIBatch:
        self._record(caller, batch_id)  # a 404, or a batch past its upload deadline expired first
        record = self.store.cancel(caller.tenant_id, "batch", batch_id)
        if record is None:
            raise NotFoundError(f"no batch {batch_id!r}")
        if record.status != "cancelled":
            raise ConflictError(f"batch {batch_id!r} has already ended ({record.status}); it cannot be cancelled")
        logger.info("batch cancelled", extra={"batch_id": batch_id, "tenant": caller.tenant_id})
        return self.describe(caller, record)

    def _record(self, caller: Caller, batch_id: str) -> WorkRecord:
        known = BATCH_ID.match(batch_id) or OPENAI_BATCH_ID.match(batch_id)
        record = self.store.get(caller.tenant_id, "batch", batch_id) if known else None
        if record is None:
            raise NotFoundError(f"no batch {batch_id!r}")
        return self.store.expire_if_stale(record, self.settings.upload_grace_s)

    def describe(self, caller: Caller, record: WorkRecord) -> BatchStatusResponse | OpenAIBatch:
        """The record as its kind's status object: OpenAI's batch object for an OpenAI batch."""
        if record.details.get("origin") == openai_batch.ORIGIN:
            return openai_batches.describe(record)
        done = record.status == "succeeded"
        response = BatchStatusResponse(
            id=record.id,
            status=record.status,
            route=record.route,
            model=record.model,
            model_version=record.details.get("version"),
            variant=record.details.get("variant"),
            rows=record.rows,
            succeeded=record.succeeded,
            failed=record.failed,
            progress=1.0 if done else record.progress,
            error=record.error if record.status in ("failed", "expired") else None,
            created_at=record.created_at,
            updated_at=record.updated_at,
            cancelled_at=record.cancelled_at,
            encoding_format="base64" if record.details.get("encoding_format") == "base64" else "float",
        )
        response.reason = record.reason
        prefix = record.output_prefix
        if prefix and prefix.startswith(f"{RESULTS_PREFIX}{caller.tenant_id}/"):
            if record.has_outputs:  # a success, or the rows a cancelled (or out of quota) run kept
                response.result_url = self._presign(prefix + OUTPUT_FILES["predictions"])
                response.errors_url = self._presign(prefix + OUTPUT_FILES["errors"])
            if record.has_outputs or record.status == "failed":
                response.manifest_url = self._presign(prefix + OUTPUT_FILES["manifest"])
        return response

    def _presign(self, key: str) -> str:
        return presign_get(self.s3, self.settings.results_bucket, key, self.settings.presign_ttl_s)


@cache
def get_batches() -> BatchesApi:
    """A Depends() provider: clients and settings built on first use, then reused while warm."""
    from sif_core.aws import client, table

    settings = get_settings()
    return BatchesApi(settings, client("s3"), WorkStore(table(settings.work_table)))


@router.post(
    "/v1/batches",
    status_code=201,
    summary="Create a file batch: an upload URL (sif), or a batch of an uploaded file (OpenAI)",
    description=(
        'sif\'s form (`model`): PUT a JSONL (`{"id", "text"}` or `{"id", "b64"}` rows) or CSV (a header '
        "with `id` and `text`) file, optionally gzipped, to `upload_url`; scoring starts when the upload "
        "completes (201). Poll `GET /v1/batches/{id}` for progress and the result URLs. OpenAI's form "
        "(`input_file_id`, `endpoint: /v1/embeddings`, `completion_window: 24h`): a batch of a file uploaded "
        "with `POST /v1/files`, one embeddings request per line; answers OpenAI's batch object (200), whose "
        "`output_file_id` / `error_file_id` are read with `GET /v1/files/{id}/content`."
    ),
    tags=["batches"],
    security=SECURITY,
    responses={
        200: {"description": "OpenAI's form: the batch object"},
        **error_responses(400, 401, 404, 413, 422, 429, 500, 503, ok=201),
    },
)
def create_batch(
    body: Annotated[CreateBatchBody, Body()],
    caller: Annotated[Caller, Depends(current_caller)],
    service: Annotated[ApiService, Depends(get_service)],
    batches: Annotated[BatchesApi, Depends(get_batches)],
    files: Annotated[FilesApi, Depends(get_files)],
) -> CreateBatchResponse | OpenAIBatch:
    if isinstance(body, OpenAIBatchRequest):  # OpenAI answers its create with 200
        batch = batches.create_openai(caller, body, service, files)
        return Response(status_code=200, content_type="application/json", body=batch)  # type: ignore[return-value]
    return batches.create(caller, body, service)


@router.get(
    "/v1/batches",
    summary="Your batches, newest first",
    description=(
        "A page of the caller's own batches as `GET /v1/batches/{id}` describes them (sif's and OpenAI's "
        "alike), newest first. `status` keeps one (sif) status; pass `next_cursor` as `after` for the next "
        "page (or a batch id, as OpenAI's lists take it)."
    ),
    tags=["batches"],
    security=SECURITY,
    responses=error_responses(400, 401, 422, 500, ok=200),
)
def list_batches(
    caller: Annotated[Caller, Depends(current_caller)],
    batches: Annotated[BatchesApi, Depends(get_batches)],
    status: Annotated[Status | None, Query(description="only batches with this status")] = None,
    after: Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX, description="page size")] = 20,
) -> BatchList:
    return batches.list(caller, status, after, limit)


@router.get(
    "/v1/batches/<batch_id>",
    summary="A batch's status, counts and result URLs",
    description="Only the caller's own batches: any other id is 404. A file with some bad rows still "
    "ends `succeeded`, with `failed` > 0 and each bad row in errors.jsonl. An OpenAI batch (`batch_...`) "
    "reads as OpenAI's batch object (`completed` with an `error_file_id` when some lines failed).",
    tags=["batches"],
    security=SECURITY,
    responses=error_responses(401, 404, 500, ok=200),
)
def get_batch(
    batch_id: str,
    caller: Annotated[Caller, Depends(current_caller)],
    batches: Annotated[BatchesApi, Depends(get_batches)],
) -> BatchStatusResponse | OpenAIBatch:
    return batches.status(caller, batch_id)


@router.post(
    "/v1/batches/<batch_id>/cancel",
    summary="Cancel a batch",
    description=(
        "A queued or running batch becomes `cancelled` (a running file stops at its next checkpoint; the rows "
        "scored are kept and billed). Cancelling a cancelled batch returns it unchanged; one that has already "
        "ended (succeeded, failed or expired) is a 409. Only the caller's own batches: any other id is 404."
    ),
    tags=["batches"],
    security=SECURITY,
    responses=error_responses(401, 404, 409, 500, ok=200),
)
def cancel_batch(
    batch_id: str,
    caller: Annotated[Caller, Depends(current_caller)],
    batches: Annotated[BatchesApi, Depends(get_batches)],
) -> BatchStatusResponse | OpenAIBatch:
    return batches.cancel(caller, batch_id)
