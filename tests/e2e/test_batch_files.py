"""Drop-file batch scoring end to end on the local stack, driven with boto3 as a user would.

Files go into the inbox bucket under incoming/{tenant}/{model}/; moto's S3 notification puts the
event on the inbox queue; the local poller invokes the scorer function (its own process, Lambda's
SQS event, partial batch responses); results appear in the results bucket.

The scorer's Timeout is shortened to SCORER_TIMEOUT_S here, so a 10k-row file usually needs several
invocations (hand-offs), and the queue's visibility timeout to just above it, so a failed record is
retried within seconds. (A killed scorer comes back through its lease whatever the queue says: see
test_recovery.py, which runs with the template's own settings.)
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig

from sif_core.filebatch import InboxFile
from sif_core.work import TERMINAL, WorkStore
from sif_emulator.pollers import start_pollers
from sif_emulator.stack import LocalStack
from sif_metering.ledger import UsageLedger
from sif_modelbuild.testimages import make_test_images

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MODEL = "all-minilm-l6-v2"
SCORER_TIMEOUT_S = 12
VISIBILITY_TIMEOUT_S = 15


def corpus() -> list[str]:
    return [t for t in (REPO / "shared" / "data" / "texts.txt").read_text().splitlines() if t.strip()]


def short_texts(n: int) -> list[str]:
    texts = corpus()
    return [f"{texts[i % len(texts)][: 30 + i % 50]} #{i}" for i in range(n)]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


class Inbox:
    """The user's view: boto3 against the emulator, the stack's buckets and tables."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.s3 = stack.client("s3")
        self.sqs = stack.client("sqs")
        self.inbox = stack.bucket("inbox")
        self.results = stack.bucket("results")
        self.tenant = str(stack.demo_tenant["tenant_id"]) if stack.demo_tenant else "t_demo"
        self.work = WorkStore(stack.table("WorkTable"))
        self.ledger = UsageLedger(stack.client("dynamodb"), stack.table_name("usage"))

    def key(self, name: str, model: str = MODEL, tenant: str | None = None) -> str:
        return f"incoming/{tenant or self.tenant}/{model}/{name}"

    def put(self, name: str, body: bytes, model: str = MODEL, tenant: str | None = None) -> InboxFile:
        key = self.key(name, model, tenant)
        resp = self.s3.put_object(Bucket=self.inbox, Key=key, Body=body)
        return InboxFile.parse(self.inbox, key, resp["ETag"], len(body))

    def wait(self, file: InboxFile, timeout_s: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.work.get(file.tenant, "batch", file.batch_id)
            if record is not None and record.status in TERMINAL and record.details.get("etag") == file.etag:
                return record
            time.sleep(0.25)
        raise AssertionError(f"{file.key} did not finish within {timeout_s} s (see {self.stack.state_dir}/logs)")

    def output(self, file: InboxFile, name: str) -> bytes:
        body: bytes = self.s3.get_object(Bucket=self.results, Key=file.output_prefix + name)["Body"].read()
        return body

    def lines(self, file: InboxFile, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.output(file, name).splitlines()]

    def manifest(self, file: InboxFile) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.output(file, "manifest.json"))
        return data

    def usage_events(self, file: InboxFile) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (
            self.stack.table("UsageTable").scan().get("Items", [])  # small table in tests
        )
        return [i for i in items if i["pk"] == f"event#{file.metering_id}"]

    def result_keys(self, file: InboxFile) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=self.results, Prefix=file.output_prefix)
        return sorted(o["Key"][len(file.output_prefix) :] for o in listing.get("Contents", []))


@pytest.fixture(scope="module")
def inbox(local_stack: LocalStack) -> Iterator[Inbox]:
    sqs = local_stack.client("sqs")
    queue = local_stack.ref("InboxQueue")
    original = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["VisibilityTimeout"])["Attributes"]
    sqs.set_queue_attributes(QueueUrl=queue, Attributes={"VisibilityTimeout": str(VISIBILITY_TIMEOUT_S)})
    pollers = start_pollers(local_stack, functions=["ScorerFunction"], timeouts={"ScorerFunction": SCORER_TIMEOUT_S})
    from sif_emulator.batch import start_batch_executor

    executor = start_batch_executor(local_stack)
    try:
        yield Inbox(local_stack)
    finally:
        executor.stop()
        for poller in pollers:
            poller.stop()
        sqs.set_queue_attributes(QueueUrl=queue, Attributes=original)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from sif_emulator.stack import models_dir_from_env
    from sif_inference import LocalDirSource, ModelRegistry

    registry = ModelRegistry(LocalDirSource(models_dir_from_env()), tmp_path_factory.mktemp("fp32-cache"))
    return registry.embedder(MODEL, "fp32")


# ---------------------------------------------------------------------- the big one
def test_10k_rows_come_back_complete_correct_and_in_order(inbox: Inbox, fp32: Any) -> None:
    texts = short_texts(10_000)
    file = inbox.put("ten-thousand.jsonl", jsonl([{"id": f"r{i:05d}", "text": t} for i, t in enumerate(texts)]))
    record = inbox.wait(file, timeout_s=240)
    assert record.status == "succeeded" and record.route == "cpu"
    assert (record.rows, record.succeeded, record.failed) == (10_000, 10_000, 0)
    preds = inbox.lines(file, "predictions.jsonl")
    assert [p["id"] for p in preds] == [f"r{i:05d}" for i in range(10_000)]
    vectors = np.array([p["prediction"] for p in preds], dtype=np.float32)
    assert vectors.shape == (10_000, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    sample = list(range(0, 10_000, 397))
    reference = fp32.embed([texts[i] for i in sample]).vectors
    cosine = (vectors[sample] * reference).sum(axis=1)
    assert cosine.min() > 0.95, cosine.min()
    assert inbox.output(file, "errors.jsonl") == b""
    manifest = inbox.manifest(file)
    assert manifest["rows"] == 10_000 and manifest["model"] == MODEL and manifest["input"]["etag"] == file.etag
    assert inbox.result_keys(file) == ["errors.jsonl", "manifest.json", "predictions.jsonl"]  # checkpoint gone
    (event,) = inbox.usage_events(file)
    assert int(event["inputs"]) == 10_000 and int(event["tokens"]) == manifest["tokens"]


# ---------------------------------------------------------------------- formats and errors
def test_mixed_good_and_bad_rows_give_exact_errors(inbox: Inbox) -> None:
    body = b"\n".join(
        [
            b'{"id": "ok-1", "text": "a perfectly fine row"}',
            b'{"id": "no-text"}',
            b"this is not json",
            b'{"id": "empty", "text": ""}',
            b'{"id": 7, "text": "numeric ids are fine"}',
            b'{"id": "latin1", "text": "caf\xe9"}',
            b'{"id": "too-long", "text": "' + b"a" * 20_001 + b'"}',
            b'["a", "list"]',
            b'{"text": "no id"}',
            b'{"id": "ok-2", "text": "the last row"}',
        ]
    )
    file = inbox.put("mixed rows.jsonl", body)
    record = inbox.wait(file)
    assert record.status == "succeeded" and (record.rows, record.succeeded, record.failed) == (10, 3, 7)
    assert [p["id"] for p in inbox.lines(file, "predictions.jsonl")] == ["ok-1", 7, "ok-2"]
    assert inbox.lines(file, "errors.jsonl") == [
        {"line": 2, "id": "no-text", "error": "missing field 'text'"},
        {"line": 3, "error": "bad JSON: Expecting value at column 1"},
        {"line": 4, "id": "empty", "error": "field 'text' is empty"},
        {"line": 6, "error": "line is not valid UTF-8 (byte 0xe9 at column 30)"},
        {"line": 7, "id": "too-long", "error": "text has 20001 characters; the limit is 20000"},
        {"line": 8, "error": "row is a JSON list, not an object"},
        {"line": 9, "error": "missing field 'id'"},
    ]


def test_gzip_and_csv_score_like_jsonl(inbox: Inbox) -> None:
    texts = short_texts(300)
    texts[5] = 'quoted, with a comma and "quotes"\nand a newline'
    rows = [{"id": f"c{i}", "text": t} for i, t in enumerate(texts)]
    csv_body = "id,text\n" + "".join(f'{r["id"]},"{r["text"].replace(chr(34), chr(34) * 2)}"\n' for r in rows)
    files = {
        "plain": inbox.put("formats/plain.jsonl", jsonl(rows)),
        "gzip": inbox.put("formats/zipped.jsonl.gz", gzip.compress(jsonl(rows))),
        "csv": inbox.put("formats/sheet é.csv", csv_body.encode()),
        "csv.gz": inbox.put("formats/sheet + more.csv.gz", gzip.compress(csv_body.encode())),
    }
    outputs = {}
    for name, file in files.items():
        record = inbox.wait(file)
        assert (record.status, record.rows, record.failed) == ("succeeded", 300, 0), name
        outputs[name] = inbox.output(file, "predictions.jsonl")
    assert len(set(outputs.values())) == 1  # same rows, same windows: byte-identical
    # results/{tenant}/{model}/{file name as dropped}/{etag}/: the extension is part of the name
    assert files["csv"].output_prefix.endswith(f"/formats/sheet é.csv/{files['csv'].etag}/")


def test_empty_file_and_zero_byte_object(inbox: Inbox) -> None:
    for name, body in [("zero-bytes.jsonl", b""), ("blank-lines.jsonl", b"\n\n\n"), ("header-only.csv", b"id,text\n")]:
        file = inbox.put(name, body)
        record = inbox.wait(file)
        assert (record.status, record.rows, record.succeeded, record.failed) == ("succeeded", 0, 0, 0), name
        assert inbox.output(file, "predictions.jsonl") == b""
        assert inbox.output(file, "errors.jsonl") == b""
        assert inbox.manifest(file)["rows"] == 0
        # nothing scored, nothing billed (not even a call): the reservation goes back
        assert inbox.usage_events(file) == [], name
        reservation = inbox.ledger.reservation(file.metering_id)
        assert reservation is not None and reservation.state == "released", name


def test_a_file_that_cannot_be_read_fails_with_a_reason(inbox: Inbox) -> None:
    bad_header = inbox.put("no-text-column.csv", b"id,body\n1,hello\n")
    unknown_model = inbox.put("rows.jsonl", b'{"id": 1, "text": "hi"}\n', model="no-such-model")
    wrong_type = inbox.put("notes.txt", b"hello\n")
    for file, reason in [
        (bad_header, "CSV header has no 'text' column (columns: id, body)"),
        (unknown_model, "unknown model 'no-such-model'"),
        (wrong_type, "unsupported file 'notes.txt': expected .jsonl or .csv, optionally .gz"),
    ]:
        record = inbox.wait(file)
        assert record.status == "failed" and record.error == reason
        assert inbox.manifest(file)["error"] == reason


# ---------------------------------------------------------------------- exactly once
def test_duplicate_events_neither_score_nor_bill_twice(inbox: Inbox) -> None:
    texts = short_texts(1500)
    body = jsonl([{"id": i, "text": t} for i, t in enumerate(texts)])
    key = inbox.key("duplicates.jsonl")
    # A multipart upload: moto announces it twice (Put and CompleteMultipartUpload).
    cfg = TransferConfig(multipart_threshold=64 * 1024, multipart_chunksize=64 * 1024)
    inbox.s3.upload_fileobj(__import__("io").BytesIO(body), inbox.inbox, key, Config=cfg)
    head = inbox.s3.head_object(Bucket=inbox.inbox, Key=key)
    file = InboxFile.parse(inbox.inbox, key, head["ETag"], len(body))
    assert "-" in file.etag  # a multipart ETag
    record = inbox.wait(file)
    assert record.status == "succeeded" and record.rows == 1500
    wait_for_empty_queue(inbox)  # both of moto's events handled
    first = inbox.s3.head_object(Bucket=inbox.results, Key=file.output_prefix + "predictions.jsonl")
    manifest = inbox.manifest(file)
    # AWS may deliver the same event again, any time later: send it ourselves.
    event = {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2026-01-01T00:00:00.000Z",
                "eventName": "ObjectCreated:CompleteMultipartUpload",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "again",
                    "bucket": {"name": inbox.inbox, "arn": f"arn:aws:s3:::{inbox.inbox}"},
                    "object": {"key": key.replace(" ", "+"), "size": len(body), "eTag": file.etag},
                },
            }
        ]
    }
    inbox.sqs.send_message(QueueUrl=inbox.stack.ref("InboxQueue"), MessageBody=json.dumps(event))
    wait_for_empty_queue(inbox)
    again = inbox.s3.head_object(Bucket=inbox.results, Key=file.output_prefix + "predictions.jsonl")
    assert again["ETag"] == first["ETag"] and again["LastModified"] == first["LastModified"]
    (usage,) = inbox.usage_events(file)
    assert int(usage["inputs"]) == 1500
    assert inbox.manifest(file) == manifest


def wait_for_empty_queue(inbox: Inbox, timeout_s: float = 60.0) -> None:
    queue = inbox.stack.ref("InboxQueue")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        attrs = inbox.sqs.get_queue_attributes(
            QueueUrl=queue,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        if attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0":
            return
        time.sleep(0.25)
    raise AssertionError("the inbox queue did not drain")


def test_a_file_replaced_while_it_is_scored_bills_only_the_new_version(inbox: Inbox, local_stack: LocalStack) -> None:
    info, _ = local_stack.create_tenant(f"replace-{uuid.uuid4().hex[:6]}", monthly_calls=0)
    tenant = str(info["tenant_id"])
    old = inbox.put(
        "replaced.jsonl", jsonl([{"id": i, "text": t} for i, t in enumerate(short_texts(8000))]), tenant=tenant
    )

    def scoring() -> bool:
        record = inbox.work.get(tenant, "batch", old.batch_id)
        return record is not None and record.status == "running" and record.rows > 0

    deadline = time.monotonic() + 120
    while not scoring():
        assert time.monotonic() < deadline, "the first version never started scoring"
        time.sleep(0.1)
    new = inbox.put(
        "replaced.jsonl", jsonl([{"id": i, "text": t} for i, t in enumerate(short_texts(500))]), tenant=tenant
    )

    superseded = inbox.wait(old, timeout_s=120)
    assert superseded.status == "failed" and superseded.reason == "superseded", superseded
    assert superseded.error is not None and "was replaced" in superseded.error
    record = inbox.wait(new, timeout_s=120)
    assert record.status == "succeeded" and (record.rows, record.succeeded) == (500, 500)
    assert len(inbox.lines(new, "predictions.jsonl")) == 500
    # The superseded version: outputs aborted (no object, no open upload), a manifest that says why, nothing billed.
    assert inbox.result_keys(old) == ["manifest.json"]
    uploads = inbox.s3.list_multipart_uploads(Bucket=inbox.results, Prefix=old.output_prefix).get("Uploads", [])
    assert uploads == []
    assert inbox.manifest(old)["reason"] == "superseded"
    assert inbox.usage_events(old) == []
    (usage,) = inbox.usage_events(new)
    assert int(usage["inputs"]) == 500
    assert inbox.ledger.month_units(tenant) == 500  # billed: exactly the rows of the result
    assert inbox.ledger.month_reserved(tenant) == 0  # and no reservation left open


# ---------------------------------------------------------------------- routing and recursion
def test_big_image_files_go_to_the_gpu_queue(inbox: Inbox) -> None:
    images = make_test_images()
    rows = [{"id": f"img{i}", "b64": base64.b64encode(images[i % len(images)][1]).decode()} for i in range(20)]
    rows.insert(3, {"id": "broken", "b64": base64.b64encode(b"not an image").decode()})
    file = inbox.put("photos.jsonl", jsonl(rows), model="open-nsfw")
    record = inbox.wait(file, timeout_s=180)
    assert record.route == "gpu" and record.details.get("gpu_job_id")
    assert record.status == "succeeded" and (record.rows, record.succeeded, record.failed) == (21, 20, 1)
    preds = inbox.lines(file, "predictions.jsonl")
    assert [p["id"] for p in preds] == [f"img{i}" for i in range(20)]
    assert all(set(p["prediction"]) == {"sfw", "nsfw"} for p in preds)
    (error,) = inbox.lines(file, "errors.jsonl")
    assert error["line"] == 4 and error["id"] == "broken" and error["error"].startswith("undecodable image")
    assert inbox.manifest(file)["route"] == "gpu"


def test_objects_outside_incoming_and_results_never_trigger(inbox: Inbox) -> None:
    before = inbox.work.table.scan()["Count"]
    dlq = inbox.stack.ref("InboxDLQ")

    def dead() -> str:
        attributes = inbox.sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])
        return str(attributes["Attributes"]["ApproximateNumberOfMessages"])

    dead_before = dead()  # other tests on this stack may have left some there (integration tests poll by hand)
    row = b'{"id": 1, "text": "should never be scored"}\n'
    inbox.s3.put_object(Bucket=inbox.inbox, Key=f"elsewhere/{inbox.tenant}/{MODEL}/stray.jsonl", Body=row)
    inbox.s3.put_object(Bucket=inbox.inbox, Key=f"incomingx/{inbox.tenant}/{MODEL}/stray.jsonl", Body=row)
    inbox.s3.put_object(Bucket=inbox.results, Key=f"incoming/{inbox.tenant}/{MODEL}/stray.jsonl", Body=row)
    # an event for a key outside incoming/ reaching the queue anyway is ignored by the function too
    stray = {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2026-01-01T00:00:00.000Z",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "stray",
                    "bucket": {"name": inbox.inbox, "arn": f"arn:aws:s3:::{inbox.inbox}"},
                    "object": {"key": f"elsewhere/{inbox.tenant}/{MODEL}/stray.jsonl", "size": len(row), "eTag": "x"},
                },
            }
        ]
    }
    inbox.sqs.send_message(QueueUrl=inbox.stack.ref("InboxQueue"), MessageBody=json.dumps(stray))
    wait_for_empty_queue(inbox)
    time.sleep(1.0)
    assert inbox.work.table.scan()["Count"] == before
    listing = inbox.s3.list_objects_v2(Bucket=inbox.results, Prefix=f"results/{inbox.tenant}/{MODEL}/stray")
    assert listing.get("KeyCount", 0) == 0
    assert dead() == dead_before


def test_s3_test_event_is_consumed_quietly(inbox: Inbox, load_event: Any) -> None:
    body = load_event("sqs_inbox_test_event")["Records"][0]["body"]
    inbox.sqs.send_message(QueueUrl=inbox.stack.ref("InboxQueue"), MessageBody=body)
    wait_for_empty_queue(inbox)
