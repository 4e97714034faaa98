"""The protocols every model speaks, over HTTP on the local stack: TF-Serving's URL forms, KServe v2 /
the Open Inference Protocol, the openai client's model list; model versions, aliases, canaries,
variants and private models on every route; jobs and dropped files pinned to one version.

The versioned and private models are published by this module into the stack's models bucket as an
operator would (`models/{name}/{version}/` with the manifest last, `models/{name}/aliases.json`):
copies of all-minilm-l6-v2's int8 graph under new names, so the other tests' models are untouched.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openai
import pytest
import requests

from sif_core.settings import Settings
from sif_emulator.stack import LocalStack

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
NSFW = "open-nsfw"
VERSIONED = "proto-minilm"  # versions 1 and 2, aliases `stable` (-> 1) and `canary` (1 and 2, 50/50)
PRIVATE = "proto-private"  # private to the `owner` tenant
TEXT = "A man is eating food."
IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CANARY_REQUESTS = int(os.environ.get("SIF_CANARY_REQUESTS", "1000"))


# ---------------------------------------------------------------------- publishing, as an operator does
class Models:
    def __init__(self, stack: LocalStack) -> None:
        self.s3 = stack.client("s3")
        self.bucket = stack.bucket("models")
        source = self.s3.get_object(Bucket=self.bucket, Key=f"models/{MODEL}/1/manifest.json")
        self.source: dict[str, Any] = json.loads(source["Body"].read())

    def publish_copy(self, name: str, version: str, *, tenant: str | None = None) -> None:
        """all-minilm-l6-v2's int8 variant as `name`/`version` (the manifest goes last)."""
        graph = self.source["variants"]["int8"]
        kept = [graph, self.source["tokenizer"]["file"]]
        for filename in kept:  # one PUT each (moto's copy of a multipart upload keeps a checksum that fails)
            data = self.s3.get_object(Bucket=self.bucket, Key=f"models/{MODEL}/1/{filename}")["Body"].read()
            self.s3.put_object(Bucket=self.bucket, Key=f"models/{name}/{version}/{filename}", Body=data)
        manifest = dict(self.source, name=name, version=version, variants={"int8": graph}, default_variant="int8")
        manifest["files"] = {f: self.source["files"][f] for f in kept}
        if tenant is not None:
            manifest["tenant"] = tenant
        self.put(f"models/{name}/{version}/manifest.json", manifest)

    def set_aliases(self, name: str, aliases: dict[str, dict[str, int]]) -> None:
        self.put(f"models/{name}/aliases.json", {"aliases": aliases, "retired": []})

    def put(self, key: str, body: dict[str, Any]) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(body).encode(), ContentType="application/json")


@pytest.fixture(scope="module")
def owner(new_tenant: Callable[..., ApiClient]) -> ApiClient:
    return new_tenant("protocols-owner")


@pytest.fixture(scope="module")
def models(local_stack: LocalStack, owner: ApiClient) -> Models:
    models = Models(local_stack)
    models.publish_copy(VERSIONED, "1")
    models.publish_copy(VERSIONED, "2")
    models.set_aliases(VERSIONED, {"stable": {"1": 1}, "canary": {"1": 50, "2": 50}})
    models.publish_copy(PRIVATE, "1", tenant=owner.tenant_id)
    return models


@pytest.fixture(scope="module")
def caller(new_tenant: Callable[..., ApiClient], models: Models) -> ApiClient:
    """A tenant of its own with room for the canary's thousand calls."""
    return new_tenant("protocols", monthly_calls=1_000_000)


def served(resp: requests.Response) -> tuple[str, str, str]:
    """(version, variant, sha256) an inference response says served it."""
    assert resp.status_code == 200, resp.text
    h = resp.headers
    return h["x-sif-model-version"], h["x-sif-model-variant"], h["x-sif-model-sha256"]


def sha256s(client: ApiClient, name: str) -> dict[str, str]:
    resp = client.get(f"/v1/models/{name}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["variants"])


def v2_texts(*texts: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}]}


# ---------------------------------------------------------------------- the document
def test_openapi_documents_every_form(anonymous: ApiClient) -> None:
    spec = anonymous.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/v1/models/{name}:predict", "post"),
        ("/v1/models/{name}/versions/{version}:predict", "post"),
        ("/v1/models/{name}/labels/{label}:predict", "post"),
        ("/v1/models/{name}/versions/{version}", "get"),
        ("/v1/models/{name}/metadata", "get"),
        ("/v2", "get"),
        ("/v2/health/live", "get"),
        ("/v2/health/ready", "get"),
        ("/v2/models/{name}", "get"),
        ("/v2/models/{name}/ready", "get"),
        ("/v2/models/{name}/versions/{version}", "get"),
        ("/v2/models/{name}/versions/{version}/ready", "get"),
        ("/v2/models/{name}/infer", "post"),
        ("/v2/models/{name}/versions/{version}/infer", "post"),
    ]:
        assert method in paths.get(path, {}), path
    for path in ["/v1/models/{name}:predict", "/v2/models/{name}/infer", "/v1/embeddings"]:
        responses = paths[path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "415", "422", "429", "500"} <= set(responses), path
        assert "$ref" in json.dumps(responses["200"]), path  # the body's schema, though a Response carries it
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert "V2InferRequest" in json.dumps(infer["requestBody"])
    assert "variant" in {p["name"] for p in infer["parameters"]}
    assert "variant" in spec["components"]["schemas"]["PredictRequest"]["properties"]
    assert {"object", "data", "models"} <= set(spec["components"]["schemas"]["ModelList"]["properties"])


# ---------------------------------------------------------------------- one text, every URL form
def test_every_predict_form_gives_the_same_values(caller: ApiClient) -> None:
    int8 = sha256s(caller, MODEL)["int8"]
    body = {"instances": [TEXT]}
    forms = [f"/v1/models/{MODEL}/predict", f"/v1/models/{MODEL}:predict", f"/v1/models/{MODEL}/versions/1:predict"]
    vectors = []
    for path in forms:
        resp = caller.post(path, body)
        assert served(resp) == ("1", "int8", int8), path
        out = resp.json()
        assert (out["model"], out["model_version"], out["variant"]) == (MODEL, "1", "int8")
        vectors.append(np.asarray(out["predictions"][0], dtype=np.float32))
    resp = caller.post(f"/v2/models/{MODEL}/infer", {"id": "req-7", **v2_texts(TEXT)})
    assert served(resp) == ("1", "int8", int8)
    out = resp.json()
    assert (out["model_name"], out["model_version"], out["id"]) == (MODEL, "1", "req-7")
    assert out["parameters"]["variant"] == "int8" and out["parameters"]["inputs"] == 1
    (tensor,) = out["outputs"]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("sentence_embedding", "FP32", [1, 384])
    vectors.append(np.asarray(tensor["data"], dtype=np.float32))
    for vector in vectors[1:]:  # predict rounds to 7 significant digits; v2 sends the float32 as it is
        np.testing.assert_allclose(vector, vectors[0], rtol=1e-6, atol=1e-7)
    resp = caller.post(f"/v2/models/{MODEL}/versions/1/infer", v2_texts(TEXT, "hello"))
    assert resp.json()["outputs"][0]["shape"] == [2, 384] and resp.json()["id"] == resp.headers["x-amzn-RequestId"]
    resp = caller.post("/v1/embeddings", {"model": f"{MODEL}@1", "input": TEXT, "encoding_format": "float"})
    assert served(resp)[:2] == ("1", "int8")
    np.testing.assert_allclose(resp.json()["data"][0]["embedding"], vectors[0], rtol=1e-6, atol=1e-7)


def test_a_verb_or_a_version_that_is_not_one_is_404(caller: ApiClient) -> None:
    caller.error(caller.post(f"/v1/models/{MODEL}:classify", {"instances": [TEXT]}), 404)
    caller.error(caller.post(f"/v1/models/{MODEL}", {"instances": [TEXT]}), 404)
    caller.error(caller.post(f"/v1/models/{MODEL}/versions/9:predict", {"instances": [TEXT]}), 404, "model_not_found")
    caller.error(caller.post(f"/v1/models/{MODEL}/versions/x:predict", {"instances": [TEXT]}), 404, "model_not_found")
    caller.error(caller.post(f"/v1/models/{MODEL}/labels/nope:predict", {"instances": [TEXT]}), 404, "model_not_found")
    caller.error(caller.post(f"/v2/models/{MODEL}@9/infer", v2_texts(TEXT)), 404, "model_not_found")


# ---------------------------------------------------------------------- the openai client and the list
def test_openai_client_lists_and_retrieves_models(caller: ApiClient) -> None:
    oai = openai.OpenAI(base_url=caller.url + "/v1", api_key=caller.key, max_retries=0)
    listed = {m.id: m for m in oai.models.list()}
    assert {MODEL, NSFW, VERSIONED} <= set(listed) and PRIVATE not in listed
    assert listed[MODEL].object == "model" and listed[MODEL].owned_by == "sif" and listed[MODEL].created > 0
    one = oai.models.retrieve(NSFW)
    assert one.id == NSFW and one.object == "model"

    body = caller.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [m["name"] for m in body["models"]]
    entry = {m["name"]: m for m in body["models"]}[VERSIONED]
    assert entry["version"] == "2" and entry["versions"] == ["1", "2"]  # `latest`: the highest
    assert entry["aliases"] == {"stable": {"1": 1}, "canary": {"1": 50, "2": 50}}
    minilm = {m["name"]: m for m in body["models"]}[MODEL]
    assert set(minilm["variants"]) == {"int8", "fp32"} and minilm["sha256"] == minilm["variants"]["int8"]


# ---------------------------------------------------------------------- variants
def test_unknown_variant_is_400(caller: ApiClient) -> None:
    caller.error(
        caller.post(f"/v1/models/{MODEL}/predict", {"instances": [TEXT], "variant": "fp16"}), 400, "unknown_variant"
    )
    caller.error(caller.post(f"/v1/models/{MODEL}:predict?variant=fp16", {"instances": [TEXT]}), 400, "unknown_variant")
    caller.error(caller.embed(TEXT, variant="fp16"), 400, "unknown_variant")
    caller.error(caller.post(f"/v2/models/{MODEL}/infer?variant=fp16", v2_texts(TEXT)), 400, "unknown_variant")
    caller.error(caller.post(f"/v1/models/{NSFW}/predict", {"instances": [{"b64": "eA=="}], "variant": "int8"}), 400)
    two = caller.post(f"/v1/models/{MODEL}/predict?variant=int8", {"instances": [TEXT], "variant": "fp32"})
    caller.error(two, 400, "bad_request")


def test_fp32_variant_is_served_with_its_sha256(caller: ApiClient) -> None:
    shas = sha256s(caller, MODEL)
    assert shas["fp32"] != shas["int8"]
    fp32 = caller.embed(TEXT, variant="fp32", encoding_format="float")
    assert served(fp32) == ("1", "fp32", shas["fp32"])
    int8 = caller.embed(TEXT, encoding_format="float")
    assert served(int8) == ("1", "int8", shas["int8"])
    a, b = (np.asarray(r.json()["data"][0]["embedding"]) for r in (fp32, int8))
    assert float(a @ b) >= 0.97 and not np.array_equal(a, b)
    resp = caller.post(f"/v1/models/{MODEL}:predict?variant=fp32", {"instances": [TEXT]})
    assert served(resp) == ("1", "fp32", shas["fp32"]) and resp.json()["variant"] == "fp32"
    np.testing.assert_allclose(resp.json()["predictions"][0], a, rtol=1e-6, atol=1e-7)
    resp = caller.post(f"/v2/models/{MODEL}/infer", {"parameters": {"variant": "fp32"}, **v2_texts(TEXT)})
    assert served(resp) == ("1", "fp32", shas["fp32"])


# ---------------------------------------------------------------------- private models
def test_a_private_model_is_its_tenants_only(caller: ApiClient, owner: ApiClient) -> None:
    body = {"instances": [TEXT]}
    assert served(owner.post(f"/v1/models/{PRIVATE}/predict", body))[0] == "1"
    assert PRIVATE in {m["id"] for m in owner.get("/v1/models").json()["data"]}
    assert owner.get(f"/v1/models/{PRIVATE}").json()["owned_by"] == owner.tenant_id
    for resp in [
        caller.post(f"/v1/models/{PRIVATE}/predict", body),
        caller.post(f"/v1/models/{PRIVATE}:predict", body),
        caller.post(f"/v1/models/{PRIVATE}/versions/1:predict", body),
        caller.get(f"/v1/models/{PRIVATE}"),
        caller.get(f"/v1/models/{PRIVATE}/metadata"),
        caller.get(f"/v1/models/{PRIVATE}/versions/1"),
        caller.get(f"/v2/models/{PRIVATE}"),
        caller.get(f"/v2/models/{PRIVATE}/ready"),
        caller.post(f"/v2/models/{PRIVATE}/infer", v2_texts(TEXT)),
        caller.embed(TEXT, model=PRIVATE),
        caller.post("/v1/jobs", {"model": PRIVATE, "input": {"instances": [TEXT]}}),
        caller.post("/v1/batches", {"model": PRIVATE}),
    ]:
        error = caller.error(resp, 404)
        assert error["message"] == f"unknown model {PRIVATE!r}", error
    assert PRIVATE not in {m["id"] for m in caller.get("/v1/models").json()["data"]}


# ---------------------------------------------------------------------- KServe v2
def test_v2_server_and_model_metadata(caller: ApiClient, anonymous: ApiClient) -> None:
    assert anonymous.get("/v2/health/live").json() == {"live": True}
    assert anonymous.get("/v2/health/ready").json() == {"ready": True}
    for method, path in [("GET", "/v2"), ("GET", f"/v2/models/{NSFW}"), ("POST", f"/v2/models/{NSFW}/infer")]:
        anonymous.error(anonymous.session.request(method, anonymous.url + path, json={}, timeout=30), 401)
    anonymous.error(anonymous.session.post(f"{anonymous.url}/v1/models/{MODEL}:predict", json={}, timeout=30), 401)
    server = caller.get("/v2").json()
    assert server["name"] == "sif" and server["version"] and server["extensions"] == []

    nsfw = caller.get(f"/v2/models/{NSFW}").json()
    assert (nsfw["name"], nsfw["versions"], nsfw["platform"]) == (NSFW, ["1"], "onnxruntime_onnx")
    assert nsfw["inputs"] == [{"name": "input:0", "datatype": "FP32", "shape": [-1, 224, 224, 3]}]
    assert nsfw["outputs"] == [{"name": "outputs", "datatype": "FP32", "shape": [-1, 2]}]
    assert caller.get(f"/v2/models/{NSFW}/versions/1").json()["inputs"] == nsfw["inputs"]

    minilm = caller.get(f"/v2/models/{MODEL}").json()
    assert minilm["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert minilm["outputs"] == [{"name": "sentence_embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert minilm["parameters"]["task"] == "embedding" and minilm["parameters"]["version"] == "1"

    for name in (MODEL, NSFW):
        assert caller.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
        assert caller.get(f"/v2/models/{name}/versions/1/ready").json() == {"name": name, "ready": True}
    caller.error(caller.get("/v2/models/no-such-model"), 404, "model_not_found")
    caller.error(caller.get(f"/v2/models/{NSFW}/versions/2/ready"), 404, "model_not_found")


def test_v2_infer_on_raw_tensors_equals_onnxruntime(caller: ApiClient) -> None:
    import onnxruntime as ort

    graph = Path(os.environ.get("SIF_MODELS_DIR") or ".cache/models") / NSFW / "1" / "open-nsfw.onnx"
    pixels = np.random.default_rng(7).uniform(-123.0, 151.0, size=(1, 224, 224, 3)).astype(np.float32)
    (want,) = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"input:0": pixels})

    tensor = {"name": "input:0", "shape": [1, 224, 224, 3], "datatype": "FP32", "data": pixels.reshape(-1).tolist()}
    resp = caller.post(f"/v2/models/{NSFW}/infer", {"inputs": [tensor], "outputs": [{"name": "outputs"}]})
    version, variant, _ = served(resp)
    out = resp.json()
    assert (out["model_name"], out["model_version"], version, variant) == (NSFW, "1", "1", "fp32")
    assert out["parameters"]["inputs"] == 1  # metered: one input, a row of the batch axis
    (got,) = out["outputs"]
    assert (got["name"], got["datatype"], got["shape"]) == ("outputs", "FP32", [1, 2])
    np.testing.assert_allclose(np.asarray(got["data"], dtype=np.float32).reshape(1, 2), want, rtol=1e-5, atol=1e-6)

    nested = dict(tensor, data=pixels.tolist())  # nested lists are taken row-major too
    again = caller.post(f"/v2/models/{NSFW}/versions/1/infer", {"inputs": [nested]}).json()["outputs"][0]["data"]
    np.testing.assert_allclose(again, got["data"], rtol=1e-5, atol=1e-6)

    small = {"name": "input:0", "shape": [1, 2, 2, 3], "datatype": "FP32", "data": [0.0] * 12}
    for bad in [
        dict(tensor, datatype="FP64"),  # the graph takes FP32
        dict(tensor, shape=[1, 224, 224, 2]),  # data does not fill the shape
        small,  # the graph's fixed axes are 224, 224, 3
        dict(tensor, name="pixels"),  # no such input
        dict(tensor, data=["x"] * pixels.size),  # strings for FP32
    ]:
        caller.error(caller.post(f"/v2/models/{NSFW}/infer", {"inputs": [bad]}), 400)
    caller.error(caller.post(f"/v2/models/{NSFW}/infer", {"inputs": [dict(tensor, datatype="FP99")]}), 422)
    caller.error(caller.post(f"/v2/models/{NSFW}/infer", {"inputs": [tensor], "outputs": [{"name": "x"}]}), 400)
    caller.error(caller.post(f"/v2/models/{MODEL}/infer", {"inputs": [small]}), 400)  # a text model takes BYTES


# ---------------------------------------------------------------------- TF-Serving status and metadata
def test_an_input_with_no_elements_is_a_400_and_the_function_stays_up(caller: ApiClient) -> None:
    """An empty batch made onnxruntime abort the API function's process on the iris graph (a 502 and a cold
    start); schemathesis' fuzzing found the numpy side of it (an axis of 4e34 next to one of 0)."""
    iris = [{"name": f, "shape": [0, 1], "datatype": "FP32", "data": []} for f in IRIS_FEATURES]
    cases = {
        "iris-species": {"inputs": iris},
        NSFW: {"inputs": [{"name": "input:0", "shape": [0, 224, 224, 3], "datatype": "FP32", "data": []}]},
        MODEL: {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]},
    }
    for model, body in cases.items():
        resp = caller.post(f"/v2/models/{model}/infer", body)
        assert resp.status_code == 400 and "has no elements" in resp.json()["error"]["message"], (model, resp.text)
    huge = {"name": "input:0", "shape": [39822791473485222057891929700433920, 0], "datatype": "FP32", "data": [[]]}
    assert caller.post(f"/v2/models/{NSFW}/infer", {"inputs": [huge]}).status_code == 422
    one = [{"name": f, "shape": [1, 1], "datatype": "FP32", "data": [1.0]} for f in IRIS_FEATURES]
    assert caller.post("/v2/models/iris-species/infer", {"inputs": one}).status_code == 200


def test_tf_serving_status_and_metadata(caller: ApiClient) -> None:
    status = caller.get(f"/v1/models/{NSFW}/versions/1").json()
    assert status == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    caller.error(caller.get(f"/v1/models/{NSFW}/versions/2"), 404, "model_not_found")
    meta = caller.get(f"/v1/models/{NSFW}/metadata").json()
    assert meta["model_spec"] == {"name": NSFW, "signature_name": "", "version": "1"}
    signature = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    image = signature["inputs"]["input:0"]
    assert image["dtype"] == "DT_FLOAT" and [d["size"] for d in image["tensor_shape"]["dim"]] == [
        "-1",
        "224",
        "224",
        "3",
    ]
    assert signature["outputs"]["outputs"]["dtype"] == "DT_FLOAT"
    assert caller.get(f"/v1/models/{VERSIONED}@1/metadata").json()["model_spec"]["version"] == "1"


# ---------------------------------------------------------------------- versions, aliases, canaries
def test_versions_and_aliases_on_every_route(caller: ApiClient) -> None:
    body = {"instances": [TEXT]}
    assert served(caller.post(f"/v1/models/{VERSIONED}/predict", body))[0] == "2"  # latest: the highest
    assert served(caller.post(f"/v1/models/{VERSIONED}@1/predict", body))[0] == "1"
    assert served(caller.post(f"/v1/models/{VERSIONED}@stable:predict", body))[0] == "1"
    assert served(caller.post(f"/v1/models/{VERSIONED}/labels/stable:predict", body))[0] == "1"
    assert served(caller.post(f"/v1/models/{VERSIONED}/versions/2:predict", body))[0] == "2"
    assert served(caller.post(f"/v2/models/{VERSIONED}@stable/infer", v2_texts(TEXT)))[0] == "1"
    assert served(caller.post(f"/v2/models/{VERSIONED}/versions/1/infer", v2_texts(TEXT)))[0] == "1"
    assert served(caller.embed(TEXT, model=f"{VERSIONED}@stable"))[0] == "1"
    assert caller.get(f"/v1/models/{VERSIONED}@stable").json()["version"] == "1"
    assert caller.get(f"/v2/models/{VERSIONED}").json()["versions"] == ["1", "2"]
    caller.error(caller.post(f"/v1/models/{VERSIONED}@nope/predict", body), 404, "model_not_found")
    caller.error(caller.embed(TEXT, model=f"{VERSIONED}@3"), 404, "model_not_found")


def test_a_canary_alias_splits_by_its_weights(caller: ApiClient) -> None:
    body = {"instances": ["canary"]}
    local = threading.local()

    def one(_: int) -> str:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        resp = session.post(
            f"{caller.url}/v1/models/{VERSIONED}@canary/predict", json=body, headers=caller.headers(), timeout=60
        )
        version = served(resp)[0]
        assert resp.json()["model_version"] == version
        return version

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        counts = Counter(pool.map(one, range(CANARY_REQUESTS)))
    share = counts["2"] / CANARY_REQUESTS
    took = time.monotonic() - started
    print(f"canary 50/50 over {CANARY_REQUESTS} requests: {dict(counts)} ({share:.1%} on 2) in {took:.1f} s")
    assert set(counts) == {"1", "2"}
    assert abs(share - 0.5) <= max(0.05, 1.6 / CANARY_REQUESTS**0.5), counts  # 5 % at 1,000 (> 3 sigma)


def test_a_warm_function_follows_an_alias_move(caller: ApiClient, models: Models) -> None:
    body = {"instances": [TEXT]}
    path = f"/v1/models/{VERSIONED}@stable/predict"
    assert {served(caller.post(path, body))[0] for _ in range(4)} == {"1"}  # every instance warm on `stable` -> 1
    models.set_aliases(VERSIONED, {"stable": {"2": 1}, "canary": {"1": 50, "2": 50}})
    moved = time.monotonic()
    try:
        streak, deadline = 0, moved + 60
        while streak < 12:  # a dozen calls in a row (over every warm instance) on the new version
            assert time.monotonic() < deadline, "the alias move was not followed within 60 s"
            streak = streak + 1 if served(caller.post(path, body))[0] == "2" else 0
            time.sleep(0.05)
        print(f"alias stable 1 -> 2 followed by every warm instance in {time.monotonic() - moved:.1f} s")
    finally:
        models.set_aliases(VERSIONED, {"stable": {"1": 1}, "canary": {"1": 50, "2": 50}})
        # An instance that read `stable` -> 2 keeps it for up to the index TTL; the tests after this one
        # (a batch pinned on `stable`) must see 1 on every instance, whichever one the gateway picks.
        time.sleep(Settings.model_fields["model_index_ttl_s"].default + 1)


# ---------------------------------------------------------------------- jobs, batches and drops pin a version
@pytest.fixture(scope="module")
def workers(local_stack: LocalStack) -> Iterator[None]:
    from sif_emulator.pollers import start_pollers

    pollers = start_pollers(local_stack, functions=["WorkerFunction", "ScorerFunction"])
    try:
        yield
    finally:
        for poller in reversed(pollers):
            poller.stop()


def wait_for(client: ApiClient, path: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get(path).json()
        if status.get("status") in ("succeeded", "failed"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"{path} did not finish in {timeout_s} s: {status}")


def test_jobs_batches_and_drops_run_one_pinned_version(
    caller: ApiClient, local_stack: LocalStack, workers: None
) -> None:
    int8 = sha256s(caller, f"{VERSIONED}@1")["int8"]
    resp = caller.post("/v1/jobs", {"model": f"{VERSIONED}@canary", "input": {"instances": [TEXT, "hello"]}})
    assert resp.status_code == 202, resp.text
    job = resp.json()["id"]
    accepted = caller.get(f"/v1/jobs/{job}").json()
    assert accepted["model"] == VERSIONED and accepted["model_version"] in ("1", "2") and accepted["variant"] == "int8"
    done = wait_for(caller, f"/v1/jobs/{job}")
    assert done["status"] == "succeeded" and done["model_version"] == accepted["model_version"], done
    manifest = requests.get(done["manifest_url"], timeout=30).json()
    assert (manifest["model"], manifest["version"], manifest["variant"]) == (VERSIONED, done["model_version"], "int8")
    assert manifest["sha256"] == int8

    batch = caller.post("/v1/batches", {"model": f"{VERSIONED}@stable", "variant": "int8"})
    assert batch.status_code == 201, batch.text
    status = caller.get(f"/v1/batches/{batch.json()['id']}").json()
    assert (status["model"], status["model_version"], status["variant"]) == (VERSIONED, "1", "int8")
    caller.error(caller.post("/v1/batches", {"model": VERSIONED, "variant": "fp32"}), 400, "unknown_variant")
    caller.error(caller.post("/v1/jobs", {"model": f"{VERSIONED}@9", "input": {"instances": [TEXT]}}), 404)

    # a file dropped under `{model}@{version}/` scores with that version, and its manifest says so
    name = f"drop-{uuid.uuid4().hex[:8]}.jsonl"
    key = f"incoming/{caller.tenant_id}/{VERSIONED}@1/{name}"
    rows = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate([TEXT, "hello", "world"]))
    local_stack.client("s3").put_object(Bucket=local_stack.bucket("inbox"), Key=key, Body=rows.encode())
    deadline = time.monotonic() + 120
    found: dict[str, Any] = {}
    while time.monotonic() < deadline and not found:
        listed = caller.get("/v1/batches").json()["data"]
        found = next(
            (b for b in listed if b["status"] == "succeeded" and b["model_version"] == "1" and b["rows"] == 3), {}
        )
        time.sleep(0.3)
    assert found, "the dropped file was not scored"
    manifest = requests.get(found["manifest_url"], timeout=30).json()
    assert (manifest["model"], manifest["version"], manifest["variant"], manifest["sha256"]) == (
        VERSIONED,
        "1",
        "int8",
        int8,
    )
    assert manifest["input"]["key"] == key
