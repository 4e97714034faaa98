"""Tenants and their API keys.

Keys are never stored: the tenants table holds the sha256 of each key as its hash key,
so a leaked table cannot be replayed against the API.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from pydantic import BaseModel

KEY_PREFIX = "sif_"


class Tenant(BaseModel):
    tenant_id: str
    name: str
    plan: str = "standard"
    monthly_calls: int = 100_000


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
        monthly_calls=int(item.get("monthly_calls", 0)),
    )
