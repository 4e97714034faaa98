"""CallbackFunction: job and batch callbacks from the callbacks queue, delivered out of the workers' way.

The lifecycle only queues a `CallbackMessage` (`sif_core.announce`); here each one is signed with its
tenant's own secret (read from the tenant's profile, so a rotation applies at once) and POSTed once
per receive (`CallbackSender`). SQS batches go through BatchProcessor with partial batch responses
(the template sets ReportBatchItemFailures): a receiver that fails in a way worth retrying gets its
message back after a backoff (the message's visibility is set to it), up to the queue's
maxReceiveCount, after which SQS moves it to the DLQ; a delivered or final callback (a 3xx, a 4xx
other than 408/429, a refused host) consumes its message. Either way the work's record ends with
`callback_delivered`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import Json

from sif_core import tenants
from sif_core.announce import CallbackMessage, CallbackSender
from sif_core.aws import client, presign_get, table
from sif_core.callbacks import callback_policy_for
from sif_core.dlq import max_receive_count
from sif_core.settings import Settings, get_settings
from sif_core.work import WorkStore


class CallbackRecord(SqsRecordModel):
    body: Json[CallbackMessage]


class CallbackNotDeliveredError(Exception):
    """The attempt failed in a way worth retrying: the record fails and comes back after its backoff."""


def callback_sender(settings: Settings) -> CallbackSender:
    tenants_table, work = table(settings.tenants_table), WorkStore(table(settings.work_table))
    s3 = client("s3")

    def record(message: CallbackMessage, delivered: bool) -> None:
        event = message.event
        work.update(message.tenant, event.kind, event.id, callback_delivered=delivered)

    return CallbackSender(
        secret_of=lambda tenant: tenants.callback_secret(tenants_table, tenant),
        record=record,
        policy=callback_policy_for(settings),
        presign=lambda key: presign_get(s3, settings.results_bucket, key, settings.presign_ttl_s),
    )


settings = get_settings()
logger = Logger()
tracer = Tracer()
processor = BatchProcessor(event_type=EventType.SQS, model=CallbackRecord, raise_on_entire_batch_failure=False)
sender = callback_sender(settings)
sqs = client("sqs")


@cache
def last_receive() -> int:
    return max_receive_count(sqs, settings.callbacks_queue_url)


@tracer.capture_method
def record_handler(record: CallbackRecord) -> dict[str, Any]:
    message = record.body
    attempt = sender.send(message, int(record.attributes.ApproximateReceiveCount or 1), last_receive())
    extra = {"kind": message.event.kind, "id": message.event.id, "tenant": message.tenant, **attempt.as_dict()}
    if attempt.retry_in_s is None:
        logger.info("callback done", extra=extra)
        return attempt.as_dict()
    logger.warning("callback not delivered", extra=extra)
    sqs.change_message_visibility(
        QueueUrl=settings.callbacks_queue_url,
        ReceiptHandle=record.receiptHandle,
        VisibilityTimeout=int(attempt.retry_in_s),
    )
    raise CallbackNotDeliveredError(f"{attempt.result.outcome}: {attempt.result.status or attempt.result.detail}")


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    response = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    return dict(response)  # {"batchItemFailures": [{"itemIdentifier": message id}, ...]}
