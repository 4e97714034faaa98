"""API keys: both header styles, 401 for a missing or unknown key, the error body and request id."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/all-minilm-l6-v2"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/models/all-minilm-l6-v2/predict"),
    ("GET", "/v1/usage"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_missing_key_is_401(anonymous: ApiClient, method: str, path: str) -> None:
    resp = anonymous.session.request(method, anonymous.url + path, json={}, timeout=30)
    anonymous.error(resp, 401, "unauthorized")


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_unknown_key_is_401(client_with_key: Callable[..., ApiClient], header: str) -> None:
    stranger = client_with_key("sif_not-a-real-key", header)
    stranger.error(stranger.get("/v1/models"), 401, "unauthorized")


def test_malformed_authorization_is_401(anonymous: ApiClient) -> None:
    for value in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "sif_something"]:
        resp = anonymous.session.get(anonymous.url + "/v1/models", headers={"Authorization": value}, timeout=30)
        anonymous.error(resp, 401)


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_both_header_styles_work(new_tenant: Callable[..., ApiClient], header: str) -> None:
    client = new_tenant("auth-styles", header=header)
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/usage").json()["tenant"] == client.tenant_id


def test_header_names_are_case_insensitive(client: ApiClient) -> None:
    for name, value in [("AUTHORIZATION", f"bearer {client.key}"), ("X-Api-Key", str(client.key))]:
        resp = client.session.get(client.url + "/v1/models", headers={name: value}, timeout=30)
        assert resp.status_code == 200, (name, resp.text)


def test_unknown_route_is_a_json_404(client: ApiClient, anonymous: ApiClient) -> None:
    client.error(client.get("/v1/nothing-here"), 404, "not_found")
    client.error(anonymous.get("/"), 404, "not_found")
    client.error(client.session.delete(client.url + "/v1/models", headers=client.headers(), timeout=30), 404)
