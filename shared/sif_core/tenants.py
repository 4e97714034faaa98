"""Tenants and their API keys.

Keys are never stored: the tenants table holds the sha256 of each key as its hash key,
so a leaked table cannot be replayed against the API.

`monthly_calls` is the tenant's monthly quota in units: one input (a text, an image, a file row)
is one unit; 0 = unlimited. The name stays for compatibility (the CLI's `--monthly-calls`, the
authorizer context). A record without the field, or with a value that is not an integer, reads as
`monthly_calls=None`: no quota configured, which fails closed (the authorizer passes NO_QUOTA and
every quota check refuses it), never as 0 = unlimited.

Items of the tenants table (hash key `key_hash`; the GSI `by_tenant` lists a tenant's items by
`tenant_id`):
  tenant#{tenant_id}   the tenant's profile: name, plan, monthly_calls, status (active | disabled;
                       none = active), created_at. What the authorizer and metering hold every
                       key to: no profile = the tenant no longer exists.
  sha256(key)          one API key: tenant_id, key_id (public: the first KEY_ID_CHARS characters
                       after `sif_`, so a key can be named without storing it), status (active |
                       revoked; none = active, as keys written before statuses exist), created_at,
                       revoked_at; and a copy of name, plan, monthly_calls at creation (the profile
                       is what counts). A tenant may have several keys.

A key may call while its item is active and its tenant's profile exists and is active. The
authorizer checks both (cached per instance for sif_authorizer.keys.CACHE_TTL_S); the usage
transaction checks both again (sif_metering.ledger, `tenants_table`), so nothing is billed to a
revoked key or a disabled or deleted tenant even while a cache still lets it in.

A tenant's callbacks are signed with its own `callback_secret`, generated when the tenant is created
and kept on its profile item only (never on a key's item); `rotate_callback_secret` replaces it and
the old one stops verifying at once. What signs (the callback function) reads only that attribute of
profile items (template.yaml: `dynamodb:LeadingKeys` `tenant#*`); DynamoDB's server-side encryption
(the table's SSESpecification) keeps it encrypted at rest.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from botocore.exceptions import ClientError
from pydantic import BaseModel

KEY_PREFIX = "sif_"
CALLBACK_SECRET_PREFIX = "sifcb_"  # noqa: S105 - a prefix, not a secret
CALLBACK_SECRET_FIELD = "callback_secret"  # noqa: S105 - an attribute name; on profile items only
# The quota a tenant without one travels with (authorizer context, the API's Caller): metering
# refuses every negative limit (sif_metering.NO_QUOTA is the same value; the authorizer does not
# load the metering package, whose pricing pulls in the inference core).
NO_QUOTA = -1
KEY_ID_CHARS = 8
TENANT_INDEX = "by_tenant"  # template.yaml's GSI on TenantsTable: a tenant's profile and keys by tenant_id
ACTIVE, REVOKED, DISABLED, DELETED = "active", "revoked", "disabled", "deleted"
# Why a key may not call (KeyCheck.refused): the first two are a bad key (401), the others a tenant
# that may not be served (403).
UNKNOWN_KEY, KEY_REVOKED = "unknown key", "key revoked"
TENANT_DISABLED, TENANT_DELETED = "tenant disabled", "tenant deleted"
# What the key and tenant functions read of an item: never the profile's callback secret.
_FIELDS = ("key_hash", "tenant_id", "name", "plan", "monthly_calls", "status", "key_id", "created_at", "revoked_at")
_READ = {
    "ProjectionExpression": ", ".join(f"#{n}" for n in _FIELDS),  # as names: several are reserved words
    "ExpressionAttributeNames": {f"#{n}": n for n in _FIELDS},
}


class TenantError(Exception):
    """An operator's request that cannot be done (no such tenant, no or several matching keys)."""


class Tenant(BaseModel):
    tenant_id: str
    name: str
    plan: str = "standard"
    monthly_calls: int | None = 100_000  # units (inputs) per month; 0 = unlimited; None = none configured
    status: str = ACTIVE  # active | disabled (the profile's); `deleted` only in listings of keys without one


class ApiKeyInfo(BaseModel):
    """A key as an operator sees it: its public id and state, never the key or its hash."""

    tenant_id: str
    key_id: str  # "" for a key created before key ids (name it by a prefix of its sha256)
    status: str = ACTIVE
    created_at: int | None = None
    revoked_at: int | None = None


class TenantSummary(BaseModel):
    """One line of `sif tenant list`: no key, no hash, no secret."""

    tenant: Tenant
    keys_active: int = 0
    keys_total: int = 0


@dataclass(frozen=True)
class KeyCheck:
    """What the tenants table says about one key: its tenant, and why it may not call (None: it may)."""

    tenant: Tenant | None
    key_id: str = ""
    key_hash: str = ""
    refused: str | None = None  # UNKNOWN_KEY | KEY_REVOKED | TENANT_DISABLED | TENANT_DELETED
    tenant_id: str = ""  # the key's tenant, also when it is refused (for the logs)

    @property
    def allowed(self) -> bool:
        return self.refused is None and self.tenant is not None


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    """`sif_` and 43 URL-safe characters; the id (`key_id_of`) starts with a letter or a digit, so that it is
    an argument on a command line, never an option (`sif tenant revoke-key T -5BiYFiR` was one)."""
    while True:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        if key[len(KEY_PREFIX)].isalnum():
            return key


def key_id_of(api_key: str) -> str:
    """A key's public id: the first KEY_ID_CHARS characters after `sif_` (stored; names the key in the CLI)."""
    return api_key.removeprefix(KEY_PREFIX)[:KEY_ID_CHARS]


def api_keys_in_headers(headers: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(the `Authorization: Bearer` key, the `x-api-key` key), header names in any case."""
    lowered = {k.lower(): v for k, v in headers.items() if isinstance(v, str)}
    scheme, _, token = lowered.get("authorization", "").strip().partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return bearer, lowered.get("x-api-key", "").strip() or None


def api_key_from_headers(headers: Mapping[str, Any]) -> str | None:
    """The key a request authenticates with: the Bearer key, else the x-api-key one (the API answers
    400 when both are given and differ: `keys_disagree`)."""
    bearer, x_api_key = api_keys_in_headers(headers)
    return bearer or x_api_key


def keys_disagree(headers: Mapping[str, Any]) -> bool:
    bearer, x_api_key = api_keys_in_headers(headers)
    return bearer is not None and x_api_key is not None and bearer != x_api_key


def create_tenant(
    table: Any,
    name: str,
    *,
    monthly_calls: int = 100_000,
    plan: str = "standard",
    callback_secret: str | None = None,
) -> tuple[Tenant, str]:
    """Create a tenant in the tenants table (a boto3 Table); returns it with its new API key.

    Its callback signing secret is `callback_secret` or a new one: a caller that shows it to the
    tenant (once, like the key) makes it with `new_callback_secret` and passes it in."""
    tenant = Tenant(tenant_id="t_" + secrets.token_hex(8), name=name, plan=plan, monthly_calls=monthly_calls)
    # The tenant's profile, found by id: what every key and the work without a key (jobs, dropped
    # files) are held to. Written first: a key never exists without its tenant.
    table.put_item(
        Item={
            "key_hash": profile_key(tenant.tenant_id),
            "created_at": int(time.time()),
            **tenant.model_dump(),
            CALLBACK_SECRET_FIELD: callback_secret or new_callback_secret(),
        },
        ConditionExpression="attribute_not_exists(key_hash)",
    )
    return tenant, _put_key(table, tenant)


def _put_key(table: Any, tenant: Tenant) -> str:
    api_key = new_api_key()
    table.put_item(
        Item={
            "key_hash": hash_key(api_key),
            "tenant_id": tenant.tenant_id,
            "key_id": key_id_of(api_key),
            "status": ACTIVE,
            "created_at": int(time.time()),
            # a copy for whoever reads the table by eye; the profile's values are the ones used
            "name": tenant.name,
            "plan": tenant.plan,
            "monthly_calls": tenant.monthly_calls,
        },
        ConditionExpression="attribute_not_exists(key_hash)",
    )
    return api_key


def check_key(table: Any, api_key: str) -> KeyCheck:
    """The key's item and its tenant's profile, read strongly consistent: may this key call, as whom?"""
    if not api_key:
        return KeyCheck(None, refused=UNKNOWN_KEY)
    digest = hash_key(api_key)
    item = table.get_item(Key={"key_hash": digest}, ConsistentRead=True).get("Item")
    if item is None or "tenant_id" not in item:
        return KeyCheck(None, key_hash=digest, refused=UNKNOWN_KEY)
    key_id = str(item.get("key_id", ""))
    tenant_id = str(item["tenant_id"])
    if not _active(item):
        return KeyCheck(None, key_id, digest, refused=KEY_REVOKED, tenant_id=tenant_id)
    tenant = get_tenant(table, tenant_id)
    if tenant is None:
        return KeyCheck(None, key_id, digest, refused=TENANT_DELETED, tenant_id=tenant_id)
    refused = None if tenant.status == ACTIVE else TENANT_DISABLED
    return KeyCheck(tenant, key_id, digest, refused=refused, tenant_id=tenant_id)


def find_tenant(table: Any, api_key: str) -> Tenant | None:
    """The tenant owning this key, or None (unknown or revoked key, disabled or deleted tenant)."""
    check = check_key(table, api_key)
    return check.tenant if check.allowed else None


def get_tenant(table: Any, tenant_id: str) -> Tenant | None:
    """The tenant's profile (strongly consistent), or None when it does not exist."""
    item = table.get_item(Key={"key_hash": profile_key(tenant_id)}, ConsistentRead=True, **_READ).get("Item")
    return None if item is None else _tenant(item)


def _tenant(item: Mapping[str, Any], status: str | None = None) -> Tenant:
    return Tenant(
        tenant_id=str(item["tenant_id"]),
        name=str(item.get("name", "")),
        plan=str(item.get("plan", "standard")),
        monthly_calls=_quota(item.get("monthly_calls")),
        status=status or str(item.get("status") or ACTIVE),
    )


def _active(item: Mapping[str, Any]) -> bool:
    """Active, or written before statuses existed (no status)."""
    return str(item.get("status") or ACTIVE) == ACTIVE


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
    # Only the quota is read (the profile also holds the tenant's callback secret, which only signers read).
    item = table.get_item(Key={"key_hash": profile_key(tenant_id)}, ProjectionExpression="monthly_calls").get("Item")
    return None if item is None else _quota(item.get("monthly_calls"))


# ---------------------------------------------------------------- operators: keys and tenants
def _is_key_item(item: Mapping[str, Any]) -> bool:
    """An API key's item: hashed by sha256 (64 hex digits), with its tenant (not a profile or other item)."""
    digest = str(item.get("key_hash", ""))
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) and "tenant_id" in item


def _key_info(item: Mapping[str, Any]) -> ApiKeyInfo:
    def when(name: str) -> int | None:
        return int(item[name]) if item.get(name) is not None else None

    return ApiKeyInfo(
        tenant_id=str(item["tenant_id"]),
        key_id=str(item.get("key_id", "")),
        status=ACTIVE if _active(item) else REVOKED,
        created_at=when("created_at"),
        revoked_at=when("revoked_at"),
    )


def _items_of(table: Any, tenant_id: str) -> list[dict[str, Any]]:
    """Every item of a tenant (its profile, its keys) through the by_tenant index."""
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {
        "IndexName": TENANT_INDEX,
        "KeyConditionExpression": "tenant_id = :t",
        "ExpressionAttributeValues": {":t": tenant_id},
        **_READ,
    }
    while True:
        page = table.query(**kwargs)
        items.extend(page.get("Items", []))
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _require_tenant(table: Any, tenant_id: str) -> Tenant:
    tenant = get_tenant(table, tenant_id)
    if tenant is None:
        raise TenantError(f"no tenant {tenant_id}")
    return tenant


def list_keys(table: Any, tenant_id: str) -> list[ApiKeyInfo]:
    """A tenant's keys, oldest first: ids and states only."""
    keys = [_key_info(item) for item in _items_of(table, tenant_id) if _is_key_item(item)]
    return sorted(keys, key=lambda k: (k.created_at or 0, k.key_id))


def list_tenants(table: Any) -> list[TenantSummary]:
    """Every tenant with its number of keys (one scan: an operator's command, not a request path).

    Keys whose tenant has no profile any more are listed under a tenant with status `deleted`
    (they are refused; `revoke-key` still works on them)."""
    profiles: dict[str, Tenant] = {}
    orphans: dict[str, Tenant] = {}
    active: dict[str, int] = {}
    total: dict[str, int] = {}
    kwargs: dict[str, Any] = dict(_READ)
    while True:
        page = table.scan(**kwargs)
        for item in page.get("Items", []):
            key = str(item.get("key_hash", ""))
            if key.startswith(profile_key("")) and "tenant_id" in item:
                profiles[str(item["tenant_id"])] = _tenant(item)
            elif _is_key_item(item):
                tenant_id = str(item["tenant_id"])
                total[tenant_id] = total.get(tenant_id, 0) + 1
                active[tenant_id] = active.get(tenant_id, 0) + _active(item)
                orphans.setdefault(tenant_id, _tenant(item, status=DELETED))
        if "LastEvaluatedKey" not in page:
            break
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    tenants = {**{t: o for t, o in orphans.items() if t not in profiles}, **profiles}
    return [
        TenantSummary(tenant=tenant, keys_active=active.get(tenant_id, 0), keys_total=total.get(tenant_id, 0))
        for tenant_id, tenant in sorted(tenants.items(), key=lambda kv: (kv[1].name, kv[0]))
    ]


def _matching_keys(table: Any, tenant_id: str, ref: str) -> list[dict[str, Any]]:
    """The tenant's key items named by `ref`: a key id or its prefix (with or without `sif_`), a
    prefix of the key's sha256, or the whole key."""
    ref = ref.strip()
    if ref.startswith(KEY_PREFIX) and len(ref) > len(KEY_PREFIX) + KEY_ID_CHARS:  # the key itself
        digest = hash_key(ref)
        return [i for i in _items_of(table, tenant_id) if _is_key_item(i) and i["key_hash"] == digest]
    short = ref.removeprefix(KEY_PREFIX)
    if len(short) < 4:
        raise TenantError(f"{ref!r} is too short to name a key: give at least 4 characters of its id or sha256")
    return [
        item
        for item in _items_of(table, tenant_id)
        if _is_key_item(item)
        and ((item.get("key_id") and str(item["key_id"]).startswith(short)) or item["key_hash"].startswith(ref.lower()))
    ]


def revoke_key(table: Any, tenant_id: str, ref: str) -> ApiKeyInfo:
    """Revoke one key of the tenant, named by its id or a prefix of its sha256 (see _matching_keys).

    Exactly one key must match (TenantError otherwise). Revoking a revoked key changes nothing."""
    found = _matching_keys(table, tenant_id, ref)
    if not found:
        raise TenantError(f"tenant {tenant_id} has no key matching {ref!r}")
    if len(found) > 1:
        ids = ", ".join(str(i.get("key_id") or "(no id)") for i in found)
        raise TenantError(f"{ref!r} matches {len(found)} keys of tenant {tenant_id} ({ids}); give more characters")
    return _revoke(table, found[0])


def _revoke(table: Any, item: Mapping[str, Any]) -> ApiKeyInfo:
    now = int(time.time())
    updated = table.update_item(
        Key={"key_hash": item["key_hash"]},
        UpdateExpression="SET #status = :revoked, revoked_at = if_not_exists(revoked_at, :now)",
        ConditionExpression="attribute_exists(key_hash) AND tenant_id = :t",
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues={":revoked": REVOKED, ":now": now, ":t": item["tenant_id"]},
        ReturnValues="ALL_NEW",
    )["Attributes"]
    return _key_info(updated)


def add_key(table: Any, tenant_id: str) -> str:
    """A new, additional API key for an existing tenant; returns it (shown once, stored as its hash)."""
    return _put_key(table, _require_tenant(table, tenant_id))


def rotate_key(table: Any, tenant_id: str, ref: str | None = None) -> tuple[str, list[ApiKeyInfo]]:
    """A new key for the tenant, and the old one revoked: the key named by `ref`, or every active
    key when `ref` is None. Returns the new key and the keys revoked."""
    tenant = _require_tenant(table, tenant_id)
    if ref is not None:
        old = _matching_keys(table, tenant_id, ref)
        if len(old) != 1:
            raise TenantError(f"{ref!r} matches {len(old)} keys of tenant {tenant_id}; name exactly one")
    else:
        old = [item for item in _items_of(table, tenant_id) if _is_key_item(item) and _active(item)]
    api_key = _put_key(table, tenant)
    new_hash = hash_key(api_key)
    return api_key, [_revoke(table, item) for item in old if item["key_hash"] != new_hash]


def set_tenant_status(table: Any, tenant_id: str, status: str) -> Tenant:
    """Disable (no key of it may call, no work of it is accepted or billed) or enable a tenant."""
    if status not in (ACTIVE, DISABLED):
        raise ValueError(f"a tenant is {ACTIVE} or {DISABLED}, not {status!r}")
    try:
        table.update_item(
            Key={"key_hash": profile_key(tenant_id)},
            UpdateExpression="SET #status = :status, status_changed_at = :now",
            ConditionExpression="attribute_exists(key_hash)",
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues={":status": status, ":now": int(time.time())},
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
        raise TenantError(f"no tenant {tenant_id}") from exc
    return _require_tenant(table, tenant_id)


def disable_tenant(table: Any, tenant_id: str) -> Tenant:
    return set_tenant_status(table, tenant_id, DISABLED)


def enable_tenant(table: Any, tenant_id: str) -> Tenant:
    return set_tenant_status(table, tenant_id, ACTIVE)


# ---------------------------------------------------------------- callback signing secrets
def new_callback_secret() -> str:
    return CALLBACK_SECRET_PREFIX + secrets.token_urlsafe(32)


def callback_secret(table: Any, tenant_id: str) -> str | None:
    """The tenant's callback signing secret, or None (no such tenant, or one created before secrets were).

    Strongly consistent, so a rotated secret signs from the next delivery on; only this attribute is
    read (the callback function may read no other)."""
    item = table.get_item(
        Key={"key_hash": profile_key(tenant_id)},
        ProjectionExpression="#s",
        ExpressionAttributeNames={"#s": CALLBACK_SECRET_FIELD},
        ConsistentRead=True,
    ).get("Item")
    value = None if item is None else item.get(CALLBACK_SECRET_FIELD)
    return str(value) if value else None


def rotate_callback_secret(table: Any, tenant_id: str) -> str:
    """Give the tenant a new callback signing secret and return it (shown once); the old one no longer
    verifies anything sent from now on. TenantError when there is no such tenant."""
    secret = new_callback_secret()
    try:
        table.update_item(
            Key={"key_hash": profile_key(tenant_id)},
            UpdateExpression="SET #s = :s, callback_secret_rotated_at = :now",
            ConditionExpression="attribute_exists(key_hash)",
            ExpressionAttributeNames={"#s": CALLBACK_SECRET_FIELD},
            ExpressionAttributeValues={":s": secret, ":now": int(time.time())},
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
        raise TenantError(f"no tenant {tenant_id}") from exc
    return secret
