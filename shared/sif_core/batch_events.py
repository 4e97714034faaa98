"""AWS Batch "Batch Job State Change" events: a GPU job that died marks its job or batch failed.

The GPU worker marks its own work failed when it can; this catches the cases where it cannot (the
container was killed, ran out of memory, never started). No numpy, no model: the Batch-events
function carries only the application core.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, Field

from sif_core import keys
from sif_core.lifecycle import Lifecycle, metering_id
from sif_core.routing import SPEC_PARAMETER
from sif_core.work import TERMINAL


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


def work_from_spec_uri(uri: str) -> tuple[str, keys.WorkKind, str] | None:
    """(tenant, kind, id) from a spec URI that `submit_gpu_job` wrote, without reading it."""
    try:
        _, key = keys.parse_s3_uri(uri)
    except ValueError:
        return None
    return keys.parse_spec_key(key)


def fail_from_batch_event(lifecycle: Lifecycle, event: BatchJobStateChange) -> dict[str, Any]:
    """A GPU job that ended FAILED in Batch: its job/batch record becomes failed (if not finished)."""
    detail = event.detail
    if detail.status != "FAILED":
        return {"action": "ignored", "status": detail.status}
    work = work_from_spec_uri(detail.parameters.get(SPEC_PARAMETER, ""))
    if work is None:
        return {"action": "ignored", "reason": "no sif spec parameter"}
    tenant, kind, work_id = work
    record = lifecycle.s.store.get(tenant, kind, work_id)
    if record is None or record.status in TERMINAL:
        return {"action": "unchanged", "id": work_id, "status": record.status if record else None}
    error = f"the GPU job failed in AWS Batch ({detail.statusReason or 'no reason given'}; Batch job {detail.jobId})"
    billed_as = metering_id(kind, work_id, record.details.get("etag"))
    lifecycle.fail(record, error, reason="gpu_job_failed", metering_id=billed_as)
    return {"action": "marked_failed", "kind": kind, "id": work_id}
