"""One core behind every path, end to end on the local stack: the same file as a dropped batch and as
an `s3_uri` job gives the same bytes and one manifest schema, billed once each; results never
overwrite; bad rows fail only themselves on every path; SNS events of both kinds carry the same
attributes; and a tenant's quota holds across API calls, jobs and dropped files running together.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from sif_core.filebatch import InboxFile
from sif_core.work import TERMINAL, WorkStore
from sif_emulator.stack import LocalStack, start_workers
from sif_metering.ledger import UsageLedger

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
MODEL = "all-minilm-l6-v2"
ATTRIBUTES = {"kind", "tenant", "status", "model"}


@dataclass
class Tenant:
    id: str
    key: str
    stack: LocalStack
    api_url: str

    def post(self, path: str, body: Any) -> requests.Response:
        return requests.post(f"{self.api_url}{path}", json=body, headers=self.headers, timeout=60)

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.api_url}{path}", headers=self.headers, timeout=60)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def drop(self, name: str, body: bytes) -> InboxFile:
        s3, inbox = self.stack.client("s3"), self.stack.bucket("inbox")
        key = f"incoming/{self.id}/{MODEL}/{name}"
        etag = s3.put_object(Bucket=inbox, Key=key, Body=body)["ETag"]
        return InboxFile.parse(inbox, key, etag, len(body))

    def upload(self, name: str, body: bytes) -> str:
        inbox = self.stack.bucket("inbox")
        key = f"uploads/{self.id}/{name}"
        self.stack.client("s3").put_object(Bucket=inbox, Key=key, Body=body)
        return f"s3://{inbox}/{key}"

    def batch(self, file: InboxFile, timeout_s: float = 120) -> Any:
        store = WorkStore(self.stack.table("WorkTable"))
        return wait_for(
            lambda: _finished(store.get(self.id, "batch", file.batch_id), file.etag), timeout_s, f"batch {file.key}"
        )

    def job(self, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            status: dict[str, Any] = self.get(f"/v1/jobs/{job_id}").json()
            return status if status["status"] in TERMINAL else None

        result: dict[str, Any] = wait_for(done, timeout_s, f"job {job_id}")
        return result

    def read(self, prefix: str, name: str) -> bytes:
        body: bytes = (
            self.stack.client("s3").get_object(Bucket=self.stack.bucket("results"), Key=prefix + name)["Body"].read()
        )
        return body

    def billed(self) -> tuple[int, int]:
        """(inputs billed this month by the usage rows, the month's quota units counter)."""
        usage = self.get("/v1/usage").json()
        ledger = UsageLedger(self.stack.client("dynamodb"), self.stack.ref("UsageTable"))
        return int(usage["total"]["inputs"]), ledger.month_units(self.id)


def _finished(record: Any, etag: str) -> Any:
    if record is not None and record.status in TERMINAL and record.details.get("etag") == etag:
        return record
    return None


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not finish within {timeout_s} s")


@pytest.fixture(scope="module")
def running(local_stack: LocalStack, api_url: str) -> Iterator[tuple[LocalStack, str]]:
    services = start_workers(local_stack)  # SQS event sources and the Batch executor, as `sif up` starts them
    try:
        yield local_stack, api_url
    finally:
        for service in reversed(services):
            service.stop()


@pytest.fixture
def new_tenant(running: tuple[LocalStack, str]) -> Callable[..., Tenant]:
    stack, api_url = running

    def make(monthly_calls: int = 0) -> Tenant:
        info, key = stack.create_tenant(f"core-{uuid.uuid4().hex[:6]}", monthly_calls=monthly_calls)
        return Tenant(str(info["tenant_id"]), key, stack, api_url)

    return make


def rows_file(n: int, bad: set[int] | None = None) -> bytes:
    texts = [t for t in (REPO / "shared" / "data" / "texts.txt").read_text().splitlines() if t.strip()]
    lines = []
    for i in range(n):
        if bad and i in bad:  # a lone surrogate, broken JSON, an empty text
            broken = [f'{{"id": {i}, "text": "\\ud800"}}', f'{{"id": {i}, "text": ', json.dumps({"id": i, "text": ""})]
            lines.append(broken[i % 3])
        else:
            lines.append(json.dumps({"id": i, "text": texts[i % len(texts)]}))
    return ("\n".join(lines) + "\n").encode()


# ---------------------------------------------------------------------- one engine, one schema
def test_the_same_file_as_a_batch_and_as_a_job_gives_the_same_bytes_billed_once_each(
    new_tenant: Callable[..., Tenant],
) -> None:
    tenant = new_tenant()
    data = rows_file(303, bad={9, 10, 251})
    file = tenant.drop("reviews.jsonl", data)
    resp = tenant.post("/v1/jobs", {"model": MODEL, "input": {"s3_uri": tenant.upload("reviews.jsonl", data)}})
    assert resp.status_code == 202, resp.text
    job = tenant.job(resp.json()["id"])
    batch = tenant.batch(file)

    assert job["status"] == "succeeded" and batch.status == "succeeded"
    assert (batch.rows, batch.succeeded, batch.failed) == (303, 300, 3)
    job_prefix = f"results/{tenant.id}/{MODEL}/{job['id']}/"
    for name in ("predictions.jsonl", "errors.jsonl"):
        assert tenant.read(job_prefix, name) == tenant.read(file.output_prefix, name), name
    errors = [json.loads(line) for line in tenant.read(job_prefix, "errors.jsonl").splitlines()]
    assert [e["line"] for e in errors] == [10, 11, 252]
    job_manifest = json.loads(tenant.read(job_prefix, "manifest.json"))
    batch_manifest = json.loads(tenant.read(file.output_prefix, "manifest.json"))
    assert set(job_manifest) == set(batch_manifest)
    assert (job_manifest["kind"], batch_manifest["kind"]) == ("job", "batch")
    for field in ("status", "rows", "succeeded", "failed", "model", "version", "variant", "sha256", "tokens"):
        assert job_manifest[field] == batch_manifest[field], field
    # Each scored and billed once: 300 good rows each, nothing for the bad ones.
    billed, units = tenant.billed()
    assert billed == 600 and units == 600


def test_a_job_never_scores_a_dropped_file_a_second_time(new_tenant: Callable[..., Tenant]) -> None:
    tenant = new_tenant()
    file = tenant.drop("dropped.jsonl", rows_file(3))
    resp = tenant.post("/v1/jobs", {"model": MODEL, "input": {"s3_uri": f"s3://{file.bucket}/{file.key}"}})
    assert resp.status_code == 422
    assert "scored as batches when they arrive" in resp.json()["error"]["message"]


def test_inline_jobs_keep_bad_rows_apart_unless_all_or_nothing(new_tenant: Callable[..., Tenant]) -> None:
    tenant = new_tenant()
    surrogate = json.dumps({"model": MODEL, "input": {"instances": ["ok", "\ud800"]}})
    resp = requests.post(
        f"{tenant.api_url}/v1/jobs", data=surrogate, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert resp.status_code == 422 and "not valid Unicode" in resp.json()["error"]["message"], resp.text
    instances = ["good one", "", "good two"]
    resp = tenant.post("/v1/jobs", {"model": MODEL, "input": {"instances": instances}})
    assert resp.status_code == 202, resp.text
    job = tenant.job(resp.json()["id"])
    assert job["status"] == "succeeded"
    prefix = f"results/{tenant.id}/{MODEL}/{job['id']}/"
    assert [json.loads(x)["id"] for x in tenant.read(prefix, "predictions.jsonl").splitlines()] == [0, 2]
    assert [json.loads(x)["id"] for x in tenant.read(prefix, "errors.jsonl").splitlines()] == [1]

    resp = tenant.post("/v1/jobs", {"model": MODEL, "input": {"instances": instances}, "on_error": "fail"})
    failed = tenant.job(resp.json()["id"])
    assert failed["status"] == "failed" and "1 row(s) failed" in failed["error"]
    assert tenant.billed() == (2, 2)  # the all-or-nothing job billed nothing


# ---------------------------------------------------------------------- results never overwrite
def test_files_with_one_stem_and_a_refused_third_keep_their_own_results(new_tenant: Callable[..., Tenant]) -> None:
    tenant = new_tenant()
    csv = tenant.drop("reviews.csv", b"id,text\na,first file\nb,second row\n")
    jsonl = tenant.drop("reviews.jsonl", rows_file(5))
    refused = tenant.drop("reviews.txt", b"not a format we read\n")
    batches = {f.key: tenant.batch(f) for f in (csv, jsonl, refused)}
    assert [batches[f.key].status for f in (csv, jsonl, refused)] == ["succeeded", "succeeded", "failed"]
    assert len({csv.output_prefix, jsonl.output_prefix, refused.output_prefix}) == 3
    assert [json.loads(x)["id"] for x in tenant.read(csv.output_prefix, "predictions.jsonl").splitlines()] == ["a", "b"]
    assert len(tenant.read(jsonl.output_prefix, "predictions.jsonl").splitlines()) == 5
    assert json.loads(tenant.read(csv.output_prefix, "manifest.json"))["status"] == "succeeded"
    assert json.loads(tenant.read(refused.output_prefix, "manifest.json"))["status"] == "failed"

    # New content under the same key is a new batch with its own folder; the first keeps its results.
    again = tenant.drop("reviews.csv", b"id,text\nc,new content\n")
    assert again.batch_id != csv.batch_id and again.output_prefix != csv.output_prefix
    assert tenant.batch(again).succeeded == 1
    assert [json.loads(x)["id"] for x in tenant.read(csv.output_prefix, "predictions.jsonl").splitlines()] == ["a", "b"]


# ---------------------------------------------------------------------- one event schema
def test_events_of_both_kinds_carry_the_same_attributes(
    running: tuple[LocalStack, str], new_tenant: Callable[..., Tenant]
) -> None:
    stack, _ = running
    sqs, sns = stack.client("sqs"), stack.client("sns")
    queue_url = sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=stack.ref("JobEventsTopic"), Protocol="sqs", Endpoint=arn)
    tenant = new_tenant()
    file = tenant.drop("events.jsonl", rows_file(2))
    job_id = tenant.post("/v1/jobs", {"model": MODEL, "input": {"instances": ["x"]}}).json()["id"]
    tenant.batch(file)
    tenant.job(job_id)

    events: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(events) < 2 and time.monotonic() < deadline:
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
            "Messages", []
        ):
            envelope = json.loads(message["Body"])
            event = json.loads(envelope["Message"])
            if event["tenant"] == tenant.id and event["status"] == "succeeded":
                attributes = {k: v["Value"] for k, v in envelope["MessageAttributes"].items()}
                events[event["kind"]] = {"event": event, "attributes": attributes}
    assert set(events) == {"job", "batch"}
    for kind, seen in events.items():
        assert set(seen["attributes"]) == ATTRIBUTES
        assert seen["attributes"] == {"kind": kind, "tenant": tenant.id, "status": "succeeded", "model": MODEL}
    assert set(events["job"]["event"]) == set(events["batch"]["event"])


# ---------------------------------------------------------------------- one quota
def test_the_quota_holds_across_api_calls_jobs_and_files_running_together(new_tenant: Callable[..., Tenant]) -> None:
    quota = 40
    tenant = new_tenant(monthly_calls=quota)
    outcomes: dict[str, list[int]] = {"api": [], "jobs": []}
    job_ids: list[str] = []
    files: list[InboxFile] = []
    lock = threading.Lock()

    def api_calls() -> None:
        for _ in range(15):
            resp = tenant.post("/v1/embeddings", {"model": MODEL, "input": "one unit"})
            with lock:
                outcomes["api"].append(resp.status_code)

    def jobs() -> None:
        for _ in range(6):
            resp = tenant.post("/v1/jobs", {"model": MODEL, "input": {"instances": ["a", "b", "c", "d"]}})
            with lock:
                outcomes["jobs"].append(resp.status_code)
                if resp.status_code == 202:
                    job_ids.append(resp.json()["id"])

    def drops() -> None:
        for i in range(3):
            files.append(tenant.drop(f"part-{i}.jsonl", rows_file(8)))

    threads = [threading.Thread(target=f) for f in (api_calls, jobs, drops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(outcomes["api"]) <= {200, 429} and set(outcomes["jobs"]) <= {202, 429}
    finished_jobs = [tenant.job(j) for j in job_ids]
    finished_files = [tenant.batch(f) for f in files]
    assert 429 in outcomes["api"] + outcomes["jobs"] or any(f.status == "failed" for f in finished_files)
    for record in finished_files:
        assert record.status == "succeeded" or record.details.get("reason") == "quota_exceeded", record
    billed, units = tenant.billed()
    scored = (
        outcomes["api"].count(200)
        + sum(j["rows"] or 0 for j in finished_jobs if j["status"] == "succeeded")
        + sum(f.succeeded for f in finished_files if f.status == "succeeded")
    )
    assert billed == scored == units
    assert billed <= quota
    # Out of quota now or nearly: a dropped file that does not fit ends failed, nothing scored or billed.
    late = tenant.drop("late.jsonl", rows_file(quota + 1))
    record = tenant.batch(late)
    assert record.status == "failed" and record.details.get("reason") == "quota_exceeded" and record.rows == 0
    assert tenant.billed() == (billed, units)


# ---------------------------------------------------------------------- cancel
def test_a_running_file_cancelled_stops_at_its_next_window_keeps_and_bills_what_was_scored(
    new_tenant: Callable[..., Tenant],
) -> None:
    tenant = new_tenant()
    total = 8000
    file = tenant.drop("long.jsonl", rows_file(total))
    store = WorkStore(tenant.stack.table("WorkTable"))
    wait_for(
        lambda: (r := store.get(tenant.id, "batch", file.batch_id)) is not None and r.status == "running" and r.rows,
        120,
        "the file to be running",
    )
    resp = tenant.post(f"/v1/batches/{file.batch_id}/cancel", None)
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    record = wait_for(
        lambda: (r := store.get(tenant.id, "batch", file.batch_id)) is not None and r.details.get("reason") and r,
        120,
        "the cancelled run to stop",
    )
    assert record.status == "cancelled" and 0 < record.succeeded < total, record
    manifest = json.loads(tenant.read(file.output_prefix, "manifest.json"))
    assert manifest["status"] == "cancelled" and manifest["succeeded"] == record.succeeded
    predictions = tenant.read(file.output_prefix, "predictions.jsonl").splitlines()
    assert [json.loads(p)["id"] for p in predictions] == list(range(record.succeeded))
    assert tenant.billed() == (record.succeeded, record.succeeded)  # billed for what was scored, the rest released


# ---------------------------------------------------------------------- one vector per text, on every path
def test_the_same_text_gives_the_same_bytes_on_every_path_in_any_batch(new_tenant: Callable[..., Tenant]) -> None:
    tenant = new_tenant()
    texts = ["The quick brown fox", "hello", "A man is eating food in a small restaurant by the sea."]
    others = [f"filler text number {i}, of a length of its own {'x' * (i * 7)}" for i in range(40)]

    def api(batch: list[str]) -> dict[str, list[float]]:
        resp = tenant.post("/v1/embeddings", {"model": MODEL, "input": batch})
        assert resp.status_code == 200, resp.text
        return {t: d["embedding"] for t, d in zip(batch, resp.json()["data"], strict=True)}

    alone = {t: api([t])[t] for t in texts}
    in_a_crowd = api(others[:20] + texts[::-1] + others[20:])
    rows = [{"id": i, "text": t} for i, t in enumerate(others[::3] + texts + others)]
    file = tenant.drop("mixed.jsonl", ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    cpu = tenant.post("/v1/jobs", {"model": MODEL, "input": {"instances": texts + others}}).json()["id"]
    gpu = tenant.post("/v1/jobs", {"model": MODEL, "input": {"instances": texts}, "accelerator": "gpu"}).json()["id"]
    assert tenant.batch(file).status == "succeeded"
    lines: dict[str, dict[str, str]] = {}
    for name, prefix, ids in (
        ("batch", file.output_prefix, {r["id"]: r["text"] for r in rows}),
        ("cpu job", f"results/{tenant.id}/{MODEL}/{tenant.job(cpu)['id']}/", dict(enumerate(texts + others))),
        ("gpu worker", f"results/{tenant.id}/{MODEL}/{tenant.job(gpu, 180)['id']}/", dict(enumerate(texts))),
    ):
        for line in tenant.read(prefix, "predictions.jsonl").decode().splitlines():
            text = ids[json.loads(line)["id"]]
            if text in texts:
                lines.setdefault(text, {})[name] = line[line.index('"prediction":') :]
    for text in texts:
        assert in_a_crowd[text] == alone[text], text  # bitwise: the same floats, whatever the batch
        serialized = set(lines[text].values())
        assert len(lines[text]) == 3 and len(serialized) == 1, (text, lines[text].keys())
        assert json.loads("{" + serialized.pop())["prediction"] == alone[text]
