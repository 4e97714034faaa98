"""OpenAI's Files API, for batches: POST /v1/files (multipart/form-data), GET /v1/files, GET
/v1/files/{id}, GET /v1/files/{id}/content, DELETE /v1/files/{id}.

An upload is kept as `files/{tenant}/{file id}` in the inbox bucket (`sif_core.keys`; never notified,
so nothing scores it until a batch is made of it), its name and purpose in the object's metadata. A
batch's output and error files are not copies: `file-{batch id}-output` / `-errors` name its results
folder's predictions.jsonl and errors.jsonl. Everything is the caller's own: any other id is 404.

Limits: the file travels in the request body, and API Gateway delivers a binary body base64-encoded
inside Lambda's 6 MB event, so a file may hold MAX_FILE_BYTES (4.5 MB); bigger inputs are for sif's
own batches (POST /v1/batches with a model: a presigned upload, no size limit but the model's rows).
Content up to INLINE_BYTES of UTF-8 comes in the response; anything else is a 307 to a presigned,
expiring GET of the object (Lambda's responses stop at 6 MB too), which the openai client follows.
"""

from __future__ import annotations

import secrets
import time
from functools import cache
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.depends import Depends
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Query
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, ValidationError

from sif_api import multipart
from sif_api.caller import Caller, current_caller
from sif_api.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    media_type,
)
from sif_api.routes_meta import SECURITY
from sif_api.schemas import error_responses
from sif_core.aws import presign_get
from sif_core.keys import FILE_ID, OUTPUT_FILES, RESULTS_PREFIX, file_id_of, file_key, files_prefix
from sif_core.openai_batch import ORIGIN, output_file_id, parse_output_file_id
from sif_core.settings import Settings, get_settings
from sif_core.work import WorkRecord, WorkStore

logger = Logger(child=True)
router = Router()

# 6 MB of event, the body base64 (4/3) plus headers and the event's own fields: 4.5 MB of file.
MAX_FILE_BYTES = 4_500_000
INLINE_BYTES = 4 << 20  # content returned in the response body; more is a redirect to S3
MAX_FILENAME_CHARS = 255
LIST_LIMIT_MAX = 100
LIST_SCAN_MAX = 10_000  # uploads a list looks at (S3 lists keys in id order: oldest first)
UPLOAD_PATH = "/v1/files"
Purpose = Literal["batch", "batch_output"]


class FileObject(BaseModel):
    """OpenAI's file object (what `client.files.create` / `retrieve` parse)."""

    id: str = Field(examples=["file-0190f3c2a1b47c2e9d0a5b61"])
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class UploadForm(BaseModel):
    """The form's fields, validated as a body is (a missing or wrong field: the API's 422)."""

    file: bytes
    filename: str = Field(min_length=1, max_length=MAX_FILENAME_CHARS)
    purpose: Literal["batch"] = Field(description="`batch`: the input of a batch (the one purpose sif keeps)")


# The request body as the OpenAPI document states it (the route reads the form itself: see `multipart`).
UPLOAD_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        multipart.MULTIPART: {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "JSONL, one request per line"},
                    "purpose": {"type": "string", "enum": ["batch"]},
                },
            }
        }
    },
}


def takes_form(event: dict[str, Any]) -> bool:
    """Whether the event is for the route that reads multipart/form-data (the handler's JSON-only 415
    check leaves it to the route, which answers 415 itself for any other media type)."""
    return event.get("httpMethod") == "POST" and event.get("resource") == UPLOAD_PATH


def _content_type(event: dict[str, Any]) -> str | None:
    for name, value in (event.get("headers") or {}).items():
        if name.lower() == "content-type":
            return str(value)
    return None


def read_form(event: dict[str, Any]) -> UploadForm:
    """The upload's fields from the raw event: 415 unless multipart/form-data, 400 for a malformed
    body, 413 for a file over MAX_FILE_BYTES, 422 (the API's validation error) for a missing field."""
    declared = _content_type(event)
    if declared is None or media_type(declared) != multipart.MULTIPART:
        shown = repr(declared.strip()) if declared else "none"
        raise UnsupportedMediaTypeError(
            f"Content-Type {shown} is not supported; send {multipart.MULTIPART} with the fields file and purpose"
        )
    try:
        parts = multipart.parse(multipart.event_body(event), declared)
    except multipart.MultipartError as exc:
        raise BadRequestError(f"the body is not valid {multipart.MULTIPART}: {exc}") from exc
    upload = parts.get("file")
    if upload is not None and len(upload.data) > MAX_FILE_BYTES:
        raise PayloadTooLargeError(
            f"the file is {len(upload.data)} bytes; files are uploaded in one request, which API Gateway and "
            f"Lambda limit to 6 MB with the file base64-encoded: at most {MAX_FILE_BYTES} bytes. Split it, or "
            "use a sif batch (POST /v1/batches with a model) for a file of any size"
        )
    purpose = parts.get("purpose")
    fields: dict[str, Any] = {}
    if upload is not None:
        fields.update(file=upload.data, filename=upload.filename or "upload.jsonl")
    if purpose is not None:
        fields["purpose"] = purpose.data.decode("utf-8", "replace")
    try:
        return UploadForm.model_validate(fields)
    except ValidationError as exc:  # the same 422 body as any other body's fields
        details = [{**e, "loc": ("body", *e.get("loc", ())), "input": None} for e in exc.errors()]
        raise RequestValidationError(details) from exc


def _file_ts(file_id: str) -> int:
    """An upload's creation time: its id starts with the creation milliseconds (hex)."""
    return int(file_id[5:17], 16) // 1000


def new_file_id() -> str:
    return f"file-{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class FilesApi:
    """What the files routes need, built once per process on first use."""

    def __init__(self, settings: Settings, s3: Any, store: WorkStore) -> None:
        self.settings = settings
        self.s3 = s3
        self.store = store

    # ------------------------------------------------------------ uploads
    def create(self, caller: Caller, form: UploadForm) -> FileObject:
        file_id = new_file_id()
        self.s3.put_object(
            Bucket=self.settings.inbox_bucket,
            Key=file_key(caller.tenant_id, file_id),
            Body=form.file,
            ContentType="application/jsonl",
            Metadata={"filename": quote(form.filename, safe=""), "purpose": form.purpose},
        )
        logger.info("file uploaded", extra={"file_id": file_id, "tenant": caller.tenant_id, "bytes": len(form.file)})
        return FileObject(
            id=file_id, bytes=len(form.file), created_at=_file_ts(file_id), filename=form.filename, purpose=form.purpose
        )

    def _head(self, caller: Caller, file_id: str) -> dict[str, Any]:
        if not FILE_ID.match(file_id):
            raise NotFoundError(f"no file {file_id!r}")
        try:
            head: dict[str, Any] = self.s3.head_object(
                Bucket=self.settings.inbox_bucket, Key=file_key(caller.tenant_id, file_id)
            )
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                raise NotFoundError(f"no file {file_id!r}") from exc
            raise
        return head

    @staticmethod
    def _upload(file_id: str, head: dict[str, Any]) -> FileObject:
        meta = head.get("Metadata") or {}
        return FileObject(
            id=file_id,
            bytes=int(head.get("ContentLength", 0)),
            created_at=_file_ts(file_id),
            filename=unquote(str(meta.get("filename") or file_id)),
            purpose="batch",
        )

    def read_input(self, caller: Caller, file_id: str) -> bytes:
        """The bytes of an upload a batch is made of (404 for any id that is not the caller's upload)."""
        if not FILE_ID.match(file_id):
            raise NotFoundError(f"no file {file_id!r}")
        try:
            obj = self.s3.get_object(Bucket=self.settings.inbox_bucket, Key=file_key(caller.tenant_id, file_id))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                raise NotFoundError(f"no file {file_id!r}") from exc
            raise
        data: bytes = obj["Body"].read()
        return data

    # ------------------------------------------------------------ a batch's output and error files
    def _output(self, caller: Caller, file_id: str) -> tuple[WorkRecord, str] | None:
        """(the batch, the results key) of an output or error file id, when that file exists."""
        parsed = parse_output_file_id(file_id)
        if parsed is None:
            return None
        batch_id, stream = parsed
        record = self.store.get(caller.tenant_id, "batch", batch_id)
        if record is None or record.details.get("origin") != ORIGIN or not record.has_outputs:
            raise NotFoundError(f"no file {file_id!r}")
        count = record.succeeded if stream == "output" else record.failed
        prefix = record.output_prefix or ""
        if (
            not count
            or output_file_id(batch_id, stream) != file_id
            or not prefix.startswith(f"{RESULTS_PREFIX}{caller.tenant_id}/")
        ):
            raise NotFoundError(f"no file {file_id!r}")
        return record, prefix + OUTPUT_FILES["predictions" if stream == "output" else "errors"]

    def _output_object(self, caller: Caller, file_id: str, key: str, record: WorkRecord) -> FileObject:
        head = self.s3.head_object(Bucket=self.settings.results_bucket, Key=key)
        stream = "output" if file_id.endswith("-output") else "errors"
        return FileObject(
            id=file_id,
            bytes=int(head.get("ContentLength", 0)),
            created_at=int(head["LastModified"].timestamp()) if head.get("LastModified") else int(record.updated_at),
            filename=f"{record.id}_{stream}.jsonl",
            purpose="batch_output",
        )

    # ------------------------------------------------------------ the routes' work
    def get(self, caller: Caller, file_id: str) -> FileObject:
        output = self._output(caller, file_id)
        if output is not None:
            return self._output_object(caller, file_id, output[1], output[0])
        return self._upload(file_id, self._head(caller, file_id))

    def content(self, caller: Caller, file_id: str) -> Response:
        output = self._output(caller, file_id)
        if output is not None:
            bucket, key = self.settings.results_bucket, output[1]
            size = int(self.s3.head_object(Bucket=bucket, Key=key).get("ContentLength", 0))
        else:
            size = int(self._head(caller, file_id).get("ContentLength", 0))  # 404 unless the caller's own
            bucket, key = self.settings.inbox_bucket, file_key(caller.tenant_id, file_id)
        if size <= INLINE_BYTES:
            data: bytes = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None:
                return Response(status_code=200, content_type="application/octet-stream", body=text)
        url = presign_get(self.s3, bucket, key, self.settings.presign_ttl_s)
        return Response(status_code=307, headers={"Location": url}, body="")

    def list(self, caller: Caller, after: str | None, limit: int, order: str, purpose: str | None) -> FileList:
        if purpose not in (None, "batch"):  # output files are found through their batch, not listed
            return FileList(data=[], has_more=False)
        ids: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        prefix = files_prefix(caller.tenant_id)
        for page in paginator.paginate(Bucket=self.settings.inbox_bucket, Prefix=prefix):
            ids += [i for i in (file_id_of(o["Key"], caller.tenant_id) for o in page.get("Contents", [])) if i]
            if len(ids) >= LIST_SCAN_MAX:
                break
        ids.sort(reverse=order == "desc")
        if after:
            if after not in ids:
                raise BadRequestError(f"after: no file {after!r} to page after")
            ids = ids[ids.index(after) + 1 :]
        page_ids = ids[:limit]
        data = []
        for file_id in page_ids:
            try:
                data.append(self._upload(file_id, self._head(caller, file_id)))
            except NotFoundError:  # deleted meanwhile
                continue
        return FileList(
            data=data,
            has_more=len(ids) > limit,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    def delete(self, caller: Caller, file_id: str) -> FileDeleted:
        if self._output(caller, file_id) is not None:
            raise ConflictError(f"file {file_id!r} is a batch's results; it is kept with the batch")
        self._head(caller, file_id)
        self.s3.delete_object(Bucket=self.settings.inbox_bucket, Key=file_key(caller.tenant_id, file_id))
        logger.info("file deleted", extra={"file_id": file_id, "tenant": caller.tenant_id})
        return FileDeleted(id=file_id, deleted=True)


@cache
def get_files() -> FilesApi:
    """A Depends() provider: clients and settings built on first use, then reused while warm."""
    from sif_core.aws import client, table

    settings = get_settings()
    return FilesApi(settings, client("s3"), WorkStore(table(settings.work_table)))


# ---------------------------------------------------------------- routes
@router.post(
    UPLOAD_PATH,
    summary="Upload a file (a batch's input)",
    description=(
        "multipart/form-data with `file` (JSONL: one `/v1/embeddings` request per line) and `purpose` "
        f"(`batch`). At most {MAX_FILE_BYTES} bytes: the file travels base64-encoded in one request, which "
        "API Gateway and Lambda limit to 6 MB. Returns OpenAI's file object; make a batch of it with "
        "`POST /v1/batches` (`input_file_id`)."
    ),
    tags=["files"],
    security=SECURITY,
    responses=error_responses(400, 401, 413, 415, 422, 500, ok=200),
)
def create_file(
    caller: Annotated[Caller, Depends(current_caller)],
    files: Annotated[FilesApi, Depends(get_files)],
) -> FileObject:
    return files.create(caller, read_form(router.current_event.raw_event))


@router.get(
    "/v1/files",
    summary="Your uploaded files",
    description="Uploads only (a batch's output and error files are named by the batch). `after`: a file id.",
    tags=["files"],
    security=SECURITY,
    responses=error_responses(400, 401, 422, 500, ok=200),
)
def list_files(
    caller: Annotated[Caller, Depends(current_caller)],
    files: Annotated[FilesApi, Depends(get_files)],
    after: Annotated[str | None, Query(max_length=128, description="the last id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX, description="page size")] = 20,
    order: Annotated[Literal["asc", "desc"], Query(description="by creation time")] = "desc",
    purpose: Annotated[str | None, Query(max_length=32, description="only files of this purpose")] = None,
) -> FileList:
    return files.list(caller, after, limit, order, purpose)


@router.get(
    "/v1/files/<file_id>",
    summary="A file's object",
    description="An upload, or a batch's output (`file-{batch id}-output`) or error file (`-errors`). "
    "Only the caller's own: any other id is 404.",
    tags=["files"],
    security=SECURITY,
    responses=error_responses(401, 404, 500, ok=200),
)
def get_file(
    file_id: str,
    caller: Annotated[Caller, Depends(current_caller)],
    files: Annotated[FilesApi, Depends(get_files)],
) -> FileObject:
    return files.get(caller, file_id)


@router.get(
    "/v1/files/<file_id>/content",
    summary="A file's content",
    description=(
        f"The bytes, in the response up to {INLINE_BYTES} bytes of UTF-8; else a 307 to a presigned, expiring "
        "GET of the object (followed by the openai client). Only the caller's own: any other id is 404."
    ),
    tags=["files"],
    security=SECURITY,
    responses={
        200: {"description": "the file's bytes", "content": {"application/octet-stream": {"schema": {}}}},
        307: {"description": "a larger file: Location is a presigned GET"},
        **error_responses(401, 404, 500),
    },
)
def get_file_content(
    file_id: str,
    caller: Annotated[Caller, Depends(current_caller)],
    files: Annotated[FilesApi, Depends(get_files)],
) -> Any:  # a Response: the bytes as they are, or a redirect
    return files.content(caller, file_id)


@router.delete(
    "/v1/files/<file_id>",
    summary="Delete an uploaded file",
    description="Batches already made of it keep running (their requests were staged when they were "
    "created). A batch's output and error files go with the batch (409). Any other id is 404.",
    tags=["files"],
    security=SECURITY,
    responses=error_responses(401, 404, 409, 500, ok=200),
)
def delete_file(
    file_id: str,
    caller: Annotated[Caller, Depends(current_caller)],
    files: Annotated[FilesApi, Depends(get_files)],
) -> FileDeleted:
    return files.delete(caller, file_id)
