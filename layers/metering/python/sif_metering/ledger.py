"""UsageLedger: exactly one usage record per request id, and one monthly quota in units (inputs).

The quota unit is the input: one text, one image, one file row. Every path draws on the same
counter: a synchronous call charges its inputs when it is recorded (`record`); a job or a file
batch reserves its estimate when it is accepted (`reserve`, `extend`) and settles to the exact
count when it ends (`settle`), or gives the reservation back (`release`). Each of these is one
DynamoDB transaction whose month-counter update carries the quota condition, so concurrent
callers can never push the billed units past the limit.

Layout of the usage table (pk, sk):
  event#{request_id}, event                    the idempotency marker (one per metered request)
  tenant#{tenant}, day#{YYYY-MM-DD}#{model}    counters by tenant, model and day
  tenant#{tenant}, month#{YYYY-MM}             `calls` (a plain counter), `units` (what the quota
                                               acts on: units billed + units held by open
                                               reservations) and `reserved` (the latter part)
  reservation#{reservation_id}, reservation   tenant, month, units held, limit, state
                                               (open | settled | released), billed units

Limits (`monthly_limit`): 0 = unlimited; NO_QUOTA (any negative value) = the tenant has no quota
configured, and every check refuses it (fail closed). DynamoDB conditions cannot add, so "n more
units fit" is written `attribute_not_exists(#units) OR #units <= :room` with room = limit - n
computed here; n > limit is refused before anything is written.

Who may be billed (`tenants_table`): with the tenants table's name, the transactions of `record`,
`reserve` and `extend` also carry a ConditionCheck on the tenant's profile item (it exists, and its
status is active or unset) and, when the caller names the API key it came with, on that key's item
(it exists, belongs to the tenant, active or unset). DynamoDB transactions span tables, so a revoked
key, a disabled or a deleted tenant is refused in the very transaction that would bill it
(TenantInactiveError, nothing written), whatever an authorizer's cache still believes. `settle` and
`release` carry no check: they close work accepted while the tenant was active (its rows were
scored). The tenants table's layout is sif_core.tenants' (`key_hash` is its hash key, a profile is
`tenant#{tenant_id}`); this layer does not import the core, so the two names are repeated here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from botocore.exceptions import ClientError

COUNTERS = ("calls", "inputs", "tokens", "pixels", "compute_ms", "gpu_ms")
EVENT_TTL_S = 90 * 24 * 3600
NO_QUOTA = -1  # the limit of a tenant whose record has no quota field (= sif_core.tenants.NO_QUOTA): nothing fits
TRANSACT_ATTEMPTS = 6  # DynamoDB cancels transactions that collide on an item (TransactionConflict)
SETTLE_ATTEMPTS = 5  # re-reads of a reservation that changed (was extended) between read and write

OPEN, SETTLED, RELEASED = "open", "settled", "released"

# The tenants table (sif_core.tenants): its hash key, a tenant's profile item, the active status.
TENANTS_HASH_KEY = "key_hash"
TENANT_PROFILE = "tenant#{}"
ACTIVE = "active"


class QuotaExceededError(Exception):
    """The units asked for do not fit in the tenant's monthly quota (or it has none: limit < 0)."""

    def __init__(self, tenant: str, limit: int, retry_after_s: int) -> None:
        if limit < 0:
            message = f"no quota configured for tenant {tenant}"
        else:
            message = f"tenant {tenant} has not enough of its {limit} monthly units (inputs) left"
        super().__init__(message)
        self.tenant = tenant
        self.limit = limit
        self.retry_after_s = retry_after_s


class TenantInactiveError(QuotaExceededError):
    """The tenant is disabled or deleted, or the API key was revoked: nothing may be billed to it.

    A QuotaExceededError with no quota (limit NO_QUOTA) on purpose: every path that refuses work
    over quota refuses it the same way (a dropped file fails, a running file stops at its next
    extension and bills only what it scored). `key_revoked` says which check failed: the key (it
    was revoked or deleted) or the tenant's profile (disabled or deleted).
    """

    def __init__(self, tenant: str, *, key_revoked: bool) -> None:
        what = "the API key was revoked" if key_revoked else f"tenant {tenant} is disabled or no longer exists"
        Exception.__init__(self, f"{what}: nothing is billed to it")
        self.tenant = tenant
        self.limit = NO_QUOTA
        self.retry_after_s = 0
        self.key_revoked = key_revoked


class ReservationError(Exception):
    """A reservation that is not open (unknown, settled, released) or belongs to another tenant."""


@dataclass(frozen=True)
class Usage:
    tenant: str
    model: str
    request_id: str
    calls: int = 1
    inputs: int = 0
    tokens: int = 0
    pixels: int = 0
    compute_ms: int = 0
    gpu_ms: int = 0
    day: date | None = None


@dataclass(frozen=True)
class UsageRow:
    model: str
    day: str
    calls: int
    inputs: int
    tokens: int
    pixels: int
    compute_ms: int
    gpu_ms: int


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    tenant: str
    month: str  # YYYY-MM: the month whose units counter holds (and is settled against) these units
    units: int  # held now (reserved + extended)
    limit: int  # the monthly limit of the last reserve/extend: the ceiling for an excess at settle
    state: str  # open | settled | released
    billed: int | None = None


def _today() -> date:
    return datetime.now(UTC).date()


def seconds_to_next_month(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    first_next = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return max(1, int((first_next - now).total_seconds()))


def _room(tenant: str, limit: int | None, units: int) -> int | None:
    """The most the units counter may hold before adding `units` (None: no condition).

    Raises QuotaExceededError at once when the tenant has no quota or `units` alone exceed it.
    """
    if limit is None or limit == 0:
        return None
    if limit < 0 or units > limit:
        raise QuotaExceededError(tenant, limit, seconds_to_next_month())
    return limit - units


def _n(value: int) -> dict[str, str]:
    return {"N": str(int(value))}


class UsageLedger:
    def __init__(
        self,
        dynamodb_client: Any,
        table_name: str,
        *,
        today: Callable[[], date] = _today,
        tenants_table: str | None = None,
    ) -> None:
        self.ddb = dynamodb_client
        self.table = table_name
        self.today = today  # the UTC date; tests move it across a month boundary
        self.tenants_table = tenants_table or None  # None: no tenant checks (tests of the counters alone)

    # ------------------------------------------------------------ synchronous calls
    def record(self, usage: Usage, *, monthly_limit: int | None = None, key_hash: str | None = None) -> bool:
        """Meter one request. Returns False (and changes nothing) if this request id was already metered.

        Charges `usage.inputs` units (at least 1) to the month. With `monthly_limit` > 0 the charge
        is conditional in the same transaction: concurrent calls can never push a tenant past its
        quota; a call that would is not metered and raises QuotaExceededError. None or 0: no limit
        (None is for callers outside the quota, e.g. a legacy settle); negative: no quota, refused.
        With a tenants table, a disabled or deleted tenant, or a revoked `key_hash` (the sha256 of
        the key the request came with), is not metered: TenantInactiveError.
        """
        units = max(1, usage.inputs)
        room = _room(usage.tenant, monthly_limit, units)
        day = usage.day or self.today()
        items = [
            self._event_put(usage, day),
            self._day_update(usage, day),
            self._month_update(usage.tenant, _month_of(day), calls=usage.calls, units=units, room=room),
        ]
        checks = self._tenant_checks(usage.tenant, key_hash)
        try:
            self._transact(items + checks)
        except ClientError as exc:
            codes = _cancellation_codes(exc)
            if codes is None:
                raise
            if _failed(codes, 0):
                return False
            self._raise_if_inactive(usage.tenant, codes, len(items), checks, exc)
            if room is not None and _failed(codes, 2):
                raise QuotaExceededError(usage.tenant, int(monthly_limit or 0), seconds_to_next_month()) from exc
            raise
        return True

    # ------------------------------------------------------------ reservations (jobs, file batches)
    def reserve(
        self, tenant: str, reservation_id: str, units: int, monthly_limit: int, *, key_hash: str | None = None
    ) -> bool:
        """Hold `units` of this month's quota for work accepted now; False if this id is already reserved.

        Atomic: the units counter moves only if the units fit (else QuotaExceededError, nothing
        written), together with the reservation item. Reserving an id again changes nothing. With
        `monthly_limit` 0 (unlimited) the reservation is still recorded, without a condition.
        With a tenants table, an inactive tenant or revoked `key_hash` is refused (TenantInactiveError).
        """
        if units < 0:
            raise ValueError(f"cannot reserve {units} units")
        room = _room(tenant, monthly_limit, units)
        month = _month_of(self.today())
        now = int(time.time())
        items = [
            {
                "Put": {
                    "TableName": self.table,
                    "Item": {
                        **_reservation_key(reservation_id),
                        "tenant": {"S": tenant},
                        "month": {"S": month},
                        "units": _n(units),
                        "limit": _n(monthly_limit),
                        "state": {"S": OPEN},
                        "created_at": _n(now),
                    },
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
            self._month_update(tenant, month, units=units, reserved=units, room=room),
        ]
        checks = self._tenant_checks(tenant, key_hash)
        try:
            self._transact(items + checks)
        except ClientError as exc:
            codes = _cancellation_codes(exc)
            if codes is None:
                raise
            if _failed(codes, 0):
                return False
            self._raise_if_inactive(tenant, codes, len(items), checks, exc)
            if room is not None and _failed(codes, 1):
                raise QuotaExceededError(tenant, monthly_limit, seconds_to_next_month()) from exc
            raise
        return True

    def extend(self, tenant: str, reservation_id: str, units: int, monthly_limit: int) -> None:
        """Add `units` to an open reservation if they fit (else QuotaExceededError, nothing changed).

        Not idempotent (an extension has no id of its own): call it once per decision to hold more.
        Raises ReservationError when the reservation is unknown, closed or another tenant's, and
        (with a tenants table) TenantInactiveError once the tenant is disabled or deleted.
        """
        if units < 0:
            raise ValueError(f"cannot extend by {units} units")
        room = _room(tenant, monthly_limit, units)
        held = self._open_reservation(tenant, reservation_id)
        if units == 0:
            return
        items = [
            self._month_update(tenant, held.month, units=units, reserved=units, room=room),
            {
                "Update": {
                    "TableName": self.table,
                    "Key": _reservation_key(reservation_id),
                    "UpdateExpression": "ADD #units :units SET #limit = :limit",
                    "ConditionExpression": "#state = :open",
                    "ExpressionAttributeNames": {"#units": "units", "#limit": "limit", "#state": "state"},
                    "ExpressionAttributeValues": {
                        ":units": _n(units),
                        ":limit": _n(monthly_limit),
                        ":open": {"S": OPEN},
                    },
                }
            },
        ]
        checks = self._tenant_checks(tenant, None)
        try:
            self._transact(items + checks)
        except ClientError as exc:
            codes = _cancellation_codes(exc)
            if codes is None:
                raise
            if _failed(codes, 1):
                raise ReservationError(f"reservation {reservation_id} was closed meanwhile") from exc
            self._raise_if_inactive(tenant, codes, len(items), checks, exc)
            if room is not None and _failed(codes, 0):
                raise QuotaExceededError(tenant, monthly_limit, seconds_to_next_month()) from exc
            raise

    def settle(self, usage: Usage, reservation_id: str) -> bool:
        """Bill the finished work exactly and close its reservation, in one transaction.

        The transaction puts the usage's idempotency marker, adds the day counters, moves the
        reservation month's units counter by (billed inputs - reserved units) and marks the
        reservation settled (it must still be open, and unchanged since it was read). Returns False
        (nothing changed) when it is already settled or released, or the request id was already
        metered. Billing more than was reserved is conditional on the reservation's limit
        (QuotaExceededError): extend first. No such reservation (a legacy caller): record(usage).
        """
        for _ in range(SETTLE_ATTEMPTS):
            held = self.reservation(reservation_id)
            if held is None:
                return self.record(usage)
            if held.tenant != usage.tenant:
                raise ReservationError(f"reservation {reservation_id} is not tenant {usage.tenant}'s")
            if held.state != OPEN:
                return False
            billed = usage.inputs
            excess = billed - held.units
            room = _room(usage.tenant, held.limit, excess) if excess > 0 else None
            day = usage.day or self.today()
            now = int(time.time())
            items = [
                self._event_put(usage, day, reservation_id=reservation_id),
                self._day_update(usage, day),
                self._month_update(
                    usage.tenant, held.month, calls=usage.calls, units=excess, reserved=-held.units, room=room
                ),
                self._close(
                    reservation_id,
                    held.units,
                    SETTLED,
                    now,
                    {"billed": _n(billed), "request_id": {"S": usage.request_id}},
                ),
            ]
            try:
                self._transact(items)
            except ClientError as exc:
                codes = _cancellation_codes(exc)
                if codes is None:
                    raise
                if _failed(codes, 0):
                    return False
                if _failed(codes, 3):
                    continue  # settled, released or extended meanwhile: read it again
                if room is not None and _failed(codes, 2):
                    raise QuotaExceededError(usage.tenant, held.limit, seconds_to_next_month()) from exc
                raise
            return True
        raise ReservationError(f"reservation {reservation_id} kept changing while it was being settled")

    def release(self, tenant: str, reservation_id: str) -> None:
        """Give a reservation's units back and bill nothing (work refused or abandoned). Idempotent:
        an unknown or already closed reservation is left as it is."""
        for _ in range(SETTLE_ATTEMPTS):
            held = self.reservation(reservation_id)
            if held is None or held.state != OPEN:
                return
            if held.tenant != tenant:
                raise ReservationError(f"reservation {reservation_id} is not tenant {tenant}'s")
            items = [
                self._month_update(tenant, held.month, units=-held.units, reserved=-held.units, room=None),
                self._close(reservation_id, held.units, RELEASED, int(time.time()), {}),
            ]
            try:
                self._transact(items)
            except ClientError as exc:
                codes = _cancellation_codes(exc)
                if codes is None or not _failed(codes, 1):
                    raise
                continue  # closed or extended meanwhile: read it again
            return
        raise ReservationError(f"reservation {reservation_id} kept changing while it was being released")

    def reservation(self, reservation_id: str) -> Reservation | None:
        item = self.ddb.get_item(TableName=self.table, Key=_reservation_key(reservation_id), ConsistentRead=True).get(
            "Item"
        )
        if item is None:
            return None
        return Reservation(
            reservation_id=reservation_id,
            tenant=item["tenant"]["S"],
            month=item["month"]["S"],
            units=int(item["units"]["N"]),
            limit=int(item["limit"]["N"]),
            state=item["state"]["S"],
            billed=int(item["billed"]["N"]) if "billed" in item else None,
        )

    # ------------------------------------------------------------ reading
    def month_units(self, tenant: str, month: str | None = None) -> int:
        """Units drawn on this month's quota: billed plus held by open reservations."""
        return self._month_counter(tenant, month, "units")

    def month_calls(self, tenant: str, month: str | None = None) -> int:
        return self._month_counter(tenant, month, "calls")

    def month_reserved(self, tenant: str, month: str | None = None) -> int:
        """Units held by open reservations (part of month_units)."""
        return self._month_counter(tenant, month, "reserved")

    def check_quota(self, tenant: str, monthly_calls: int, units: int = 1) -> None:
        """Raise QuotaExceededError when `units` more do not fit this month (0 = unlimited, < 0 = no quota)."""
        room = _room(tenant, monthly_calls, units)
        if room is not None and self.month_units(tenant) > room:
            raise QuotaExceededError(tenant, monthly_calls, seconds_to_next_month())

    def rows(self, tenant: str, start: date, end: date) -> list[UsageRow]:
        """Counters by model and day for start <= day <= end."""
        rows: list[UsageRow] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk AND sk BETWEEN :lo AND :hi",
            "ExpressionAttributeValues": {
                ":pk": {"S": f"tenant#{tenant}"},
                ":lo": {"S": f"day#{start.isoformat()}"},
                ":hi": {"S": f"day#{end.isoformat()}#\uffff"},
            },
        }
        while True:
            page = self.ddb.query(**kwargs)
            for item in page.get("Items", []):
                rows.append(
                    UsageRow(
                        model=item["model"]["S"],
                        day=item["day"]["S"],
                        **{c: int(item[c]["N"]) if c in item else 0 for c in COUNTERS},
                    )
                )
            if "LastEvaluatedKey" not in page:
                return rows
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # ------------------------------------------------------------ transaction items
    def _month_counter(self, tenant: str, month: str | None, name: str) -> int:
        month = month or _month_of(self.today())
        item = self.ddb.get_item(
            TableName=self.table,
            Key={"pk": {"S": f"tenant#{tenant}"}, "sk": {"S": f"month#{month}"}},
            ConsistentRead=True,
        ).get("Item")
        return int(item[name]["N"]) if item and name in item else 0

    def _open_reservation(self, tenant: str, reservation_id: str) -> Reservation:
        held = self.reservation(reservation_id)
        if held is None or held.tenant != tenant:
            raise ReservationError(f"tenant {tenant} has no reservation {reservation_id}")
        if held.state != OPEN:
            raise ReservationError(f"reservation {reservation_id} is {held.state}")
        return held

    def _event_put(self, usage: Usage, day: date, *, reservation_id: str | None = None) -> dict[str, Any]:
        extra = {"reservation_id": {"S": reservation_id}} if reservation_id else {}
        return {
            "Put": {
                "TableName": self.table,
                "Item": {
                    "pk": {"S": f"event#{usage.request_id}"},
                    "sk": {"S": "event"},
                    "tenant": {"S": usage.tenant},
                    "model": {"S": usage.model},
                    "day": {"S": day.isoformat()},
                    "expires_at": _n(int(time.time()) + EVENT_TTL_S),
                    **{c: _n(getattr(usage, c)) for c in COUNTERS},
                    **extra,
                },
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        }

    def _day_update(self, usage: Usage, day: date) -> dict[str, Any]:
        return {
            "Update": {
                "TableName": self.table,
                "Key": {"pk": {"S": f"tenant#{usage.tenant}"}, "sk": {"S": f"day#{day.isoformat()}#{usage.model}"}},
                "UpdateExpression": "ADD "
                + ", ".join(f"#{c} :{c}" for c in COUNTERS)
                + " SET #model = :model, #day = :day",
                "ExpressionAttributeNames": {**{f"#{c}": c for c in COUNTERS}, "#model": "model", "#day": "day"},
                "ExpressionAttributeValues": {
                    **{f":{c}": _n(getattr(usage, c)) for c in COUNTERS},
                    ":model": {"S": usage.model},
                    ":day": {"S": day.isoformat()},
                },
            }
        }

    def _month_update(
        self, tenant: str, month: str, *, units: int, reserved: int = 0, calls: int = 0, room: int | None
    ) -> dict[str, Any]:
        """ADD to the month's counters; with `room`, only while the units counter is at most room."""
        adds = {"units": units, "reserved": reserved, "calls": calls}
        adds = {name: value for name, value in adds.items() if value or name == "units"}
        update: dict[str, Any] = {
            "TableName": self.table,
            "Key": {"pk": {"S": f"tenant#{tenant}"}, "sk": {"S": f"month#{month}"}},
            "UpdateExpression": "ADD " + ", ".join(f"#{name} :{name}" for name in adds),
            "ExpressionAttributeNames": {f"#{name}": name for name in adds},
            "ExpressionAttributeValues": {f":{name}": _n(value) for name, value in adds.items()},
        }
        if room is not None:
            update["ConditionExpression"] = "attribute_not_exists(#units) OR #units <= :room"
            update["ExpressionAttributeValues"][":room"] = _n(room)
        return {"Update": update}

    def _close(
        self, reservation_id: str, held: int, state: str, now: int, extra: dict[str, dict[str, str]]
    ) -> dict[str, Any]:
        """Mark an open reservation settled/released, provided it still holds `held` units."""
        sets = {"state": {"S": state}, "closed_at": _n(now), "expires_at": _n(now + EVENT_TTL_S), **extra}
        return {
            "Update": {
                "TableName": self.table,
                "Key": _reservation_key(reservation_id),
                "UpdateExpression": "SET " + ", ".join(f"#{name} = :{name}" for name in sets),
                "ConditionExpression": "#state = :open AND #units = :held",
                "ExpressionAttributeNames": {**{f"#{name}": name for name in sets}, "#units": "units"},
                "ExpressionAttributeValues": {
                    **{f":{name}": value for name, value in sets.items()},
                    ":open": {"S": OPEN},
                    ":held": _n(held),
                },
            }
        }

    def _tenant_checks(self, tenant: str, key_hash: str | None) -> list[dict[str, Any]]:
        """ConditionChecks that the tenant (and the key, when named) may be billed; none without a tenants table."""
        if self.tenants_table is None:
            return []
        names = {"#hk": TENANTS_HASH_KEY, "#status": "status"}
        active = "(attribute_not_exists(#status) OR #status = :active)"  # no status: written before statuses existed
        checks: list[dict[str, Any]] = [
            {
                "ConditionCheck": {
                    "TableName": self.tenants_table,
                    "Key": {TENANTS_HASH_KEY: {"S": TENANT_PROFILE.format(tenant)}},
                    "ConditionExpression": f"attribute_exists(#hk) AND {active}",
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": {":active": {"S": ACTIVE}},
                }
            }
        ]
        if key_hash:
            checks.append(
                {
                    "ConditionCheck": {
                        "TableName": self.tenants_table,
                        "Key": {TENANTS_HASH_KEY: {"S": key_hash}},
                        "ConditionExpression": f"attribute_exists(#hk) AND #tenant = :tenant AND {active}",
                        "ExpressionAttributeNames": {**names, "#tenant": "tenant_id"},
                        "ExpressionAttributeValues": {":active": {"S": ACTIVE}, ":tenant": {"S": tenant}},
                    }
                }
            )
        return checks

    @staticmethod
    def _raise_if_inactive(
        tenant: str, codes: list[str | None], first: int, checks: list[dict[str, Any]], exc: ClientError
    ) -> None:
        """TenantInactiveError when one of the tenant checks (items first, first + 1) failed."""
        if checks and _failed(codes, first):
            raise TenantInactiveError(tenant, key_revoked=False) from exc
        if len(checks) > 1 and _failed(codes, first + 1):
            raise TenantInactiveError(tenant, key_revoked=True) from exc

    def _transact(self, items: list[dict[str, Any]]) -> None:
        """One transaction, retried while DynamoDB cancels it only for colliding with another one
        (every item here is conditional or an ADD of a cancelled, never applied, transaction)."""
        for attempt in range(TRANSACT_ATTEMPTS):
            try:
                self.ddb.transact_write_items(TransactItems=items)
                return
            except ClientError as exc:
                codes = _cancellation_codes(exc)
                conflict = (
                    codes is not None and "TransactionConflict" in codes and "ConditionalCheckFailed" not in codes
                )
                if not conflict or attempt == TRANSACT_ATTEMPTS - 1:
                    raise
                time.sleep(0.02 * 2**attempt)


def _month_of(day: date) -> str:
    return day.strftime("%Y-%m")


def _reservation_key(reservation_id: str) -> dict[str, dict[str, str]]:
    return {"pk": {"S": f"reservation#{reservation_id}"}, "sk": {"S": "reservation"}}


def _cancellation_codes(exc: ClientError) -> list[str | None] | None:
    """The per-item codes of a cancelled transaction (None for other errors)."""
    if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
        return None
    reasons = exc.response.get("CancellationReasons") or []
    if reasons:
        return [r.get("Code") if r.get("Code") not in (None, "None") else None for r in reasons]
    # Without structured reasons, the message lists one code per item: "[ConditionalCheckFailed, None, ...]".
    codes = str(exc).rsplit("[", 1)[-1].rstrip("]").split(", ")
    return [c.strip() if c.strip() not in ("", "None") else None for c in codes]


def _failed(codes: list[str | None], index: int) -> bool:
    """Whether the transaction's item `index` failed its condition."""
    return len(codes) > index and codes[index] == "ConditionalCheckFailed"
