"""Crash recovery end to end, with the template's own settings: a SIGKILLed scorer or worker resumes
its file or job from the checkpoint within two minutes of the kill, byte-identical and billed once.

Nothing is shortened here: the queues keep their 1,800 s visibility timeout and the functions their
300 s Timeout, as deployed. What brings the work back is the lease (`sif_core.leases`): the dead
invocation stops renewing its message and its idempotency lock, both lapse within a minute, and the
poller (which leaves visibility to SQS, as Lambda does) receives the message again.

Each test prints what it measured (kill -> the resumed run's start -> finished), e.g. with `-s`.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from sif_core import keys
from sif_core.filebatch import InboxFile
from sif_core.work import TERMINAL, WorkRecord, WorkStore
from sif_emulator.pollers import start_pollers
from sif_emulator.stack import LocalStack
from sif_metering.ledger import UsageLedger

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MODEL = "all-minilm-l6-v2"
ROWS = 2500  # ~11 MB of predictions: a first 8 MiB part (and its checkpoint) well before the end
RESUME_BOUND_S = 120.0


@dataclass
class Recovery:
    stack: LocalStack
    tenant: str

    @property
    def s3(self) -> Any:
        return self.stack.client("s3")

    def record(self, kind: str, work_id: str) -> WorkRecord | None:
        return WorkStore(self.stack.table("WorkTable")).get(self.tenant, kind, work_id)  # type: ignore[arg-type]

    def read(self, prefix: str, name: str) -> bytes:
        body: bytes = self.s3.get_object(Bucket=self.stack.bucket("results"), Key=prefix + name)["Body"].read()
        return body

    def usage_events(self, metering_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.stack.table("UsageTable").scan().get("Items", [])
        return [i for i in items if i["pk"] == f"event#{metering_id}"]

    def queue_depth(self, logical_id: str) -> int:
        attrs = self.stack.client("sqs").get_queue_attributes(
            QueueUrl=self.stack.ref(logical_id),
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


@pytest.fixture(scope="module")
def recovery(local_stack: LocalStack) -> Iterator[Recovery]:
    sqs = local_stack.client("sqs")
    for queue, function in (("InboxQueue", "ScorerFunction"), ("JobsQueue", "WorkerFunction")):
        visibility = sqs.get_queue_attributes(QueueUrl=local_stack.ref(queue), AttributeNames=["VisibilityTimeout"])
        assert int(visibility["Attributes"]["VisibilityTimeout"]) == 6 * local_stack.template.function_timeout(function)
    pollers = start_pollers(local_stack, functions=["ScorerFunction", "WorkerFunction"])  # template timeouts
    info, _ = local_stack.create_tenant(f"recovery-{uuid.uuid4().hex[:6]}", monthly_calls=0)
    try:
        yield Recovery(local_stack, str(info["tenant_id"]))
    finally:
        for poller in pollers:
            poller.stop()


@cache
def body() -> bytes:
    texts = [t for t in (REPO / "shared" / "data" / "texts.txt").read_text().splitlines() if t.strip()]
    rows = [{"id": i, "text": f"{texts[i % len(texts)][: 30 + i % 50]} #{i}"} for i in range(ROWS)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def eventually(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout_s} s")


def function_pids(function_name: str) -> list[int]:
    """Our child processes that are instances of `function_name` (the pollers' function processes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and f"AWS_LAMBDA_FUNCTION_NAME={function_name}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def kill_at_checkpoint(r: Recovery, function: str, checkpoint_key: str, timeout_s: float = 240) -> float:
    """SIGKILL the function's instances once the work's first checkpoint is written; the kill's time."""
    results, name = r.stack.bucket("results"), r.stack.name(function)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if r.s3.list_objects_v2(Bucket=results, Prefix=checkpoint_key).get("KeyCount", 0):
            pids = function_pids(name)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            if pids:
                return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {checkpoint_key} to crash after")


def watch_resume(r: Recovery, kind: str, work_id: str, killed_at: float) -> tuple[WorkRecord, float, float]:
    """Wait for the run after the kill to start (its record counts a second run) and for the work to end."""

    def resumed() -> WorkRecord | None:
        record = r.record(kind, work_id)
        return record if record is not None and int(record.details.get("runs", 0)) >= 2 else None

    eventually(resumed, RESUME_BOUND_S, f"the {kind} resumed")
    resumed_after = time.monotonic() - killed_at

    def finished() -> WorkRecord | None:
        record = r.record(kind, work_id)
        return record if record is not None and record.status in TERMINAL else None

    record = eventually(finished, RESUME_BOUND_S, f"the {kind} finished")
    return record, resumed_after, time.monotonic() - killed_at


@pytest.fixture(scope="module")
def reference(recovery: Recovery) -> bytes:
    """predictions.jsonl of the same rows, scored without interruption (a dropped file)."""
    file = drop(recovery, "reference.jsonl")
    record = eventually(
        lambda: (rec := recovery.record("batch", file.batch_id)) is not None and rec.status in TERMINAL and rec,
        240,
        "the reference file scored",
    )
    assert record.status == "succeeded" and record.rows == ROWS
    return recovery.read(file.output_prefix, "predictions.jsonl")


def drop(r: Recovery, name: str) -> InboxFile:
    key = f"incoming/{r.tenant}/{MODEL}/{name}"
    etag = r.s3.put_object(Bucket=r.stack.bucket("inbox"), Key=key, Body=body())["ETag"]
    return InboxFile.parse(r.stack.bucket("inbox"), key, etag, len(body()))


def test_a_killed_scorer_resumes_its_file_within_two_minutes(recovery: Recovery, reference: bytes) -> None:
    dead_letters = recovery.queue_depth("InboxDLQ")
    file = drop(recovery, "victim.jsonl")
    killed_at = kill_at_checkpoint(recovery, "ScorerFunction", keys.checkpoint_key(file.output_prefix))
    record, resumed_s, finished_s = watch_resume(recovery, "batch", file.batch_id, killed_at)
    print(f"\nscorer SIGKILLed mid-file: resumed after {resumed_s:.1f} s, finished after {finished_s:.1f} s")

    assert record.status == "succeeded" and (record.rows, record.failed) == (ROWS, 0)
    assert resumed_s > 0 and finished_s < RESUME_BOUND_S
    assert recovery.read(file.output_prefix, "predictions.jsonl") == reference  # no row lost or repeated
    assert recovery.read(file.output_prefix, "errors.jsonl") == b""
    (usage,) = recovery.usage_events(file.metering_id)
    assert int(usage["inputs"]) == ROWS
    assert recovery.queue_depth("InboxDLQ") == dead_letters


def test_a_killed_worker_resumes_its_job_within_two_minutes(recovery: Recovery, reference: bytes) -> None:
    dead_letters = recovery.queue_depth("JobsDLQ")
    inbox = recovery.stack.bucket("inbox")
    key = f"uploads/{recovery.tenant}/victim-{uuid.uuid4().hex[:6]}.jsonl"
    recovery.s3.put_object(Bucket=inbox, Key=key, Body=body())
    job_id = f"j_crash{uuid.uuid4().hex[:10]}"
    message = {"id": job_id, "tenant": recovery.tenant, "model": MODEL, "input": {"s3_uri": f"s3://{inbox}/{key}"}}
    recovery.stack.client("sqs").send_message(QueueUrl=recovery.stack.ref("JobsQueue"), MessageBody=json.dumps(message))
    prefix = keys.job_results_prefix(recovery.tenant, MODEL, job_id)

    killed_at = kill_at_checkpoint(recovery, "WorkerFunction", keys.checkpoint_key(prefix))
    before = recovery.record("job", job_id)
    assert before is not None and before.status == "running" and 0 < before.progress < 1  # byte progress
    record, resumed_s, finished_s = watch_resume(recovery, "job", job_id, killed_at)
    print(f"\nworker SIGKILLed mid-job: resumed after {resumed_s:.1f} s, finished after {finished_s:.1f} s")

    assert record.status == "succeeded" and record.route == "cpu" and (record.rows, record.failed) == (ROWS, 0)
    assert resumed_s > 0 and finished_s < RESUME_BOUND_S
    assert recovery.read(prefix, "predictions.jsonl") == reference  # the same bytes as the file, uninterrupted
    assert recovery.read(prefix, "errors.jsonl") == b""
    (usage,) = recovery.usage_events(f"job#{job_id}")
    assert int(usage["inputs"]) == ROWS
    ledger = UsageLedger(recovery.stack.client("dynamodb"), recovery.stack.table_name("usage"))
    assert ledger.month_reserved(recovery.tenant) == 0
    assert recovery.queue_depth("JobsDLQ") == dead_letters
