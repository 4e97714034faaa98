"""Jobs without AWS: the message schema and its samples, inputs, bucket keys, callbacks and their signature,
and Batch state-change events (the local Batch executor's rules: tests/emulator/test_batch_executor.py)."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sif_core import keys
from sif_core.announce import CallbackMessage, CallbackSender, WorkEvent
from sif_core.batch_events import BatchJobStateChange, work_from_spec_uri
from sif_core.callbacks import (
    CallbackPolicy,
    CallbackRefusedError,
    callback_policy_for,
    classify,
    sign,
    target_for,
    verify_signature,
)
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

REPO = Path(__file__).resolve().parents[2]
EVENTS = REPO / "events"


def event(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return data


def manifest(name: str) -> ModelManifest:
    return ModelManifest.model_validate_json((REPO / "shared" / "models" / f"{name}.json").read_text())


MINILM = manifest("all-minilm-l6-v2")
NSFW = manifest("open-nsfw")
IRIS = manifest("iris-species")


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


def test_callbacks_reach_only_public_hosts_outside_the_local_stack() -> None:
    aws, local = callback_policy_for(Settings()), callback_policy_for(Settings(local=True))
    assert not aws.allow_private_hosts and local.allow_private_hosts
    assert not hasattr(Settings(), "callback_secret")  # no deployment-wide secret: each tenant has its own
    dns = {"rebound.example": ["93.184.216.34", "10.0.0.7"], "hooks.example.com": ["93.184.216.34"]}

    def resolve(host: str, port: int) -> list[str]:
        return dns.get(host, [host])  # IP literals resolve to themselves

    for url in (
        "http://127.0.0.1:9001/2018-06-01/runtime",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "http://rebound.example/x",  # every address must be public, not just one
        "ftp://hooks.example.com/x",
    ):
        with pytest.raises(CallbackRefusedError):
            target_for(url, aws, resolve)
    target = target_for("https://hooks.example.com/cb?a=1", aws, resolve)
    assert (target.address, target.host, target.port, target.path) == (
        "93.184.216.34",
        "hooks.example.com",
        443,
        "/cb?a=1",
    )
    assert target_for("http://127.0.0.1:8080/hook", local, resolve).address == "127.0.0.1"


# ---------------------------------------------------------------------- inputs
def test_instances_are_checked_at_the_door_and_read_as_the_jsonl_they_describe() -> None:
    assert check_instances(MINILM, ["a", {"text": "b"}]) == [{"text": "a"}, {"text": "b"}]
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


def test_tabular_instances_may_be_bare_feature_objects_and_are_staged_as_feature_rows() -> None:
    flower = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    rows = check_instances(IRIS, [flower, {"features": flower}])
    assert rows == [{"features": flower}, {"features": flower}]
    with pytest.raises(JobInputError, match=r"instances\[1\]: expected an object of named features"):
        check_instances(IRIS, [flower, "5.1,3.5,1.4,0.2"])
    with open_rows(BytesSource(instances_jsonl(rows)), "jsonl", "features") as reader:
        read = [r for r in reader if isinstance(r, Row)]
    assert [(r.id, r.value) for r in read] == [(0, flower), (1, flower)]


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


class FakeReceiver:
    """A receiver behind a socketpair (no network): each connection answers the next status, or raises."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.connected: list[tuple[str, int]] = []
        self._peers: list[socket.socket] = []

    def connect(self, address: str, port: int, timeout: float) -> socket.socket:
        self.connected.append((address, port))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        ours, theirs = socket.socketpair()
        theirs.sendall(f"HTTP/1.1 {answer} X\r\nContent-Length: 0\r\n\r\n".encode())
        self._peers.append(theirs)
        return ours

    def read_requests(self) -> list[tuple[dict[str, str], bytes]]:
        for peer in self._peers:
            peer.settimeout(1)
            raw = b""
            while b"\r\n\r\n" not in raw:
                raw += peer.recv(65536)
            head, _, body = raw.partition(b"\r\n\r\n")
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
            while len(body) < int(headers["Content-Length"]):
                body += peer.recv(65536)
            self.requests.append((headers, body))
            peer.close()
        self._peers = []
        return self.requests


def callback_message(tenant: str = "t_1", output_key: str | None = None) -> CallbackMessage:
    event = WorkEvent.of("job", "succeeded", id="j_1", tenant=tenant, model="m", rows=1)
    return CallbackMessage(tenant=tenant, url="http://hooks.example.com/cb", event=event, output_key=output_key)


def sender_for(receiver: FakeReceiver, secrets_: dict[str, str], recorded: list[bool]) -> CallbackSender:
    return CallbackSender(
        secret_of=secrets_.get,
        record=lambda message, delivered: recorded.append(delivered),
        policy=CallbackPolicy(base_delay_s=5, max_delay_s=30),
        presign=lambda key: f"https://results.example/{key}?sig=x",
        resolve=lambda host, port: ["93.184.216.34"],
        connect=receiver.connect,
    )


def test_delivery_outcomes() -> None:
    assert [classify(s) for s in (200, 204)] == ["delivered"] * 2
    assert [classify(s) for s in (408, 429, 500, 503)] == ["retry"] * 4
    assert [classify(s) for s in (301, 302, 307, 400, 401, 404, 410)] == ["final"] * 7  # redirects never followed
    policy = CallbackPolicy(base_delay_s=5, max_delay_s=30)
    assert [policy.retry_delay(n) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 30, 30]


def test_a_callback_is_retried_through_the_queue_with_backoff() -> None:
    """One attempt per receive; a retry comes back after its backoff; the outcome is recorded once, when final."""
    receiver, recorded = FakeReceiver(OSError("refused"), 503, 204), []
    sender = sender_for(receiver, {"t_1": "secret-of-t1"}, recorded)
    message = callback_message(output_key="results/t_1/m/j_1/predictions.jsonl")
    first, second, third = (sender.send(message, attempt, 10) for attempt in (1, 2, 3))
    assert (first.result.outcome, first.retry_in_s) == ("retry", 5)
    assert (second.result.status, second.retry_in_s) == (503, 10)
    assert third.delivered and third.retry_in_s is None and recorded == [True]
    assert receiver.connected == [("93.184.216.34", 80)] * 3
    for headers, body in receiver.read_requests():
        assert verify_signature("secret-of-t1", headers, body) and headers["X-Sif-Event"] == "job.succeeded"
        assert not verify_signature("secret-of-t2", headers, body)
        assert headers["Host"] == "hooks.example.com"
        payload = json.loads(body)
        assert payload["output_url"] == "https://results.example/results/t_1/m/j_1/predictions.jsonl?sig=x"


def test_a_callback_ends_on_a_final_answer_or_the_last_receive() -> None:
    receiver, recorded = FakeReceiver(404, 302, 503), []
    sender = sender_for(receiver, {"t_1": "s"}, recorded)
    for status in (404, 302):
        attempt = sender.send(callback_message(), 1, 10)
        assert (attempt.result.outcome, attempt.result.status, attempt.retry_in_s) == ("final", status, None)
    last = sender.send(callback_message(), 10, 10)  # retryable, but the queue's last receive: on to the DLQ
    assert (last.result.outcome, last.retry_in_s) == ("retry", 0.0)
    assert recorded == [False, False, False]
    nobody, recorded = FakeReceiver(), []
    no_secret = sender_for(nobody, {}, recorded).send(callback_message(), 1, 10)  # a tenant without a secret
    assert no_secret.result.outcome == "final" and no_secret.retry_in_s is None
    assert recorded == [False] and not nobody.connected


def test_callback_messages_stay_within_their_tenant() -> None:
    message = callback_message(output_key="results/t_1/m/j_1/predictions.jsonl")
    assert CallbackMessage.model_validate_json(message.model_dump_json()) == message
    work_event = message.event
    with pytest.raises(ValidationError, match="tenant of its event"):
        CallbackMessage(tenant="t_2", url="http://h/cb", event=work_event)
    with pytest.raises(ValidationError, match="own tenant's results"):
        CallbackMessage(
            tenant="t_1", url="http://h/cb", event=work_event, output_key="results/t_2/m/j/predictions.jsonl"
        )
    with pytest.raises(ValidationError, match="http"):
        CallbackMessage(tenant="t_1", url="file:///etc/passwd", event=work_event)
    record = event("sqs_callback")["Records"][0]
    sample = CallbackMessage.model_validate_json(record["body"])
    assert sample.event.type == "job.succeeded" and sample.tenant == sample.event.tenant


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
