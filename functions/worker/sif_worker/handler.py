"""WorkerFunction: async jobs from the jobs queue.

SQS batches go through BatchProcessor with partial batch responses (the template sets
ReportBatchItemFailures), so one bad job never re-drives its neighbours. Each job runs at most once
per id: powertools idempotency keys on [tenant, id] in the IdempotencyTable, so a duplicate
delivery returns the first run's outcome instead of running (and billing) again.

A job that fails on purpose (unknown model, unreadable input) is marked failed and its message
consumed. Any other error fails the record, SQS redelivers it, and on the queue's last receive
(ApproximateReceiveCount == maxReceiveCount) the job is marked failed with that error before SQS
moves the message to the DLQ (`sif jobs redrive` puts it back).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyAlreadyInProgressError
from aws_lambda_powertools.utilities.typing import LambdaContext

from sif_core.aws import client
from sif_core.dlq import max_receive_count
from sif_core.jobs import JobMessage, Jobs
from sif_core.scoring import Deadline
from sif_core.services import lifecycle
from sif_core.settings import get_settings

IDEMPOTENCY_TTL_S = 24 * 3600

settings = get_settings()
logger = Logger()
tracer = Tracer()
# Every record failing is answered like any partial failure (all ids listed), not raised.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
jobs = Jobs(lifecycle(settings))
idempotency = IdempotencyConfig(
    event_key_jmespath="[tenant, id]",
    raise_on_no_idempotency_key=True,
    expires_after_seconds=IDEMPOTENCY_TTL_S,
)
persistence = DynamoDBPersistenceLayer(table_name=settings.idempotency_table)


@cache
def last_receive() -> int:
    return max_receive_count(client("sqs"), settings.jobs_queue_url)


@idempotent_function(data_keyword_argument="job", persistence_store=persistence, config=idempotency)
def run_job(job: JobMessage, deadline: Deadline) -> dict[str, Any]:
    outcome = jobs.handle(job, deadline)
    logger.info("job done", extra={"job_id": job.id, "tenant": job.tenant, **outcome.as_dict()})
    return outcome.as_dict()


@tracer.capture_method
def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> dict[str, Any]:
    """BatchProcessor passes the invocation's context to a record handler that declares it; a cpu job
    still running near the timeout goes to the GPU queue."""
    deadline = Deadline.from_context(lambda_context)
    attempts = int(record.attributes.approximate_receive_count or 1)
    try:
        return run_job(job=JobMessage.model_validate_json(record.body), deadline=deadline)
    except IdempotencyAlreadyInProgressError:
        raise  # a duplicate of a job running right now: redelivered later, never given up on
    except Exception as exc:
        logger.warning("job message failed", extra={"message_id": record.message_id, "attempt": attempts})
        if attempts >= last_receive():
            jobs.give_up(record.body, exc, attempts)
        raise


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    idempotency.register_lambda_context(context)
    response = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    return dict(response)  # {"batchItemFailures": [{"itemIdentifier": message id}, ...]}
