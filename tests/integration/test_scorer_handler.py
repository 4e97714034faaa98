"""The scorer function's handler, called in-process with SQS events, against the stack in moto.

The sample events in events/ are the templates; keys, ETags and sizes are swapped for objects this
module puts into the inbox. The handler module is imported after the function's environment is
set, as Lambda imports it.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from sif_core.filebatch import InboxFile
from sif_core.work import WorkStore
from sif_emulator.pollers import sqs_record
from sif_emulator.stack import LocalStack
from sif_metering.ledger import UsageLedger

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:No application metrics to publish")]

MODEL = "all-minilm-l6-v2"


@dataclass
class Context:
    """What a Lambda context offers the handler (powertools reads these)."""

    remaining_ms: float = 300_000
    function_name: str = "sif-local-scorerfunction"
    memory_limit_in_mb: int = 3008
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:sif-local-scorerfunction"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _start: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return int(self.remaining_ms - (time.monotonic() - self._start) * 1000)


@pytest.fixture(scope="module")
def scorer(local_stack: LocalStack) -> Iterator[ModuleType]:
    yield from import_scorer(local_stack)


def import_scorer(local_stack: LocalStack) -> Iterator[ModuleType]:
    """The scorer's handler module, imported with the function's environment (as Lambda imports it)."""
    patch = pytest.MonkeyPatch()
    for key, value in local_stack.function_env("ScorerFunction").items():
        patch.setenv(key, value)
    from sif_core.settings import get_settings

    get_settings.cache_clear()
    sys.modules.pop("sif_scorer.handler", None)
    try:
        yield importlib.import_module("sif_scorer.handler")
    finally:
        sys.modules.pop("sif_scorer.handler", None)
        get_settings.cache_clear()
        patch.undo()


@pytest.fixture(scope="module")
def tenant(local_stack: LocalStack) -> Iterator[str]:
    info, _ = local_stack.create_tenant(f"handler-{uuid.uuid4().hex[:6]}", monthly_calls=0)  # unlimited
    tenant = str(info["tenant_id"])
    yield tenant
    # the notifications moto queued for our own uploads: nobody else should ever receive them
    sqs, queue = local_stack.client("sqs"), local_stack.ref("InboxQueue")
    for _ in range(5):
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        for msg in messages:
            if tenant in msg["Body"]:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"])
            else:
                sqs.change_message_visibility(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"], VisibilityTimeout=0)
        if not messages:
            break


def s3_event(load_event: Callable[[str], dict[str, Any]], file: InboxFile) -> dict[str, Any]:
    """events/sqs_inbox_multipart.json, pointed at `file` (key URL-encoded, as S3 sends it)."""
    from urllib.parse import quote_plus

    event = copy.deepcopy(load_event("sqs_inbox_multipart"))
    body = json.loads(event["Records"][0]["body"])
    body["Records"][0]["s3"]["bucket"]["name"] = file.bucket
    body["Records"][0]["s3"]["object"].update(key=quote_plus(file.key, safe="/"), size=file.size, eTag=file.etag)
    event["Records"][0]["body"] = json.dumps(body)
    event["Records"][0]["messageId"] = str(uuid.uuid4())
    return event


def put(stack: LocalStack, tenant: str, name: str, body: bytes) -> InboxFile:
    key = f"incoming/{tenant}/{MODEL}/{name}"
    etag = stack.client("s3").put_object(Bucket=stack.bucket("inbox"), Key=key, Body=body)["ETag"]
    return InboxFile.parse(stack.bucket("inbox"), key, etag, len(body))


def rows(n: int) -> bytes:
    return b"".join(
        json.dumps({"id": i, "text": f"sentence number {i} for the handler"}).encode() + b"\n" for i in range(n)
    )


def output(stack: LocalStack, file: InboxFile, name: str) -> bytes:
    s3 = stack.client("s3")
    body: bytes = s3.get_object(Bucket=stack.bucket("results"), Key=file.output_prefix + name)["Body"].read()
    return body


def take_continuation(stack: LocalStack, file: InboxFile, timeout_s: float = 20) -> dict[str, Any]:
    """The hand-off message for `file` from the inbox queue (S3 notifications about our own puts are dropped)."""
    sqs, queue = stack.client("sqs"), stack.ref("InboxQueue")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for msg in sqs.receive_message(
            QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1, AttributeNames=["All"]
        ).get("Messages", []):
            body = json.loads(msg["Body"])
            ours = file.tenant in msg["Body"]
            if body.get("sif") == "continue" and body["key"] == file.key:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"])
                return dict(msg)
            if ours:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"])
            else:
                sqs.change_message_visibility(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"], VisibilityTimeout=0)
    raise AssertionError(f"no continuation for {file.key} on the inbox queue")


# ---------------------------------------------------------------------- events that score nothing
def test_the_s3_test_event_is_skipped(scorer: ModuleType, load_event: Callable[..., Any]) -> None:
    assert scorer.lambda_handler(load_event("sqs_inbox_test_event"), Context()) == {"batchItemFailures": []}


def test_objects_outside_incoming_are_ignored(
    scorer: ModuleType, load_event: Callable[..., Any], local_stack: LocalStack
) -> None:
    before = local_stack.table("WorkTable").scan()["Count"]
    assert scorer.lambda_handler(load_event("sqs_inbox_outside_incoming"), Context()) == {"batchItemFailures": []}
    assert local_stack.table("WorkTable").scan()["Count"] == before


def test_an_unparseable_message_fails_only_its_record(scorer: ModuleType, load_event: Callable[..., Any]) -> None:
    event = load_event("sqs_inbox_test_event")
    bad = copy.deepcopy(event["Records"][0])
    bad["messageId"] = "poison-1"
    bad["body"] = '{"what": "is this"}'
    event["Records"].append(bad)
    assert scorer.lambda_handler(event, Context()) == {"batchItemFailures": [{"itemIdentifier": "poison-1"}]}


# ---------------------------------------------------------------------- scoring once
def test_a_file_is_scored_once_however_often_it_is_announced(
    scorer: ModuleType, load_event: Callable[..., Any], local_stack: LocalStack, tenant: str
) -> None:
    file = put(local_stack, tenant, "once upon (a) time é.jsonl", rows(50) + b'{"id": "x"}\n')
    event = s3_event(load_event, file)
    assert scorer.lambda_handler(event, Context()) == {"batchItemFailures": []}
    record = WorkStore(local_stack.table("WorkTable")).get(tenant, "batch", file.batch_id)
    assert record is not None and (record.status, record.rows, record.failed) == ("succeeded", 51, 1)
    s3 = local_stack.client("s3")
    first = s3.head_object(Bucket=local_stack.bucket("results"), Key=file.output_prefix + "predictions.jsonl")
    for _ in range(2):  # the same event again (idempotency), then a fresh message id
        assert scorer.lambda_handler(s3_event(load_event, file), Context()) == {"batchItemFailures": []}
    again = s3.head_object(Bucket=local_stack.bucket("results"), Key=file.output_prefix + "predictions.jsonl")
    assert again["LastModified"] == first["LastModified"]
    events = [i for i in local_stack.table("UsageTable").scan()["Items"] if i["pk"] == f"event#{file.metering_id}"]
    assert len(events) == 1 and int(events[0]["inputs"]) == 50


def test_a_short_invocation_hands_the_file_on_and_the_next_one_finishes_it(
    scorer: ModuleType, load_event: Callable[..., Any], local_stack: LocalStack, tenant: str
) -> None:
    body = rows(2500)
    reference = put(local_stack, tenant, "handoff-reference.jsonl", body)
    assert scorer.lambda_handler(s3_event(load_event, reference), Context()) == {"batchItemFailures": []}
    file = put(local_stack, tenant, "handoff.jsonl", body)
    # 1 s left: the scorer gets through one window, checkpoints and queues segment 1
    assert scorer.lambda_handler(s3_event(load_event, file), Context(remaining_ms=1000)) == {"batchItemFailures": []}
    record = WorkStore(local_stack.table("WorkTable")).get(tenant, "batch", file.batch_id)
    assert record is not None and record.status == "running" and 0 < record.rows < 2500
    segments = 1
    while True:
        message = take_continuation(local_stack, file)
        assert json.loads(message["Body"])["segment"] == segments
        event = {"Records": [sqs_record(message, local_stack.arn("InboxQueue"), "us-east-1")]}
        context = Context(remaining_ms=1000 if segments < 2 else 300_000)
        assert scorer.lambda_handler(event, context) == {"batchItemFailures": []}
        segments += 1
        record = WorkStore(local_stack.table("WorkTable")).get(tenant, "batch", file.batch_id)
        assert record is not None
        if record.status == "succeeded":
            break
    assert segments == 3
    assert output(local_stack, file, "predictions.jsonl") == output(local_stack, reference, "predictions.jsonl")
    assert json.loads(output(local_stack, file, "manifest.json"))["segments"] == 3


def test_a_file_over_the_models_row_limit_fails_before_scoring(
    scorer: ModuleType, load_event: Callable[..., Any], local_stack: LocalStack, tenant: str
) -> None:
    file = put(local_stack, tenant, "too-many.jsonl", b'{"id":1,"text":"a"}\n' * 1_000_100)
    assert scorer.lambda_handler(s3_event(load_event, file), Context()) == {"batchItemFailures": []}
    record = WorkStore(local_stack.table("WorkTable")).get(tenant, "batch", file.batch_id)
    assert record is not None and record.status == "failed" and record.rows == 0
    assert record.error is not None and record.error.startswith("the file has about 100")
    assert record.error.endswith("rows; all-minilm-l6-v2 takes at most 1000000 per file")


def test_the_last_receive_marks_the_batch_failed_before_the_dlq(
    scorer: ModuleType,
    load_event: Callable[..., Any],
    local_stack: LocalStack,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    file = put(local_stack, tenant, "doomed.jsonl", rows(3))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the models bucket is down")

    monkeypatch.setattr(scorer.batches, "handle", broken)
    event = s3_event(load_event, file)
    message_id = event["Records"][0]["messageId"]
    event["Records"][0]["attributes"]["ApproximateReceiveCount"] = "4"
    assert scorer.lambda_handler(event, Context()) == {"batchItemFailures": [{"itemIdentifier": message_id}]}
    store = WorkStore(local_stack.table("WorkTable"))
    assert store.get(tenant, "batch", file.batch_id) is None  # not yet: SQS will try again
    event["Records"][0]["attributes"]["ApproximateReceiveCount"] = "5"  # the queue's maxReceiveCount
    assert scorer.lambda_handler(event, Context()) == {"batchItemFailures": [{"itemIdentifier": message_id}]}
    record = store.get(tenant, "batch", file.batch_id)
    assert record is not None and record.status == "failed"
    assert record.error == "gave up after 5 attempts: the models bucket is down"


def test_a_file_replaced_between_segments_is_dropped_and_never_billed(
    scorer: ModuleType, load_event: Callable[..., Any], local_stack: LocalStack, tenant: str
) -> None:
    old = put(local_stack, tenant, "replaced.jsonl", rows(2500))
    # 1 s left: one window, a checkpoint, segment 1 queued
    assert scorer.lambda_handler(s3_event(load_event, old), Context(remaining_ms=1000)) == {"batchItemFailures": []}
    message = take_continuation(local_stack, old)
    new = put(local_stack, tenant, "replaced.jsonl", rows(3))  # new content under the key meanwhile
    event = {"Records": [sqs_record(message, local_stack.arn("InboxQueue"), "us-east-1")]}
    assert scorer.lambda_handler(event, Context()) == {"batchItemFailures": []}  # consumed, not retried

    store = WorkStore(local_stack.table("WorkTable"))
    ledger = UsageLedger(local_stack.client("dynamodb"), local_stack.table_name("usage"))
    record = store.get(tenant, "batch", old.batch_id)
    assert record is not None and record.status == "failed" and record.reason == "superseded"
    s3, results = local_stack.client("s3"), local_stack.bucket("results")
    listing = s3.list_objects_v2(Bucket=results, Prefix=old.output_prefix).get("Contents", [])
    assert [o["Key"][len(old.output_prefix) :] for o in listing] == ["manifest.json"]  # no checkpoint, no output
    assert s3.list_multipart_uploads(Bucket=results, Prefix=old.output_prefix).get("Uploads", []) == []
    reservation = ledger.reservation(old.metering_id)
    assert reservation is not None and reservation.state == "released"
    usage = [i for i in local_stack.table("UsageTable").scan()["Items"] if i["pk"] == f"event#{old.metering_id}"]
    assert usage == []

    assert scorer.lambda_handler(s3_event(load_event, new), Context()) == {"batchItemFailures": []}
    record = store.get(tenant, "batch", new.batch_id)
    assert record is not None and (record.status, record.rows) == ("succeeded", 3)


def test_a_cancel_while_the_upload_arrives_is_kept_and_nothing_is_scored(
    scorer: ModuleType,
    load_event: Callable[..., Any],
    local_stack: LocalStack,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An API batch cancelled between the scorer reading its record and setting it to this upload stays
    cancelled (it once went back to queued, then ran to succeeded)."""
    from sif_core.work import WorkRecord

    file = put(local_stack, tenant, "cancel-race.jsonl", rows(3))
    store = WorkStore(local_stack.table("WorkTable"))
    waiting = WorkRecord(id=file.batch_id, kind="batch", tenant=tenant, model=MODEL, details={"origin": "api"})
    store.create(waiting)  # an API batch waiting for its upload: no etag yet
    ensure = scorer.batches.lc.ensure

    def read_then_cancelled(record: WorkRecord) -> WorkRecord:
        stale = ensure(record)
        assert store.cancel(tenant, "batch", file.batch_id).status == "cancelled"  # the caller cancels now
        return stale

    monkeypatch.setattr(scorer.batches.lc, "ensure", read_then_cancelled)
    assert scorer.lambda_handler(s3_event(load_event, file), Context()) == {"batchItemFailures": []}
    record = store.get(tenant, "batch", file.batch_id)
    assert record is not None and (record.status, record.rows, record.succeeded) == ("cancelled", 0, 0)
    assert "routed" not in record.details
    s3, results = local_stack.client("s3"), local_stack.bucket("results")
    assert s3.list_objects_v2(Bucket=results, Prefix=file.output_prefix).get("KeyCount", 0) == 0
