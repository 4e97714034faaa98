"""Batches through the HTTP API and `sif score`: presigned upload, status, results, isolation, metering.

Only HTTP is used on the user's side (the API and the presigned URLs it hands out), as a client
without AWS credentials would; the local stack runs the API gateway, the inbox poller and the
Batch executor.
"""

from __future__ import annotations

import gzip
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sif_cli import main as cli
from sif_emulator.batch import start_batch_executor
from sif_emulator.pollers import start_pollers
from sif_emulator.stack import LocalStack

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def scoring(local_stack: LocalStack, api_url: str) -> Iterator[str]:
    pollers = start_pollers(local_stack, functions=["ScorerFunction"])
    executor = start_batch_executor(local_stack)
    try:
        yield api_url
    finally:
        executor.stop()
        for poller in pollers:
            poller.stop()


def rows(n: int, bad_every: int = 0) -> bytes:
    out = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            out.append(json.dumps({"id": f"r{i}", "text": ""}))
        else:
            out.append(json.dumps({"id": f"r{i}", "text": f"review number {i}: the product works as described"}))
    return ("\n".join(out) + "\n").encode()


def wait_done(client: Any, batch_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        resp = client.get(f"/v1/batches/{batch_id}")
        assert resp.status_code == 200, resp.text
        state = resp.json()
        seen.add(state["status"])
        if state["status"] in ("succeeded", "failed"):
            state["seen"] = seen
            return dict(state)
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not finish")


def test_create_upload_poll_download(scoring: str, new_tenant: Callable[..., Any]) -> None:
    client = new_tenant("batch-api")
    resp = client.post("/v1/batches", {"model": MODEL, "format": "jsonl.gz"})
    assert resp.status_code == 201, resp.text
    batch = resp.json()
    assert batch["id"].startswith("b_") and batch["status"] == "queued"
    assert batch["key"] == f"incoming/{client.tenant_id}/{MODEL}/{batch['id']}.jsonl.gz"
    assert 3500 <= batch["expires_at"] - time.time() <= 3700
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(batch["upload_url"]).query)
    assert query["X-Amz-Expires"] == ["3600"]
    assert urllib.parse.unquote(urllib.parse.urlsplit(batch["upload_url"]).path).endswith(batch["key"])

    queued = client.get(f"/v1/batches/{batch['id']}").json()
    assert queued["status"] == "queued" and queued["result_url"] is None

    put = requests.put(batch["upload_url"], data=gzip.compress(rows(500, bad_every=50)), timeout=60)
    assert put.status_code == 200, put.text
    state = wait_done(client, batch["id"])
    assert state["status"] == "succeeded" and state["route"] == "cpu"
    assert (state["rows"], state["succeeded"], state["failed"]) == (500, 490, 10)
    assert state["progress"] == 1.0

    predictions = [json.loads(line) for line in requests.get(state["result_url"], timeout=60).text.splitlines()]
    assert [p["id"] for p in predictions] == [f"r{i}" for i in range(500) if i % 50 != 49]
    assert all(len(p["prediction"]) == 384 for p in predictions)
    errors = [json.loads(line) for line in requests.get(state["errors_url"], timeout=60).text.splitlines()]
    assert errors == [{"line": i + 1, "id": f"r{i}", "error": "field 'text' is empty"} for i in range(49, 500, 50)]
    manifest = requests.get(state["manifest_url"], timeout=60).json()
    assert manifest["rows"] == 500 and manifest["input"]["batch_id"] == batch["id"]

    # metered once for the file: the rows scored, their tokens
    usage = client.get("/v1/usage").json()
    (row,) = [r for r in usage["by_model_day"] if r["model"] == MODEL]
    assert row["inputs"] == 490 and row["tokens"] == manifest["tokens"]


def test_batches_are_tenant_isolated(scoring: str, new_tenant: Callable[..., Any]) -> None:
    owner, other = new_tenant("batch-owner"), new_tenant("batch-other")
    batch = owner.post("/v1/batches", {"model": MODEL}).json()
    assert owner.get(f"/v1/batches/{batch['id']}").status_code == 200
    other.error(other.get(f"/v1/batches/{batch['id']}"), 404, "not_found")
    owner.error(owner.get("/v1/batches/b_00000000000000000000"), 404, "not_found")
    owner.error(owner.get("/v1/batches/not-an-id"), 404, "not_found")
    # the upload URL is for the owner's own inbox prefix, and nothing else
    assert f"/incoming/{owner.tenant_id}/" in urllib.parse.unquote(batch["upload_url"])


def test_create_batch_validates(scoring: str, client: Any) -> None:
    client.error(client.post("/v1/batches", {"model": "no-such-model"}), 404, "model_not_found")
    client.error(client.post("/v1/batches", {"model": MODEL, "format": "xlsx"}), 422)
    client.error(client.post("/v1/batches", {"model": MODEL, "accelerator": "tpu"}), 422)


def test_accelerator_gpu_routes_the_file_to_the_gpu_queue(scoring: str, client: Any) -> None:
    batch = client.post("/v1/batches", {"model": MODEL, "format": "csv", "accelerator": "gpu"}).json()
    body = "id,text\n" + "".join(f"{i},text number {i}\n" for i in range(50))
    assert requests.put(batch["upload_url"], data=body.encode(), timeout=60).status_code == 200
    state = wait_done(client, batch["id"], timeout_s=180)
    assert state["status"] == "succeeded" and state["route"] == "gpu" and state["rows"] == 50
    predictions = requests.get(state["result_url"], timeout=60).text.splitlines()
    assert [json.loads(p)["id"] for p in predictions] == [str(i) for i in range(50)]


def test_sif_score_uploads_shows_progress_and_downloads(
    scoring: str, new_tenant: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = new_tenant("sif-score")
    source = tmp_path / "reviews.csv"
    source.write_text("id,text\n" + "".join(f"{i},the {i}th review\n" for i in range(300)) + "300,\n")
    code = cli.main(["score", str(source), "--model", MODEL, "--api-url", scoring, "--key", client.key])
    out, err = capsys.readouterr()
    assert code == 0, err
    (results,) = (tmp_path / "reviews.csv.results").iterdir()  # one folder per run: FILE.results/{batch id}/
    assert results.name.startswith("b_")
    assert out.strip() == str(results / "predictions.jsonl")
    assert "%" in err and "300 scored, 1 failed" in err
    predictions = [json.loads(line) for line in (results / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [str(i) for i in range(300)]
    assert json.loads((results / "errors.jsonl").read_text()) == {
        "line": 302,
        "id": "300",
        "error": "field 'text' is empty",
    }
    assert json.loads((results / "manifest.json").read_text())["succeeded"] == 300


def test_sif_score_reports_errors(
    scoring: str, client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert cli.main(["score", str(notes), "--model", MODEL, "--api-url", scoring, "--key", client.key]) == 1
    assert "expected a .jsonl or .csv file" in capsys.readouterr().err
    good = tmp_path / "a.jsonl"
    good.write_text('{"id": 1, "text": "x"}\n')
    assert cli.main(["score", str(good), "--model", "nope", "--api-url", scoring, "--key", client.key]) == 1
    assert "404" in capsys.readouterr().err
