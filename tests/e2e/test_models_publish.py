"""`sif models publish|list|show|alias|retire` against the local stack's models bucket, checked over HTTP.

Models the project does not ship are built here (a scikit-learn pipeline with numeric and categorical
columns, a small tensor graph, a text graph with its tokenizer) and published with the CLI (its main
function, as `sif` runs it). What the API predicts must be what onnxruntime gives on the same inputs;
a broken model must leave the bucket exactly as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests

from sif_cli.main import main as sif
from sif_emulator.stack import LocalStack
from tests import onnx_factory as factory
from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

ROWS = [
    {"age": 23.0, "monthly_spend": 12.5, "plan": "basic", "region": "north"},
    {"age": 61.0, "monthly_spend": 150.0, "plan": "pro", "region": "south"},
    {"age": 44.5, "monthly_spend": 80.25, "plan": "plus", "region": "south"},
    {"age": 52.0, "monthly_spend": 33.0, "plan": "pro", "region": "north"},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("byom")
    return {
        "tokenizer": factory.tokenizer_json(d / "tokenizer.json"),
        "text": factory.text_model(d / "text.onnx"),
        "tabular": factory.sklearn_model(d / "churn.onnx"),
        "tensor": factory.tensor_model(d / "tensor.onnx"),
        "tensor-2": factory.tensor_model(d / "tensor2.onnx", seed=1),
        "unknown-op": factory.unknown_op_model(d / "custom.onnx"),
        "random": factory.random_bytes(d / "random.onnx"),
    }


@pytest.fixture(scope="module")
def models(local_stack: LocalStack) -> Callable[..., tuple[int, str, str]]:
    """Run `sif models ...` on the test stack: (exit code, stdout, stderr)."""

    def run(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = sif(["-q", "--stack-json", str(local_stack.stack_json_path), "models", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def bucket_keys(local_stack: LocalStack) -> dict[str, str]:
    s3, bucket = local_stack.client("s3"), local_stack.bucket("models")
    keys: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return keys


def index_of(local_stack: LocalStack, name: str) -> dict[str, Any]:
    s3 = local_stack.client("s3")
    body = s3.get_object(Bucket=local_stack.bucket("models"), Key=f"models/{name}/aliases.json")["Body"].read()
    return dict(json.loads(body))


def test_tabular_predictions_equal_onnxruntime(
    built: dict[str, Path], models: Any, client: ApiClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = models("publish", str(built["tabular"]), "--name", "byom-churn", capsys=capsys)
    assert code == 0, err
    assert "published byom-churn version 1" in out and "task tabular" in out
    resp = client.post("/v1/models/byom-churn/predict", {"instances": ROWS})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == "1"
    labels, probs = ort.InferenceSession(str(built["tabular"]), providers=["CPUExecutionProvider"]).run(
        ["label", "probabilities"], factory.tabular_feed(ROWS)
    )
    for i, prediction in enumerate(body["predictions"]):
        assert str(prediction["label"]) == str(labels[i])
        assert np.allclose([prediction["probabilities"][str(k)] for k in range(3)], probs[i], rtol=1e-6, atol=1e-7)


def test_tensor_predictions_equal_onnxruntime_and_versions_move_latest(
    built: dict[str, Path], models: Any, client: ApiClient, local_stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    assert models("publish", str(built["tensor"]), "--name", "byom-tensor", capsys=capsys)[0] == 0
    code, out, err = models("publish", str(built["tensor-2"]), "--name", "byom-tensor", "--json", capsys=capsys)
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["version"] == "2" and manifest["cost"]["measured"] is True
    assert index_of(local_stack, "byom-tensor")["aliases"] == {"latest": {"2": 1}}
    x = np.random.default_rng(2).normal(size=(3, 3)).astype(np.float32)
    resp = client.post("/v1/models/byom-tensor/predict", {"instances": [{"x": row.tolist()} for row in x]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_version"] == "2"
    y, s = ort.InferenceSession(str(built["tensor-2"]), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for i, prediction in enumerate(resp.json()["predictions"]):
        assert np.allclose(prediction["y"], y[i], rtol=1e-6, atol=1e-7)
        assert np.allclose(prediction["s"], s[i], rtol=1e-6, atol=1e-7)
    old = client.post("/v1/models/byom-tensor@1/predict", {"instances": [{"x": x[0].tolist()}]})
    assert old.status_code == 200, old.text
    y1, _ = ort.InferenceSession(str(built["tensor"]), providers=["CPUExecutionProvider"]).run(None, {"x": x[:1]})
    assert np.allclose(old.json()["predictions"][0]["y"], y1[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("random", [], "is not an ONNX model"),
        ("unknown-op", [], "cannot load this graph"),
        ("text", ["--tokenizer", "@tokenizer", "--dim", "384"], "has 8 dimensions, not --dim 384"),
    ],
)
def test_broken_models_are_refused_and_the_bucket_is_untouched(
    built: dict[str, Path],
    models: Any,
    local_stack: LocalStack,
    model: str,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = bucket_keys(local_stack)
    args = [str(built[a[1:]]) if a.startswith("@") else a for a in extra]
    code, _, err = models("publish", str(built[model]), "--name", "byom-broken", *args, capsys=capsys)
    assert code == 1 and message in err and "Traceback" not in err
    assert bucket_keys(local_stack) == before


def test_alias_canary_and_retire_of_an_aliased_version(
    built: dict[str, Path], models: Any, local_stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):
        assert models("publish", str(built["tensor"]), "--name", "byom-canary", capsys=capsys)[0] == 0
    code, out, err = models("alias", "byom-canary", "latest", "1=90", "2=10", capsys=capsys)
    assert code == 0, err
    assert index_of(local_stack, "byom-canary")["aliases"] == {"latest": {"1": 90, "2": 10}}
    code, _, err = models("retire", "byom-canary", "2", capsys=capsys)
    assert code == 1 and "in use by alias latest" in err
    assert index_of(local_stack, "byom-canary")["retired"] == []
    assert models("alias", "byom-canary", "latest", "1", capsys=capsys)[0] == 0  # rollback
    assert models("retire", "byom-canary", "2", capsys=capsys)[0] == 0
    code, out, _ = models("show", "byom-canary", "--json", capsys=capsys)
    shown = json.loads(out)
    assert (shown["latest"], shown["retired"], shown["aliases"]) == ("1", ["2"], {"latest": {"1": 1}})
    assert all(v["measured"] and v["sha256"] for v in shown["versions"])


def test_private_model_is_listed_for_its_tenant_only(
    built: dict[str, Path],
    models: Any,
    new_tenant: Callable[..., ApiClient],
    capsys: pytest.CaptureFixture[str],
) -> None:
    owner, other = new_tenant("byom-owner"), new_tenant("byom-other")
    code, _, err = models(
        "publish", str(built["tensor"]), "--name", "byom-private", "--tenant", owner.tenant_id, capsys=capsys
    )
    assert code == 0, err
    listed = {m["name"] for m in owner.get("/v1/models").json()["models"]}
    assert "byom-private" in listed
    assert "byom-private" not in {m["name"] for m in other.get("/v1/models").json()["models"]}
    instance = {"instances": [{"x": [0.1, 0.2, 0.3]}]}
    assert owner.post("/v1/models/byom-private/predict", instance).status_code == 200
    ApiClient.error(other.post("/v1/models/byom-private/predict", instance), 404)
    code, out, _ = models("list", "--tenant", other.tenant_id, "--json", capsys=capsys)
    assert code == 0 and "byom-private" not in {m["name"] for m in json.loads(out)}


def _wait(client: ApiClient, path: str, done: tuple[str, ...] = ("succeeded", "failed"), timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(path).json()
        if state["status"] in done:
            return state
        time.sleep(0.3)
    raise AssertionError(f"{path} did not end")


def test_a_published_model_gives_onnxruntime_values_on_every_path(
    built: dict[str, Path], models: Any, client: ApiClient, local_stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """predict, TF-Serving's :predict forms, KServe v2 infer, a CSV batch file and a job: the same values
    as onnxruntime run directly on the same rows."""
    from sif_emulator.pollers import start_pollers

    name = "byom-paths"
    assert models("publish", str(built["tabular"]), "--name", name, capsys=capsys)[0] == 0
    labels, probs = ort.InferenceSession(str(built["tabular"]), providers=["CPUExecutionProvider"]).run(
        ["label", "probabilities"], factory.tabular_feed(ROWS)
    )

    def check(predictions: list[dict[str, Any]], path: str) -> None:
        assert len(predictions) == len(ROWS), path
        for i, prediction in enumerate(predictions):
            assert str(prediction["label"]) == str(labels[i]), path
            got = [prediction["probabilities"][str(k)] for k in range(3)]
            assert np.allclose(got, probs[i], rtol=1e-6, atol=1e-7), path

    for path in (f"/v1/models/{name}/predict", f"/v1/models/{name}:predict", f"/v1/models/{name}/versions/1:predict"):
        resp = client.post(path, {"instances": ROWS})
        assert resp.status_code == 200, (path, resp.text)
        check(resp.json()["predictions"], path)

    # KServe v2: the graph's own typed tensors ([N, 1] per column), straight through it
    inputs = [
        {"name": n, "shape": [len(ROWS), 1], "datatype": "FP32", "data": [r[n] for r in ROWS]}
        for n in ("age", "monthly_spend")
    ] + [
        {"name": n, "shape": [len(ROWS), 1], "datatype": "BYTES", "data": [r[n] for r in ROWS]}
        for n in ("plan", "region")
    ]
    resp = client.post(f"/v2/models/{name}/infer", {"inputs": inputs})
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o for o in resp.json()["outputs"]}
    assert [str(v) for v in outputs["label"]["data"]] == [str(v) for v in labels]
    assert outputs["probabilities"]["shape"] == [len(ROWS), 3]
    assert np.allclose(np.asarray(outputs["probabilities"]["data"]).reshape(-1, 3), probs, rtol=1e-6, atol=1e-7)

    pollers = start_pollers(local_stack, functions=["WorkerFunction", "ScorerFunction"])
    try:
        # a CSV batch file: columns mapped to the features by name (in another order than the graph's)
        batch = client.post("/v1/batches", {"model": name, "format": "csv"})
        assert batch.status_code == 201, batch.text
        csv = "region,plan,id,monthly_spend,age\n" + "".join(
            f"{r['region']},{r['plan']},r{i},{r['monthly_spend']},{r['age']}\n" for i, r in enumerate(ROWS)
        )
        assert requests.put(batch.json()["upload_url"], data=csv.encode(), timeout=60).status_code == 200
        state = _wait(client, f"/v1/batches/{batch.json()['id']}")
        assert (state["status"], state["succeeded"], state["failed"]) == ("succeeded", len(ROWS), 0), state
        lines = [json.loads(line) for line in requests.get(state["result_url"], timeout=60).text.splitlines()]
        assert [line["id"] for line in lines] == [f"r{i}" for i in range(len(ROWS))]
        check([line["prediction"] for line in lines], "csv batch")

        # a job of inline instances (the bare feature objects predict takes)
        job = client.post("/v1/jobs", {"model": name, "input": {"instances": ROWS}})
        assert job.status_code == 202, job.text
        state = _wait(client, f"/v1/jobs/{job.json()['id']}")
        assert state["status"] == "succeeded", state
        lines = [json.loads(line) for line in requests.get(state["output_url"], timeout=60).text.splitlines()]
        assert [line["id"] for line in lines] == list(range(len(ROWS)))
        check([line["prediction"] for line in lines], "job")
    finally:
        for poller in reversed(pollers):
            poller.stop()
