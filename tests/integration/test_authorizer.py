"""The REQUEST authorizer with the sample events: keys in both header styles, 401s, policy, cache,
a tenant record without a quota, which fails closed (NO_QUOTA in the context, never 0 = unlimited);
revoked keys (401), disabled or deleted tenants (403), keys from before statuses (still active); the
operators' functions of sif_core.tenants: list (no secrets), keys, revoke, rotate, disable, enable."""

from __future__ import annotations

import copy
import importlib
import json
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from types import ModuleType
from typing import Any

import pytest

from sif_api.caller import Caller
from sif_authorizer.keys import CACHE_TTL_S, TenantCache, api_key_from_headers
from sif_core import tenants
from sif_core.tenants import (
    KeyCheck,
    check_key,
    find_tenant,
    hash_key,
    key_id_of,
    keys_disagree,
    new_api_key,
    profile_key,
)
from sif_emulator.gateway import policy_allows
from sif_emulator.lambda_runtime import LambdaContext
from sif_emulator.stack import LocalStack
from sif_metering import NO_QUOTA, QuotaExceededError, QuotaGate, UsageLedger

pytestmark = pytest.mark.integration

EXAMPLE_KEY = "sif_exampleexampleexampleexampleexample00000"


@pytest.fixture(scope="module")
def authorizer(local_stack: LocalStack) -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as env:
        for key, value in local_stack.function_env("AuthorizerFunction").items():
            env.setenv(key, value)
        yield importlib.import_module("sif_authorizer.handler")


@pytest.fixture(scope="module")
def tenant(local_stack: LocalStack) -> tuple[dict[str, Any], str]:
    return local_stack.create_tenant("unit-auth", monthly_calls=42)


def run(authorizer: ModuleType, load_event: Callable[[str], dict], name: str, key: str | None) -> dict[str, Any]:
    event = copy.deepcopy(load_event(name))
    for headers in (event["headers"], event["multiValueHeaders"]):
        for header in list(headers):
            if header.lower() == "authorization":
                headers[header] = f"Bearer {key}" if isinstance(headers[header], str) else [f"Bearer {key}"]
            elif header.lower() == "x-api-key":
                headers[header] = key if isinstance(headers[header], str) else [key]
    result: dict[str, Any] = authorizer.lambda_handler(event, LambdaContext(function_name="sif-authorizer"))
    return result


@pytest.mark.parametrize("event_name", ["authorizer_bearer", "authorizer_x_api_key"])
def test_a_known_key_is_allowed_with_the_tenant_in_the_context(
    authorizer: ModuleType, load_event: Callable[[str], dict], tenant: tuple[dict[str, Any], str], event_name: str
) -> None:
    info, key = tenant
    result = run(authorizer, load_event, event_name, key)
    assert result["principalId"] == info["tenant_id"]
    assert result["context"] == {
        "tenant_id": info["tenant_id"],
        "tenant_name": "unit-auth",
        "plan": "standard",
        "monthly_calls": 42,
        "key_id": key_id_of(key),  # public: the 8 characters after sif_
        "key_hash": hash_key(key),  # what the usage transaction checks again
    }
    # One policy for the whole API, so a cached result would serve every route.
    arn = load_event(event_name)["methodArn"]
    assert policy_allows(result["policyDocument"], arn)
    assert policy_allows(result["policyDocument"], arn.replace("POST/v1/embeddings", "GET/v1/usage"))


@pytest.mark.parametrize(("event_name", "key"), [("authorizer_bearer", "sif_unknown"), ("authorizer_no_key", None)])
def test_missing_or_unknown_key_is_unauthorized(
    authorizer: ModuleType, load_event: Callable[[str], dict], event_name: str, key: str | None
) -> None:
    with pytest.raises(Exception, match=r"^Unauthorized$"):
        run(authorizer, load_event, event_name, key or EXAMPLE_KEY)


def test_known_keys_are_cached(
    authorizer: ModuleType, load_event: Callable[[str], dict], local_stack: LocalStack
) -> None:
    info, key = local_stack.create_tenant("unit-auth-cache")
    assert run(authorizer, load_event, "authorizer_bearer", key)["principalId"] == info["tenant_id"]
    local_stack.table("TenantsTable").delete_item(Key={"key_hash": hash_key(key)})
    # answered from this instance's cache, no DynamoDB read (for up to CACHE_TTL_S; metering checks
    # the key itself meanwhile: tests/integration/test_ledger.py, tests/e2e/test_revocation.py)
    assert run(authorizer, load_event, "authorizer_bearer", key)["principalId"] == info["tenant_id"]


def test_the_documented_revocation_bound_is_ten_seconds() -> None:
    assert CACHE_TTL_S == 10.0  # README "Keys" and the CLI's messages say 10 s


def test_tenant_cache_expires_and_does_not_cache_refusals(local_stack: LocalStack) -> None:
    info, key = local_stack.create_tenant("unit-auth-ttl")
    table = local_stack.table("TenantsTable")
    lookups: list[str] = []

    def lookup(api_key: str) -> KeyCheck:
        lookups.append(api_key)
        return check_key(table, api_key)

    now = [1000.0]
    cache = TenantCache(lookup, ttl_s=CACHE_TTL_S, clock=lambda: now[0])
    assert cache.tenant(key) is not None and cache.tenant(key) is not None
    assert len(lookups) == 1
    now[0] += CACHE_TTL_S + 1
    assert cache.tenant(key) is not None and len(lookups) == 2
    assert cache.tenant("sif_nobody") is None and cache.tenant("sif_nobody") is None
    assert len(lookups) == 4
    # revoked: still answered from the cache until the entry is CACHE_TTL_S old, then refused, and
    # the refusal is not cached (every later call reads again)
    tenants.revoke_key(table, info["tenant_id"], key_id_of(key))
    now[0] += CACHE_TTL_S - 1
    assert cache.tenant(key) is not None and len(lookups) == 4
    now[0] += 1
    assert cache.check(key).refused == tenants.KEY_REVOKED and len(lookups) == 5
    assert cache.tenant(key) is None and len(lookups) == 6


def put_tenant_record(local_stack: LocalStack, name: str, **fields: Any) -> tuple[str, str]:
    """A tenant as someone might have written it by hand (or before key ids and statuses existed):
    a key item and a profile with only the given quota fields, no key_id, no status."""
    key, tenant_id = f"sif_{name}_{uuid.uuid4().hex}", f"t_{uuid.uuid4().hex[:16]}"
    table = local_stack.table("TenantsTable")
    table.put_item(Item={"key_hash": hash_key(key), "tenant_id": tenant_id, "name": name, **fields})
    table.put_item(Item={"key_hash": profile_key(tenant_id), "tenant_id": tenant_id, "name": name, **fields})
    return tenant_id, key


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),  # no quota field: none configured, not unlimited
        ({"monthly_calls": None}, None),
        ({"monthly_calls": "lots"}, None),
        ({"monthly_calls": Decimal("2.5")}, None),
        ({"monthly_calls": Decimal("-3")}, None),
        ({"monthly_calls": Decimal("0")}, 0),  # explicitly unlimited
        ({"monthly_calls": Decimal("250")}, 250),
        ({"monthly_calls": "250"}, 250),
    ],
)
def test_find_tenant_never_turns_a_missing_quota_into_unlimited(
    local_stack: LocalStack, fields: dict[str, Any], expected: int | None
) -> None:
    tenant_id, key = put_tenant_record(local_stack, "unit-auth-fields", **fields)
    found = find_tenant(local_stack.table("TenantsTable"), key)
    assert found is not None and found.tenant_id == tenant_id
    assert found.monthly_calls == expected


def test_a_tenant_without_quota_is_allowed_in_but_refused_by_every_quota_check(
    authorizer: ModuleType, load_event: Callable[[str], dict], local_stack: LocalStack
) -> None:
    tenant_id, key = put_tenant_record(local_stack, "unit-auth-noquota")
    result = run(authorizer, load_event, "authorizer_bearer", key)
    assert result["principalId"] == tenant_id
    assert result["context"]["monthly_calls"] == NO_QUOTA == tenants.NO_QUOTA
    # as API Gateway hands it on (strings) -> the API's Caller -> the quota gate: 429, no inference
    caller = Caller.model_validate({k: str(v) for k, v in result["context"].items()})
    assert caller.monthly_calls == NO_QUOTA
    ledger = UsageLedger(local_stack.client("dynamodb"), local_stack.table_name("usage"))
    with pytest.raises(QuotaExceededError, match="no quota configured"):
        QuotaGate(ledger).check(caller.tenant_id, caller.monthly_calls)
    with pytest.raises(QuotaExceededError, match="no quota configured"):
        ledger.reserve(caller.tenant_id, f"r-{uuid.uuid4().hex}", 1, caller.monthly_calls)


def test_keys_without_status_or_id_still_work_as_active(
    authorizer: ModuleType, load_event: Callable[[str], dict], local_stack: LocalStack
) -> None:
    tenant_id, key = put_tenant_record(local_stack, "unit-auth-legacy", monthly_calls=Decimal("7"))
    result = run(authorizer, load_event, "authorizer_x_api_key", key)
    assert result["principalId"] == tenant_id
    assert result["context"]["key_id"] == "" and result["context"]["key_hash"] == hash_key(key)
    # and it can be revoked by a prefix of its sha256 (it has no id)
    revoked = tenants.revoke_key(local_stack.table("TenantsTable"), tenant_id, hash_key(key)[:10])
    assert revoked.status == tenants.REVOKED
    assert check_key(local_stack.table("TenantsTable"), key).refused == tenants.KEY_REVOKED


def fresh_authorizer(authorizer: ModuleType) -> None:
    """Forget this instance's cache (what CACHE_TTL_S does on its own)."""
    authorizer.tenants.clear()


def test_a_revoked_key_is_401(
    authorizer: ModuleType, load_event: Callable[[str], dict], local_stack: LocalStack
) -> None:
    info, key = local_stack.create_tenant("unit-auth-revoke")
    assert run(authorizer, load_event, "authorizer_bearer", key)["principalId"] == info["tenant_id"]
    tenants.revoke_key(local_stack.table("TenantsTable"), info["tenant_id"], key_id_of(key))
    fresh_authorizer(authorizer)
    with pytest.raises(Exception, match=r"^Unauthorized$"):
        run(authorizer, load_event, "authorizer_bearer", key)


@pytest.mark.parametrize("how", ["disable", "delete profile"])
def test_a_disabled_or_deleted_tenant_is_denied_403(
    authorizer: ModuleType, load_event: Callable[[str], dict], local_stack: LocalStack, how: str
) -> None:
    info, key = local_stack.create_tenant("unit-auth-disable")
    table = local_stack.table("TenantsTable")
    if how == "disable":
        tenants.disable_tenant(table, info["tenant_id"])
    else:
        table.delete_item(Key={"key_hash": profile_key(info["tenant_id"])})
    fresh_authorizer(authorizer)
    result = run(authorizer, load_event, "authorizer_bearer", key)
    arn = load_event("authorizer_bearer")["methodArn"]
    assert not policy_allows(result["policyDocument"], arn)  # a Deny: API Gateway answers 403
    assert result["policyDocument"]["Statement"][0]["Effect"] == "Deny"
    assert "context" not in result or "tenant_id" not in (result.get("context") or {})
    if how == "disable":
        tenants.enable_tenant(table, info["tenant_id"])  # enabled again: works at once (refusals are not cached)
        assert run(authorizer, load_event, "authorizer_bearer", key)["principalId"] == info["tenant_id"]


# ---------------------------------------------------------------- operators' functions
def test_key_ids_are_command_line_arguments_never_options() -> None:
    # an id of `-5BiYFiR` made `sif tenant revoke-key T -5BiYFiR` an unknown option (the README test, once)
    keys = [new_api_key() for _ in range(3000)]  # about 94 of them would start with - or _ otherwise
    assert all(key_id_of(key)[0].isalnum() for key in keys)
    assert all(len(key) == 47 and key.startswith("sif_") for key in keys) and len(set(keys)) == len(keys)


def test_new_keys_have_a_public_id_and_a_status(local_stack: LocalStack) -> None:
    info, key = local_stack.create_tenant("unit-keys")
    item = local_stack.table("TenantsTable").get_item(Key={"key_hash": hash_key(key)})["Item"]
    assert item["key_id"] == key[4:12] == key_id_of(key) and item["status"] == "active"
    profile = local_stack.table("TenantsTable").get_item(Key={"key_hash": profile_key(info["tenant_id"])})["Item"]
    assert profile["status"] == "active"
    assert key not in str(item) and key not in str(profile)


def test_tenant_list_shows_states_and_key_counts_never_a_secret(local_stack: LocalStack) -> None:
    table = local_stack.table("TenantsTable")
    info, key = local_stack.create_tenant("unit-list", monthly_calls=77)
    second = tenants.add_key(table, info["tenant_id"])
    tenants.revoke_key(table, info["tenant_id"], key_id_of(key))
    gone, gone_key = local_stack.create_tenant("unit-list-deleted")
    table.delete_item(Key={"key_hash": profile_key(gone["tenant_id"])})
    listing = {line.tenant.tenant_id: line for line in tenants.list_tenants(table)}
    mine = listing[info["tenant_id"]]
    assert (mine.tenant.name, mine.tenant.monthly_calls, mine.tenant.status) == ("unit-list", 77, "active")
    assert (mine.keys_active, mine.keys_total) == (1, 2)
    assert listing[gone["tenant_id"]].tenant.status == "deleted"  # its key is still there, and refused
    dump = json.dumps([line.model_dump() for line in listing.values()])
    for secret in (key, second, gone_key):
        assert secret not in dump and hash_key(secret) not in dump and hash_key(secret)[:16] not in dump
    profile = table.get_item(Key={"key_hash": profile_key(info["tenant_id"])})["Item"]
    assert all(str(value) not in dump for name, value in profile.items() if "secret" in name)
    keys = tenants.list_keys(table, info["tenant_id"])
    assert sorted((k.key_id, k.status) for k in keys) == sorted(
        [(key_id_of(key), "revoked"), (key_id_of(second), "active")]
    )
    assert hash_key(key) not in json.dumps([k.model_dump() for k in keys])


def test_revoke_key_by_id_hash_prefix_or_the_key_exactly_one(local_stack: LocalStack) -> None:
    table = local_stack.table("TenantsTable")
    info, key = local_stack.create_tenant("unit-revoke")
    tenant_id = info["tenant_id"]
    _, other_key = local_stack.create_tenant("unit-revoke-other")
    with pytest.raises(tenants.TenantError, match="no key"):
        tenants.revoke_key(table, tenant_id, key_id_of(other_key))  # another tenant's key: not named here
    with pytest.raises(tenants.TenantError, match="too short"):
        tenants.revoke_key(table, tenant_id, "ab")
    assert tenants.revoke_key(table, tenant_id, "sif_" + key_id_of(key)).status == "revoked"
    assert find_tenant(table, key) is None
    assert find_tenant(table, other_key) is not None
    # by the key itself, or by a prefix of its sha256; revoking again changes nothing
    second = tenants.add_key(table, tenant_id)
    assert tenants.revoke_key(table, tenant_id, hash_key(second)[:12]).key_id == key_id_of(second)
    again = tenants.revoke_key(table, tenant_id, second)
    assert again.status == "revoked" and again.revoked_at is not None


def test_rotate_key_revokes_the_old_and_the_new_one_works(local_stack: LocalStack) -> None:
    table = local_stack.table("TenantsTable")
    info, old = local_stack.create_tenant("unit-rotate")
    new, revoked = tenants.rotate_key(table, info["tenant_id"])
    assert [k.key_id for k in revoked] == [key_id_of(old)]
    assert check_key(table, old).refused == tenants.KEY_REVOKED
    found = find_tenant(table, new)
    assert found is not None and found.tenant_id == info["tenant_id"]
    with pytest.raises(tenants.TenantError, match="no tenant"):
        tenants.rotate_key(table, "t_nobody")


def test_disable_and_enable_a_tenant(local_stack: LocalStack) -> None:
    table = local_stack.table("TenantsTable")
    info, key = local_stack.create_tenant("unit-disable")
    assert tenants.disable_tenant(table, info["tenant_id"]).status == "disabled"
    assert check_key(table, key).refused == tenants.TENANT_DISABLED
    assert tenants.tenant_quota(table, info["tenant_id"]) == 100_000  # the quota itself is unchanged
    assert tenants.enable_tenant(table, info["tenant_id"]).status == "active"
    assert find_tenant(table, key) is not None
    with pytest.raises(tenants.TenantError, match="no tenant"):
        tenants.disable_tenant(table, "t_nobody")
    assert local_stack.table("TenantsTable").get_item(Key={"key_hash": profile_key("t_nobody")}).get("Item") is None


@pytest.mark.parametrize(
    ("headers", "disagree"),
    [
        ({"Authorization": "Bearer k1", "x-api-key": "k1"}, False),
        ({"Authorization": "Bearer k1", "x-api-key": "k2"}, True),
        ({"authorization": "bearer k1", "X-API-KEY": "k2"}, True),
        ({"Authorization": "Basic abc", "x-api-key": "k2"}, False),  # not a Bearer key: only one key
        ({"x-api-key": "k2"}, False),
        ({}, False),
    ],
)
def test_keys_disagree(headers: dict[str, str], disagree: bool) -> None:
    assert keys_disagree(headers) is disagree


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer k1"}, "k1"),
        ({"authorization": "bearer  k2 "}, "k2"),
        ({"X-API-Key": "k3"}, "k3"),
        ({"Authorization": "Basic abc", "x-api-key": "k4"}, "k4"),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "k5"}, None),
        ({}, None),
    ],
)
def test_api_key_from_headers(headers: dict[str, str], expected: str | None) -> None:
    assert api_key_from_headers(headers) == expected
