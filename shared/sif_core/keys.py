"""Every S3 key the product writes or reads, built and parsed here and nowhere else.

Inbox bucket (what tenants put in):
    incoming/{tenant}/{model}/{name}          a file dropped for scoring (S3 notifies the inbox queue); {model}
                                               is `name`, `name@version` or `name@alias`
    uploads/{tenant}/{name}                    an input kept for jobs (`s3_uri`); never notified, never scored as a drop

Results bucket (what the product writes; never notified, so outputs cannot retrigger scoring):
    results/{tenant}/{model}/{name}/{etag}/    one dropped file's outputs: `name` is the file's name as dropped
                                               (extension included) and `etag` the uploaded content's ETag, so
                                               two files with one stem, or new content under one key, never
                                               share a folder, and an identical re-drop finds its own results
    results/{tenant}/{model}/{job id}/         one job's outputs
    .../predictions.jsonl, errors.jsonl, manifest.json, _state/checkpoint.json.gz
    results/{tenant}/_inputs/{job id}.jsonl    instances too big for one SQS message, staged by the API
    results/{tenant}/_specs/{kind}-{id}.json   a GPU job's spec (the Batch job gets its URI)

Inbox bucket, OpenAI Files (POST /v1/files; never notified, never scored by itself):
    files/{tenant}/{file id}                   an uploaded file (`file-...`), its name and purpose in the
                                               object's metadata; a batch made from it is staged under incoming/

The tenant-prefix rule: a tenant reads and names only keys under its own `{prefix}/{tenant}/`; every
segment that comes from a request is checked against `SEGMENT` before it becomes part of a key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

INBOX_PREFIX = "incoming/"
UPLOADS_PREFIX = "uploads/"
FILES_PREFIX = "files/"
RESULTS_PREFIX = "results/"
SPECS_DIR = "_specs"
INPUTS_DIR = "_inputs"
CHECKPOINT_NAME = "_state/checkpoint.json.gz"
OUTPUT_FILES: dict[str, str] = {
    "predictions": "predictions.jsonl",
    "errors": "errors.jsonl",
    "manifest": "manifest.json",
}

SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A dropped file's model folder: a plain name, optionally tagged with a version or an alias.
MODEL_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9_-]{1,63})?$")
ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
BATCH_ID = re.compile(r"^b_[0-9a-f]{20}$")
JOB_ID = re.compile(r"^j_[0-9a-f]{20}$")
OPENAI_BATCH_ID = re.compile(r"^batch_[0-9a-f]{20}$")  # a batch made from an uploaded file (OpenAI's Batch API)
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")  # an uploaded file: 12 hex of its creation ms, then 12 random
_ETAG = re.compile(r"^[0-9A-Za-z-]{1,80}$")

WorkKind = Literal["job", "batch"]


class KeyFormatError(ValueError):
    """A key or URI that is not one of ours, or a segment that is not safe to put in one."""


def _segment(value: str, what: str) -> str:
    if not SEGMENT.match(value):
        raise KeyFormatError(f"{what} {value!r} is not a plain name (letters, digits, '.', '_', '-')")
    return value


def _id(value: str, what: str) -> str:
    if not ID.match(value):
        raise KeyFormatError(f"{what} {value!r} is not a valid id")
    return value


def clean_etag(etag: str) -> str:
    value = etag.strip('"')
    if not _ETAG.match(value):
        raise KeyFormatError(f"ETag {etag!r} is not an S3 ETag")
    return value


# ---------------------------------------------------------------------- s3:// URIs
def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or not parts.path.lstrip("/"):
        raise KeyFormatError(f"not an s3://bucket/key URI: {uri!r}")
    return parts.netloc, parts.path.lstrip("/")


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


# ---------------------------------------------------------------------- the inbox
@dataclass(frozen=True)
class InboxKey:
    """`incoming/{tenant}/{model}/{name}`: what was dropped, for whom, for which model."""

    tenant: str
    model: str
    name: str  # the file's name below the model folder, extension included (may hold '/')

    @classmethod
    def parse(cls, key: str) -> InboxKey:
        if not key.startswith(INBOX_PREFIX):
            raise KeyFormatError(f"{key!r} is outside {INBOX_PREFIX}")
        parts = key[len(INBOX_PREFIX) :].split("/")
        if len(parts) < 3 or not all(parts):
            raise KeyFormatError(f"{key!r} is not {INBOX_PREFIX}{{tenant}}/{{model}}/{{name}}")
        tenant, model = parts[0], parts[1]
        if not SEGMENT.match(tenant) or not MODEL_SEGMENT.match(model):
            raise KeyFormatError(f"{key!r}: tenant and model must be plain names (the model may be name@version)")
        if any(p in (".", "..") for p in parts[2:]):
            raise KeyFormatError(f"{key!r}: '.' and '..' are not file names")
        return cls(tenant, model, "/".join(parts[2:]))

    @property
    def key(self) -> str:
        return f"{INBOX_PREFIX}{self.tenant}/{self.model}/{self.name}"

    @property
    def filename(self) -> str:
        return self.name.rsplit("/", 1)[-1]


def inbox_key(tenant: str, model: str, name: str) -> str:
    return InboxKey(_segment(tenant, "tenant"), _segment(model, "model"), _segment(name, "file name")).key


def uploads_prefix(tenant: str) -> str:
    return f"{UPLOADS_PREFIX}{_segment(tenant, 'tenant')}/"


# ---------------------------------------------------------------------- results
def batch_results_prefix(tenant: str, model: str, name: str, etag: str) -> str:
    """The one folder of a dropped file's outputs (see the module docstring for the rule)."""
    return f"{RESULTS_PREFIX}{tenant}/{model}/{name}/{clean_etag(etag)}/"


def job_results_prefix(tenant: str, model: str, job_id: str) -> str:
    return f"{RESULTS_PREFIX}{_segment(tenant, 'tenant')}/{_segment(model, 'model')}/{_id(job_id, 'job id')}/"


def tenant_results_prefix(tenant: str) -> str:
    return f"{RESULTS_PREFIX}{_segment(tenant, 'tenant')}/"


def output_key(prefix: str, name: str) -> str:
    """predictions / errors / manifest (or a file name) inside a results folder."""
    return prefix + OUTPUT_FILES.get(name, name)


def checkpoint_key(prefix: str) -> str:
    return prefix + CHECKPOINT_NAME


def staged_input_key(tenant: str, job_id: str) -> str:
    """Where the API stages an instance list too big for one SQS message."""
    return f"{tenant_results_prefix(tenant)}{INPUTS_DIR}/{_id(job_id, 'job id')}.jsonl"


def spec_key(kind: WorkKind, tenant: str, work_id: str) -> str:
    return f"{tenant_results_prefix(tenant)}{SPECS_DIR}/{kind}-{_id(work_id, 'id')}.json"


_SPEC_KEY = re.compile(
    rf"^{RESULTS_PREFIX}(?P<tenant>[A-Za-z0-9][A-Za-z0-9._-]*)/{SPECS_DIR}/(?P<kind>job|batch)-(?P<id>[A-Za-z0-9_-]+)\.json$"
)


def parse_spec_key(key: str) -> tuple[str, WorkKind, str] | None:
    """(tenant, kind, id) of a spec key that `spec_key` built, else None."""
    m = _SPEC_KEY.match(key)
    if m is None:
        return None
    kind: WorkKind = "job" if m["kind"] == "job" else "batch"
    return m["tenant"], kind, m["id"]


# ---------------------------------------------------------------------- uploaded files (OpenAI Files)
def files_prefix(tenant: str) -> str:
    return f"{FILES_PREFIX}{_segment(tenant, 'tenant')}/"


def file_key(tenant: str, file_id: str) -> str:
    """Where an uploaded file lives in the inbox bucket (KeyFormatError for an id that is not one)."""
    if not FILE_ID.match(file_id):
        raise KeyFormatError(f"file id {file_id!r} is not a valid id")
    return files_prefix(tenant) + file_id


def file_id_of(key: str, tenant: str) -> str | None:
    """The file id of a key `file_key` built for `tenant`, else None."""
    prefix = files_prefix(tenant)
    rest = key[len(prefix) :] if key.startswith(prefix) else ""
    return rest if FILE_ID.match(rest) else None


# ---------------------------------------------------------------------- ids
def dropped_batch_id(bucket: str, key: str, etag: str) -> str:
    """A direct drop's batch id: one per (object, content), so new content under a key is a new batch."""
    return "b_" + hashlib.sha256(f"{bucket}/{key}#{clean_etag(etag)}".encode()).hexdigest()[:20]


# ---------------------------------------------------------------------- what a job may read
def job_input_allowed(bucket: str, key: str, tenant: str, *, inbox_bucket: str, results_bucket: str) -> str | None:
    """None when a job of `tenant` may read s3://bucket/key, else why not.

    A job reads its tenant's `uploads/` in the inbox bucket or its own results. Never `incoming/`:
    a file there is scored as a drop already, and a job on it would score and bill it a second time.
    """
    if ".." in key.split("/"):
        return "the key must not contain '..'"
    allowed = [(inbox_bucket, uploads_prefix(tenant)), (results_bucket, tenant_results_prefix(tenant))]
    if any(bucket == b and key.startswith(p) for b, p in allowed if b):
        return None
    if bucket == inbox_bucket and key.startswith(f"{INBOX_PREFIX}{tenant}/"):
        return (
            f"files under {INBOX_PREFIX} are scored as batches when they arrive (see GET /v1/batches); "
            f"put a job's input under s3://{inbox_bucket}/{uploads_prefix(tenant)}"
        )
    return f"s3_uri must be under s3://{inbox_bucket}/{uploads_prefix(tenant)} or s3://{results_bucket}/{tenant_results_prefix(tenant)}"
