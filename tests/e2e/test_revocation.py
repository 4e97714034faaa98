"""Revocation end to end on the local stack (issue 11, defect 10: a deleted tenant's key kept working
for 59 s and 57 calls were billed to a tenant that no longer existed).

Each attack keeps calling with the old key right after the change: every metered call is refused at
once (the usage transaction checks the key and the tenant's profile: 401 for a key, 403 for a
tenant) and nothing more is billed; within CACHE_TTL_S (the authorizer's per-instance cache, 10 s)
every call is refused, the unmetered routes too. Also: a disabled tenant's job submit and dropped
file are refused and bill nothing; rotate-key; `sif tenant list` shows no secret; a Bearer key and
an x-api-key that disagree are a 400.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from sif_authorizer.keys import CACHE_TTL_S
from sif_cli import main as cli
from sif_core import tenants
from sif_core.filebatch import InboxFile
from sif_core.work import TERMINAL, WorkStore
from sif_emulator.pollers import start_pollers
from sif_emulator.stack import LocalStack
from sif_metering.ledger import UsageLedger

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
# attack -> the status every call with the old key gets from then on (401: the key; 403: the tenant)
ATTACKS = {
    "revoke key": 401,
    "delete key item": 401,
    "rotate key": 401,
    "disable tenant": 403,
    "delete profile": 403,
}


def billed(local_stack: LocalStack, tenant_id: str) -> tuple[int, int, int]:
    """(units, calls, reserved) of the tenant's month: what would move if anything were billed."""
    ledger = UsageLedger(local_stack.client("dynamodb"), local_stack.table_name("usage"))
    return ledger.month_units(tenant_id), ledger.month_calls(tenant_id), ledger.month_reserved(tenant_id)


def attack(local_stack: LocalStack, client: ApiClient, how: str) -> str | None:
    """Do it to the tenant behind `client`; returns the new key for rotate-key."""
    table = local_stack.table("TenantsTable")
    assert client.key is not None
    if how == "revoke key":
        tenants.revoke_key(table, client.tenant_id, tenants.key_id_of(client.key))
    elif how == "delete key item":
        table.delete_item(Key={"key_hash": tenants.hash_key(client.key)})
    elif how == "rotate key":
        new_key, revoked = tenants.rotate_key(table, client.tenant_id)
        assert [k.key_id for k in revoked] == [tenants.key_id_of(client.key)]
        return new_key
    elif how == "disable tenant":
        tenants.disable_tenant(table, client.tenant_id)
    else:
        table.delete_item(Key={"key_hash": tenants.profile_key(client.tenant_id)})
    return None


def test_old_keys_are_refused_at_once_for_metered_calls_and_within_the_cache_time_for_all(
    local_stack: LocalStack, new_tenant: Callable[..., ApiClient]
) -> None:
    clients = {how: new_tenant(f"revoke-{how.replace(' ', '-')}") for how in ATTACKS}
    for how, client in clients.items():
        for _ in range(3):  # warm every authorizer instance's cache with the key
            assert client.embed("warm the cache").status_code == 200, how
            assert client.get("/v1/models").status_code == 200, how
    before = {how: billed(local_stack, c.tenant_id) for how, c in clients.items()}
    assert all(b == (3, 3, 0) for b in before.values()), before

    new_keys = {how: attack(local_stack, client, how) for how, client in clients.items()}
    attacked_at = time.monotonic()
    refused_by_authorizer_at = attacked_at + CACHE_TTL_S + 0.5
    unmetered_answers: dict[str, set[int]] = {how: set() for how in clients}
    calls = 0
    while time.monotonic() < refused_by_authorizer_at + 1.0:
        for how, client in clients.items():
            status = ATTACKS[how]
            resp = client.embed(f"call {calls} after: {how}")
            client.error(resp, status)  # metered: refused at once, from the first call on
            calls += 1
            models = client.get("/v1/models")
            unmetered_answers[how].add(models.status_code)
            if time.monotonic() > refused_by_authorizer_at:
                client.error(models, status)  # every authorizer instance has read the key again
                client.error(client.get("/v1/usage"), status)
        time.sleep(0.2)
    assert calls >= 5 * len(clients)
    # the authorizers' caches did let the old keys in meanwhile (unmetered routes answered 200): the
    # metered calls were refused by the usage transaction itself
    assert any(200 in answers for answers in unmetered_answers.values()), unmetered_answers
    for how, client in clients.items():
        assert billed(local_stack, client.tenant_id) == before[how], f"{how}: billed after the change"
        assert unmetered_answers[how] <= {200, ATTACKS[how]}, (how, unmetered_answers[how])

    # rotate-key: the new key works at once, and is billed as usual
    rotated = clients["rotate key"]
    rotated.key = new_keys["rotate key"]
    assert rotated.embed("the new key").status_code == 200
    units, calls_billed, _ = billed(local_stack, rotated.tenant_id)
    assert (units, calls_billed) == (4, 4)


def test_a_disabled_or_revoked_tenant_submits_no_job_and_is_billed_nothing(
    local_stack: LocalStack, new_tenant: Callable[..., ApiClient]
) -> None:
    body = {"model": MODEL, "input": {"instances": ["first", "second"]}}
    disabled, revoked = new_tenant("revoke-job-disabled"), new_tenant("revoke-job-revoked")
    for client in (disabled, revoked):
        assert client.embed("warm").status_code == 200
    tenants.disable_tenant(local_stack.table("TenantsTable"), disabled.tenant_id)
    assert revoked.key is not None
    tenants.revoke_key(local_stack.table("TenantsTable"), revoked.tenant_id, tenants.key_id_of(revoked.key))
    for client, status in ((disabled, 403), (revoked, 401)):
        client.error(client.post("/v1/jobs", body), status)
        assert billed(local_stack, client.tenant_id) == (1, 1, 0)  # no reservation either


def test_enable_lets_the_tenant_call_again(local_stack: LocalStack, new_tenant: Callable[..., ApiClient]) -> None:
    client = new_tenant("revoke-enable")
    table = local_stack.table("TenantsTable")
    tenants.disable_tenant(table, client.tenant_id)
    client.error(client.embed("disabled"), 403)
    tenants.enable_tenant(table, client.tenant_id)
    assert client.embed("enabled again").status_code == 200  # refusals are never cached
    assert billed(local_stack, client.tenant_id)[:2] == (1, 1)


def test_a_bearer_key_and_an_x_api_key_that_disagree_are_400(
    new_tenant: Callable[..., ApiClient], client_with_key: Callable[..., ApiClient]
) -> None:
    one, other = new_tenant("revoke-two-keys"), new_tenant("revoke-two-keys-other")
    body = {"model": MODEL, "input": "hello"}
    url = one.url + "/v1/embeddings"
    both = {"Authorization": f"Bearer {one.key}", "x-api-key": str(other.key)}
    error = one.error(one.session.post(url, json=body, headers=both, timeout=60), 400, "bad_request")
    assert "different keys" in error["message"]
    one.error(one.session.get(one.url + "/v1/models", headers=both, timeout=60), 400)
    # the same key in both headers is fine; an unknown Bearer key is refused before any choice (401)
    same = {"Authorization": f"Bearer {one.key}", "x-api-key": str(one.key)}
    assert one.session.post(url, json=body, headers=same, timeout=60).status_code == 200
    unknown = {"Authorization": "Bearer sif_not-a-real-key", "x-api-key": str(one.key)}
    one.error(one.session.get(one.url + "/v1/models", headers=unknown, timeout=60), 401)
    assert client_with_key(str(other.key), "x-api-key").get("/v1/models").status_code == 200


def test_tenant_commands_show_no_secret(
    local_stack: LocalStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIF_STACK_JSON", str(local_stack.stack_json_path))
    info, first = local_stack.create_tenant(f"revoke-cli-{uuid.uuid4().hex[:6]}", monthly_calls=500)
    tenant_id = info["tenant_id"]
    assert cli.main(["tenant", "add-key", tenant_id]) == 0
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["tenant", "rotate-key", tenant_id, tenants.key_id_of(first)]) == 0
    out = capsys.readouterr()
    third = out.out.strip().splitlines()[-1]
    assert f"revoked: {tenants.key_id_of(first)}" in out.err
    assert cli.main(["tenant", "revoke-key", tenant_id, tenants.hash_key(second)[:10]]) == 0
    assert tenants.key_id_of(second) in capsys.readouterr().out
    assert cli.main(["tenant", "disable", tenant_id]) == 0
    assert "disabled" in capsys.readouterr().out

    assert cli.main(["tenant", "list"]) == 0
    listing = capsys.readouterr().out
    (line,) = [row for row in listing.splitlines() if row.startswith(tenant_id)]
    assert line.split()[1:] == [info["name"], "standard", "500", "disabled", "1", "active,", "2", "revoked"]
    assert cli.main(["tenant", "keys", tenant_id]) == 0
    keys = capsys.readouterr().out
    assert sorted(tuple(row.split()[:2]) for row in keys.splitlines()[1:]) == sorted(
        [
            (tenants.key_id_of(first), "revoked"),
            (tenants.key_id_of(second), "revoked"),
            (tenants.key_id_of(third), "active"),
        ]
    )
    profile = local_stack.table("TenantsTable").get_item(Key={"key_hash": tenants.profile_key(tenant_id)})["Item"]
    secrets = [str(value) for name, value in profile.items() if "secret" in name]  # e.g. the callback secret
    for text in (listing, keys):
        for key in (first, second, third, str(local_stack.demo_api_key)):
            assert key not in text and tenants.hash_key(key)[:12] not in text
        assert all(secret not in text for secret in secrets)
    assert cli.main(["tenant", "revoke-key", tenant_id, "zzzz"]) == 1
    assert "no key matching" in capsys.readouterr().err
    assert cli.main(["tenant", "enable", "t_nobody"]) == 1


# ---------------------------------------------------------------------- a dropped file
@pytest.fixture(scope="module")
def scorer(local_stack: LocalStack) -> Iterator[None]:
    pollers = start_pollers(local_stack, functions=["ScorerFunction"])
    try:
        yield
    finally:
        for poller in pollers:
            poller.stop()


def test_a_disabled_tenants_dropped_file_fails_and_bills_nothing(
    local_stack: LocalStack, new_tenant: Callable[..., ApiClient], scorer: None
) -> None:
    client = new_tenant("revoke-file")
    tenants.disable_tenant(local_stack.table("TenantsTable"), client.tenant_id)
    s3 = local_stack.client("s3")
    key = f"incoming/{client.tenant_id}/{MODEL}/rows.jsonl"
    body = b"".join(json.dumps({"id": i, "text": f"row {i}"}).encode() + b"\n" for i in range(5))
    etag = s3.put_object(Bucket=local_stack.bucket("inbox"), Key=key, Body=body)["ETag"]
    file = InboxFile.parse(local_stack.bucket("inbox"), key, etag, len(body))
    record = wait_for(local_stack, file)
    assert record.status == "failed" and record.reason == "tenant_inactive", record
    assert "disabled" in (record.error or ""), record.error
    assert billed(local_stack, client.tenant_id) == (0, 0, 0)
    ledger = UsageLedger(local_stack.client("dynamodb"), local_stack.table_name("usage"))
    assert ledger.reservation(file.metering_id) is None


def wait_for(local_stack: LocalStack, file: InboxFile, timeout_s: float = 120.0) -> Any:
    work = WorkStore(local_stack.table("WorkTable"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = work.get(file.tenant, "batch", file.batch_id)
        if record is not None and record.status in TERMINAL:
            return record
        time.sleep(0.25)
    raise AssertionError(f"{file.key} did not finish within {timeout_s} s (see {local_stack.state_dir}/logs)")
