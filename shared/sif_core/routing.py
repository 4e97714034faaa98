"""The router: does a piece of work run on CPU in Lambda, or go to the AWS Batch GPU queue?

Used by the API (POST /v1/jobs), the scorer (file batches) and the job worker, so all three
decide the same way from the model manifest:

- an explicit ``accelerator`` of "cpu" or "gpu" wins;
- otherwise a model whose manifest route is "gpu" (or, for archives, whose archive_route is) goes
  to the GPU queue;
- otherwise the estimated CPU time, ``cost.cpu_ms_per_item x items``, decides: past
  ``cost.lambda_budget_ms`` (what one Lambda run may spend) the work goes to the GPU queue.

A GPU job is described by a `GpuJobSpec` written as JSON to the results bucket under the tenant's
prefix; the Batch job gets only that spec's URI (job definition parameter ``spec``), so the
container command stays `python -m sif_gpu_worker.entrypoint --spec Ref::spec`.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import time
import zlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from sif_core import keys
from sif_core.rows import ByteSource, FileFormatError, Format
from sif_core.settings import Settings

if TYPE_CHECKING:  # annotations only: the Batch-events function imports this module without numpy
    from sif_inference.manifest import ModelManifest

Route = Literal["cpu", "gpu"]
Accelerator = Literal["auto", "cpu", "gpu"]
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "gpu")

SPEC_PARAMETER = "spec"
SPECS_DIR = keys.SPECS_DIR
COUNT_BYTES = 4 << 20  # the row estimator reads at most this much of a file (raw bytes)
_BATCH_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class RoutingError(ValueError):
    """An accelerator value the router does not know, or a spec that cannot be submitted."""


def estimated_cpu_ms(manifest: ModelManifest, items: int) -> float:
    return manifest.cost.cpu_ms_per_item * max(0, items)


def estimated_gpu_ms(manifest: ModelManifest, items: int) -> float:
    return manifest.cost.gpu_ms_per_item * max(0, items)


def choose_route(
    manifest: ModelManifest, items_estimate: int, accelerator: str = "auto", *, archive: bool = False
) -> Route:
    """ "cpu" (Lambda) or "gpu" (AWS Batch) for `items_estimate` inputs of this model.

    `archive`: the input is an image archive (the manifest's archive_route, when set, applies).
    """
    if accelerator not in ACCELERATORS:
        raise RoutingError(f"accelerator must be one of {', '.join(ACCELERATORS)}; got {accelerator!r}")
    if accelerator == "cpu":
        return "cpu"
    if accelerator == "gpu":
        return "gpu"
    if manifest.route == "gpu":
        return "gpu"
    if archive and manifest.archive_route == "gpu":
        return "gpu"
    if estimated_cpu_ms(manifest, items_estimate) > manifest.cost.lambda_budget_ms:
        return "gpu"
    return "cpu"


def estimate_rows(source: ByteSource, fmt: Format | None, *, budget_bytes: int = COUNT_BYTES) -> int:
    """Rows in a file, for routing and the quota reservation: counted when its head (`budget_bytes`
    raw) is all of it, else scaled up from the head. The one estimator of every way in (API, worker,
    scorer); the exact count settles the bill at the end."""
    size = source.size or 0
    if size == 0 or fmt is None:
        return 0
    with source.open(0) as raw:
        counting = _CountingRead(raw)
        stream: Any = counting
        if fmt.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=counting, mode="rb")  # type: ignore[call-overload]
        lines, last, eof = 0, b"\n", False
        try:
            while not eof:
                chunk = stream.read(1 << 20)
                eof = not chunk
                lines += chunk.count(b"\n")
                last = chunk[-1:] or last
                if counting.count >= budget_bytes:
                    break
        except (OSError, EOFError, zlib.error) as exc:
            raise FileFormatError(f"not a valid gzip file: {exc}") from exc
    lines += 0 if last == b"\n" else 1
    rows = lines if eof else math.ceil(lines * size / max(1, counting.count))
    return max(0, rows - 1) if fmt.startswith("csv") else rows  # less the header


class _CountingRead:
    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n)
        self.count += len(data)
        return data


# ---------------------------------------------------------------------- the GPU job spec
class GpuJobSpec(BaseModel):
    """What a GPU worker container is asked to do; written to S3, its URI passed to Batch.

    kind "job": an async job (POST /v1/jobs or a raw queue message): `instances` or `input_uri`.
    kind "batch": a drop-file batch: `input_uri` is the inbox object, scored with the streaming scorer.
    `output_prefix` is the results-bucket key prefix (ends with "/") the outputs go under.
    """

    version: Literal[1] = 1
    kind: Literal["job", "batch"]
    id: str = Field(min_length=1, max_length=128)
    tenant: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=128)
    model_version: str | None = None  # pinned at acceptance: the whole job or file runs this one version
    variant: str | None = None
    instances: list[Any] | None = None
    input_uri: str | None = None
    input_format: str | None = None
    output_prefix: str
    callback_url: str | None = None
    on_error: Literal["continue", "fail"] = "continue"
    request_id: str | None = None  # the metering key; defaults to "{kind}#{id}"
    submitted_at: float = Field(default_factory=time.time)
    details: dict[str, Any] = Field(default_factory=dict)

    @property
    def metering_id(self) -> str:
        return self.request_id or f"{self.kind}#{self.id}"


def spec_key(spec: GpuJobSpec) -> str:
    """Where the spec lives in the results bucket: under the tenant's prefix, beside nothing tenants fetch."""
    return keys.spec_key(spec.kind, spec.tenant, spec.id)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    return keys.parse_s3_uri(uri)


def batch_job_name(spec: GpuJobSpec) -> str:
    """Batch job names: up to 128 letters, digits, hyphens and underscores."""
    return _BATCH_NAME_UNSAFE.sub("-", f"sif-{spec.kind}-{spec.id}")[:128]


def write_spec(s3_client: Any, settings: Settings, spec: GpuJobSpec) -> str:
    if not settings.results_bucket:
        raise RoutingError("SIF_RESULTS_BUCKET is not set: nowhere to write the GPU job spec")
    key = spec_key(spec)
    s3_client.put_object(
        Bucket=settings.results_bucket,
        Key=key,
        Body=json.dumps(spec.model_dump(mode="json")).encode("utf-8"),
        ContentType="application/json",
    )
    return f"s3://{settings.results_bucket}/{key}"


def read_spec(s3_client: Any, uri: str) -> GpuJobSpec:
    bucket, key = parse_s3_uri(uri)
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return GpuJobSpec.model_validate(json.loads(body))


def submit_gpu_job(batch_client: Any, s3_client: Any, settings: Settings, spec: GpuJobSpec) -> str:
    """Write the spec to S3 and submit it to the GPU job queue; returns the Batch job id."""
    if not settings.batch_job_queue or not settings.batch_job_definition:
        raise RoutingError("SIF_BATCH_JOB_QUEUE / SIF_BATCH_JOB_DEFINITION are not set: no GPU queue to submit to")
    uri = write_spec(s3_client, settings, spec)
    resp = batch_client.submit_job(
        jobName=batch_job_name(spec),
        jobQueue=settings.batch_job_queue,
        jobDefinition=settings.batch_job_definition,
        parameters={SPEC_PARAMETER: uri},
        tags={"sif:tenant": spec.tenant, "sif:kind": spec.kind, "sif:id": spec.id, "sif:model": spec.model},
        propagateTags=True,
    )
    return str(resp["jobId"])
