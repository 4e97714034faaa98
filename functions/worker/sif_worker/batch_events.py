"""GpuJobEventsFunction: AWS Batch "Batch Job State Change" events (FAILED) for the GPU queue.

The GPU worker marks its own job failed when it can; this catches the cases where it cannot (the
container was killed, ran out of memory, hit the attempt timeout, never started): the job or
batch named by the spec URI parameter is marked failed with Batch's status reason, so nothing
waits forever in queued or running. A record that already finished is left alone.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext

from sif_core.batch_events import BatchJobStateChange, fail_from_batch_event
from sif_core.services import lifecycle
from sif_core.settings import get_settings

logger = Logger()
# No model runs here: the lifecycle only (this function's layers carry neither numpy nor onnxruntime).
work = lifecycle(get_settings(), registry=None, batch=None)


@logger.inject_lambda_context
@event_parser(model=BatchJobStateChange)
def lambda_handler(event: BatchJobStateChange, context: LambdaContext) -> dict[str, Any]:
    outcome = fail_from_batch_event(work, event)
    logger.info("batch job state change", extra={"batch_job_id": event.detail.jobId, **outcome})
    return outcome
