"""Drop-file batches: an inbox object -> its batch record, its quota, its route, its run.

What makes a file a *batch* (the scoring, the record's life, metering and events are the shared
`WorkRunner` and `Lifecycle`, the same as jobs):

- the object: `incoming/{tenant}/{model}/{name}` at one ETag; its outputs go to its own folder
  `results/{tenant}/{model}/{name}/{etag}/` (`sif_core.keys`), so nothing is ever overwritten;
- the batch id: the upload's own name for files put through POST /v1/batches, else derived from
  the object and its ETag (new content under a key is a new batch; an identical re-drop is the same
  one, and a batch finished at an ETag is never scored again);
- on arrival (segment 0): rows estimated (`routing.estimate_rows`), the estimate reserved against
  the tenant's quota (a tenant out of quota: `failed`, reason `quota_exceeded`, nothing scored or
  billed), then the route: CPU segments here, or the AWS Batch GPU queue;
- superseded: content put again under the key while a version is being scored stops that version
  at its next window (`runner.still_current`): its outputs are aborted and its reservation released,
  so only the newer upload's result is billed; its record (a direct drop's own) fails with reason
  `superseded`;
- one model version: the key's model folder may be `name`, `name@version` or `name@alias`; the
  version is resolved once (POST /v1/batches at creation, else on arrival, a canary alias picking by
  the batch id) and pinned in the record's `details.version`, so every segment and a GPU hand-off
  score with it, and the results manifest names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sif_core import keys, openai_batch
from sif_core.lifecycle import QUOTA_EXCEEDED, TENANT_INACTIVE, Lifecycle, metering_id
from sif_core.routing import GpuJobSpec, Route, choose_route, estimate_rows, submit_gpu_job
from sif_core.rows import FileFormatError, Format, detect_format
from sif_core.runner import DeadlineReached, Outcome, Work, WorkRunner, still_current
from sif_core.s3io import S3Object, SourceChangedError
from sif_core.scoring import Deadline
from sif_core.work import TERMINAL, WorkRecord
from sif_inference.errors import ModelNotFoundError, UnknownVariantError
from sif_inference.manifest import ModelManifest
from sif_metering.ledger import QuotaExceededError, TenantInactiveError

log = logging.getLogger("sif.filebatch")

NotAnInboxFileError = keys.KeyFormatError
SUPERSEDED = "superseded"
# A batch in one of these stays so whatever is uploaded after: an upload never takes it back.
CLOSED = ("cancelled", "expired")


@dataclass(frozen=True)
class InboxFile:
    """One object in the inbox, at one ETag: what to score, for whom, with which model, to where."""

    bucket: str
    key: str
    etag: str
    size: int
    tenant: str
    model: str  # the key's model folder: `name`, `name@version` or `name@alias`
    name: str  # below the model folder, extension included
    fmt: Format | None  # None: an extension we do not read

    @classmethod
    def parse(cls, bucket: str, key: str, etag: str, size: int) -> InboxFile:
        where = keys.InboxKey.parse(key)
        return cls(
            bucket,
            key,
            keys.clean_etag(etag),
            int(size),
            where.tenant,
            where.model,
            where.name,
            detect_format(where.name),
        )

    @property
    def model_name(self) -> str:
        """The model's name without its tag (what the record, the ledger and the usage carry)."""
        return self.model.partition("@")[0]

    @property
    def output_prefix(self) -> str:
        return keys.batch_results_prefix(self.tenant, self.model, self.name, self.etag)

    @property
    def batch_id(self) -> str:
        """The upload's name for files put through POST /v1/batches; else one id per object and content."""
        stem = self.name.split(".", 1)[0]
        if (keys.BATCH_ID.match(stem) or keys.OPENAI_BATCH_ID.match(stem)) and "/" not in self.name:
            return stem
        return keys.dropped_batch_id(self.bucket, self.key, self.etag)

    @property
    def metering_id(self) -> str:
        return metering_id("batch", self.batch_id, self.etag)

    @property
    def uri(self) -> str:
        return keys.s3_uri(self.bucket, self.key)

    def describe(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "etag": self.etag, "size": self.size, "format": self.fmt}


class FileBatches:
    def __init__(self, lifecycle: Lifecycle, runner: WorkRunner | None = None) -> None:
        self.lc = lifecycle
        self.s = lifecycle.s
        self.runner = runner or WorkRunner(lifecycle)

    # ------------------------------------------------------------ records
    def new_record(self, file: InboxFile) -> WorkRecord:
        return WorkRecord(
            id=file.batch_id,
            kind="batch",
            tenant=file.tenant,
            model=file.model_name,
            input_key=file.key,
            output_prefix=file.output_prefix,
            details={"etag": file.etag, "input": file.describe(), "origin": "inbox"},
        )

    def record(self, file: InboxFile) -> WorkRecord:
        """The batch's record at this ETag: created for a direct drop, set to the upload for an API batch.

        SourceChangedError: the record names another upload and this one is not the object's current
        version (a late event or hand-off of a superseded upload never takes the record back)."""
        record = self.lc.ensure(self.new_record(file))
        if record.details.get("etag") == file.etag or record.status in CLOSED:
            return record
        still_current(S3Object(self.s.s3, file.bucket, file.key, file.etag))
        # An upload to an API batch (or new content put again through its URL): this content's batch now.
        details = {k: v for k, v in record.details.items() if k not in ("routed", "gpu_job_id", "manifest", "reserved")}
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
        if not self.s.store.update(file.tenant, "batch", file.batch_id, unless=CLOSED, **fields):
            # cancelled (or expired) since it was read: that stands, and this upload is not scored
            ended = self.s.store.get(file.tenant, "batch", file.batch_id)
            assert ended is not None
            return ended
        return record.model_copy(update=fields)

    def work(self, file: InboxFile, record: WorkRecord) -> Work:
        assert file.fmt is not None
        return Work(
            record=record,
            source=S3Object(self.s.s3, file.bucket, file.key, file.etag, file.size),
            fmt=file.fmt,
            output_prefix=file.output_prefix,
            metering_id=file.metering_id,
            variant=record.details.get("variant"),
            version=record.details.get("version"),
            describe={**file.describe(), "batch_id": file.batch_id},
            encoding="base64" if record.details.get("encoding_format") == "base64" else "float",
            protocol="openai" if record.details.get("origin") == openai_batch.ORIGIN else "sif",
        )

    def pin(self, file: InboxFile, record: WorkRecord) -> ModelManifest:
        """The version the batch scores with: pinned already (at creation or a first arrival), else what
        the key's model reference means now for this batch, pinned in the record.

        ModelNotFoundError: unknown (or another tenant's private model); UnknownVariantError: no such variant."""
        pinned = record.details.get("version")
        if pinned:
            manifest = self.s.models.manifest(file.model_name, str(pinned))
            if not manifest.visible_to(file.tenant):
                raise ModelNotFoundError(f"unknown model {file.model_name!r}")
        else:
            manifest = self.s.models.resolve(file.model, routing_key=file.batch_id, tenant=file.tenant)
        variant = record.details.get("variant") or manifest.default_variant
        manifest.variant_file(variant)
        if record.details.get("version") != manifest.version or record.details.get("variant") != variant:
            record.details.update(version=manifest.version, variant=variant)
            self.lc.update(record, details=record.details)
        return manifest

    # ------------------------------------------------------------ arrival
    def _finished(self, file: InboxFile, record: WorkRecord) -> bool:
        return record.status in TERMINAL and (record.details.get("etag") == file.etag or record.status in CLOSED)

    def accept(self, file: InboxFile, record: WorkRecord, manifest: ModelManifest) -> tuple[Route, int] | Outcome:
        """Estimate, check the model's limit, reserve the quota, route: (route, rows) or the failed outcome."""
        assert file.fmt is not None
        source = S3Object(self.s.s3, file.bucket, file.key, file.etag, file.size)
        work = self.work(file, record)
        try:
            rows = estimate_rows(source, file.fmt)
        except FileFormatError as exc:
            return self.runner.fail(work, exc, reason="bad_file")
        what, about = "rows", "" if file.size <= 4 << 20 else "about "
        if work.protocol == "openai":  # the quota's unit is the input: the texts the API counted in the requests
            rows, what, about = int(record.details.get("units") or rows), "texts", ""
        limit = manifest.limits.max_batch_rows
        if rows > limit:
            return self.runner.fail(
                work,
                f"the file has {about}{rows} {what}; {manifest.name} takes at most {limit} per file",
                reason="too_large",
            )
        try:
            self.lc.reserve(record, rows, file.metering_id)
        except TenantInactiveError as exc:
            return self.runner.fail(work, f"{TENANT_INACTIVE}: {exc}", reason=TENANT_INACTIVE)
        except QuotaExceededError as exc:
            return self.runner.fail(work, f"{QUOTA_EXCEEDED}: {exc}", reason=QUOTA_EXCEEDED)
        archive = manifest.task == "image-classification" and rows > manifest.limits.max_inputs
        route = choose_route(manifest, rows, str(record.details.get("accelerator", "auto")), archive=archive)
        record.details.update(routed=file.etag, rows_estimate=rows, reserved=rows)
        self.lc.update(record, route=route, details=record.details)
        record.route = route
        return route, rows

    def handle(self, file: InboxFile, segment: int, deadline: Deadline) -> Outcome:
        """One SQS message's worth: segment 0 accepts and routes the file; CPU segments score until the deadline."""
        try:
            record = self.record(file)
        except SourceChangedError as exc:
            return self.superseded(file, self.new_record(file), exc)
        if record.status == "cancelled" and record.details.get("routed") == file.etag and file.fmt is not None:
            return self._finish_cancelled(file, record, segment)
        if self._finished(file, record):
            return Outcome("skipped", file.batch_id, record.route, reason=f"already {record.status}")
        work = self.work(file, record) if file.fmt is not None else None
        if work is None:
            name = file.key.rsplit("/", 1)[-1]
            bad = Work(
                record, S3Object(self.s.s3, file.bucket, file.key), "jsonl", file.output_prefix, file.metering_id
            )
            return self.runner.fail(
                bad, f"unsupported file {name!r}: expected .jsonl or .csv, optionally .gz", reason="bad_file"
            )
        try:
            manifest = self.pin(file, record)
        except ModelNotFoundError as exc:
            return self.runner.fail(work, exc, reason="unknown_model")
        except UnknownVariantError as exc:
            return self.runner.fail(work, exc, reason="unknown_variant")
        work = self.work(file, record)  # with the pinned version
        try:
            if record.details.get("routed") != file.etag:
                accepted = self.accept(file, record, manifest)
                if isinstance(accepted, Outcome):
                    return accepted
                route, rows = accepted
                if route == "gpu":
                    return self.submit_to_gpu(file, record, rows)
                work = self.work(file, record)
            elif record.route == "gpu":
                return Outcome("skipped", file.batch_id, "gpu", reason="the GPU queue has this file")
            return self.runner.score(work, segment, deadline, route="cpu")
        except SourceChangedError as exc:
            return self.superseded(file, record, exc)
        except DeadlineReached as exc:
            if self.s.continue_with is None:
                raise RuntimeError("a deadline was reached but there is no way to hand the file on") from exc
            self.s.continue_with(file, exc.next_segment)
            return Outcome("continued", file.batch_id, "cpu", segment=exc.next_segment)

    def superseded(self, file: InboxFile, record: WorkRecord, error: SourceChangedError) -> Outcome:
        """This version of the file was replaced (or deleted) before it was scored through: nothing of it
        is billed. Its record fails with reason `superseded`, unless the record already names the newer
        upload (a batch made with POST /v1/batches keeps one record for its current upload)."""
        log.info("batch %s: %s; the newer upload's own event takes over", file.batch_id, error)
        if file.fmt is None:  # nothing was scored or reserved
            return Outcome("skipped", file.batch_id, record.route, reason=f"{SUPERSEDED}: {error}")
        work = self.work(file, record)
        current = self.lc.get(record)
        if current is not None and current.details.get("etag") == file.etag and current.status not in TERMINAL:
            return self.runner.fail(work, f"{SUPERSEDED}: {error}", reason=SUPERSEDED)
        self.runner.discard(work)
        return Outcome("skipped", file.batch_id, record.route, reason=f"{SUPERSEDED}: {error}")

    def _finish_cancelled(self, file: InboxFile, record: WorkRecord, segment: int) -> Outcome:
        """Cancelled after it was accepted: the rows scored so far are completed and billed, the rest released."""
        try:
            return self.runner.score(self.work(file, record), segment, Deadline.never(), route=record.route)
        except SourceChangedError as exc:
            self.lc.release(record, file.metering_id)
            return Outcome("cancelled", file.batch_id, record.route, reason=str(exc))

    def submit_to_gpu(self, file: InboxFile, record: WorkRecord, rows_estimate: int) -> Outcome:
        existing = record.details.get("gpu_job_id")
        if existing and record.details.get("routed") == file.etag:
            return Outcome("submitted", file.batch_id, "gpu", reason=f"already Batch job {existing}")
        spec = GpuJobSpec(
            kind="batch",
            id=file.batch_id,
            tenant=file.tenant,
            model=file.model_name,
            model_version=record.details.get("version"),
            variant=record.details.get("variant"),
            input_uri=file.uri,
            input_format=file.fmt,
            output_prefix=file.output_prefix,
            request_id=file.metering_id,
            details={"etag": file.etag, "size": file.size, "rows_estimate": rows_estimate},
        )
        job_id = submit_gpu_job(self.s.batch, self.s.s3, self.s.settings, spec)
        record.details.update(gpu_job_id=job_id)
        self.lc.update(record, route="gpu", status="queued", details=record.details)
        log.info("batch %s (~%d rows) goes to the GPU queue as Batch job %s", file.batch_id, rows_estimate, job_id)
        return Outcome("submitted", file.batch_id, "gpu", reason=f"Batch job {job_id}")

    def give_up(self, file: InboxFile, error: BaseException | str, attempts: int) -> None:
        """The message's last receive failed: mark the batch failed before SQS dead-letters it."""
        try:
            record = self.record(file)
        except SourceChangedError:
            return  # a superseded upload: the record is the newer one's
        if self._finished(file, record):
            return
        self.lc.give_up(record, error, attempts, file.metering_id)

    # ------------------------------------------------------------ the GPU worker
    def run_gpu(self, spec: GpuJobSpec) -> Outcome:
        """A file the router sent to the GPU queue: the whole file in one run (resumed if retried)."""
        if spec.kind != "batch" or spec.input_uri is None:
            raise ValueError(f"spec {spec.id} is not a file batch")
        bucket, key = keys.parse_s3_uri(spec.input_uri)
        etag = str(spec.details.get("etag", ""))
        size = spec.details.get("size")
        if not etag or size is None:
            head = self.s.s3.head_object(Bucket=bucket, Key=key)
            etag, size = str(head["ETag"]), int(head["ContentLength"])
        file = InboxFile.parse(bucket, key, etag, int(size))
        try:
            record = self.record(file)
        except SourceChangedError as exc:
            return self.superseded(file, self.new_record(file), exc)
        if record.status == "cancelled" and file.fmt is not None:
            return self._finish_cancelled(file, record, 0)
        if self._finished(file, record) or file.fmt is None:
            return Outcome("skipped", file.batch_id, "gpu", reason=f"already {record.status}")
        try:
            return self.runner.score(self.work(file, record), 0, Deadline.never(), route="gpu")
        except SourceChangedError as exc:
            return self.superseded(file, record, exc)
