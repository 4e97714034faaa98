"""Leases: a queue message and the idempotency lock of its work are held only while the work is alive.

Lambda's rule for an SQS event source is a queue visibility timeout of at least the function's
timeout (AWS recommends six times it: the queues' 1,800 s for the 300 s scorer and worker), and
powertools' in-progress idempotency record lasts until the invocation's own deadline. Left at
that, an invocation that dies (SIGKILL, out of memory, the sandbox lost) leaves its file or job
waiting up to 30 minutes before anyone resumes it.

So an invocation holds what it works on by lease instead:

- `MessageLease`: at the invocation's start every message of its batch gets MESSAGE_LEASE_S of
  visibility (ChangeMessageVisibility shortens as well as extends), renewed every RENEW_EVERY_S
  by a background thread while the invocation runs;
- `LeasedIdempotencyStore`: powertools' DynamoDB store whose in-progress records last
  LOCK_LEASE_S (never past the invocation's deadline when first taken), renewed on the same beat.

A live invocation keeps both for as long as it needs (up to its timeout). A dead one renews
nothing: its locks lapse within LOCK_LEASE_S, its messages come back within MESSAGE_LEASE_S (the
lock first, so the redelivery is never locked out) and the work resumes from its checkpoint.
A record that failed (an exception, a duplicate of work in progress elsewhere) is handed back to
the queue's own schedule: its visibility becomes the queue's VisibilityTimeout, as without a lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSEvent
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("sif.leases")

MESSAGE_LEASE_S = 45  # a dead invocation's messages come back this long after its last beat, at most
LOCK_LEASE_S = 35  # its in-progress locks lapse sooner, so the redelivery finds them free
RENEW_EVERY_S = 10  # three beats may be missed before a lock lapses
SQS_BATCH = 10  # ChangeMessageVisibilityBatch takes at most 10 entries
IN_PROGRESS = "INPROGRESS"  # powertools' status of an in-progress record


class LeasedIdempotencyStore(DynamoDBPersistenceLayer):
    """Powertools' DynamoDB idempotency store whose in-progress records are leases (see the module).

    `save_inprogress`, `save_success` and `delete_record` are powertools' public extension points;
    the record's key is built with powertools' own helpers (`_get_hashed_idempotency_key`,
    `_get_key`) so a renewal names exactly the item powertools wrote (tests/integration checks it)."""

    def __init__(self, table_name: str, *, lock_s: float = LOCK_LEASE_S, **kwargs: Any) -> None:
        super().__init__(table_name=table_name, **kwargs)
        self.lock_ms = int(lock_s * 1000)
        self._held: set[str] = set()
        self._mutex = threading.Lock()

    def save_inprogress(self, data: dict[str, Any], remaining_time_in_millis: int | None = None) -> None:
        lock_ms = self.lock_ms if remaining_time_in_millis is None else min(self.lock_ms, remaining_time_in_millis)
        super().save_inprogress(data, lock_ms)
        key = self._get_hashed_idempotency_key(data)
        if key is not None:
            with self._mutex:
                self._held.add(key)

    def save_success(self, data: dict[str, Any], result: dict[str, Any]) -> None:
        self._let_go(data)
        super().save_success(data, result)

    def delete_record(self, data: dict[str, Any], exception: Exception) -> None:
        self._let_go(data)
        super().delete_record(data, exception)

    def _let_go(self, data: dict[str, Any]) -> None:
        key = self._get_hashed_idempotency_key(data)
        with self._mutex:
            self._held.discard(key or "")

    @property
    def held(self) -> int:
        with self._mutex:
            return len(self._held)

    def renew(self) -> None:
        """Push the expiry of every lock this process holds LOCK_LEASE_S ahead (only while still in progress)."""
        with self._mutex:
            keys = sorted(self._held)
        until = int(time.time() * 1000) + self.lock_ms
        for key in keys:
            try:
                self.client.update_item(
                    TableName=self.table_name,
                    Key=self._get_key(key),
                    UpdateExpression="SET #lock = :until",
                    ConditionExpression="#status = :in_progress",
                    ExpressionAttributeNames={"#lock": self.in_progress_expiry_attr, "#status": self.status_attr},
                    ExpressionAttributeValues={":until": {"N": str(until)}, ":in_progress": {"S": IN_PROGRESS}},
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                    raise
                with self._mutex:  # finished (or taken over after a lapse) meanwhile: not ours to renew
                    self._held.discard(key)


class MessageLease:
    """The messages of one invocation, held on a short lease renewed from a background thread.

    Use it around the batch: `with MessageLease(...) as lease: response = process_partial_response(...);
    lease.hand_back(response)`. Renewing never fails the invocation: a beat that cannot reach SQS
    or DynamoDB is logged and the next one tries again."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        event: Mapping[str, Any],
        *,
        also: Callable[[], None] | None = None,
        lease_s: int = MESSAGE_LEASE_S,
        every_s: float = RENEW_EVERY_S,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.handles = {r.message_id: r.receipt_handle for r in SQSEvent(dict(event)).records}
        self.also = also
        self.lease_s = lease_s
        self.every_s = every_s
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MessageLease:
        if self.queue_url and self.handles:
            self._beat()
            self._thread = threading.Thread(target=self._loop, name="sif-lease", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._beat()

    def _beat(self) -> None:
        try:
            self._set_visibility(list(self.handles), self.lease_s)
            if self.also is not None:
                self.also()
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not renew the lease of %d message(s): %s", len(self.handles), exc)
        except Exception:  # a beat must never end the heartbeat
            log.exception("the lease beat failed")
        self.beats += 1

    def hand_back(self, response: Mapping[str, Any]) -> None:
        """The records that failed go back on the queue's own schedule (its VisibilityTimeout), not the lease's."""
        failed = [
            str(item["itemIdentifier"])
            for item in response.get("batchItemFailures", [])
            if item.get("itemIdentifier") in self.handles
        ]
        if not failed or not self.queue_url:
            return
        self._stop.set()  # no beat may shorten them again
        if self._thread is not None:
            self._thread.join()
        try:
            attributes = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["VisibilityTimeout"])
            self._set_visibility(failed, int(attributes["Attributes"]["VisibilityTimeout"]))
        except (BotoCoreError, ClientError, KeyError, ValueError) as exc:
            log.warning("failed records keep the lease's visibility (%s s): %s", self.lease_s, exc)

    def _set_visibility(self, message_ids: list[str], seconds: int) -> None:
        for start in range(0, len(message_ids), SQS_BATCH):
            entries = [
                {"Id": str(i), "ReceiptHandle": self.handles[m], "VisibilityTimeout": seconds}
                for i, m in enumerate(message_ids[start : start + SQS_BATCH])
            ]
            resp = self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=entries)
            for failure in resp.get("Failed", []):
                log.warning("message lease not changed: %s %s", failure.get("Code"), failure.get("Message"))
