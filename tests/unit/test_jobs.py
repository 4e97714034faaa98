"""Jobs without AWS: the message schema and its samples, inputs, bucket keys, callbacks and their signature,
Batch state-change events and the local Batch executor's rules."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sif_core import keys
from sif_core.batch_events import BatchJobStateChange, work_from_spec_uri
from sif_core.callbacks import CallbackPolicy, callback_policy_for, deliver_callback, sign, verify_signature
from sif_core.jobs import (
    JobInputError,
    JobMessage,
    check_input_uri,
    check_instances,
    describe_error,
    instances_jsonl,
    loose_identity,
)
from sif_core.routing import GpuJobSpec
from sif_core.rows import BytesSource, Row, open_rows
from sif_core.settings import Settings
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


# ---------------------------------------------------------------------- inputs
def test_instances_are_checked_at_the_door_and_read_as_the_jsonl_they_describe() -> None:
    check_instances(MINILM, ["a", {"text": "b"}])
    with pytest.raises(JobInputError, match=r"instances\[1\]: expected a string"):
        check_instances(MINILM, ["a", 2])
    png = base64.b64encode(b"\x89PNG").decode()
    check_instances(NSFW, [{"b64": png}])
    with pytest.raises(JobInputError, match=r'instances\[0\]: expected \{"b64"'):
        check_instances(NSFW, ["not an image"])
    data = instances_jsonl(["a", {"text": "b"}, {"b64": png}])
    assert data.decode().splitlines() == [
        '{"id": 0, "text": "a"}',
        '{"id": 1, "text": "b"}',
        f'{{"id": 2, "b64": "{png}"}}',
    ]
    with open_rows(BytesSource(data), "jsonl", "text") as reader:
        rows = list(reader)
    assert [(r.id, r.value) for r in rows[:2] if isinstance(r, Row)] == [(0, "a"), (1, "b")]


def test_a_job_reads_its_own_uploads_or_results_never_a_dropped_file() -> None:
    buckets = {"inbox_bucket": "inbox", "results_bucket": "results"}
    assert check_input_uri("s3://inbox/uploads/t_1/x.jsonl", "t_1", **buckets) == ("inbox", "uploads/t_1/x.jsonl")
    assert check_input_uri("s3://results/results/t_1/m/j_1/predictions.jsonl", "t_1", **buckets)[0] == "results"
    with pytest.raises(JobInputError, match="scored as batches when they arrive"):
        check_input_uri("s3://inbox/incoming/t_1/m/x.jsonl", "t_1", **buckets)
    for uri in (
        "s3://inbox/uploads/t_2/x.jsonl",
        "s3://models/models/m/1/model.onnx",
        "s3://inbox/uploads/t_1/../t_2/x",
    ):
        with pytest.raises(JobInputError):
            check_input_uri(uri, "t_1", **buckets)


def test_results_folders_never_collide() -> None:
    csv = keys.batch_results_prefix("t_1", "m", "reviews.csv.gz", '"abc"')
    jsonl = keys.batch_results_prefix("t_1", "m", "reviews.jsonl", "abc")
    again = keys.batch_results_prefix("t_1", "m", "reviews.csv.gz", "def-2")
    assert len({csv, jsonl, again}) == 3
    assert csv == "results/t_1/m/reviews.csv.gz/abc/"
    assert keys.dropped_batch_id("inbox", "incoming/t_1/m/a.jsonl", "e1") != keys.dropped_batch_id(
        "inbox", "incoming/t_1/m/a.jsonl", "e2"
    )
    assert keys.InboxKey.parse("incoming/t_1/m/sub/a.jsonl").name == "sub/a.jsonl"
    for bad in ("incoming/t_1/m/../x.jsonl", "incoming/../m/x.jsonl", "results/t_1/m/x.jsonl", "incoming/t_1/x.jsonl"):
        with pytest.raises(keys.KeyFormatError):
            keys.InboxKey.parse(bad)
    assert keys.parse_spec_key(keys.spec_key("batch", "t_1", "b_1")) == ("t_1", "batch", "b_1")


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
