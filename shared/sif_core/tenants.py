"""Tenants and their API keys.

Keys are never stored: the tenants table holds the sha256 of each key as its hash key,
so a leaked table cannot be replayed against the API.

`monthly_calls` is the tenant's monthly quota in units: one input (a text, an image, a file row)
is one unit; 0 = unlimited. The name stays for compatibility (the CLI's `--monthly-calls`, the
authorizer context). A record without the field, or with a value that is not an integer, reads as
`monthly_calls=None`: no quota configured, which fails closed (the authorizer passes NO_QUOTA and
every quota check refuses it), never as 0 = unlimited.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel

KEY_PREFIX = "sif_"
# The quota a tenant without one travels with (authorizer context, the API's Caller): metering
# refuses every negative limit (sif_metering.NO_QUOTA is the same value; the authorizer does not
# load the metering package, whose pricing pulls in the inference core).
NO_QUOTA = -1


class Tenant(BaseModel):
    tenant_id: str
    name: str
    plan: str = "standard"
    monthly_calls: int | None = 100_000  # units (inputs) per month; 0 = unlimited; None = none configured


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_tenant(table: Any, name: str, *, monthly_calls: int = 100_000, plan: str = "standard") -> tuple[Tenant, str]:
    """Create a tenant in the tenants table (a boto3 Table); returns it with its new API key."""
    tenant = Tenant(tenant_id="t_" + secrets.token_hex(8), name=name, plan=plan, monthly_calls=monthly_calls)
    api_key = new_api_key()
    table.put_item(
        Item={"key_hash": hash_key(api_key), "created_at": int(time.time()), **tenant.model_dump()},
        ConditionExpression="attribute_not_exists(key_hash)",
    )
    # The tenant's profile, found by id: what jobs and dropped files (which carry no key) are held to.
    table.put_item(
        Item={"key_hash": profile_key(tenant.tenant_id), "created_at": int(time.time()), **tenant.model_dump()}
    )
    return tenant, api_key


def find_tenant(table: Any, api_key: str) -> Tenant | None:
    """The tenant owning this key, or None; the lookup is by the key's hash only."""
    if not api_key:
        return None
    item = table.get_item(Key={"key_hash": hash_key(api_key)}).get("Item")
    if item is None:
        return None
    return Tenant(
        tenant_id=str(item["tenant_id"]),
        name=str(item["name"]),
        plan=str(item.get("plan", "standard")),
        monthly_calls=_quota(item.get("monthly_calls")),
    )


def _quota(value: Any) -> int | None:
    """The stored quota, or None when it is missing or unreadable (refused, never unlimited)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        quota = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    if not quota.is_finite() or quota < 0 or quota != quota.to_integral_value():
        return None
    return int(quota)


def profile_key(tenant_id: str) -> str:
    """The tenants table's item for a tenant by id (API keys are items keyed by their hash; this is not one)."""
    return f"tenant#{tenant_id}"


def tenant_quota(table: Any, tenant_id: str) -> int | None:
    """The tenant's monthly quota in units, or None when there is no profile or no readable quota (refused)."""
    item = table.get_item(Key={"key_hash": profile_key(tenant_id)}).get("Item")
    return None if item is None else _quota(item.get("monthly_calls"))
