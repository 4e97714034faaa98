"""Every error status the API returns, with the one error body: 400, 404, 413, 422, 429, 500."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from sif_emulator.stack import LocalStack

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"


def test_wrong_task_is_400(client: ApiClient) -> None:
    client.error(client.post("/v1/embeddings", {"model": "open-nsfw", "input": "hello"}), 400, "wrong_task")
    client.error(client.post("/v1/models/open-nsfw/predict", {"instances": ["a text"]}), 400, "wrong_task")
    image = {"b64": base64.b64encode(b"\x89PNG").decode()}
    client.error(client.post(f"/v1/models/{MODEL}/predict", {"instances": [image]}), 400, "wrong_task")
    labels = {"instances": [image], "parameters": {"labels": ["a", "b"]}}
    client.error(client.post("/v1/models/open-nsfw/predict", labels), 400, "wrong_task")


def test_bad_inputs_are_400(client: ApiClient) -> None:
    not_b64 = {"instances": [{"b64": "this is not base64!"}]}
    client.error(client.post("/v1/models/open-nsfw/predict", not_b64), 400, "bad_request")
    not_an_image = {"instances": [{"b64": base64.b64encode(b"plain text, not an image").decode()}]}
    client.error(client.post("/v1/models/open-nsfw/predict", not_an_image), 400, "invalid_image")
    client.error(client.embed("hi", dimensions=128), 400, "bad_request")
    duplicates = {"instances": ["x"], "parameters": {"labels": ["a", "a"]}}
    client.error(client.post(f"/v1/models/{MODEL}/predict", duplicates), 400)


def test_unknown_model_is_404(client: ApiClient) -> None:
    client.error(client.get("/v1/models/no-such-model"), 404, "model_not_found")
    client.error(client.get("/v1/models/..%2F..%2Fetc"), 404)
    client.error(client.post("/v1/embeddings", {"model": "no-such-model", "input": "x"}), 404, "model_not_found")
    client.error(client.post("/v1/models/no-such-model/predict", {"instances": ["x"]}), 404, "model_not_found")


def test_over_6mb_is_413(client: ApiClient) -> None:
    big = "x" * (6 * 1024 * 1024 + 10)
    client.error(client.embed(big), 413)
    over_api_gateway = b"{" + b" " * (10 * 1024 * 1024 + 1) + b"}"
    resp = client.session.post(
        client.url + "/v1/embeddings", data=over_api_gateway, headers=client.headers(), timeout=60
    )
    client.error(resp, 413)


def test_model_limits_are_413(client: ApiClient) -> None:
    client.error(client.embed(["x"] * 257), 413, "input_too_large")
    client.error(client.embed("y" * 20_001), 413, "input_too_large")
    images = {"instances": [{"b64": base64.b64encode(b"x").decode()}] * 17}
    client.error(client.post("/v1/models/open-nsfw/predict", images), 413, "input_too_large")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"model": MODEL},
        {"model": MODEL, "input": []},
        {"model": MODEL, "input": [1.5, 2]},  # token ids are integers ([1, 2] is one input of two ids)
        {"model": MODEL, "input": [[101, 7592], "text"]},
        {"model": MODEL, "input": "x", "encoding_format": "hex"},
        {"model": "", "input": "x"},
    ],
)
def test_invalid_embeddings_bodies_are_422(client: ApiClient, body: dict) -> None:
    error = client.error(client.post("/v1/embeddings", body), 422, "validation_error")
    assert error["details"] and all({"loc", "msg", "type"} == set(d) for d in error["details"])


def test_invalid_json_and_predict_bodies_are_422(client: ApiClient) -> None:
    resp = client.session.post(client.url + "/v1/embeddings", data=b"{not json", headers=client.headers(), timeout=30)
    client.error(resp, 422)
    for body in [{"instances": []}, {"instances": ["x"], "parameters": {"labels": []}}, {"inputs": ["x"]}]:
        client.error(client.post(f"/v1/models/{MODEL}/predict", body), 422, "validation_error")
    template = {"instances": ["x"], "parameters": {"labels": ["a"], "template": "no slot"}}
    client.error(client.post(f"/v1/models/{MODEL}/predict", template), 422)
    client.error(client.get("/v1/usage", params={"from": "2026-13-01"}), 422)
    client.error(client.get("/v1/usage", params={"from": "2026-02-01", "to": "2026-01-01"}), 400)


def test_quota_exhaustion_is_429_with_retry_after(new_tenant: Callable[..., ApiClient]) -> None:
    client = new_tenant("quota", monthly_calls=3)
    for _ in range(3):
        assert client.embed("within quota").status_code == 200
    for _ in range(2):
        resp = client.embed("over quota")
        error = client.error(resp, 429, "quota_exceeded")
        retry_after = int(resp.headers["Retry-After"])
        assert 0 < retry_after <= 31 * 24 * 3600
        assert "3 units (inputs)" in error["message"]
    assert client.post(f"/v1/models/{MODEL}/predict", {"instances": ["x"]}).status_code == 429
    # Refused calls are not metered; reading usage is not a metered call.
    usage = client.get("/v1/usage").json()
    assert usage["total"]["calls"] == 3


@pytest.fixture
def broken_model(local_stack: LocalStack) -> Iterator[str]:
    """A model whose file in the models bucket does not match its manifest's sha256."""
    s3 = local_stack.client("s3")
    bucket = local_stack.bucket("models")
    good = json.loads(s3.get_object(Bucket=bucket, Key=f"models/{MODEL}/1/manifest.json")["Body"].read())
    manifest = copy.deepcopy(good)
    manifest["name"] = "broken-model"
    prefix = "models/broken-model/1/"
    s3.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest).encode())
    s3.put_object(Bucket=bucket, Key=prefix + manifest["variants"]["int8"], Body=b"not the model you hashed")
    try:
        yield "broken-model"
    finally:
        for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])


def test_a_failing_dependency_is_500_with_the_request_id(client: ApiClient, broken_model: str) -> None:
    before = client.get("/v1/usage").json()["total"]["calls"]
    resp = client.post("/v1/embeddings", {"model": broken_model, "input": "hello"})
    error = client.error(resp, 500, "internal_error")
    assert error["request_id"] in error["message"]
    assert "sha256" not in resp.text  # details stay in the logs
    assert client.get("/v1/usage").json()["total"]["calls"] == before  # failed calls are not metered
    assert client.embed("the other models keep serving").status_code == 200
