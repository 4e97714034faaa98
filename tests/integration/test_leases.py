"""Leases (sif_core.leases) against the stack in moto: a message held while its work lives and back soon
after it dies; an idempotency lock that lapses when it is not renewed and holds while it is."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig
from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyItemAlreadyExistsError

from sif_core.leases import LeasedIdempotencyStore, MessageLease
from sif_emulator.pollers import sqs_record
from sif_emulator.stack import LocalStack

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(local_stack: LocalStack) -> Iterator[str]:
    """A queue of its own with the template's 30-minute visibility timeout."""
    sqs = local_stack.client("sqs")
    url = sqs.create_queue(QueueName=f"lease-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "1800"})
    yield str(url["QueueUrl"])
    sqs.delete_queue(QueueUrl=url["QueueUrl"])


def receive(sqs: Any, url: str, wait_s: int = 0) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s, AttributeNames=["All"]
    ).get("Messages", [])
    return messages


def event(url: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "Records": [
            sqs_record(m, f"arn:aws:sqs:us-east-1:123456789012:{url.rsplit('/', 1)[-1]}", "us-east-1") for m in messages
        ]
    }


def test_a_dead_holders_messages_come_back_after_the_lease_not_the_queues_timeout(
    local_stack: LocalStack, queue: str
) -> None:
    sqs = local_stack.client("sqs")
    for body in ("one", "two"):
        sqs.send_message(QueueUrl=queue, MessageBody=body)
    held = receive(sqs, queue, wait_s=1)
    assert len(held) == 2
    beats: list[float] = []
    with MessageLease(
        sqs, queue, event(queue, held), also=lambda: beats.append(time.monotonic()), lease_s=2, every_s=0.5
    ):
        time.sleep(3.0)  # alive past the lease: renewed, so nothing comes back
        assert receive(sqs, queue) == []
    assert len(beats) >= 4
    # The holder is gone (no more beats): back within the lease, not 30 minutes.
    time.sleep(2.2)
    again = receive(sqs, queue)
    assert sorted(m["Body"] for m in again) == ["one", "two"]
    assert all(m["Attributes"]["ApproximateReceiveCount"] == "2" for m in again)


def test_failed_records_go_back_on_the_queues_own_schedule(local_stack: LocalStack, queue: str) -> None:
    sqs = local_stack.client("sqs")
    for body in ("ok", "failed"):
        sqs.send_message(QueueUrl=queue, MessageBody=body)
    held = receive(sqs, queue, wait_s=1)
    failed = next(m for m in held if m["Body"] == "failed")
    sqs.set_queue_attributes(QueueUrl=queue, Attributes={"VisibilityTimeout": "1"})  # the queue's retry pace
    with MessageLease(sqs, queue, event(queue, held), lease_s=30, every_s=10) as lease:
        lease.hand_back({"batchItemFailures": [{"itemIdentifier": failed["MessageId"]}]})
    time.sleep(1.5)
    assert [m["Body"] for m in receive(sqs, queue)] == ["failed"]  # "ok" is still leased (Lambda deletes it)


def test_an_idempotency_lock_lapses_unless_renewed(local_stack: LocalStack) -> None:
    table = local_stack.ref("IdempotencyTable")
    config = IdempotencyConfig(event_key_jmespath="[id]")
    holder = LeasedIdempotencyStore(table_name=table, lock_s=2)
    holder.configure(config, "test_leases.holder")
    other = LeasedIdempotencyStore(table_name=table, lock_s=2)
    other.configure(config, "test_leases.holder")
    data = {"id": uuid.uuid4().hex}

    holder.save_inprogress(data, remaining_time_in_millis=300_000)  # a 300 s invocation: locked for 2 s only
    assert holder.held == 1
    for _ in range(4):  # alive for 4 s: the lock holds
        time.sleep(1.0)
        holder.renew()
        with pytest.raises(IdempotencyItemAlreadyExistsError):
            other.save_inprogress(data, remaining_time_in_millis=300_000)
    time.sleep(2.5)  # the holder died: no renewal, the lock lapses
    other.save_inprogress(data, remaining_time_in_millis=300_000)  # taken over
    holder.renew()  # a late beat of the old holder only extends the lock the new one holds
    other.save_success(data, {"done": True})
    assert other.held == 0
    holder.renew()  # completed: nothing is renewed, nothing fails
    assert holder.held == 0
