"""WorkerFunction: async jobs from the jobs queue.

SQS batches go through BatchProcessor with partial batch responses (the template sets
ReportBatchItemFailures), so one bad job never re-drives its neighbours. Each job runs at most once
per id: powertools idempotency keys on [tenant, id] in the IdempotencyTable, so a duplicate
delivery returns the first run's outcome instead of running (and billing) again.

An error that is a property of the data fails the job on the first receive and consumes the
message: a message naming a job that does not validate (`Jobs.refuse`), an unknown model, an
unreadable input. A message reusing a job id for different content is a conflict (powertools'
payload validation over `sif_core.jobs.CONTENT_FIELDS`, and the content hash kept in the job's
record): refused, logged and counted in the job's `details.conflicts`, the job left as it is.
Any other error fails the record, SQS redelivers it, and on the queue's last receive
(ApproximateReceiveCount == maxReceiveCount) the job is marked failed with that error before SQS
moves the message to the DLQ (`sif jobs redrive` puts it back); a message that names no job at
all can only end there.

The invocation holds its messages and the in-progress idempotency record of the job it runs on a
lease renewed while it runs (`sif_core.leases`): if it dies both lapse within a minute and the job
resumes from its checkpoint, instead of waiting out the queue's 30 minutes.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyValidationError,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from sif_core.aws import client
from sif_core.dlq import max_receive_count
from sif_core.jobs import JobMessage, Jobs, content_jmespath
from sif_core.leases import LeasedIdempotencyStore, MessageLease
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
    payload_validation_jmespath=content_jmespath(),  # one id, other content: IdempotencyValidationError
    raise_on_no_idempotency_key=True,
    expires_after_seconds=IDEMPOTENCY_TTL_S,
)
persistence = LeasedIdempotencyStore(table_name=settings.idempotency_table)  # in-progress records on a lease


@cache
def last_receive() -> int:
    return max_receive_count(client("sqs"), settings.jobs_queue_url)


@idempotent_function(data_keyword_argument="job", persistence_store=persistence, config=idempotency)
def run_job(job: JobMessage, deadline: Deadline) -> dict[str, Any]:
    outcome = jobs.handle(job, deadline)
    logger.info("job done", extra={"job_id": job.id, "tenant": job.tenant, **outcome.as_dict()})
    return outcome.as_dict()


def handle_message(body: str, deadline: Deadline, message_id: str) -> dict[str, Any]:
    """One message: a job run (or its first run's outcome), or refused for what it is."""
    try:
        job = JobMessage.model_validate_json(body)
    except ValidationError as exc:
        refused = jobs.refuse(body, exc)  # a property of the data: the job fails now, the message is consumed
        if refused is None:
            raise  # names no job: retried, then dead-lettered
        logger.warning("invalid job message", extra={"message_id": message_id, **refused.as_dict()})
        return refused.as_dict()
    try:
        return run_job(job=job, deadline=deadline)
    except IdempotencyValidationError:
        return jobs.conflict(job.tenant, job.id, "the job id was already used for a different job").as_dict()


@tracer.capture_method
def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> dict[str, Any]:
    """BatchProcessor passes the invocation's context to a record handler that declares it; a cpu job
    still running near the timeout goes to the GPU queue."""
    attempts = int(record.attributes.approximate_receive_count or 1)
    try:
        return handle_message(record.body, Deadline.from_context(lambda_context), record.message_id)
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
    with MessageLease(client("sqs"), settings.jobs_queue_url, event, also=persistence.renew) as lease:
        response = process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
        lease.hand_back(response)
    return dict(response)  # {"batchItemFailures": [{"itemIdentifier": message id}, ...]}
