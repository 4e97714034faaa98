"""One event schema for jobs and batches: published on the SNS topic and POSTed to a callback_url.

Every event carries the same MessageAttributes (`kind`, `tenant`, `status`, `model`), so an SNS
subscription filter policy on any of them sees both kinds alike.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict

from sif_core.callbacks import CallbackPolicy, HttpPost, deliver_callback, urllib_post

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


@dataclass
class Announcer:
    """Publishes events; `presign` turns an output folder into a URL for callbacks."""

    sns: Any = None
    topic_arn: str = ""
    secret: str | None = None
    policy: CallbackPolicy | None = None  # None: no callbacks (no secret configured)
    post: HttpPost = urllib_post
    presign: Callable[[str], str] | None = None

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

    def call_back(self, url: str, event: WorkEvent, output_key: str | None = None) -> bool:
        """POST the event, signed; False when it was not taken (or callbacks are off)."""
        if self.policy is None or not self.secret:
            log.error(
                "%s %s has a callback_url but no callback secret is configured: not called back", event.kind, event.id
            )
            return False
        if output_key is not None and self.presign is not None:
            event = event.model_copy(update={"output_url": self.presign(output_key)})
        payload = json.loads(event.model_dump_json(exclude_none=True))
        return deliver_callback(url, payload, self.secret, post=self.post, policy=self.policy)
