"""OpenAI's Batch API with the official openai client, unchanged, against the local stack.

`files.create(purpose="batch")` -> `batches.create(endpoint="/v1/embeddings")` -> `batches.retrieve`
until `completed` -> `files.content(output_file_id)`: the vectors are exactly POST /v1/embeddings'
for the same texts, the quota is drawn in texts and billed once, bad lines fail only themselves into
the error file, and cancel, list and tenant isolation work as for sif's own batches (whose routes
these share). Also sif's own batches and jobs with `encoding_format: "base64"`: the size of
predictions.jsonl against the float form.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests

from sif_core.work import TERMINAL
from sif_emulator.stack import LocalStack, start_workers

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
REPO = Path(__file__).resolve().parents[2]
TEXTS = [t for t in (REPO / "shared" / "data" / "texts.txt").read_text().splitlines() if t.strip()]


@pytest.fixture(scope="module")
def running(local_stack: LocalStack, api_url: str) -> Iterator[str]:
    services = start_workers(local_stack)  # the scorer and worker pollers and the Batch executor, as `sif up`
    try:
        yield api_url
    finally:
        for service in reversed(services):
            service.stop()


def sdk(client: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=client.url + "/v1", api_key=client.key, max_retries=0, timeout=60)


def request_line(custom_id: str, body: dict[str, Any], **overrides: Any) -> str:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, **body}}
    return json.dumps({**line, **overrides})


def upload(oai: openai.OpenAI, lines: list[str], name: str = "in.jsonl") -> Any:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    return oai.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def wait_batch(oai: openai.OpenAI, batch_id: str, timeout_s: float = 240) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} did not finish: {batch}")


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def reference(oai: openai.OpenAI, texts: list[str], encoding: str) -> tuple[list[Any], int]:
    """POST /v1/embeddings' vectors for `texts` (as its JSON says them) and the tokens, in calls of 250."""
    vectors: list[Any] = []
    tokens = 0
    for start in range(0, len(texts), 250):
        resp = oai.embeddings.with_raw_response.create(
            model=MODEL, input=texts[start : start + 250], encoding_format=encoding
        )
        body = json.loads(resp.text)  # the raw body: the client would decode base64 itself
        vectors += [d["embedding"] for d in body["data"]]
        tokens += body["usage"]["prompt_tokens"]
    return vectors, tokens


def usage_inputs(client: Any) -> tuple[int, int, int]:
    """(inputs, calls, tokens) billed to the tenant this month."""
    total = client.get("/v1/usage").json()["total"]
    return int(total["inputs"]), int(total["calls"]), int(total["tokens"])


# ---------------------------------------------------------------------- the SDK flow, end to end
def test_sdk_batch_of_1000_embeddings_equals_the_api_and_bills_1000_inputs(
    running: str, new_tenant: Callable[..., Any], client: Any
) -> None:
    tenant = new_tenant("oai-batch", monthly_calls=5000)
    oai = sdk(tenant)
    texts = TEXTS[:1000]
    # 800 requests of one text and 50 of four: 850 requests, 1,000 texts; every 10th request base64
    requests_: list[tuple[str, list[str], str]] = []
    for i in range(800):
        requests_.append((f"one-{i}", [texts[i]], "base64" if i % 10 == 0 else "float"))
    for j in range(50):
        requests_.append((f"four-{j}", texts[800 + 4 * j : 804 + 4 * j], "float"))
    lines = [
        request_line(cid, {"input": batch[0] if cid.startswith("one-") else batch, "encoding_format": enc})
        for cid, batch, enc in requests_
    ]
    started = time.monotonic()
    uploaded = upload(oai, lines)
    assert uploaded.id.startswith("file-") and uploaded.object == "file" and uploaded.purpose == "batch"
    assert uploaded.filename == "in.jsonl" and uploaded.bytes == len(("\n".join(lines) + "\n").encode())
    assert oai.files.retrieve(uploaded.id).model_dump() == uploaded.model_dump()

    created = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert created.id.startswith("batch_") and created.object == "batch" and created.endpoint == "/v1/embeddings"
    assert created.status in ("validating", "in_progress") and created.input_file_id == uploaded.id
    assert created.request_counts is not None and created.request_counts.total == 850
    batch = wait_batch(oai, created.id)
    elapsed = time.monotonic() - started
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 850, "completed": 850, "failed": 0}
    assert batch.output_file_id and batch.error_file_id is None
    assert batch.created_at <= (batch.in_progress_at or 0) <= (batch.completed_at or 0)

    output = oai.files.content(batch.output_file_id).text
    out = {line["custom_id"]: line for line in jsonl(output)}
    assert list(out) == [cid for cid, _, _ in requests_]  # input order, one line each
    info = oai.files.retrieve(batch.output_file_id)
    assert info.purpose == "batch_output" and info.bytes == len(output.encode())

    # The same texts through POST /v1/embeddings (another tenant): the same numbers, digit for digit.
    ref = sdk(client)
    floats, tokens = reference(ref, texts, "float")
    b64, _ = reference(ref, texts, "base64")
    index = {t: i for i, t in enumerate(texts)}
    prompt_tokens = 0
    for cid, batch_texts, enc in requests_:
        line = out[cid]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert set(body) == {"object", "data", "model", "usage"} and body["model"] == MODEL
        assert [d["index"] for d in body["data"]] == list(range(len(batch_texts)))
        expected = [(b64 if enc == "base64" else floats)[index[t]] for t in batch_texts]
        got = [d["embedding"] for d in body["data"]]
        assert json.dumps(got) == json.dumps(expected), cid  # the bytes of each vector's JSON
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0
        prompt_tokens += body["usage"]["prompt_tokens"]
    assert prompt_tokens == tokens  # each request's tokens, as the API counts them
    decoded = np.frombuffer(base64.b64decode(out["one-0"]["response"]["body"]["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats[0], atol=1e-6)

    # Metered once for the batch: 1,000 inputs (texts), the tokens of every request, one call.
    assert usage_inputs(tenant) == (1000, 1, tokens)
    assert batch.usage is not None and batch.usage.input_tokens == batch.usage.total_tokens == tokens
    print(f"\n1,000 texts in 850 requests: created to completed in {elapsed:.1f} s")


# ---------------------------------------------------------------------- bad lines
def test_bad_lines_fail_only_themselves_into_the_error_file(running: str, new_tenant: Callable[..., Any]) -> None:
    tenant = new_tenant("oai-bad-lines", monthly_calls=1000)
    oai = sdk(tenant)
    good = [request_line(f"good-{i}", {"input": [f"good text {i}", f"and another {i}"]}) for i in range(6)]
    bad = {
        # line text -> (custom_id in the error file, error code, HTTP status of its response or None)
        "this is not json": (None, "invalid_json", None),
        json.dumps({"method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": "x"}}): (
            None,
            "invalid_request",
            None,
        ),
        request_line("good-1", {"input": "a second good-1"}): ("good-1", "duplicate_custom_id", None),
        request_line("wrong-url", {"input": "x"}, url="/v1/chat/completions"): ("wrong-url", "invalid_url", None),
        request_line("wrong-method", {"input": "x"}, method="GET"): ("wrong-method", "invalid_method", None),
        request_line("no-input", {}): ("no-input", "validation_error", 422),
        request_line("empty-text", {"input": ["fine", ""]}): ("empty-text", "bad_request", 400),
        '{"custom_id": "surrogate", "method": "POST", "url": "/v1/embeddings", '
        f'"body": {{"model": "{MODEL}", "input": "\\ud800"}}}}': ("surrogate", "bad_request", 400),
        request_line("too-many", {"input": ["t"] * 257}): ("too-many", "input_too_large", 413),
        request_line("other-model", {"model": "open-nsfw", "input": "x"}): ("other-model", "model_mismatch", None),
        request_line("dimensions", {"input": "x", "dimensions": 12}): ("dimensions", "bad_request", 400),
    }
    lines = good[:3] + list(bad) + [""] + good[3:]  # a blank line is no request
    batch = wait_batch(
        oai,
        oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings", completion_window="24h").id,
    )
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 6 + len(bad), "completed": 6, "failed": len(bad)}
    assert batch.output_file_id and batch.error_file_id

    output = jsonl(oai.files.content(batch.output_file_id).text)
    assert [line["custom_id"] for line in output] == [f"good-{i}" for i in range(6)]
    errors = jsonl(oai.files.content(batch.error_file_id).text)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(c, code) for c, code, _ in bad.values()]
    for error, (_, _, status) in zip(errors, bad.values(), strict=True):
        assert error["id"].startswith("batch_req_") and error["error"]["message"]
        if status is None:
            assert error["response"] is None
        else:  # what POST /v1/embeddings answers for that body, in the API's error body
            assert error["response"]["status_code"] == status
            assert error["response"]["body"]["error"]["type"] == error["error"]["code"]
    by_id = {e["custom_id"]: e["error"]["message"] for e in errors}
    assert by_id["empty-text"] == "input 1: text is empty"
    assert "lone surrogate" in by_id["surrogate"]
    # Billed: the 12 texts of the 6 good requests, nothing of the others.
    assert usage_inputs(tenant)[:2] == (12, 1)


def test_create_refuses_what_is_not_a_batch(running: str, new_tenant: Callable[..., Any]) -> None:
    tenant = new_tenant("oai-refused", monthly_calls=10)
    oai = sdk(tenant)
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(
            input_file_id="file-000000000000000000000000", endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.UnprocessableEntityError):
        oai.batches.create(
            input_file_id=upload(oai, [request_line("a", {"input": "x"})]).id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )  # type: ignore[arg-type]
    empty = upload(oai, [""])
    with pytest.raises(openai.BadRequestError, match="no requests"):
        oai.batches.create(input_file_id=empty.id, endpoint="/v1/embeddings", completion_window="24h")
    unknown = upload(oai, [request_line("a", {"model": "no-such-model", "input": "x"})])
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id=unknown.id, endpoint="/v1/embeddings", completion_window="24h")
    too_many = upload(oai, [request_line(f"r{i}", {"input": ["a", "b"]}) for i in range(6)])  # 12 texts > 10
    with pytest.raises(openai.RateLimitError):
        oai.batches.create(input_file_id=too_many.id, endpoint="/v1/embeddings", completion_window="24h")


# ---------------------------------------------------------------------- cancel, list, isolation
def test_cancel_then_list_with_sif_batches(running: str, new_tenant: Callable[..., Any]) -> None:
    tenant = new_tenant("oai-cancel-list", monthly_calls=10_000)
    oai = sdk(tenant)
    sif_batch = tenant.post("/v1/batches", {"model": MODEL}).json()["id"]
    lines = [request_line(f"r{i}", {"input": [TEXTS[(4 * i + k) % len(TEXTS)] for k in range(4)]}) for i in range(500)]
    file = upload(oai, lines)
    first = oai.batches.create(
        input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h", metadata={"purpose": "cancel me"}
    )
    cancelled = oai.batches.cancel(first.id)
    assert cancelled.id == first.id and cancelled.status in ("cancelling", "cancelled")
    assert cancelled.cancelling_at is not None
    final = wait_batch(oai, first.id)
    assert final.status == "cancelled" and final.metadata == {"purpose": "cancel me"}
    assert oai.batches.cancel(first.id).status == "cancelled"  # again: unchanged
    counts = final.request_counts
    assert counts is not None and counts.total == 500 and counts.completed + counts.failed <= 500
    if counts.completed:  # stopped part-way: what was scored is kept and billed, nothing more
        assert len(jsonl(oai.files.content(final.output_file_id or "").text)) == counts.completed
    assert usage_inputs(tenant)[0] == 4 * counts.completed

    second = wait_batch(
        oai, oai.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h").id
    )
    assert second.status == "completed"
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(second.id)

    # One list for both kinds, newest first, paged by `after` as the client pages it.
    listed = [b.id for b in oai.batches.list(limit=1)]
    assert listed == [second.id, first.id, sif_batch]
    page = tenant.get("/v1/batches").json()
    assert page["object"] == "list" and (page["first_id"], page["last_id"]) == (second.id, sif_batch)
    assert page["has_more"] is False
    kinds = {item["id"]: item.get("object") for item in page["data"]}
    assert kinds == {second.id: "batch", first.id: "batch", sif_batch: None}  # sif's keeps its own fields
    assert page["data"][2]["status"] == "queued" and "upload_url" not in page["data"][2]
    assert tenant.get(f"/v1/batches/{sif_batch}").json()["status"] == "queued"


def test_another_tenants_files_and_batches_are_404(running: str, new_tenant: Callable[..., Any]) -> None:
    owner, other = new_tenant("oai-owner", monthly_calls=100), new_tenant("oai-other", monthly_calls=100)
    mine, theirs = sdk(owner), sdk(other)
    file = upload(mine, [request_line("a", {"input": "x"}), "not json"])
    batch = wait_batch(
        mine, mine.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h").id
    )
    assert batch.status == "completed" and batch.output_file_id and batch.error_file_id
    for call in (
        lambda: theirs.files.retrieve(file.id),
        lambda: theirs.files.content(file.id),
        lambda: theirs.files.delete(file.id),
        lambda: theirs.files.retrieve(batch.output_file_id or ""),
        lambda: theirs.files.content(batch.error_file_id or ""),
        lambda: theirs.batches.retrieve(batch.id),
        lambda: theirs.batches.cancel(batch.id),
        lambda: theirs.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [b.id for b in theirs.batches.list()] == []
    assert [f.id for f in theirs.files.list()] == []
    other.error(other.get(f"/v1/files/{batch.id}"), 404, "not_found")
    assert mine.files.content(file.id).text.startswith('{"custom_id": "a"')  # still the owner's


# ---------------------------------------------------------------------- the Files routes themselves
def test_files_routes(running: str, new_tenant: Callable[..., Any]) -> None:
    tenant = new_tenant("oai-files")
    oai = sdk(tenant)
    ids = [upload(oai, [request_line(str(i), {"input": "x"})], name=f"f{i}.jsonl").id for i in range(3)]
    assert [f.id for f in oai.files.list()] == ids[::-1]  # newest first
    assert [f.id for f in oai.files.list(limit=1, order="asc")] == ids  # paged through `after`
    assert [f.filename for f in oai.files.list()] == ["f2.jsonl", "f1.jsonl", "f0.jsonl"]
    deleted = oai.files.delete(ids[1])
    assert deleted.id == ids[1] and deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(ids[1])
    assert [f.id for f in oai.files.list()] == [ids[2], ids[0]]

    url, auth = tenant.url + "/v1/files", {"Authorization": f"Bearer {tenant.key}"}
    form = {"purpose": (None, "batch")}
    tenant.error(requests.post(url, json={"purpose": "batch"}, headers=auth, timeout=60), 415, "unsupported_media_type")
    missing = tenant.error(requests.post(url, files=form, headers=auth, timeout=60), 422, "validation_error")
    assert missing["message"].startswith("body.file:")
    wrong = tenant.error(
        requests.post(
            url, files={"file": ("a.jsonl", b"{}"), "purpose": (None, "fine-tune")}, headers=auth, timeout=60
        ),
        422,
        "validation_error",
    )
    assert wrong["message"].startswith("body.purpose:")
    broken = {**auth, "Content-Type": "multipart/form-data; boundary=xyz"}
    tenant.error(requests.post(url, data=b"--xyz\r\nno end", headers=broken, timeout=60), 400, "bad_request")
    big = b'{"custom_id": "x"}\n' * (4_600_000 // 19)
    too_big = tenant.error(
        requests.post(url, files={"file": ("big.jsonl", big), "purpose": (None, "batch")}, headers=auth, timeout=60),
        413,
        "payload_too_large",
    )
    assert "6 MB" in too_big["message"]
    # non-ASCII content and names come back byte for byte
    text = request_line("é", {"input": "naïve café ☕"})
    named = oai.files.create(file=("données ☕.jsonl", io.BytesIO(text.encode())), purpose="batch")
    assert named.filename == "données ☕.jsonl" and oai.files.content(named.id).content == text.encode()


# ---------------------------------------------------------------------- base64 for sif's batches and jobs
def test_sif_batches_and_jobs_write_base64_vectors_at_under_half_the_size(
    running: str, new_tenant: Callable[..., Any], client: Any
) -> None:
    tenant = new_tenant("b64-files", monthly_calls=10_000)
    texts = TEXTS[:300]
    rows = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)).encode()
    outputs: dict[str, bytes] = {}
    for encoding in ("float", "base64"):
        created = tenant.post("/v1/batches", {"model": MODEL, "encoding_format": encoding})
        assert created.status_code == 201, created.text
        batch = created.json()
        assert requests.put(batch["upload_url"], data=rows, timeout=60).status_code == 200
        state = wait_sif(tenant, f"/v1/batches/{batch['id']}")
        assert state["status"] == "succeeded" and state["encoding_format"] == encoding
        outputs[f"batch-{encoding}"] = requests.get(state["result_url"], timeout=60).content
        job = tenant.post("/v1/jobs", {"model": MODEL, "input": {"instances": texts}, "encoding_format": encoding})
        assert job.status_code == 202, job.text
        done = wait_sif(tenant, f"/v1/jobs/{job.json()['id']}")
        assert done["status"] == "succeeded"
        outputs[f"job-{encoding}"] = requests.get(done["output_url"], timeout=60).content

    b64_api, _ = reference(sdk(client), texts, "base64")
    for kind in ("batch", "job"):
        floats, packed = jsonl(outputs[f"{kind}-float"].decode()), jsonl(outputs[f"{kind}-base64"].decode())
        assert [p["id"] for p in packed] == [p["id"] for p in floats] == list(range(300))
        assert [p["prediction"] for p in packed] == b64_api  # exactly the API's base64 vectors
        for f, p in zip(floats, packed, strict=True):
            vector = np.frombuffer(base64.b64decode(p["prediction"]), dtype="<f4")
            assert np.allclose(vector, f["prediction"], rtol=1e-6, atol=1e-9)
        ratio = len(outputs[f"{kind}-base64"]) / len(outputs[f"{kind}-float"])
        print(
            f"\n{kind}: predictions.jsonl {len(outputs[f'{kind}-float'])} B as floats, "
            f"{len(outputs[f'{kind}-base64'])} B as base64: ratio {ratio:.3f}"
        )
        assert ratio < 0.5
    tenant.error(tenant.post("/v1/batches", {"model": "open-nsfw", "encoding_format": "base64"}), 422)
    job = {"model": "open-nsfw", "input": {"instances": [{"b64": "aGk="}]}, "encoding_format": "base64"}
    tenant.error(tenant.post("/v1/jobs", job), 422)


def wait_sif(client: Any, path: str, timeout_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = client.get(path).json()
        if state["status"] in TERMINAL:
            return state
        time.sleep(0.3)
    raise AssertionError(f"{path} did not finish: {state}")
