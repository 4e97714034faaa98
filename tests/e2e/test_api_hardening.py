"""Issue 11 over HTTP (the local gateway passes headers and bodies as API Gateway does): content types,
deep nesting, empty texts, zero-shot bounds. The handler-level tests are tests/unit/test_hardening.py."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import requests

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
BODIES = {
    "/v1/embeddings": {"model": MODEL, "input": "hello"},
    f"/v1/models/{MODEL}/predict": {"instances": ["hello"]},
    "/v1/jobs": {"model": MODEL, "input": {"instances": ["hello"]}},
    "/v1/batches": {"model": MODEL},
}


def post(client: ApiClient, path: str, body: str, content_type: str | None) -> requests.Response:
    headers = client.headers() | ({"Content-Type": content_type} if content_type is not None else {})
    return client.session.post(client.url + path, data=body.encode(), headers=headers, timeout=60)


@pytest.mark.parametrize("path", list(BODIES))
def test_every_post_route_takes_json_in_any_case_and_refuses_other_types(client: ApiClient, path: str) -> None:
    body = json.dumps(BODIES[path])
    for content_type in ("application/json", "APPLICATION/JSON", "application/json; charset=utf-8", None):
        resp = post(client, path, body, content_type)
        assert resp.status_code in (200, 201, 202), (content_type, resp.text)
    for content_type in ("text/plain", "application/xml", "application/x-www-form-urlencoded"):
        error = client.error(post(client, path, body, content_type), 415, "unsupported_media_type")
        assert content_type in error["message"]


def test_deep_json_and_empty_texts_are_4xx(client: ApiClient) -> None:
    deep = '{"model": "all-minilm-l6-v2", "input": ' + "[" * 100_000 + "]" * 100_000 + "}"
    client.error(post(client, "/v1/embeddings", deep, "application/json"), 400, "bad_request")
    error = client.error(client.embed(["fine", ""]), 400, "bad_request")
    assert error["message"] == "input 1: text is empty"


def test_zero_shot_bounds_are_422_at_once(client: ApiClient) -> None:
    body = {"instances": ["x"], "parameters": {"labels": ["a"] * 64, "template": "t" * 1_000_000 + "{}"}}
    error = client.error(client.post(f"/v1/models/{MODEL}/predict", body), 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "parameters", "template"]
    limits = client.get(f"/v1/models/{MODEL}").json()["limits"]
    assert (limits["max_labels"], limits["max_label_chars"], limits["max_template_chars"]) == (64, 100, 500)
