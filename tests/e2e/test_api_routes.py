"""Every route of the HTTP API over HTTP, against the reference values where there are some."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def png(width: int = 96, height: int = 64) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 160, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_health_and_openapi_need_no_key(anonymous: ApiClient) -> None:
    assert anonymous.get("/health").json() == {"status": "ok"}
    spec = anonymous.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    paths = set(spec["paths"])
    assert {"/health", "/v1/models", "/v1/models/{name}", "/v1/embeddings", "/v1/usage"} <= paths
    assert "/v1/models/{name}/predict" in paths
    assert set(spec["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyAuth"}
    assert spec["servers"] == [{"url": "/"}]


def test_swagger_ui(anonymous: ApiClient) -> None:
    resp = anonymous.get("/docs")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "swagger" in resp.text.lower() and "/v1/embeddings" in resp.text


def test_models(client: ApiClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert {MODEL, "open-nsfw"} <= set(models)
    minilm = models[MODEL]
    assert minilm["task"] == "embedding" and minilm["route"] == "cpu" and minilm["dim"] == 384
    assert minilm["sha256"] == minilm["variants"]["int8"] and len(minilm["sha256"]) == 64
    assert minilm["limits"]["max_inputs"] == 256
    assert models["open-nsfw"]["task"] == "image-classification"
    assert models["open-nsfw"]["labels"] == ["sfw", "nsfw"]
    one = client.get(f"/v1/models/{MODEL}")
    assert one.status_code == 200 and one.json() == minilm


def test_embeddings_match_the_reference(client: ApiClient, minilm_reference: dict) -> None:
    texts = minilm_reference["texts"]
    body = client.embed(texts).json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert vectors.shape == (len(texts), 384)
    assert cosines(vectors, np.array(minilm_reference["embeddings"])).min() >= 0.97
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 256
    assert usage["truncated_inputs"] == [5]  # the one text over 256 tokens
    assert usage["cost_usd"] > 0


def test_embeddings_base64_is_little_endian_float32(client: ApiClient) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    as_float = client.embed(text).json()["data"][0]["embedding"]
    encoded = client.embed(text, encoding_format="base64").json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(decoded, np.array(as_float, dtype=np.float32), atol=1e-7)


def test_predict_text_embedding(client: ApiClient, minilm_reference: dict) -> None:
    texts = minilm_reference["texts"][:3]
    body = client.post(f"/v1/models/{MODEL}/predict", {"instances": texts}).json()
    assert body["model"] == MODEL and body["model_version"] == "1"
    vectors = np.array(body["predictions"])
    assert cosines(vectors, np.array(minilm_reference["embeddings"][:3])).min() >= 0.97
    assert body["usage"]["inputs"] == 3 and body["usage"]["tokens"] > 0 and body["usage"]["compute_ms"] >= 1


def test_predict_zero_shot(client: ApiClient) -> None:
    body = client.post(
        f"/v1/models/{MODEL}/predict",
        {
            "instances": ["The striker scored twice in the cup final.", "The central bank raised interest rates."],
            "parameters": {"labels": ["sports", "finance", "cooking"], "template": "This text is about {}."},
        },
    ).json()
    first, second = body["predictions"]
    assert first["label"] == "sports" and second["label"] == "finance"
    assert sorted(first["labels"]) == ["cooking", "finance", "sports"]
    assert first["scores"] == sorted(first["scores"], reverse=True)
    assert sum(first["scores"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_image_moderation(client: ApiClient) -> None:
    body = client.post("/v1/models/open-nsfw/predict", {"instances": [{"b64": png()}, {"b64": png(300, 200)}]}).json()
    assert len(body["predictions"]) == 2
    for prediction in body["predictions"]:
        assert set(prediction["scores"]) == {"sfw", "nsfw"}
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-3)
        assert prediction["label"] == "sfw"
    assert body["usage"]["inputs"] == 2 and body["usage"]["pixels"] == 96 * 64 + 300 * 200


def test_usage_route_shape(client: ApiClient) -> None:
    body = client.get("/v1/usage").json()
    assert body["tenant"] == client.tenant_id
    assert set(body["period"]) == {"from", "to"} and body["period"]["from"].endswith("-01")
    assert {"calls", "inputs", "tokens", "compute_ms", "cost_usd"} <= set(body["total"])
    for row in body["by_model_day"]:
        assert {"model", "day", "calls", "inputs", "tokens", "compute_ms", "cost_usd"} <= set(row)


def test_the_stage_path_works_too(client: ApiClient) -> None:
    """Copied from an AWS URL (…/prod/v1/models): served the same."""
    assert client.get("/prod/v1/models").status_code == 200
