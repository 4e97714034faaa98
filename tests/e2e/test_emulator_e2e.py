"""The local stack behaves like AWS where a user can tell (issue 11), seen from the user's side: the
upload URL `POST /v1/batches` hands out works only as issued, a file PUT with urllib's defaults is
scored whole, the API answers any method as API Gateway does (JSON, never a 5xx), and a stack
stopped with `sif down` and started again still has its tenants, batches, results, usage and demo key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sif_emulator.moto_server import free_port
from sif_emulator.pollers import start_pollers
from sif_emulator.stack import LocalStack

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def scoring(local_stack: LocalStack, api_url: str) -> Iterator[str]:
    pollers = start_pollers(local_stack, functions=["ScorerFunction"])
    try:
        yield api_url
    finally:
        for poller in pollers:
            poller.stop()


def _wait_done(client: Any, batch_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(f"/v1/batches/{batch_id}").json()
        if state["status"] in ("succeeded", "failed"):
            return dict(state)
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not finish")


def _s3_code(resp: requests.Response) -> str:
    return str(ET.fromstring(resp.content).findtext("Code"))


def test_an_upload_url_works_only_as_issued(
    scoring: str, local_stack: LocalStack, new_tenant: Callable[..., Any]
) -> None:
    mallory, victim = new_tenant("mallory"), new_tenant("victim")
    batch = mallory.post("/v1/batches", {"model": MODEL}).json()
    url = batch["upload_url"]
    body = b'{"id": "1", "text": "planted"}\n'

    planted = url.replace(f"/incoming/{mallory.tenant_id}/", f"/incoming/{victim.tenant_id}/")
    assert planted != url
    refused = requests.put(planted, data=body, timeout=60)
    assert refused.status_code == 403 and _s3_code(refused) == "SignatureDoesNotMatch"
    as_delete = requests.delete(url, timeout=60)
    assert as_delete.status_code == 403 and _s3_code(as_delete) == "SignatureDoesNotMatch"
    longer = url.replace("X-Amz-Expires=3600", "X-Amz-Expires=604800")
    assert longer != url
    assert requests.put(longer, data=body, timeout=60).status_code == 403
    bare = requests.put(url.split("?", 1)[0], data=body, timeout=60)
    assert bare.status_code == 403 and _s3_code(bare) == "AccessDenied"

    s3 = local_stack.client("s3")
    listed = s3.list_objects_v2(Bucket=local_stack.bucket("inbox"), Prefix=f"incoming/{victim.tenant_id}/")
    assert listed.get("KeyCount", 0) == 0  # nothing planted in the victim's inbox
    assert victim.get("/v1/batches").json()["data"] == []
    victim_usage = victim.get("/v1/usage").json()
    assert victim_usage["total"]["inputs"] == 0  # and nothing billed to it


def test_a_urllib_upload_with_its_default_content_type_is_scored_whole(
    scoring: str, new_tenant: Callable[..., Any]
) -> None:
    """urllib sends `application/x-www-form-urlencoded` unless told otherwise; S3 stores the bytes."""
    client = new_tenant("urllib-upload")
    batch = client.post("/v1/batches", {"model": MODEL}).json()
    rows = "".join(json.dumps({"id": f"r{i}", "text": f"row {i} & more = text"}) + "\n" for i in range(20))
    request = urllib.request.Request(batch["upload_url"], data=rows.encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
    state = _wait_done(client, batch["id"])
    assert state["status"] == "succeeded", state
    assert (state["rows"], state["succeeded"], state["failed"]) == (20, 20, 0)
    predictions = requests.get(state["result_url"], timeout=60).text.splitlines()
    assert [json.loads(p)["id"] for p in predictions] == [f"r{i}" for i in range(20)]


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "FOO"])
@pytest.mark.parametrize("path", ["/v1/models", "/health", "/nowhere"])
def test_any_method_gets_api_gateways_json_answer(api_url: str, method: str, path: str) -> None:
    resp = requests.request(method, api_url + path, headers={"Authorization": "Bearer x"}, timeout=30)
    assert resp.status_code < 500
    assert resp.status_code == 404  # MISSING_AUTHENTICATION_TOKEN, as template.yaml's GatewayResponses say
    assert resp.headers["Content-Type"] == "application/json"
    error = resp.json()["error"]
    assert error["type"] == "not_found" and error["request_id"] == resp.headers["x-amzn-RequestId"]


def test_a_malformed_request_gets_a_json_4xx(api_url: str) -> None:
    host, port = urllib.parse.urlsplit(api_url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert 400 <= status < 500, head
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"]["type"] == "bad_request"


# ---------------------------------------------------------------------- a restart keeps the state
class _Caller:
    def __init__(self, api_url: str, key: str) -> None:
        self.url, self.headers = api_url, {"Authorization": f"Bearer {key}"}

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=60)

    def post(self, path: str, body: Any) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=self.headers, timeout=60)


def _sif(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sif_cli.main", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_a_restarted_stack_still_has_its_tenants_batches_usage_and_demo_key(tmp_path: Path) -> None:
    env = {**os.environ, "SIF_LOCAL_SNAPSHOT_S": "0", "SIF_STACK_JSON": str(tmp_path / "stack.json")}
    env.pop("AWS_ENDPOINT_URL", None)

    def up() -> dict[str, Any]:
        ports = {"SIF_API_PORT": str(free_port()), "SIF_AWS_PORT": str(free_port())}
        started = _sif("up", "--background", "--state-dir", str(tmp_path), env={**env, **ports})
        assert started.returncode == 0, started.stderr + started.stdout
        return dict(json.loads((tmp_path / "stack.json").read_text()))

    def down() -> None:
        stopped = _sif("down", "--state-dir", str(tmp_path), env=env)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr

    info = up()
    try:
        created = _sif("tenant", "create", "acme", "--monthly-calls", "1000", env=env)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        acme = _Caller(info["api_url"], key)
        assert acme.post("/v1/embeddings", {"model": MODEL, "input": ["one", "two", "three"]}).status_code == 200
        batch = acme.post("/v1/batches", {"model": MODEL}).json()
        rows = "".join(json.dumps({"id": f"r{i}", "text": f"row {i}"}) + "\n" for i in range(5))
        upload = urllib.request.Request(batch["upload_url"], data=rows.encode(), method="PUT")
        with urllib.request.urlopen(upload, timeout=60) as resp:
            assert resp.status == 200
        done = _wait_done(acme, batch["id"])
        assert done["status"] == "succeeded" and done["rows"] == 5
        usage = acme.get("/v1/usage").json()["total"]
        assert usage["inputs"] == 3 + 5
    finally:
        down()

    restarted = up()
    try:
        assert restarted["demo_api_key"] == info["demo_api_key"]
        demo = _Caller(restarted["api_url"], restarted["demo_api_key"])
        assert demo.get("/v1/models").status_code == 200
        acme = _Caller(restarted["api_url"], key)
        assert acme.get("/v1/usage").json()["total"] == usage
        again = acme.get(f"/v1/batches/{batch['id']}").json()
        assert again["status"] == "succeeded" and again["rows"] == 5
        assert [b["id"] for b in acme.get("/v1/batches").json()["data"]] == [batch["id"]]
        predictions = requests.get(again["result_url"], timeout=60).text.splitlines()
        assert [json.loads(p)["id"] for p in predictions] == [f"r{i}" for i in range(5)]
        time.sleep(3)  # the restored inbox file is not scored (nor billed) a second time
        assert acme.get("/v1/usage").json()["total"] == usage
    finally:
        down()
