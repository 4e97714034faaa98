"""Callbacks that cannot be abused (issue 11): each attack reproduced, and what stops it.

- SSRF: a 302 from an allowed host is not followed (to 127.0.0.1 or anywhere), and the connection goes to
  the address that was checked, so a DNS answer that changes after the check (rebinding) cannot move it;
  https keeps SNI and the certificate check on the hostname. The resolver and the connector are seams, so
  a test host can be "public" while the test's servers listen on 127.0.0.1.
- Out of band: the worker only queues a callback; the callback function delivers it, so a receiver that
  hangs costs the callback function its timeout and no other job waits for it. Retries are the queue's
  (backoff through the message's visibility), a 4xx is final, and the message goes to the DLQ after the
  queue's maxReceiveCount.
- Per-tenant secrets: each tenant's callbacks are signed with its own secret (its profile item), which
  a rotation replaces at once; one tenant's secret verifies nothing of another's.
"""

from __future__ import annotations

import datetime
import importlib
import json
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests

from sif_cli import main as cli
from sif_core.announce import CallbackMessage, CallbackSender, WorkEvent
from sif_core.callbacks import CallbackPolicy, deliver, signed_headers, system_resolver, tcp_connect, verify_signature
from sif_core.tenants import callback_secret, hash_key
from sif_core.work import WorkRecord, WorkStore
from sif_emulator.pollers import sqs_record, start_pollers
from sif_emulator.stack import LocalStack

pytestmark = [pytest.mark.e2e]

MODEL = "all-minilm-l6-v2"
PUBLIC = "93.184.216.34"  # what the test DNS says hooks.example.com is: a public address
BODY = b'{"type":"job.succeeded","id":"j_1"}'


# ---------------------------------------------------------------------- receivers
class Receiver:
    """A callback receiver on 127.0.0.1: answers each POST with the next status (the last one repeats),
    with a Location header on a 3xx; `hang()` holds every answer until `release()`."""

    def __init__(self, *statuses: int, location: str = "") -> None:
        self.statuses = list(statuses) or [204]
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Condition()
        self.released = threading.Event()
        self.released.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.arrived:
                    receiver.calls.append((dict(self.headers), body))
                    status = receiver.statuses[min(len(receiver.calls), len(receiver.statuses)) - 1]
                    receiver.arrived.notify_all()
                receiver.released.wait(60)
                try:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the caller gave up waiting (a hanging receiver)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hooks/sif"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hang(self) -> None:
        self.released.clear()

    def release(self, status: int = 204) -> None:
        self.statuses = [status]
        self.released.set()

    def wait_calls(self, count: int, timeout_s: float = 60) -> list[tuple[dict[str, str], bytes]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.calls) >= count, timeout_s), f"{len(self.calls)} calls"
            return list(self.calls)

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def make(*statuses: int, location: str = "") -> Receiver:
        started.append(Receiver(*statuses, location=location))
        return started[-1]

    yield make
    for receiver in started:
        receiver.stop()


class Dns:
    """A resolver seam that answers from a table (a list per host: one answer per lookup, the last repeats)."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.answers:
            return system_resolver(host, port)  # IP literals
        seen = self.lookups.count(host)
        return self.answers[host][min(seen, len(self.answers[host])) - 1]


class Network:
    """A connector seam: the test's public address is routed to a local server; every connection is noted."""

    def __init__(self, routes: dict[tuple[str, int], int]) -> None:
        self.routes = routes
        self.connections: list[tuple[str, int]] = []

    def __call__(self, address: str, port: int, timeout: float) -> socket.socket:
        self.connections.append((address, port))
        local_port = self.routes.get((address, port))
        if local_port is None:
            return tcp_connect(address, port, timeout)
        return tcp_connect("127.0.0.1", local_port, timeout)


# ---------------------------------------------------------------------- defect 3: SSRF
def test_a_redirect_from_an_allowed_host_is_not_followed(receivers: Callable[..., Receiver]) -> None:
    internal = receivers(204)  # what the attacker wants reached: a private address, with our X-Sif-* headers
    allowed = receivers(302, location=internal.url + "/steal")
    dns = Dns({"hooks.example.com": [[PUBLIC]]})
    network = Network({(PUBLIC, 80): allowed.port})
    policy = CallbackPolicy(allow_private_hosts=False, timeout_s=5)  # as in AWS: private hosts refused

    result = deliver(
        "http://hooks.example.com/cb",
        BODY,
        signed_headers("s" * 20, BODY, "job.succeeded"),
        policy,
        resolve=dns,
        connect=network,
    )
    assert (result.outcome, result.status) == ("final", 302)  # a failed delivery, never retried
    ((headers, _),) = allowed.wait_calls(1)
    assert headers["Host"] == "hooks.example.com" and headers["X-Sif-Signature"].startswith("sha256=")
    assert network.connections == [(PUBLIC, 80)]
    assert internal.calls == []

    # through the sender (what the callback function runs): final, recorded as not delivered, not retried
    recorded: list[bool] = []
    sender = CallbackSender(
        secret_of=lambda tenant: "s" * 20,
        record=lambda message, delivered: recorded.append(delivered),
        policy=policy,
        resolve=dns,
        connect=network,
    )
    event = WorkEvent.of("job", "succeeded", id="j_1", tenant="t_1", model=MODEL)
    attempt = sender.send(CallbackMessage(tenant="t_1", url="http://hooks.example.com/cb", event=event), 1, 10)
    assert attempt.result.status == 302 and attempt.retry_in_s is None and recorded == [False]
    # the redirect's target itself is refused before anything connects
    before = len(network.connections)
    refused = deliver(internal.url, BODY, {}, policy, resolve=dns, connect=network)
    assert refused.outcome == "final" and "not a public address" in refused.detail
    assert len(network.connections) == before and internal.calls == []

    # on the local stack (private hosts allowed), with the real resolver and sockets: still not followed
    local = deliver(allowed.url, BODY, {}, CallbackPolicy(allow_private_hosts=True))
    assert (local.outcome, local.status) == ("final", 302) and internal.calls == []


def test_the_connection_goes_to_the_address_that_was_checked(receivers: Callable[..., Receiver]) -> None:
    """DNS rebinding: a first answer that passes the check, then 127.0.0.1 for whoever asks again."""
    hook = receivers(204)
    dns = Dns({"rebind.example.com": [[PUBLIC], ["127.0.0.1"]]})
    network = Network({(PUBLIC, 8080): hook.port})
    result = deliver(
        "http://rebind.example.com:8080/cb", BODY, {}, CallbackPolicy(timeout_s=5), resolve=dns, connect=network
    )
    assert result.outcome == "delivered"
    assert dns.lookups == ["rebind.example.com"]  # resolved once
    assert network.connections == [(PUBLIC, 8080)]  # and connected to what was checked
    ((headers, body),) = hook.calls
    assert headers["Host"] == "rebind.example.com:8080" and body == BODY

    # an answer with one private address among public ones is refused outright
    mixed = Dns({"mixed.example.com": [[PUBLIC, "127.0.0.1"]]})
    refused = deliver("http://mixed.example.com/cb", BODY, {}, CallbackPolicy(), resolve=mixed, connect=network)
    assert refused.outcome == "final" and network.connections == [(PUBLIC, 8080)]


def self_signed(host: str, directory: Path) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_https_sends_the_hostname_for_sni_and_checks_its_certificate(tmp_path: Path) -> None:
    """Pinned to the checked address, an https callback still says (SNI) and verifies (certificate) the hostname:
    a server whose certificate no CA vouches for is not called back."""
    cert, key = self_signed("hooks.example.com", tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server_names: list[str | None] = []

    def note_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        server_names.append(name)

    context.sni_callback = note_sni  # type: ignore[assignment]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            pass  # the client refused our certificate
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    network = Network({(PUBLIC, 443): port})
    dns = Dns({"hooks.example.com": [[PUBLIC]]})
    try:
        result = deliver("https://hooks.example.com/cb", BODY, {}, CallbackPolicy(), resolve=dns, connect=network)
    finally:
        thread.join(10)
        listener.close()
    assert result.outcome == "retry" and "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert server_names == ["hooks.example.com"] and network.connections == [(PUBLIC, 443)]


# ---------------------------------------------------------------------- the callback function, in-process
@dataclass
class Context:
    function_name: str = "sif-local-callbackfunction"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:sif-local-callbackfunction"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


@pytest.fixture(scope="module")
def callback_handler(local_stack: LocalStack) -> Iterator[ModuleType]:
    """The callback function's handler module, imported with its environment (as Lambda imports it)."""
    patch = pytest.MonkeyPatch()
    for key, value in local_stack.function_env("CallbackFunction").items():
        patch.setenv(key, value)
    from sif_core.settings import get_settings

    get_settings.cache_clear()
    sys.modules.pop("sif_callbacks.handler", None)
    try:
        yield importlib.import_module("sif_callbacks.handler")
    finally:
        sys.modules.pop("sif_callbacks.handler", None)
        get_settings.cache_clear()
        patch.undo()


def queued_callback(stack: LocalStack, tenant: str, url: str) -> tuple[str, str]:
    """A job record with a callback_url, and its callback on the callbacks queue (as the lifecycle queues it)."""
    job_id = "j_" + uuid.uuid4().hex[:20]
    WorkStore(stack.table("WorkTable")).create(
        WorkRecord(id=job_id, kind="job", tenant=tenant, model=MODEL, status="succeeded", callback_url=url)
    )
    event = WorkEvent.of("job", "succeeded", id=job_id, tenant=tenant, model=MODEL, rows=1)
    message = CallbackMessage(tenant=tenant, url=url, event=event)
    stack.client("sqs").send_message(QueueUrl=stack.ref("CallbacksQueue"), MessageBody=message.model_dump_json())
    return job_id, message.model_dump_json()


def receive_ours(stack: LocalStack, queue: str, body: str, wait_s: float = 3) -> dict[str, Any] | None:
    sqs, url = stack.client("sqs"), stack.ref(queue)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for msg in sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, AttributeNames=["All"]
        ).get("Messages", []):
            if msg["Body"] == body:
                return dict(msg)
            sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"], VisibilityTimeout=0)
    return None


def callback_delivered(stack: LocalStack, tenant: str, job_id: str) -> Any:
    item = stack.table("WorkTable").get_item(Key=WorkStore.key(tenant, "job", job_id), ConsistentRead=True)["Item"]
    return item.get("callback_delivered")


def test_the_callback_function_backs_off_then_dead_letters(
    local_stack: LocalStack,
    callback_handler: ModuleType,
    receivers: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receiver that keeps answering 503: each receive is one attempt, the message comes back after its
    backoff, and after the queue's maxReceiveCount it is in the DLQ, the job saying callback_delivered=false."""
    failing = receivers(503)
    info, _ = local_stack.create_tenant(f"cb-dlq-{uuid.uuid4().hex[:6]}")
    tenant = str(info["tenant_id"])
    job_id, body = queued_callback(local_stack, tenant, failing.url)
    arn = local_stack.arn("CallbacksQueue")

    def invoke(message: dict[str, Any]) -> dict[str, Any]:
        event = {"Records": [sqs_record(message, arn, local_stack.region)]}
        return dict(callback_handler.lambda_handler(event, Context()))

    first = receive_ours(local_stack, "CallbacksQueue", body)
    assert first is not None and first["Attributes"]["ApproximateReceiveCount"] == "1"
    assert invoke(first) == {"batchItemFailures": [{"itemIdentifier": first["MessageId"]}]}
    assert receive_ours(local_stack, "CallbacksQueue", body, wait_s=2) is None  # backing off (5 s)
    second = receive_ours(local_stack, "CallbacksQueue", body, wait_s=8)
    assert second is not None and second["Attributes"]["ApproximateReceiveCount"] == "2"
    assert callback_delivered(local_stack, tenant, job_id) is None  # not final yet

    # the rest of the receives without waiting out the backoff (the policy is the function's to set)
    monkeypatch.setattr(callback_handler.sender, "policy", CallbackPolicy(allow_private_hosts=True, base_delay_s=0))
    message: dict[str, Any] | None = second
    receives = callback_handler.last_receive()
    assert receives == 10  # template.yaml's maxReceiveCount
    for count in range(2, receives + 1):
        assert message is not None and message["Attributes"]["ApproximateReceiveCount"] == str(count)
        assert invoke(message)["batchItemFailures"]
        message = receive_ours(local_stack, "CallbacksQueue", body) if count < receives else None
    assert len(failing.calls) == receives
    assert callback_delivered(local_stack, tenant, job_id) is False
    assert receive_ours(local_stack, "CallbacksQueue", body, wait_s=2) is None  # that receive moved it on
    assert receive_ours(local_stack, "CallbacksDLQ", body) is not None


# ---------------------------------------------------------------------- defect 6: one secret per tenant
def test_sif_tenant_create_shows_the_callback_secret_once_and_rotation_replaces_it(
    local_stack: LocalStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIF_STACK_JSON", str(local_stack.stack_json_path))
    assert cli.main(["tenant", "create", f"cb-cli-{uuid.uuid4().hex[:6]}"]) == 0
    out, err = capsys.readouterr()
    api_key = out.strip().splitlines()[-1]  # stdout is the key alone: SIF_KEY=$(sif tenant create x)
    assert api_key.startswith("sif_")
    table = local_stack.table("TenantsTable")
    key_item = table.get_item(Key={"key_hash": hash_key(api_key)})["Item"]
    assert "callback_secret" not in key_item  # the authorizer's item holds no secret
    tenant = str(key_item["tenant_id"])
    secret = callback_secret(table, tenant)
    assert secret and secret.startswith("sifcb_") and secret in err and secret not in out

    assert cli.main(["tenant", "rotate-callback-secret", tenant]) == 0
    out, err = capsys.readouterr()
    rotated = out.strip()
    assert rotated == callback_secret(table, tenant) and rotated != secret
    assert cli.main(["tenant", "rotate-callback-secret", "t_nobody"]) == 1
    assert "no tenant t_nobody" in capsys.readouterr().err


# ---------------------------------------------------------------------- the stack: jobs and their callbacks
@dataclass
class Running:
    stack: LocalStack
    api_url: str

    def tenant(self, name: str) -> tuple[str, requests.Session]:
        info, key = self.stack.create_tenant(f"{name}-{uuid.uuid4().hex[:6]}")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        return str(info["tenant_id"]), session

    def submit(self, session: requests.Session, text: str, callback_url: str | None = None) -> str:
        body: dict[str, Any] = {"model": MODEL, "input": {"instances": [text]}}
        if callback_url:
            body["callback_url"] = callback_url
        resp = session.post(f"{self.api_url}/v1/jobs", json=body, timeout=60)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def wait(self, session: requests.Session, job_id: str, timeout_s: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            resp = session.get(f"{self.api_url}/v1/jobs/{job_id}", timeout=30)
            if resp.status_code == 200:
                status = resp.json()
                if status["status"] in ("succeeded", "failed"):
                    return status
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish in {timeout_s} s; last status {status}")


@pytest.fixture(scope="module")
def running(local_stack: LocalStack, api_url: str) -> Iterator[Running]:
    """The jobs queue's and the callbacks queue's event sources, as `sif up` runs them."""
    pollers = start_pollers(local_stack, functions={"WorkerFunction", "CallbackFunction"})
    try:
        yield Running(local_stack, api_url)
    finally:
        for poller in reversed(pollers):
            poller.stop()


def eventually(check: Callable[[], bool], timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


def test_a_hanging_receiver_does_not_delay_other_jobs(running: Running, receivers: Callable[..., Receiver]) -> None:
    """Inline, a receiver that never answers held the worker ~23.5 s per job (4 attempts x 5 s + backoff), and
    every job behind it waited; queued, the worker is done with the job at once."""
    tenant_a, a = running.tenant("cb-hang-a")
    _, b = running.tenant("cb-hang-b")
    assert running.wait(b, running.submit(b, "warm the worker up"))["status"] == "succeeded"
    hanging = receivers(204)
    hanging.hang()
    first = running.submit(a, "call a receiver that hangs", hanging.url)
    assert running.wait(a, first, timeout_s=30)["status"] == "succeeded"
    hanging.wait_calls(1, timeout_s=30)  # the callback function is now stuck on it, not the worker

    started = time.monotonic()
    second = running.submit(b, "another tenant's job")
    assert running.wait(b, second, timeout_s=30)["status"] == "succeeded"
    took = time.monotonic() - started
    assert took < 5, f"the second job took {took:.1f} s behind a hanging callback"
    assert callback_delivered(running.stack, tenant_a, first) is None  # still being tried

    hanging.release(204)
    eventually(lambda: callback_delivered(running.stack, tenant_a, first) is True, 45, "the callback delivered")


def test_a_receiver_that_answers_4xx_is_not_retried(running: Running, receivers: Callable[..., Receiver]) -> None:
    tenant, session = running.tenant("cb-404")
    gone = receivers(404)
    job_id = running.submit(session, "nobody wants this", gone.url)
    assert running.wait(session, job_id)["status"] == "succeeded"
    eventually(lambda: callback_delivered(running.stack, tenant, job_id) is False, 30, "the callback given up")
    time.sleep(6)  # past the first backoff: nothing comes again
    assert len(gone.calls) == 1


def test_a_tenants_secret_verifies_only_its_own_callbacks_until_rotated(
    running: Running, receivers: Callable[..., Receiver]
) -> None:
    tenant_a, a = running.tenant("cb-sign-a")
    tenant_b, b = running.tenant("cb-sign-b")
    table = running.stack.table("TenantsTable")
    secret_a, secret_b = callback_secret(table, tenant_a), callback_secret(table, tenant_b)
    assert secret_a and secret_b and secret_a != secret_b
    hook = receivers(204)
    jobs = {running.submit(a, "from a", hook.url): tenant_a, running.submit(b, "from b", hook.url): tenant_b}
    calls = hook.wait_calls(2)
    by_tenant = {json.loads(body)["tenant"]: (headers, body) for headers, body in calls}
    assert {json.loads(body)["id"] for _, body in calls} == set(jobs)
    assert verify_signature(secret_a, *by_tenant[tenant_a]) and verify_signature(secret_b, *by_tenant[tenant_b])
    assert not verify_signature(secret_a, *by_tenant[tenant_b])  # A cannot forge (or accept) B's callbacks
    assert not verify_signature(secret_b, *by_tenant[tenant_a])

    from sif_core.tenants import rotate_callback_secret

    rotated = rotate_callback_secret(table, tenant_b)
    running.submit(b, "from b, after the rotation", hook.url)
    headers, body = hook.wait_calls(3)[2]
    assert verify_signature(rotated, headers, body)
    assert not verify_signature(secret_b, headers, body)  # the old secret no longer verifies
