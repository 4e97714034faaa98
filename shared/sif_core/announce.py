"""One event schema for jobs and batches: published on the SNS topic and POSTed to a callback_url.

Every event carries the same MessageAttributes (`kind`, `tenant`, `status`, `model`), so an SNS
subscription filter policy on any of them sees both kinds alike.

Callbacks go out of band: the lifecycle only queues a `CallbackMessage` on the callbacks queue
(`Announcer.queue_callback`); the callback function (functions/callbacks) hands each one to a
`CallbackSender`, which signs it with the tenant's own secret and makes one attempt per receive. A
receiver that fails with a network error, a timeout, 408, 429 or a 5xx is tried again when the message
comes back (the message's visibility is the backoff), up to the queue's maxReceiveCount, after which
SQS moves it to the DLQ; a 3xx (never followed), any other 4xx or a refused host is final. Either
way the work's record says `callback_delivered`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from sif_core.callbacks import (
    CallbackPolicy,
    Connector,
    DeliveryResult,
    Resolver,
    check_callback_url,
    deliver,
    signed_headers,
    system_resolver,
    tcp_connect,
)

log = logging.getLogger("sif.announce")

ATTRIBUTES = ("kind", "tenant", "status", "model")


class WorkEvent(BaseModel):
    """What happened to a job or batch. `output` is the s3:// folder of its outputs once it has them."""

    model_config = ConfigDict(extra="forbid")

    type: str  # "{kind}.{status}", e.g. "batch.succeeded"
    kind: Literal["job", "batch"]
    id: str
    tenant: str
    model: str
    status: str
    route: Literal["cpu", "gpu"] = "cpu"
    rows: int | None = None
    succeeded: int | None = None
    failed: int | None = None
    output: str | None = None
    output_url: str | None = None  # a presigned GET of predictions.jsonl (callbacks only)
    error: str | None = None
    reason: str | None = None  # a short machine-readable cause: quota_exceeded, cancelled, ...
    at: float

    @classmethod
    def of(cls, kind: Literal["job", "batch"], status: str, **fields: Any) -> WorkEvent:
        return cls(type=f"{kind}.{status}", kind=kind, status=status, at=round(time.time(), 3), **fields)

    def attributes(self) -> dict[str, dict[str, str]]:
        return {name: {"DataType": "String", "StringValue": str(getattr(self, name))} for name in ATTRIBUTES}


class CallbackMessage(BaseModel):
    """A callback to deliver: the body of a message on the callbacks queue (template.yaml's CallbacksQueue)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    tenant: str  # whose secret signs it (and always the event's tenant)
    url: str
    event: WorkEvent
    output_key: str | None = None  # results-bucket key of predictions.jsonl: presigned at each attempt

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return str(check_callback_url(value))

    @model_validator(mode="after")
    def _one_tenant(self) -> CallbackMessage:
        if self.event.tenant != self.tenant:
            raise ValueError("a callback is signed for the tenant of its event")
        if self.output_key is not None and not self.output_key.startswith(f"results/{self.tenant}/"):
            raise ValueError("a callback links only its own tenant's results")
        return self


@dataclass
class Announcer:
    """Publishes events on the SNS topic and queues callbacks for the callback function."""

    sns: Any = None
    topic_arn: str = ""
    sqs: Any = None
    callbacks_queue_url: str = ""

    def publish(self, event: WorkEvent) -> None:
        if self.sns is None or not self.topic_arn:
            return
        try:
            self.sns.publish(
                TopicArn=self.topic_arn,
                Message=event.model_dump_json(exclude_none=True, exclude={"output_url"}),
                MessageAttributes=event.attributes(),
            )
        except ClientError as exc:  # an announcement must never undo finished work
            log.warning("could not publish %s %s: %s", event.type, event.id, exc)

    def queue_callback(self, url: str, event: WorkEvent, output_key: str | None = None) -> bool:
        """Queue the event for delivery to `url` (the callback function delivers it); False when it could
        not be queued. Never blocks on the receiver: that is the point of the queue."""
        if self.sqs is None or not self.callbacks_queue_url:
            log.error("%s %s has a callback_url but no callbacks queue is configured", event.kind, event.id)
            return False
        try:
            message = CallbackMessage(tenant=event.tenant, url=url, event=event, output_key=output_key)
            self.sqs.send_message(QueueUrl=self.callbacks_queue_url, MessageBody=message.model_dump_json())
        except (ValueError, ClientError, BotoCoreError) as exc:  # a callback must never undo finished work
            log.warning("could not queue the callback of %s %s: %s", event.kind, event.id, exc)
            return False
        return True


@dataclass(frozen=True)
class Attempt:
    """What one receive of a callback message came to; `retry_in_s` None: the message is done with."""

    result: DeliveryResult
    attempt: int
    retry_in_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.result.outcome == "delivered"

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.result.outcome,
            "status": self.result.status,
            "detail": self.result.detail,
            "attempt": self.attempt,
            "retry_in_s": self.retry_in_s,
        }


@dataclass
class CallbackSender:
    """One delivery attempt of a queued callback: sign with the tenant's secret, POST, record the outcome.

    `secret_of` reads the tenant's current secret (so a rotation applies to the next attempt),
    `record(message, delivered)` sets `callback_delivered` on the work's record once the outcome is
    final, `presign` makes a fresh output_url for each attempt."""

    secret_of: Callable[[str], str | None]
    record: Callable[[CallbackMessage, bool], None]
    policy: CallbackPolicy
    presign: Callable[[str], str] | None = None
    resolve: Resolver = system_resolver
    connect: Connector = tcp_connect

    def send(self, message: CallbackMessage, attempt: int, last_attempt: int) -> Attempt:
        """Attempt number `attempt` of `last_attempt` (the queue's maxReceiveCount)."""
        event = message.event
        secret = self.secret_of(message.tenant)
        if not secret:
            log.error("tenant %s has no callback secret: %s %s not called back", message.tenant, event.kind, event.id)
            result = DeliveryResult("final", detail="the tenant has no callback secret")
        else:
            if message.output_key is not None and self.presign is not None:
                event = event.model_copy(update={"output_url": self.presign(message.output_key)})
            body = event.model_dump_json(exclude_none=True).encode("utf-8")
            headers = signed_headers(secret, body, event.type)
            result = deliver(message.url, body, headers, self.policy, resolve=self.resolve, connect=self.connect)
        retry = result.outcome == "retry"
        if not retry or attempt >= last_attempt:
            self.record(message, result.outcome == "delivered")
        if not retry:
            return Attempt(result, attempt)
        # The last receive goes straight back (and SQS moves it to the DLQ on the next receive).
        return Attempt(result, attempt, 0.0 if attempt >= last_attempt else self.policy.retry_delay(attempt))
