"""End-to-end fixtures: the real HTTP API on the local stack (template.yaml's resources in moto).

`api` (session) starts the local API gateway in this process on a free 127.0.0.1 port, in front of
the session's `local_stack`; the functions run in their own worker processes, as `sif up` runs them.
`new_tenant(name, monthly_calls=...)` creates a tenant and returns an `ApiClient` with its key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from sif_emulator.gateway import LocalApiGateway
from sif_emulator.stack import LocalStack


@dataclass
class ApiClient:
    url: str
    key: str | None = None
    tenant_id: str = ""
    header: str = "authorization"  # or "x-api-key"
    session: requests.Session = field(default_factory=requests.Session)

    def headers(self) -> dict[str, str]:
        if not self.key:
            return {}
        if self.header == "x-api-key":
            return {"x-api-key": self.key}
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url + path, headers=self.headers(), timeout=60, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return self.session.post(self.url + path, json=body, headers=self.headers(), timeout=60, **kwargs)

    def embed(self, texts: str | list[str], **extra: Any) -> requests.Response:
        return self.post("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": texts, **extra})

    @staticmethod
    def error(resp: requests.Response, status: int, kind: str | None = None) -> dict[str, Any]:
        """Assert `resp` is the API's one error body with `status` (and `type`); returns the error."""
        assert resp.status_code == status, resp.text
        assert resp.headers["Content-Type"].startswith("application/json")
        error = resp.json()["error"]
        assert set(error) >= {"type", "message", "request_id"}, error
        assert error["request_id"] == resp.headers["x-amzn-RequestId"]
        if kind is not None:
            assert error["type"] == kind, error
        assert "Traceback" not in resp.text
        return dict(error)


# How often a warm function re-reads a model's versions and aliases (30 s on AWS): short on the test
# stack, so that an alias moved by a test serves within seconds (tests/e2e/test_protocols.py).
MODEL_INDEX_TTL_S = 3


@pytest.fixture(scope="session")
def api(local_stack: LocalStack) -> Iterator[LocalApiGateway]:
    env = pytest.MonkeyPatch()  # for the whole session: instances spawned later read it too
    env.setenv("SIF_MODEL_INDEX_TTL_S", str(MODEL_INDEX_TTL_S))
    gateway = LocalApiGateway(local_stack, 0).start()
    try:
        yield gateway
    finally:
        gateway.stop()
        env.undo()


@pytest.fixture(scope="session")
def api_url(api: LocalApiGateway) -> str:
    return api.url


@pytest.fixture(scope="session")
def new_tenant(local_stack: LocalStack, api_url: str) -> Callable[..., ApiClient]:
    def make(name: str = "e2e", *, monthly_calls: int | None = None, header: str = "authorization") -> ApiClient:
        tenant, key = local_stack.create_tenant(name, monthly_calls=monthly_calls)
        return ApiClient(api_url, key, tenant["tenant_id"], header)

    return make


@pytest.fixture(scope="session")
def client(new_tenant: Callable[..., ApiClient]) -> ApiClient:
    """A tenant shared by tests that do not count its usage."""
    return new_tenant("e2e-shared")


@pytest.fixture
def anonymous(api_url: str) -> ApiClient:
    return ApiClient(api_url)


@pytest.fixture
def client_with_key(api_url: str) -> Callable[..., ApiClient]:
    def make(key: str, header: str = "authorization") -> ApiClient:
        return ApiClient(api_url, key, header=header)

    return make


@pytest.fixture(scope="session")
def minilm_reference() -> dict[str, Any]:
    import json
    from pathlib import Path

    return dict(json.loads((Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json").read_text()))
