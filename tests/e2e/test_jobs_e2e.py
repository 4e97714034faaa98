"""Async jobs end to end on the local stack: the HTTP API, the jobs queue with its poller driving the
worker function, the AWS Batch GPU queue with the local executor, callbacks, the DLQ and redrive.

Everything a user or an operator would touch is used as they would: HTTP for the API, boto3 for
putting messages on the queue and looking at tables, `sif jobs redrive` for the DLQ.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from sif_cli.main import main as sif
from sif_core.callbacks import verify_signature
from sif_core.settings import Settings
from sif_core.tenants import callback_secret
from sif_core.work import WorkRecord, WorkStore
from sif_emulator.stack import LocalStack, start_workers
from sif_metering.ledger import UsageLedger

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((REPO / "tests" / "data" / "minilm_reference.json").read_text())
MODEL = "all-minilm-l6-v2"


# ---------------------------------------------------------------------- the stack and its clients
@dataclass
class Jobs:
    """The session's local stack and API, with its queue pollers and local Batch executor running."""

    stack: LocalStack
    api_url: str


@pytest.fixture(scope="module")
def running(local_stack: LocalStack, api_url: str) -> Iterator[Jobs]:
    services = start_workers(local_stack)  # SQS event sources and the Batch executor, as `sif up` starts them
    try:
        yield Jobs(local_stack, api_url)
    finally:
        for service in reversed(services):
            service.stop()


class Client:
    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def post_job(self, body: dict[str, Any]) -> requests.Response:
        return self.session.post(f"{self.url}/v1/jobs", json=body, timeout=60)

    def job(self, job_id: str) -> requests.Response:
        return self.session.get(f"{self.url}/v1/jobs/{job_id}", timeout=30)

    def wait(self, job_id: str, timeout_s: float = 90, until: Callable[[dict[str, Any]], bool] | None = None) -> dict:
        done = until or (lambda s: s["status"] in ("succeeded", "failed"))
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            resp = self.job(job_id)
            if resp.status_code == 200:
                status = resp.json()
                if done(status):
                    return status
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish in {timeout_s} s; last status {status}")

    def usage(self) -> dict[str, Any]:
        resp = self.session.get(f"{self.url}/v1/usage", timeout=30)
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data


@pytest.fixture(scope="module")
def tenant(running: Jobs) -> tuple[str, Client]:
    """A tenant of its own, so usage counts are exact."""
    info, key = running.stack.create_tenant(f"jobs-{uuid.uuid4().hex[:6]}")
    return str(info["tenant_id"]), Client(running.api_url, key)


def new_tenant(running: Jobs) -> tuple[str, Client]:
    info, key = running.stack.create_tenant(f"jobs-{uuid.uuid4().hex[:6]}")
    return str(info["tenant_id"]), Client(running.api_url, key)


def predictions(url: str) -> list[dict[str, Any]]:
    resp = requests.get(url, timeout=60)
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines()]


def assert_matches_reference(rows: list[dict[str, Any]]) -> None:
    assert [r["id"] for r in rows] == list(range(len(REFERENCE["texts"])))
    for row, expected in zip(rows, REFERENCE["embeddings"], strict=True):
        got, want = np.asarray(row["prediction"]), np.asarray(expected)
        cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert got.shape == (384,) and cosine >= 0.97, cosine


def send_job(running: Jobs, body: dict[str, Any] | str) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    running.stack.client("sqs").send_message(QueueUrl=running.stack.queue_url("jobs"), MessageBody=text)


def queue_depth(running: Jobs, key: str) -> int:
    attrs = running.stack.client("sqs").get_queue_attributes(
        QueueUrl=running.stack.queue_url(key),
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def work_record(running: Jobs, tenant_id: str, job_id: str) -> WorkRecord:
    record = WorkStore(running.stack.table("WorkTable")).get(tenant_id, "job", job_id)
    assert record is not None
    return record


def eventually(check: Callable[[], bool], timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


# ---------------------------------------------------------------------- the API path
def test_api_job_runs_on_the_worker_with_correct_output(tenant: tuple[str, Client]) -> None:
    _, client = tenant
    resp = client.post_job({"model": MODEL, "input": {"instances": REFERENCE["texts"]}})
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert accepted["status"] == "queued" and accepted["route"] == "cpu" and accepted["id"].startswith("j_")

    status = client.wait(accepted["id"])
    assert status["status"] == "succeeded", status
    assert status["progress"] == 1.0 and status["rows"] == len(REFERENCE["texts"])
    assert_matches_reference(predictions(status["output_url"]))
    manifest = requests.get(status["manifest_url"], timeout=30).json()
    assert manifest["route"] == "cpu" and manifest["rows"] == len(REFERENCE["texts"])


def test_invalid_jobs_are_refused_at_the_door(tenant: tuple[str, Client]) -> None:
    _, client = tenant
    cases = [
        ({"model": MODEL, "input": {}}, 422),
        ({"model": MODEL, "input": {"instances": [1, 2]}}, 422),
        ({"model": MODEL, "input": {"instances": ["x"]}, "accelerator": "tpu"}, 422),
        ({"model": MODEL, "input": {"instances": ["x"]}, "callback_url": "file:///etc/passwd"}, 422),
        ({"model": MODEL, "input": {"s3_uri": "s3://someone-elses-bucket/data.jsonl"}}, 422),
        ({"model": "no-such-model", "input": {"instances": ["x"]}}, 404),
    ]
    for body, expected in cases:
        resp = client.post_job(body)
        assert resp.status_code == expected, (body, resp.text)
        assert set(resp.json()["error"]) >= {"type", "message", "request_id"}


def test_another_tenant_gets_404(running: Jobs, tenant: tuple[str, Client]) -> None:
    _, owner = tenant
    job_id = owner.post_job({"model": MODEL, "input": {"instances": ["mine"]}}).json()["id"]
    _, other = new_tenant(running)
    resp = other.job(job_id)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found"
    assert other.job("j_doesnotexist").status_code == 404
    assert owner.wait(job_id)["status"] == "succeeded"


# ---------------------------------------------------------------------- straight on the queue
def test_job_put_straight_on_the_queue(running: Jobs, tenant: tuple[str, Client]) -> None:
    tenant_id, client = tenant
    job_id = f"j_raw{uuid.uuid4().hex[:12]}"
    send_job(running, {"id": job_id, "tenant": tenant_id, "model": MODEL, "input": {"instances": ["a", "b", "c"]}})
    status = client.wait(job_id)
    assert status["status"] == "succeeded" and status["rows"] == 3, status
    assert [r["id"] for r in predictions(status["output_url"])] == [0, 1, 2]


def test_unreadable_inputs_fail_with_their_reason_and_bad_rows_only_themselves(
    running: Jobs, tenant: tuple[str, Client]
) -> None:
    tenant_id, client = tenant
    inbox = running.stack.bucket("inbox")
    key = f"uploads/{tenant_id}/{uuid.uuid4().hex[:8]}.jsonl"
    running.stack.client("s3").put_object(Bucket=inbox, Key=key, Body=b'{"id": 1, "text": "ok"}\n{"id": 2, "text": ')
    missing, bad_rows = f"j_missing{uuid.uuid4().hex[:8]}", f"j_badrows{uuid.uuid4().hex[:8]}"
    for job_id, uri in ((missing, f"s3://{inbox}/{key}.nope"), (bad_rows, f"s3://{inbox}/{key}")):
        send_job(running, {"id": job_id, "tenant": tenant_id, "model": MODEL, "input": {"s3_uri": uri}})
    failed_missing, with_bad_row = client.wait(missing), client.wait(bad_rows)
    assert failed_missing["status"] == "failed" and "unknown format" in failed_missing["error"]
    assert with_bad_row["status"] == "succeeded" and with_bad_row["rows"] == 2, with_bad_row
    assert [r["id"] for r in predictions(with_bad_row["output_url"])] == [1]
    gone = f"j_gone{uuid.uuid4().hex[:8]}"
    send_job(
        running, {"id": gone, "tenant": tenant_id, "model": MODEL, "input": {"s3_uri": f"s3://{inbox}/{key}x.jsonl"}}
    )
    failed_gone = client.wait(gone)
    assert failed_gone["status"] == "failed" and "404" in failed_gone["error"], failed_gone
    # a file unreadable as a whole is a property of the data: failed at the first receive, never retried
    zipped = f"uploads/{tenant_id}/{uuid.uuid4().hex[:8]}.jsonl.gz"
    running.stack.client("s3").put_object(Bucket=inbox, Key=zipped, Body=b"this is not gzip")
    corrupt = f"j_corrupt{uuid.uuid4().hex[:8]}"
    send_job(
        running, {"id": corrupt, "tenant": tenant_id, "model": MODEL, "input": {"s3_uri": f"s3://{inbox}/{zipped}"}}
    )
    failed_corrupt = client.wait(corrupt, timeout_s=60)  # a retry would wait out the queue's 30 minutes
    assert failed_corrupt["status"] == "failed" and "not a valid gzip file" in failed_corrupt["error"], failed_corrupt
    assert work_record(running, tenant_id, corrupt).reason == "bad_file"


@pytest.fixture(scope="module")
def job_events(running: Jobs) -> Callable[[str], list[dict[str, Any]]]:
    """An SQS queue subscribed to the job events topic; returns a reader of one job's events."""
    sqs, sns = running.stack.client("sqs"), running.stack.client("sns")
    url = sqs.create_queue(QueueName=f"job-events-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    topic = running.stack.ref("JobEventsTopic")
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"})
    seen: list[dict[str, Any]] = []

    def events_of(job_id: str) -> list[dict[str, Any]]:
        while True:
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
            if not messages:
                return [e for e in seen if e["id"] == job_id]
            for message in messages:
                seen.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    return events_of


def test_duplicate_message_one_run_one_bill(running: Jobs, job_events: Callable[[str], list[dict[str, Any]]]) -> None:
    tenant_id, client = new_tenant(running)
    job_id = f"j_dup{uuid.uuid4().hex[:12]}"
    body = {"id": job_id, "tenant": tenant_id, "model": MODEL, "input": {"instances": ["one", "two", "three", "four"]}}
    send_job(running, body)
    send_job(running, body)  # SQS delivers at least once; a producer may also send twice
    assert client.wait(job_id)["status"] == "succeeded"
    eventually(lambda: queue_depth(running, "jobs") == 0, what="both messages consumed")

    assert work_record(running, tenant_id, job_id).details["runs"] == 1
    total = client.usage()["total"]
    assert total["calls"] == 1 and total["inputs"] == 4, total
    (event,) = job_events(job_id)  # announced once, too
    assert event["type"] == "job.succeeded" and event["tenant"] == tenant_id and event["rows"] == 4


def test_a_job_id_sent_again_with_other_content_is_a_conflict(
    running: Jobs, job_events: Callable[[str], list[dict[str, Any]]]
) -> None:
    tenant_id, client = new_tenant(running)
    job_id = f"j_conflict{uuid.uuid4().hex[:10]}"
    first = {"id": job_id, "tenant": tenant_id, "model": MODEL, "input": {"instances": ["one", "two", "three"]}}
    send_job(running, first)
    done = client.wait(job_id)
    assert done["status"] == "succeeded" and done["rows"] == 3
    output = requests.get(done["output_url"], timeout=30).content

    send_job(running, {**first, "input": {"instances": ["something", "else"]}})  # a raw producer reusing the id
    eventually(lambda: work_record(running, tenant_id, job_id).details.get("conflicts") == 1, what="the conflict")
    eventually(lambda: queue_depth(running, "jobs") == 0, what="the conflicting message consumed")
    after = client.job(job_id).json()
    assert (after["status"], after["rows"], after["succeeded"]) == ("succeeded", 3, 3)
    assert requests.get(after["output_url"], timeout=30).content == output  # the first job untouched
    assert work_record(running, tenant_id, job_id).details["runs"] == 1
    total = client.usage()["total"]
    assert total["calls"] == 1 and total["inputs"] == 3, total
    assert [e["type"] for e in job_events(job_id)] == ["job.succeeded"]


# ---------------------------------------------------------------------- failures, the DLQ and redrive
@pytest.fixture
def quick_retries(running: Jobs) -> Iterator[None]:
    """Failed messages come back after 1 s instead of the template's 30 min (restored after)."""
    sqs, url = running.stack.client("sqs"), running.stack.queue_url("jobs")
    before = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])["Attributes"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "1"})
    time.sleep(2.5)  # a long poll already waiting took the old timeout: let it end (the poller waits 1 s)
    try:
        yield
    finally:
        sqs.set_queue_attributes(QueueUrl=url, Attributes=before)


def test_an_invalid_job_message_fails_at_its_first_receive(running: Jobs, tenant: tuple[str, Client]) -> None:
    """A schema error is a property of the data: the job fails at once and the message is consumed."""
    tenant_id, client = tenant
    dead_letters = queue_depth(running, "jobs_dlq")
    job_id = f"j_invalid{uuid.uuid4().hex[:8]}"
    send_job(running, {"id": job_id, "tenant": tenant_id, "model": MODEL, "input": {"instances": "not a list"}})
    # no quick retries here: a retry would come back after the queue's 30 minutes, long past this wait
    status = client.wait(job_id, timeout_s=60)
    assert status["status"] == "failed"
    assert status["error"] == "invalid job message: input.instances: Input should be a valid array", status
    record = work_record(running, tenant_id, job_id)
    assert record.reason == "invalid_message" and "gave up" not in str(record.error)
    eventually(lambda: queue_depth(running, "jobs") == 0, what="the invalid message consumed")
    assert queue_depth(running, "jobs_dlq") == dead_letters


def test_a_message_naming_no_job_dead_letters_after_max_receives_and_redrives(
    running: Jobs, quick_retries: None
) -> None:
    """What names no job cannot be failed visibly: it is retried, then dead-lettered, and redrive puts it back."""
    sqs, dlq = running.stack.client("sqs"), running.stack.queue_url("jobs_dlq")
    before = queue_depth(running, "jobs_dlq")
    marker = f"not a job {uuid.uuid4().hex}"
    send_job(running, marker)
    eventually(lambda: queue_depth(running, "jobs_dlq") == before + 1, timeout_s=60, what="the message in the DLQ")

    def dead_lettered() -> dict[str, Any] | None:
        messages = sqs.receive_message(
            QueueUrl=dlq, MaxNumberOfMessages=10, AttributeNames=["All"], VisibilityTimeout=0, WaitTimeSeconds=0
        )
        return next((m for m in messages.get("Messages", []) if m["Body"] == marker), None)

    message = eventually_value(dead_lettered, what="the message readable in the DLQ")
    assert int(message["Attributes"]["ApproximateReceiveCount"]) >= 1
    stack_json = str(running.stack.stack_json_path)
    assert sif(["--stack-json", stack_json, "jobs", "redrive"]) == 0
    assert queue_depth(running, "jobs_dlq") == 0
    # Back on the jobs queue, the worker takes it again (five more receives) and it returns to the DLQ.
    eventually(lambda: queue_depth(running, "jobs_dlq") >= 1, timeout_s=60, what="the redriven message back")
    assert dead_lettered() is not None
    sqs.purge_queue(QueueUrl=dlq)  # leave the DLQ as the other tests found it


def eventually_value(check: Callable[[], Any], timeout_s: float = 60, what: str = "value") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


# ---------------------------------------------------------------------- progress
def test_a_staged_job_reports_byte_progress_while_it_runs(running: Jobs) -> None:
    """Instances too big for one SQS message are staged in S3 and read as that file: progress moves."""
    tenant_id, client = new_tenant(running)
    texts = [f"{REFERENCE['texts'][3]} (copy {i})" for i in range(3000)]  # ~290 KB: over one SQS message
    resp = client.post_job({"model": MODEL, "input": {"instances": texts}})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    seen: list[float] = []

    def sampled(status: dict[str, Any]) -> bool:
        if status["status"] == "running":
            seen.append(float(status["progress"]))
        return status["status"] in ("succeeded", "failed")

    status = client.wait(job_id, timeout_s=180, until=sampled)
    assert status["status"] == "succeeded" and status["rows"] == 3000 and status["progress"] == 1.0, status
    assert str(work_record(running, tenant_id, job_id).input_key).startswith("s3://")  # staged
    assert any(0 < p < 1 for p in seen), seen


# ---------------------------------------------------------------------- the GPU path
def test_gpu_route_job_runs_through_batch_and_the_local_executor(running: Jobs) -> None:
    tenant_id, client = new_tenant(running)
    resp = client.post_job({"model": MODEL, "input": {"instances": REFERENCE["texts"]}, "accelerator": "gpu"})
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert accepted["route"] == "gpu"
    status = client.wait(accepted["id"], timeout_s=120)
    assert status["status"] == "succeeded", status
    assert_matches_reference(predictions(status["output_url"]))
    manifest = requests.get(status["manifest_url"], timeout=30).json()
    assert manifest["route"] == "gpu" and manifest["provider"] == "CPUExecutionProvider"
    assert manifest["kind"] == "job" and manifest["status"] == "succeeded"

    record = work_record(running, tenant_id, accepted["id"])
    batch = running.stack.client("batch")
    (described,) = batch.describe_jobs(jobs=[record.details["batch_job_id"]])["jobs"]
    assert described["parameters"]["spec"].endswith(f"/_specs/job-{accepted['id']}.json")
    assert described["jobQueue"] == running.stack.ref("GpuJobQueue")

    rows = UsageLedger(running.stack.client("dynamodb"), running.stack.table_name("usage")).rows(
        tenant_id, date_of(record.created_at), date_of(time.time())
    )
    assert sum(r.calls for r in rows) == 1 and sum(r.inputs for r in rows) == len(REFERENCE["texts"])
    assert sum(r.gpu_ms for r in rows) > 0


def test_gpu_job_whose_container_dies_is_failed_by_the_batch_event(running: Jobs) -> None:
    tenant_id, client = new_tenant(running)
    job_id = f"j_crash{uuid.uuid4().hex[:8]}"
    WorkStore(running.stack.table("WorkTable")).create(
        WorkRecord(id=job_id, kind="job", tenant=tenant_id, model=MODEL, route="gpu")
    )
    results = running.stack.bucket("results")
    spec_key = f"results/{tenant_id}/_specs/job-{job_id}.json"
    running.stack.client("s3").put_object(Bucket=results, Key=spec_key, Body=b"{not a spec")  # the worker dies
    running.stack.client("batch").submit_job(
        jobName=f"sif-job-{job_id}",
        jobQueue=running.stack.ref("GpuJobQueue"),
        jobDefinition=running.stack.ref("GpuJobDefinition"),
        parameters={"spec": f"s3://{results}/{spec_key}"},
    )
    status = client.wait(job_id, timeout_s=120)
    assert status["status"] == "failed"
    assert "the GPU job failed in AWS Batch" in status["error"], status


# ---------------------------------------------------------------------- callbacks
class Hook:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.calls.append((dict(self.headers), body))
                self.send_response(503 if len(hook.calls) == 1 else 204)  # the first delivery is refused
                self.end_headers()
                if len(hook.calls) > 1:
                    hook.arrived.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/sif"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_callback_is_signed_and_retried(running: Jobs, tenant: tuple[str, Client]) -> None:
    """Delivered by the callback function from the callbacks queue, signed with the tenant's own secret."""
    tenant_id, client = tenant
    hook = Hook()
    try:
        resp = client.post_job({"model": MODEL, "input": {"instances": ["call me back"]}, "callback_url": hook.url})
        job_id = resp.json()["id"]
        assert hook.arrived.wait(60), "no callback arrived"
    finally:
        hook.server.shutdown()
    secret = callback_secret(running.stack.table("TenantsTable"), tenant_id)
    assert secret and "SIF_CALLBACK_SECRET" not in running.stack.function_env("WorkerFunction")
    assert len(hook.calls) == 2  # refused once (503), retried with backoff (the queue's), taken
    for headers, body in hook.calls:
        assert verify_signature(secret, headers, body)
        assert not verify_signature("some-other-secret", headers, body)
    payload = json.loads(hook.calls[-1][1])
    assert payload["id"] == job_id and payload["status"] == "succeeded" and payload["rows"] == 1
    assert len(predictions(payload["output_url"])) == 1
    table = running.stack.table("WorkTable")
    key = WorkStore.key(tenant_id, "job", job_id)
    eventually(
        lambda: table.get_item(Key=key, ConsistentRead=True)["Item"].get("callback_delivered") is True,
        timeout_s=30,
        what="callback_delivered recorded",
    )


def date_of(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).date()


# ---------------------------------------------------------------------- the worker's time running out
def test_cpu_job_that_outgrows_the_worker_is_handed_to_the_gpu_queue(
    running: Jobs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker function's own code path, in-process, with an invocation whose time is already up."""
    from sif_core.jobs import JobMessage, Jobs
    from sif_core.lifecycle import CoreServices, Lifecycle
    from sif_core.model_store import S3ModelSource
    from sif_core.scoring import Deadline
    from sif_inference.registry import ModelRegistry

    for name, value in running.stack.function_env("WorkerFunction").items():
        monkeypatch.setenv(name, value)
    stack, settings = running.stack, Settings.from_env()
    s3 = stack.client("s3")
    runner = Jobs(
        Lifecycle(
            CoreServices(
                settings=settings,
                s3=s3,
                store=WorkStore(stack.table("WorkTable")),
                ledger=UsageLedger(stack.client("dynamodb"), settings.usage_table),
                registry=ModelRegistry(S3ModelSource(s3, settings.models_bucket), tmp_path),
                batch=stack.client("batch"),
            )
        )
    )
    tenant_id, client = new_tenant(running)
    texts = [f"text number {i}" for i in range(1100)]  # two chunks: one runs here, then time is up
    job = JobMessage(id=f"j_handoff{uuid.uuid4().hex[:8]}", tenant=tenant_id, model=MODEL, input={"instances": texts})
    outcome = runner.handle(job, Deadline(lambda: 0.0, margin_ms=1000))
    assert outcome.status == "submitted" and outcome.route == "gpu", outcome

    status = client.wait(job.id, timeout_s=120)
    assert status["status"] == "succeeded" and status["route"] == "gpu" and status["rows"] == 1100, status
    record = work_record(running, tenant_id, job.id)
    assert record.details["handed_off"].startswith("the invocation's time ran out after 1024 rows")
    assert client.usage()["total"]["calls"] == 1
