"""The REQUEST authorizer with the sample events: keys in both header styles, 401s, policy, cache,
and a tenant record without a quota, which fails closed (NO_QUOTA in the context, never 0 = unlimited)."""

from __future__ import annotations

import copy
import importlib
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from types import ModuleType
from typing import Any

import pytest

from sif_api.caller import Caller
from sif_authorizer.keys import TenantCache, api_key_from_headers
from sif_core import tenants
from sif_core.tenants import Tenant, find_tenant, hash_key
from sif_local.gateway import LambdaContext, policy_allows
from sif_local.stack import LocalStack
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
    # answered from this instance's cache, no DynamoDB read (for up to CACHE_TTL_S)
    assert run(authorizer, load_event, "authorizer_bearer", key)["principalId"] == info["tenant_id"]


def test_tenant_cache_expires_and_does_not_cache_unknown_keys(local_stack: LocalStack) -> None:
    _, key = local_stack.create_tenant("unit-auth-ttl")
    table = local_stack.table("TenantsTable")
    lookups: list[str] = []

    def lookup(api_key: str) -> Tenant | None:
        lookups.append(api_key)
        return find_tenant(table, api_key)

    now = [1000.0]
    cache = TenantCache(lookup, ttl_s=60, clock=lambda: now[0])
    assert cache.tenant(key) is not None and cache.tenant(key) is not None
    assert len(lookups) == 1
    now[0] += 61
    assert cache.tenant(key) is not None and len(lookups) == 2
    assert cache.tenant("sif_nobody") is None and cache.tenant("sif_nobody") is None
    assert len(lookups) == 4


def put_tenant_record(local_stack: LocalStack, name: str, **fields: Any) -> tuple[str, str]:
    """A tenant record as someone might have written it by hand: only the given quota fields."""
    key, tenant_id = f"sif_{name}_{uuid.uuid4().hex}", f"t_{uuid.uuid4().hex[:16]}"
    item = {"key_hash": hash_key(key), "tenant_id": tenant_id, "name": name, **fields}
    local_stack.table("TenantsTable").put_item(Item=item)
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
