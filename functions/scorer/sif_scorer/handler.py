"""ScorerFunction: files dropped in the inbox (S3 -> SQS) scored into the results bucket.

One SQS record is one S3 event (or the scorer's own hand-off). Records go through BatchProcessor
with partial batch responses (the template sets ReportBatchItemFailures; the queue's visibility
timeout is six times this function's timeout and a DLQ catches poison messages).

Each (bucket, key, ETag, segment) runs at most once: powertools idempotency on the
IdempotencyTable. Duplicate S3 events (AWS delivers at least once; moto sends two for a multipart
upload) and SQS redeliveries of a finished file therefore neither score nor bill again. A file too
big for one invocation is checkpointed before the deadline and handed on to the next segment
through the queue.

The invocation holds its message and the file's in-progress idempotency record on a lease renewed
while it runs (`sif_core.leases`): if it dies (killed, out of memory) both lapse within a minute and
the redelivery resumes the file from its checkpoint, instead of waiting out the queue's 30 minutes.
A file that cannot be scored as given (bad file, unknown model, out of quota, replaced) ends failed
at once and its message is consumed; only other errors are retried.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyAlreadyInProgressError
from aws_lambda_powertools.utilities.typing import LambdaContext

from sif_core.aws import client
from sif_core.dlq import max_receive_count
from sif_core.filebatch import FileBatches, InboxFile, NotAnInboxFileError
from sif_core.keys import INBOX_PREFIX
from sif_core.leases import LeasedIdempotencyStore, MessageLease
from sif_core.scoring import Deadline
from sif_core.services import lifecycle
from sif_core.settings import get_settings
from sif_scorer.events import Continuation, FileTask, InboxRecord, InboxS3Event, InboxS3Record, S3TestEvent

IDEMPOTENCY_TTL_S = 24 * 3600

# S3 test events and duplicates score nothing, so some invocations have no metrics: that is fine.
warnings.filterwarnings("ignore", message="No application metrics to publish")

settings = get_settings()
logger = Logger()
tracer = Tracer()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.SQS, model=InboxRecord, raise_on_entire_batch_failure=False)
sqs = client("sqs")


def hand_on(file: InboxFile, segment: int) -> None:
    """Queue the file's next segment (the current invocation is about to run out of time)."""
    if not settings.inbox_queue_url:
        raise RuntimeError("SIF_INBOX_QUEUE_URL is not set: a long file cannot be handed on")
    message = Continuation(bucket=file.bucket, key=file.key, etag=file.etag, size=file.size, segment=segment)
    sqs.send_message(QueueUrl=settings.inbox_queue_url, MessageBody=message.model_dump_json())


batches = FileBatches(lifecycle(settings, continue_with=hand_on))
idempotency = IdempotencyConfig(
    event_key_jmespath="[bucket, key, etag, segment]",
    raise_on_no_idempotency_key=True,
    expires_after_seconds=IDEMPOTENCY_TTL_S,
)
persistence = LeasedIdempotencyStore(table_name=settings.idempotency_table)  # in-progress records on a lease


@idempotent_function(data_keyword_argument="task", persistence_store=persistence, config=idempotency)
def score_task(task: FileTask, deadline: Deadline) -> dict[str, Any]:
    file = InboxFile.parse(task.bucket, task.key, task.etag, task.size)
    outcome = batches.handle(file, task.segment, deadline)
    logger.info("file batch", extra={"key": file.key, "segment": task.segment, **outcome.as_dict()})
    if outcome.status in ("succeeded", "failed"):
        metrics.add_metric(name="FilesFinished", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="RowsScored", unit=MetricUnit.Count, value=outcome.rows)
    return outcome.as_dict()


def tasks_from_s3(event: InboxS3Event) -> list[FileTask]:
    tasks = []
    for record in event.Records:
        task = task_from_s3(record)
        if task is not None:
            tasks.append(task)
    return tasks


def task_from_s3(record: InboxS3Record) -> FileTask | None:
    """The file an S3 record announces, or None when it is not ours to score (logged)."""
    bucket, key, obj = record.s3.bucket.name, record.object_key, record.s3.object
    if not record.created or obj is None:
        logger.info("ignoring a non-create S3 event", extra={"event": record.eventName, "key": key})
        return None
    if settings.inbox_bucket and bucket != settings.inbox_bucket:
        logger.warning("ignoring an event from another bucket", extra={"bucket": bucket, "key": key})
        return None
    if not key.startswith(INBOX_PREFIX):
        logger.info("ignoring an object outside incoming/", extra={"key": key})
        return None
    try:
        InboxFile.parse(bucket, key, obj.eTag or "", int(obj.size or 0))
    except NotAnInboxFileError as exc:
        logger.warning("ignoring an object that is not a batch file", extra={"key": key, "reason": str(exc)})
        return None
    return FileTask(bucket=bucket, key=key, etag=(obj.eTag or "").strip('"'), size=int(obj.size or 0))


@tracer.capture_method
def record_handler(record: InboxRecord, lambda_context: LambdaContext) -> list[dict[str, Any]]:
    """BatchProcessor passes the invocation's context to a record handler that declares it."""
    body = record.body
    if isinstance(body, S3TestEvent):
        logger.info("S3 test event", extra={"bucket": body.Bucket})
        return []
    if isinstance(body, Continuation):
        tasks = [FileTask(bucket=body.bucket, key=body.key, etag=body.etag, size=body.size, segment=body.segment)]
    else:
        tasks = tasks_from_s3(body)
    results = []
    for task in tasks:
        try:
            results.append(score_task(task=task, deadline=Deadline.from_context(lambda_context)))
        except IdempotencyAlreadyInProgressError:
            # A duplicate of a file running right now: the record fails and SQS redelivers it later,
            # when it finds the finished result (or takes over from a crashed run).
            raise
        except Exception as exc:
            attempts = int(record.attributes.ApproximateReceiveCount or 1)
            logger.warning("file batch failed", extra={"key": task.key, "attempt": attempts, "error": str(exc)})
            if attempts >= last_receive():
                batches.give_up(InboxFile.parse(task.bucket, task.key, task.etag, task.size), exc, attempts)
            raise
    return results


@cache
def last_receive() -> int:
    """The inbox queue's maxReceiveCount: on that receive, a failure is final (SQS dead-letters it)."""
    return max_receive_count(sqs, settings.inbox_queue_url) if settings.inbox_queue_url else 5


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    idempotency.register_lambda_context(context)
    with MessageLease(sqs, settings.inbox_queue_url, event, also=persistence.renew) as lease:
        response = process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
        lease.hand_back(response)
    return dict(response)
