"""Listing and cancelling jobs and batches over HTTP, and batches whose file never arrives expiring.

Two tenants on the local stack (API gateway, pollers and the local Batch executor running): lists are
the caller's own, newest first, filtered by status and paged with the cursor; another tenant's ids are
404 for every route; cancel is 200 (also when repeated) until the work ends, then 409. A batch whose
upload URL expired (plus the grace) reads and lists as `expired`: its record is put past that point
through the work table, as time would. `sif batches ...` / `sif jobs ...` are run as a user runs them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sif_cli import main as cli
from sif_core.settings import Settings
from sif_core.work import WorkRecord, WorkStore, new_id
from sif_emulator.stack import LocalStack, start_workers

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def running(local_stack: LocalStack, api_url: str) -> Iterator[str]:
    services = start_workers(local_stack)  # the scorer and worker pollers and the Batch executor, as `sif up`
    try:
        yield api_url
    finally:
        for service in reversed(services):
            service.stop()


@pytest.fixture(scope="module")
def store(local_stack: LocalStack) -> WorkStore:
    return WorkStore(local_stack.table("WorkTable"))


def ids(resp: requests.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    page = resp.json()
    assert page["object"] == "list" and isinstance(page["has_more"], bool)
    return [item["id"] for item in page["data"]]


def every_page(client: Any, path: str, **query: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    after = None
    while True:
        resp = client.get(path, params={**query, **({"after": after} if after else {})})
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages.append([item["id"] for item in page["data"]])
        assert page["has_more"] == (page["next_cursor"] is not None)
        if page["data"]:
            assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][-1]["id"])
        if not page["has_more"]:
            return pages
        after = page["next_cursor"]
        assert len(pages) < 50, "pagination does not end"


def wait_for(client: Any, path: str, statuses: tuple[str, ...], timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        resp = client.get(path)
        assert resp.status_code == 200, resp.text
        state = resp.json()
        if state["status"] in statuses:
            return state
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {statuses}: {state}")


def queued_job(store: WorkStore, tenant: str) -> str:
    """A job as a producer records it before any worker has seen it (no message: it stays queued)."""
    job_id = new_id("job")
    store.create(WorkRecord(id=job_id, kind="job", tenant=tenant, model=MODEL, details={"source": "queue"}))
    return job_id


def upload_deadline_passed(local_stack: LocalStack, store: WorkStore, tenant: str, batch_id: str) -> None:
    """Move the batch's upload URL expiry back past the API function's grace, as if that time had gone by."""
    env = local_stack.function_env("ApiFunction")
    grace = int(env.get("SIF_UPLOAD_GRACE_S") or Settings().upload_grace_s)
    store.table.update_item(
        Key=store.key(tenant, "batch", batch_id),
        UpdateExpression="SET details.upload_expires_at = :t",
        ExpressionAttributeValues={":t": int(time.time()) - grace - 60},
    )


# ---------------------------------------------------------------------- lists
def test_lists_newest_first_filtered_and_paged(running: str, new_tenant: Callable[..., Any]) -> None:
    owner, other = new_tenant("list-owner"), new_tenant("list-other")
    batches = [owner.post("/v1/batches", {"model": MODEL}).json()["id"] for _ in range(7)]
    theirs = [other.post("/v1/batches", {"model": MODEL}).json()["id"] for _ in range(2)]
    newest_first = batches[::-1]

    assert ids(owner.get("/v1/batches")) == newest_first
    assert ids(other.get("/v1/batches")) == theirs[::-1]
    # every item is the status object GET /v1/batches/{id} returns
    (first,) = owner.get("/v1/batches", params={"limit": 1}).json()["data"]
    one = owner.get(f"/v1/batches/{first['id']}").json()
    assert {k: v for k, v in first.items() if k != "updated_at"} == {k: v for k, v in one.items() if k != "updated_at"}

    for limit in (1, 2, 3, 7, 100):
        pages = every_page(owner, "/v1/batches", limit=limit)
        flat = [i for page in pages for i in page]
        assert flat == newest_first, limit  # none missing, none twice, in order
        assert all(len(page) == limit for page in pages[:-1])
    # OpenAI style: `after` may be the last id of the previous page
    assert ids(owner.get("/v1/batches", params={"after": newest_first[2], "limit": 2})) == newest_first[3:5]

    # status filter: cancel three, the rest stay queued
    for batch_id in (batches[1], batches[4], batches[5]):
        assert owner.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    assert ids(owner.get("/v1/batches", params={"status": "cancelled"})) == [batches[5], batches[4], batches[1]]
    queued = [b for b in newest_first if b not in (batches[1], batches[4], batches[5])]
    assert ids(owner.get("/v1/batches", params={"status": "queued"})) == queued
    assert [i for p in every_page(owner, "/v1/batches", status="queued", limit=1) for i in p] == queued
    assert ids(owner.get("/v1/batches", params={"status": "succeeded"})) == []
    assert ids(other.get("/v1/batches", params={"status": "cancelled"})) == []


def test_job_list_newest_first_and_per_tenant(running: str, new_tenant: Callable[..., Any], store: WorkStore) -> None:
    owner, other = new_tenant("jobs-owner"), new_tenant("jobs-other")
    submitted = []
    for i in range(3):
        resp = owner.post("/v1/jobs", {"model": MODEL, "input": {"instances": [f"text {i}"]}})
        assert resp.status_code == 202, resp.text
        submitted.append(resp.json()["id"])
    waiting = queued_job(store, owner.tenant_id)
    newest_first = [waiting, *submitted[::-1]]
    assert ids(owner.get("/v1/jobs")) == newest_first
    assert [i for p in every_page(owner, "/v1/jobs", limit=3) for i in p] == newest_first
    assert ids(other.get("/v1/jobs")) == []
    for job_id in submitted:
        wait_for(owner, f"/v1/jobs/{job_id}", ("succeeded",))
    assert ids(owner.get("/v1/jobs", params={"status": "succeeded"})) == submitted[::-1]
    assert ids(owner.get("/v1/jobs", params={"status": "queued"})) == [waiting]


def test_list_rejects_bad_queries(running: str, client: Any) -> None:
    for path in ("/v1/jobs", "/v1/batches"):
        client.error(client.get(path, params={"limit": 0}), 422, "validation_error")
        client.error(client.get(path, params={"limit": 101}), 422, "validation_error")
        client.error(client.get(path, params={"status": "done"}), 422, "validation_error")
        client.error(client.get(path, params={"after": "not a cursor"}), 400, "bad_request")
        client.error(client.get(path, params={"after": "b_00000000000000000000"}), 400, "bad_request")


# ---------------------------------------------------------------------- cancel
def test_cancel_batch_then_again_and_another_tenant_404(running: str, new_tenant: Callable[..., Any]) -> None:
    owner, other = new_tenant("cancel-owner"), new_tenant("cancel-other")
    batch = owner.post("/v1/batches", {"model": MODEL}).json()

    other.error(other.get(f"/v1/batches/{batch['id']}"), 404, "not_found")
    other.error(other.post(f"/v1/batches/{batch['id']}/cancel"), 404, "not_found")
    assert batch["id"] not in ids(other.get("/v1/batches"))
    assert owner.get(f"/v1/batches/{batch['id']}").json()["status"] == "queued"  # untouched by the other

    resp = owner.post(f"/v1/batches/{batch['id']}/cancel")
    assert resp.status_code == 200, resp.text
    cancelled = resp.json()
    assert cancelled["id"] == batch["id"] and cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] >= cancelled["created_at"]
    again = owner.post(f"/v1/batches/{batch['id']}/cancel")
    assert again.status_code == 200 and again.json() == cancelled  # unchanged
    assert owner.get(f"/v1/batches/{batch['id']}").json()["status"] == "cancelled"
    owner.error(owner.post("/v1/batches/b_00000000000000000000/cancel"), 404, "not_found")
    owner.error(owner.post("/v1/batches/not-an-id/cancel"), 404, "not_found")


def test_cancel_jobs(running: str, new_tenant: Callable[..., Any], store: WorkStore) -> None:
    owner, other = new_tenant("cancel-jobs"), new_tenant("cancel-jobs-other")
    resp = owner.post("/v1/jobs", {"model": MODEL, "input": {"instances": ["done soon"]}})
    assert resp.status_code == 202, resp.text
    done = wait_for(owner, f"/v1/jobs/{resp.json()['id']}", ("succeeded", "failed"))
    assert done["status"] == "succeeded"
    conflict = owner.error(owner.post(f"/v1/jobs/{done['id']}/cancel"), 409, "conflict")
    assert "succeeded" in conflict["message"]
    assert owner.get(f"/v1/jobs/{done['id']}").json()["status"] == "succeeded"
    other.error(other.post(f"/v1/jobs/{done['id']}/cancel"), 404, "not_found")
    other.error(other.get(f"/v1/jobs/{done['id']}"), 404, "not_found")

    waiting = queued_job(store, owner.tenant_id)
    other.error(other.post(f"/v1/jobs/{waiting}/cancel"), 404, "not_found")
    first = owner.post(f"/v1/jobs/{waiting}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled" and first.json()["cancelled_at"]
    second = owner.post(f"/v1/jobs/{waiting}/cancel")
    assert second.status_code == 200 and second.json() == first.json()
    assert owner.get(f"/v1/jobs/{waiting}").json()["status"] == "cancelled"
    owner.error(owner.post("/v1/jobs/j_nosuchjob/cancel"), 404, "not_found")


def test_cancel_succeeded_batch_is_409(running: str, new_tenant: Callable[..., Any]) -> None:
    owner = new_tenant("cancel-done-batch")
    batch = owner.post("/v1/batches", {"model": MODEL}).json()
    body = "".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(5))
    assert requests.put(batch["upload_url"], data=body.encode(), timeout=60).status_code == 200
    assert wait_for(owner, f"/v1/batches/{batch['id']}", ("succeeded", "failed"))["status"] == "succeeded"
    owner.error(owner.post(f"/v1/batches/{batch['id']}/cancel"), 409, "conflict")


# ---------------------------------------------------------------------- expiry
def test_batch_never_uploaded_expires(
    running: str, new_tenant: Callable[..., Any], local_stack: LocalStack, store: WorkStore
) -> None:
    owner = new_tenant("expiry")
    seen_by_list, seen_by_get, fresh = (owner.post("/v1/batches", {"model": MODEL}).json()["id"] for _ in range(3))
    upload_deadline_passed(local_stack, store, owner.tenant_id, seen_by_list)
    upload_deadline_passed(local_stack, store, owner.tenant_id, seen_by_get)
    stored = store.get(owner.tenant_id, "batch", seen_by_list)
    assert stored is not None and stored.status == "queued"  # nothing runs on a schedule

    # a list marks what it reads, and its status filter sees the new status
    assert ids(owner.get("/v1/batches", params={"status": "queued"})) == [fresh]
    stored = store.get(owner.tenant_id, "batch", seen_by_list)
    assert stored is not None and stored.status == "expired"
    assert ids(owner.get("/v1/batches", params={"status": "expired"})) == [seen_by_get, seen_by_list]

    state = owner.get(f"/v1/batches/{seen_by_get}").json()
    assert state["status"] == "expired" and "never uploaded" in state["error"] and state["result_url"] is None
    listed = {item["id"]: item["status"] for item in owner.get("/v1/batches").json()["data"]}
    assert listed == {fresh: "queued", seen_by_get: "expired", seen_by_list: "expired"}
    conflict = owner.error(owner.post(f"/v1/batches/{seen_by_get}/cancel"), 409, "conflict")
    assert "expired" in conflict["message"]

    # one only read by GET (never listed) expires as well, and cancelling it then is a 409 too
    late = owner.post("/v1/batches", {"model": MODEL}).json()["id"]
    upload_deadline_passed(local_stack, store, owner.tenant_id, late)
    owner.error(owner.post(f"/v1/batches/{late}/cancel"), 409, "conflict")
    assert owner.get(f"/v1/batches/{late}").json()["status"] == "expired"


# ---------------------------------------------------------------------- the CLI
def test_sif_batches_and_jobs_commands(
    running: str, new_tenant: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = new_tenant("sif-cli")
    auth = ["--api-url", running, "--key", user.key]
    body = "id,text\n" + "".join(f"{i},review {i}\n" for i in range(20)) + "20,\n"
    done = user.post("/v1/batches", {"model": MODEL, "format": "csv"}).json()
    assert requests.put(done["upload_url"], data=body.encode(), timeout=60).status_code == 200
    wait_for(user, f"/v1/batches/{done['id']}", ("succeeded",))
    waiting = user.post("/v1/batches", {"model": MODEL}).json()["id"]
    listed = ids(user.get("/v1/batches"))

    assert cli.main(["batches", "list", "--json", *auth]) == 0
    page = json.loads(capsys.readouterr().out)
    assert page["object"] == "list" and [item["id"] for item in page["data"]] == listed
    assert cli.main(["batches", "list", "--limit", "1", *auth]) == 0
    out, err = capsys.readouterr()
    assert waiting in out and done["id"] not in out and "--after" in err  # a table, and how to get more
    assert cli.main(["batches", "list", "--status", "succeeded", *auth]) == 0
    out = capsys.readouterr().out
    assert done["id"] in out and "succeeded" in out and waiting not in out

    assert cli.main(["batches", "status", done["id"], *auth]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["id"].strip() == done["id"] and fields["status"].strip() == "succeeded"
    assert (fields["rows"].strip(), fields["succeeded"].strip(), fields["failed"].strip()) == ("21", "20", "1")
    assert cli.main(["batches", "fetch", done["id"], "--out", str(tmp_path / "out"), *auth]) == 0
    capsys.readouterr()
    predictions = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in predictions] == [str(i) for i in range(20)]
    assert json.loads((tmp_path / "out" / "errors.jsonl").read_text())["id"] == "20"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["succeeded"] == 20

    assert cli.main(["batches", "cancel", waiting, *auth]) == 0
    assert capsys.readouterr().out.strip() == f"batch {waiting}: cancelled"
    assert cli.main(["batches", "cancel", done["id"], *auth]) == 1
    assert "409" in capsys.readouterr().err
    assert cli.main(["batches", "fetch", waiting, "--out", str(tmp_path / "none"), *auth]) == 1
    assert "cancelled" in capsys.readouterr().err

    assert cli.main(["jobs", "list", "--json", *auth]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == []
    assert cli.main(["jobs", "status", "j_nosuchjob", *auth]) == 1
    assert "404" in capsys.readouterr().err
