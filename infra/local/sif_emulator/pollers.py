"""Local event source mappings: every `Type: SQS` event of template.yaml, polled as Lambda polls.

For each function event `{Queue, BatchSize, FunctionResponseTypes, MaximumBatchingWindowInSeconds}`
a poller receives up to BatchSize messages from the queue (with the queue's own visibility
timeout: nothing is overridden), builds the SQS event Lambda would send (`Records` with
messageId, receiptHandle, body, attributes, messageAttributes, md5OfBody, eventSource,
eventSourceARN, awsRegion) and invokes the function in a function instance: a separate process
with the function's environment, its CodeUri on sys.path, its Handler imported once, and a
context whose remaining time follows the function's Timeout (sif_emulator.lambda_runtime; an
invocation past its Timeout is killed, as Lambda kills it).

What happens to the messages is Lambda's rule:
- the function returned and the event source reports batch item failures: every message not
  listed in `batchItemFailures` is deleted; a listed id that is empty or not in the batch
  fails the whole batch;
- the function returned, without ReportBatchItemFailures: all messages are deleted;
- the function raised, timed out or its process died: nothing is deleted.
Messages not deleted come back when their visibility timeout ends, and the queue's own
RedrivePolicy moves a message to its DLQ after maxReceiveCount receives.

Visibility is the queue's business, as on AWS: the poller never sets or resets it after the
receive, so what the function does to its own messages (`ChangeMessageVisibility`: the scorer's
and the worker's leases, `sif_core.leases`, shorten it at once and renew it while they run) is
what decides when a message whose invocation died comes back. moto keeps that per message, with
the receipt handle the event carried, exactly as SQS does.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sif_emulator.deployment import Deployment
from sif_emulator.lambda_runtime import FunctionFailedToStart, FunctionPool, WorkerSpec, function_worker_spec
from sif_tools.template import FunctionSpec, QueueSubscription

log = logging.getLogger("sif_emulator.pollers")

WAIT_TIME_S = 1  # long polling, short enough for a prompt stop
RETRY_AFTER_INIT_ERROR_S = 5.0
MAX_SQS_BATCH = 10  # one ReceiveMessage returns at most 10


def instance_count(default: int = 1) -> int:
    """Concurrent instances per polled function (SIF_LOCAL_POLLER_INSTANCES; Lambda would scale out)."""
    raw = os.environ.get("SIF_LOCAL_POLLER_INSTANCES", "")
    return max(1, int(raw)) if raw.isdigit() else default


def worker_spec(stack: Deployment, fn: FunctionSpec, *, timeout_s: float | None = None) -> WorkerSpec:
    logs = Path(stack.state_dir) / "logs"
    return function_worker_spec(fn, stack.function_env(fn.logical_id), logs, timeout_s=timeout_s)


def sqs_record(message: dict[str, Any], queue_arn: str, region: str) -> dict[str, Any]:
    """One received message as a record of Lambda's SQS event."""
    attributes = {k: str(v) for k, v in message.get("Attributes", {}).items()}
    message_attributes: dict[str, Any] = {}
    for name, value in message.get("MessageAttributes", {}).items():
        entry: dict[str, Any] = {
            "stringListValues": list(value.get("StringListValues", [])),
            "binaryListValues": [base64.b64encode(b).decode() for b in value.get("BinaryListValues", [])],
            "dataType": value["DataType"],
        }
        if "StringValue" in value:
            entry["stringValue"] = value["StringValue"]
        if "BinaryValue" in value:
            entry["binaryValue"] = base64.b64encode(value["BinaryValue"]).decode()
        message_attributes[name] = entry
    record: dict[str, Any] = {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": attributes,
        "messageAttributes": message_attributes,
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }
    if "MD5OfMessageAttributes" in message:
        record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
    return record


def messages_to_delete(
    outcome: str, result: Any, message_ids: list[str], *, report_batch_item_failures: bool
) -> list[str]:
    """Which messages of an invoked batch Lambda deletes, given how the invocation ended."""
    if outcome != "ok":
        return []
    if not report_batch_item_failures:
        return list(message_ids)
    failures = result.get("batchItemFailures") if isinstance(result, dict) else None
    if not failures:
        return list(message_ids)
    failed: set[str] = set()
    for item in failures:
        ident = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not ident or ident not in message_ids:
            return []  # an unusable response fails the whole batch, as Lambda does
        failed.add(str(ident))
    return [m for m in message_ids if m not in failed]


class QueuePoller:
    """One SQS event source mapping: a queue feeding a function, `threads` batches at a time."""

    def __init__(
        self,
        stack: Deployment,
        subscription: QueueSubscription,
        pool: FunctionPool,
        *,
        threads: int = 1,
        wait_time_s: int = WAIT_TIME_S,
    ) -> None:
        self.stack = stack
        self.sub = subscription
        self.pool = pool
        self.queue_url = stack.ref(subscription.queue)
        self.queue_arn = stack.arn(subscription.queue)
        self.batch_size = max(1, subscription.batch_size)
        self.wait_time_s = wait_time_s
        self.sqs = stack.client("sqs")
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"sif-poller-{subscription.function}-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        self.invocations = 0
        self.deleted = 0
        self.failed_batches = 0

    @property
    def name(self) -> str:
        return f"{self.sub.queue} -> {self.sub.function}"

    def start(self) -> QueuePoller:
        for thread in self._threads:
            thread.start()
        log.info("polling %s (batch size %d)", self.name, self.batch_size)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.wait_time_s + 30)
        self.pool.stop()

    # ------------------------------------------------------------ the loop
    def _receive(self) -> list[dict[str, Any]]:
        """Up to BatchSize messages; with a batching window, keep collecting until it ends or the batch is full."""
        messages: list[dict[str, Any]] = []
        window_end = time.monotonic() + self.sub.maximum_batching_window_s
        while not self._stop.is_set():
            want = min(MAX_SQS_BATCH, self.batch_size - len(messages))
            resp = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=want,
                WaitTimeSeconds=self.wait_time_s,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            messages += resp.get("Messages", [])
            if len(messages) >= self.batch_size or time.monotonic() >= window_end:
                break
        return messages

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self._receive()
            except (BotoCoreError, ClientError) as exc:  # the emulator going away at shutdown, mostly
                if self._stop.is_set():
                    return
                log.warning("%s: receive failed: %s", self.name, exc)
                self._stop.wait(1.0)
                continue
            if messages:
                self.deliver(messages)

    def deliver(self, messages: list[dict[str, Any]]) -> str:
        """Invoke the function with these messages as one SQS event; delete what Lambda would delete."""
        event = {"Records": [sqs_record(m, self.queue_arn, self.stack.region) for m in messages]}
        request_id = str(uuid.uuid4())
        try:
            outcome, result = self.pool.invoke(event, request_id)
        except FunctionFailedToStart as exc:
            log.error("%s: the function did not start: %s", self.name, exc)
            outcome, result = "init_error", None
            self._stop.wait(RETRY_AFTER_INIT_ERROR_S)
        self.invocations += 1
        ids = [m["MessageId"] for m in messages]
        delete = set(
            messages_to_delete(outcome, result, ids, report_batch_item_failures=self.sub.report_batch_item_failures)
        )
        if outcome != "ok":
            log.warning("%s: invocation %s ended %s: %s", self.name, request_id, outcome, result)
        if len(delete) < len(ids):
            self.failed_batches += 1
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
            for i, m in enumerate(messages)
            if m["MessageId"] in delete
        ]
        for start in range(0, len(entries), MAX_SQS_BATCH):
            try:
                resp = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries[start : start + 10])
                self.deleted += len(resp.get("Successful", []))
            except (BotoCoreError, ClientError) as exc:  # not deleted is redelivered: at-least-once, as on AWS
                log.warning("%s: delete failed: %s", self.name, exc)
        return outcome


def start_pollers(
    stack: Deployment,
    *,
    functions: Iterable[str] | None = None,
    timeouts: dict[str, float] | None = None,
    instances: int | None = None,
) -> list[QueuePoller]:
    """Start a poller for every SQS event source of the template (or of `functions`, logical ids).

    `timeouts` overrides a function's Timeout (tests shorten it to exercise hand-offs);
    `instances` is how many invocations of each function may run at once (default
    SIF_LOCAL_POLLER_INSTANCES or 1, capped by the event's MaximumConcurrency).
    """
    specs = stack.template.functions()
    wanted = set(functions) if functions is not None else None
    pollers: list[QueuePoller] = []
    try:
        for sub in stack.template.queue_subscriptions():
            if wanted is not None and sub.function not in wanted:
                continue
            if sub.queue not in stack.created:
                log.warning("not polling %s for %s: the queue was not created", sub.queue, sub.function)
                continue
            count = instances or instance_count()
            if sub.maximum_concurrency:
                count = min(count, sub.maximum_concurrency)
            spec = worker_spec(stack, specs[sub.function], timeout_s=(timeouts or {}).get(sub.function))
            pool = FunctionPool(spec, min_instances=1, max_instances=count)
            pool.start()  # the cold start happens now, not on the first message
            pollers.append(QueuePoller(stack, sub, pool, threads=count).start())
    except BaseException:
        for poller in pollers:
            poller.stop()
        raise
    return pollers
