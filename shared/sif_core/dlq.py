"""Dead-letter queues: when a failure is final (the last receive), and putting messages back."""

from __future__ import annotations

import json
import logging
from typing import Any

from botocore.exceptions import ClientError

log = logging.getLogger("sif.dlq")


def max_receive_count(sqs: Any, queue_url: str, default: int = 5) -> int:
    """The queue's RedrivePolicy maxReceiveCount: the receive after which SQS dead-letters a message."""
    try:
        attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])["Attributes"]
        return int(json.loads(attrs["RedrivePolicy"])["maxReceiveCount"])
    except (ClientError, KeyError, ValueError, TypeError) as exc:
        log.warning("cannot read the redrive policy of %s (%s); assuming maxReceiveCount=%d", queue_url, exc, default)
        return default


def redrive(sqs: Any, dlq_url: str, queue_url: str, *, limit: int | None = None, wait_s: int = 1) -> int:
    """Move messages from the dead-letter queue back to the source queue (body and attributes kept).

    Each message is sent before it is deleted from the DLQ, so a crash duplicates rather than loses
    one (the worker is idempotent on the job id). Returns how many were moved.
    """
    moved = 0
    while limit is None or moved < limit:
        batch = 10 if limit is None else max(1, min(10, limit - moved))
        resp = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=batch,
            WaitTimeSeconds=wait_s,
            MessageAttributeNames=["All"],
            VisibilityTimeout=60,
        )
        messages = resp.get("Messages", [])
        if not messages:
            break
        for msg in messages:
            kwargs: dict[str, Any] = {"QueueUrl": queue_url, "MessageBody": msg["Body"]}
            if msg.get("MessageAttributes"):
                kwargs["MessageAttributes"] = msg["MessageAttributes"]
            sqs.send_message(**kwargs)
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=msg["ReceiptHandle"])
            moved += 1
    return moved
