"""The inbox queue's messages, as pydantic models (powertools' S3 and SQS models, loosened where needed).

Three kinds of body arrive on the inbox queue:
- an S3 event notification (object created under incoming/): `InboxS3Event`;
- S3's test event, sent once when the notification is configured: `S3TestEvent` (ignored);
- the scorer's own hand-off, when a file needs another invocation: `Continuation`.

Powertools' S3 record model requires fields (userIdentity, requestParameters, responseElements,
the bucket's ownerIdentity) that AWS sends but emulators may leave out; the scorer reads none of
them, so they are optional here and everything else is validated as powertools does.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.parser.models import S3Model, S3RecordModel, SqsRecordModel
from aws_lambda_powertools.utilities.parser.models.s3 import (
    S3Bucket,
    S3Identity,
    S3Message,
    S3OwnerIdentify,
    S3RequestParameters,
    S3ResponseElements,
)
from pydantic import BaseModel, Field, Json


class InboxS3Bucket(S3Bucket):
    ownerIdentity: S3OwnerIdentify | None = None  # type: ignore[assignment]


class InboxS3Message(S3Message):
    bucket: InboxS3Bucket


class InboxS3Record(S3RecordModel):
    userIdentity: S3Identity | None = None  # type: ignore[assignment]
    requestParameters: S3RequestParameters | None = None  # type: ignore[assignment]
    responseElements: S3ResponseElements | None = None  # type: ignore[assignment]
    s3: InboxS3Message

    @property
    def object_key(self) -> str:
        """The key as stored: S3 events carry it URL-encoded (spaces as '+')."""
        assert self.s3.object is not None
        return unquote_plus(self.s3.object.key)

    @property
    def created(self) -> bool:
        return self.eventName.startswith("ObjectCreated:")


class InboxS3Event(S3Model):
    Records: list[InboxS3Record]  # type: ignore[assignment]


class S3TestEvent(BaseModel):
    """What S3 sends when a notification configuration is saved."""

    Service: str
    Event: Literal["s3:TestEvent"]
    Time: str | None = None
    Bucket: str
    RequestId: str | None = None
    HostId: str | None = None


class Continuation(BaseModel):
    """The scorer's hand-off: carry on with this file (at this ETag) as segment `segment`."""

    sif: Literal["continue"] = "continue"
    bucket: str
    key: str
    etag: str
    size: int = Field(ge=0)
    segment: int = Field(ge=1)


class InboxRecord(SqsRecordModel):
    body: Json[InboxS3Event | S3TestEvent | Continuation]


class FileTask(BaseModel):
    """One unit of work, and the idempotency key's source: bucket, key, ETag and segment."""

    bucket: str
    key: str
    etag: str
    size: int
    segment: int = 0
