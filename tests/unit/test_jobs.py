"""Jobs without AWS: the message schema and its samples, input rows, callbacks and their signature,
Batch state-change events, the GPU worker's overlapped pipeline and the local Batch executor's rules."""

from __future__ import annotations

import base64
import gzip
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sif_core.jobs import (
    BatchJobStateChange,
    CallbackPolicy,
    ChunkResult,
    InputRow,
    JobInputError,
    JobMessage,
    callback_policy_for,
    deliver_callback,
    describe_error,
    instance_rows,
    iter_file_rows,
    loose_identity,
    sign,
    verify_signature,
    work_from_spec_uri,
)
from sif_core.routing import GpuJobSpec
from sif_core.settings import Settings
from sif_gpu_worker.pipeline import run_pipeline
from sif_inference.manifest import ModelManifest
from sif_local.batch_executor import local_command, pattern_matches, resolve_command, retry_decision

REPO = Path(__file__).resolve().parents[2]
EVENTS = REPO / "events"


def event(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return data


def manifest(name: str) -> ModelManifest:
    return ModelManifest.model_validate_json((REPO / "shared" / "models" / f"{name}.json").read_text())


MINILM = manifest("all-minilm-l6-v2")
NSFW = manifest("open-nsfw")


# ---------------------------------------------------------------------- the message
@pytest.mark.parametrize("name", ["sqs_job_cpu", "sqs_job_gpu", "sqs_job"])
def test_sample_messages_are_valid_jobs(name: str) -> None:
    for record in event(name)["Records"]:
        job = JobMessage.model_validate_json(record["body"])
        assert job.metering_id == f"job#{job.id}"


def test_the_poison_sample_is_not_a_job_but_names_one() -> None:
    (record,) = event("sqs_job_poison")["Records"]
    with pytest.raises(ValidationError) as info:
        JobMessage.model_validate_json(record["body"])
    assert describe_error(info.value) == "invalid job message: input.instances: Input should be a valid array"
    assert loose_identity(record["body"]) == ("j_0badbadbadbadbadbad0", "t_0123456789abcdef")
    assert record["attributes"]["ApproximateReceiveCount"] == "5"


def base_job(**changes: Any) -> dict[str, Any]:
    return {"id": "j_1", "tenant": "t_1", "model": "all-minilm-l6-v2", "input": {"instances": ["x"]}, **changes}


@pytest.mark.parametrize(
    "changes",
    [
        {"input": {}},
        {"input": {"instances": ["x"], "s3_uri": "s3://b/k"}},
        {"input": {"instances": []}},
        {"input": {"s3_uri": "https://b/k"}},
        {"id": "j/../x"},
        {"tenant": ""},
        {"accelerator": "tpu"},
        {"callback_url": "file:///etc/passwd"},
        {"surprise": 1},
        {"model": "../other-tenant"},
    ],
)
def test_bad_messages_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JobMessage.model_validate(base_job(**changes))


def test_loose_identity_needs_a_safe_id_and_tenant() -> None:
    assert loose_identity("not json") is None
    assert loose_identity("[1]") is None
    assert loose_identity(json.dumps({"id": "j_1"})) is None
    assert loose_identity(json.dumps({"id": "j_1", "tenant": "t/../x"})) is None


def test_describe_error_is_short() -> None:
    assert describe_error(RuntimeError("x" * 5000)).endswith("…")
    assert len(describe_error(RuntimeError("x" * 5000))) == 1000
    assert describe_error(KeyError()) == "KeyError"


def test_callbacks_need_a_secret_and_a_public_host_outside_the_local_stack() -> None:
    assert callback_policy_for(Settings(local=True)) is None  # no secret, no callbacks: there is no default one
    aws = callback_policy_for(Settings(callback_secret="a-long-enough-secret"))
    assert aws is not None and not aws.allow_private_hosts
    local = callback_policy_for(Settings(callback_secret="a-long-enough-secret", local=True))
    assert local is not None and local.allow_private_hosts
    post = FakePost(204)
    for url in ("http://127.0.0.1:9001/2018-06-01/runtime", "http://169.254.169.254/latest", "http://[::1]/x"):
        assert not deliver_callback(url, {"id": "j"}, "s", post=post, policy=aws)
    assert not post.calls  # refused before anything was sent
    assert deliver_callback("http://127.0.0.1:1/hook", {"id": "j"}, "s", post=post, policy=local)


# ---------------------------------------------------------------------- input rows
def test_instances_become_rows_with_their_index() -> None:
    rows = instance_rows(MINILM, ["a", "b"])
    assert [(r.id, r.value) for r in rows] == [(0, "a"), (1, "b")]
    with pytest.raises(JobInputError, match=r"instances\[1\]: expected a string"):
        instance_rows(MINILM, ["a", 2])
    png = base64.b64encode(b"\x89PNG").decode()
    assert instance_rows(NSFW, [{"b64": png}])[0].value == b"\x89PNG"
    with pytest.raises(JobInputError, match="not valid base64"):
        instance_rows(NSFW, [{"b64": "***"}])
    with pytest.raises(JobInputError, match="characters; the limit"):
        instance_rows(MINILM, ["x" * 20001])


def rows_of(data: bytes, key: str) -> list[tuple[Any, Any]]:
    return [(r.id, r.value) for r in iter_file_rows(MINILM, io.BytesIO(data), key)]


def test_file_rows_jsonl_csv_and_gzip() -> None:
    jsonl = b'{"id": "a", "text": "one"}\n\n{"id": 2, "text": "two"}\n'
    assert rows_of(jsonl, "x.jsonl") == [("a", "one"), (2, "two")]
    assert rows_of(gzip.compress(jsonl), "x.jsonl.gz") == [("a", "one"), (2, "two")]
    csv_data = b'id,text\na,"one, with a comma"\nb,two\n'
    assert rows_of(csv_data, "x.csv") == [("a", "one, with a comma"), ("b", "two")]


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        (b'{"id": 1, "text": "ok"}\n{"id": 2, "text": \n', "x.jsonl", "line 2: bad JSON"),
        (b'{"id": 1, "text": "ok"}\n{"text": "no id"}\n', "x.jsonl", "line 2: missing field 'id'"),
        (b'{"id": 1, "text": 5}\n', "x.jsonl", "line 1: field 'text' must be a string"),
        (b"name,body\nx,y\n", "x.csv", "CSV header has no 'id' or 'text' column"),
        (b"", "x.jsonl", "has no rows"),
        (b"abc", "x.parquet", "unknown format"),
        (b"not gzip", "x.jsonl.gz", "not a valid gzip file"),
    ],
)
def test_bad_files_fail_the_job_with_the_reason(data: bytes, key: str, message: str) -> None:
    with pytest.raises(JobInputError, match=message):
        rows_of(data, key)


# ---------------------------------------------------------------------- callbacks
def test_signature_round_trip_and_replay_window() -> None:
    body = b'{"id":"j_1","status":"succeeded"}'
    now = str(int(time.time()))
    headers = {"X-Sif-Timestamp": now, "X-Sif-Signature": sign("s3cret-s3cret-s3cret", now, body)}
    assert verify_signature("s3cret-s3cret-s3cret", headers, body)
    assert not verify_signature("another-secret-here", headers, body)
    assert not verify_signature("s3cret-s3cret-s3cret", headers, body + b" ")
    old = str(int(time.time()) - 3600)
    stale = {"X-Sif-Timestamp": old, "X-Sif-Signature": sign("s3cret-s3cret-s3cret", old, body)}
    assert not verify_signature("s3cret-s3cret-s3cret", stale, body)
    assert sign("k", "1", b"{}").startswith("sha256=")


class FakePost:
    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
        self.calls.append((url, body, headers))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


LOCAL = CallbackPolicy(allow_private_hosts=True)  # the fake hosts below resolve nowhere


def test_callback_retries_with_backoff_then_succeeds() -> None:
    post, sleeps = FakePost(OSError("refused"), 503, 204), []
    ok = deliver_callback(
        "http://h/cb", {"id": "j", "status": "succeeded"}, "secret", post=post, policy=LOCAL, sleep=sleeps.append
    )
    assert ok and len(post.calls) == 3 and sleeps == [0.5, 1.0]
    _, body, headers = post.calls[-1]
    assert verify_signature("secret", headers, body) and headers["X-Sif-Event"] == "job.succeeded"


def test_callback_gives_up_quietly() -> None:
    post, sleeps = FakePost(500, 500, 500, 500), []
    policy = CallbackPolicy(attempts=4, base_delay_s=1, max_delay_s=3, allow_private_hosts=True)
    assert not deliver_callback("http://h/cb", {"id": "j"}, "s", post=post, policy=policy, sleep=sleeps.append)
    assert sleeps == [1, 2, 3]
    no_retry = FakePost(410)
    assert not deliver_callback("http://h/cb", {"id": "j"}, "s", post=no_retry, policy=LOCAL, sleep=sleeps.append)
    assert len(no_retry.calls) == 1


# ---------------------------------------------------------------------- Batch events and specs
def test_spec_uris_name_their_work() -> None:
    spec = GpuJobSpec.model_validate(event("batch_gpu_job_spec"))
    assert spec.metering_id == "job#j_9a8b7c6d5e4f3a2b1c0d"
    uri = "s3://r/results/t_0123456789abcdef/_specs/job-j_9a8b7c6d5e4f3a2b1c0d.json"
    assert work_from_spec_uri(uri) == ("t_0123456789abcdef", "job", "j_9a8b7c6d5e4f3a2b1c0d")
    assert work_from_spec_uri("s3://r/results/t_1/_specs/batch-b_1.json") == ("t_1", "batch", "b_1")
    assert work_from_spec_uri("s3://r/elsewhere/spec.json") is None
    assert work_from_spec_uri("") is None


def test_batch_state_change_samples_parse() -> None:
    failed = BatchJobStateChange.model_validate(event("batch_job_failed"))
    assert failed.detail.status == "FAILED"
    work = work_from_spec_uri(failed.detail.parameters["spec"])
    assert work == ("t_0123456789abcdef", "job", "j_9a8b7c6d5e4f3a2b1c0d")
    succeeded = BatchJobStateChange.model_validate(event("batch_job_state_change"))
    assert succeeded.detail.status == "SUCCEEDED"


# ---------------------------------------------------------------------- the GPU worker's pipeline
def test_pipeline_keeps_order_and_overlaps_the_stages() -> None:
    def slow_rows() -> Any:
        for i in range(40):
            if i % 4 == 0:
                time.sleep(0.04)  # reading one 4-row chunk takes 40 ms
            yield InputRow(i, f"t{i}")

    def predict(values: list[Any]) -> ChunkResult:
        time.sleep(0.04)
        return ChunkResult([v.upper() for v in values], tokens=len(values))

    written: list[tuple[Any, Any]] = []

    def sink(ids: list[Any], preds: list[Any]) -> None:
        time.sleep(0.04)
        written.extend(zip(ids, preds, strict=True))

    started = time.perf_counter()
    stats = run_pipeline(slow_rows(), predict, sink, chunk_items=4, depth=2)
    elapsed = time.perf_counter() - started
    assert written == [(i, f"T{i}") for i in range(40)]
    assert stats.rows == 40 and stats.chunks == 10 and stats.tokens == 40
    assert elapsed < 0.9, f"stages did not overlap: {elapsed:.2f} s (serial would be 1.2 s)"


@pytest.mark.parametrize("stage", ["reader", "compute", "writer"])
def test_pipeline_surfaces_the_first_error(stage: str) -> None:
    def rows() -> Any:
        for i in range(100):
            if stage == "reader" and i == 50:
                raise JobInputError("line 51: not JSON")
            yield InputRow(i, i)

    def predict(values: list[Any]) -> ChunkResult:
        if stage == "compute" and values[0] >= 40:
            raise RuntimeError("compute broke")
        return ChunkResult(values)

    def sink(ids: list[Any], preds: list[Any]) -> None:
        if stage == "writer" and ids[0] >= 30:
            raise OSError("disk full")

    with pytest.raises((JobInputError, RuntimeError, OSError)):
        run_pipeline(rows(), predict, sink, chunk_items=10, depth=1)
    assert not [t for t in threading.enumerate() if t.name in ("sif-reader", "sif-writer") and t.is_alive()]


# ---------------------------------------------------------------------- the local Batch executor's rules
def test_command_substitution_as_batch_does_it() -> None:
    command = ["python", "-m", "sif_gpu_worker.entrypoint", "--spec", "Ref::spec"]
    resolved = resolve_command(command, {"spec": "s3://r/k.json"})
    assert resolved[-1] == "s3://r/k.json"
    assert local_command(resolved, "/venv/bin/python")[0] == "/venv/bin/python"
    assert local_command(["/bin/true"], "/venv/bin/python") == ["/bin/true"]


def test_retry_strategy_like_the_template() -> None:
    strategy = {
        "attempts": 3,
        "evaluateOnExit": [
            {"onStatusReason": "Host EC2*", "action": "RETRY"},
            {"onReason": "CannotPullContainerError*", "action": "RETRY"},
            {"onReason": "*", "action": "EXIT"},
        ],
    }
    assert retry_decision(strategy, 1, "Essential container in task exited", "Essential container") == "EXIT"
    assert retry_decision(strategy, 137, "x", "Host EC2 (instance i-1) terminated.") == "RETRY"
    assert retry_decision({"attempts": 2}, 1, "x", "x") == "RETRY"


def test_event_patterns() -> None:
    pattern = {"source": ["aws.batch"], "detail": {"status": ["FAILED"], "jobQueue": ["q"]}}
    assert pattern_matches(pattern, {"source": "aws.batch", "detail": {"status": "FAILED", "jobQueue": "q", "x": 1}})
    assert not pattern_matches(pattern, {"source": "aws.batch", "detail": {"status": "SUCCEEDED", "jobQueue": "q"}})
    assert not pattern_matches(pattern, {"source": "aws.s3"})
