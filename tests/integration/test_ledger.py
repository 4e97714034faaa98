"""UsageLedger against the usage table that the local stack creates from template.yaml: usage
records, the monthly quota in units (inputs), and reservations reserved, extended, settled and
released with exact counters, idempotently and under concurrency."""

import contextlib
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime

import pytest

from sif_core.aws import client
from sif_metering import (
    NO_QUOTA,
    QuotaExceededError,
    ReservationError,
    TenantInactiveError,
    Usage,
    UsageLedger,
    cost_usd,
)
from sif_metering.ledger import seconds_to_next_month


@pytest.fixture
def ledger(local_stack):
    return UsageLedger(client("dynamodb"), local_stack.table_name("usage"))


def on_day(local_stack, day: date) -> UsageLedger:
    """A ledger whose clock says `day` (reservations take their month from it)."""
    return UsageLedger(client("dynamodb"), local_stack.table_name("usage"), today=lambda: day)


def new_tenant(prefix: str) -> str:
    return f"t_{prefix}_{uuid.uuid4().hex[:8]}"


def job_usage(tenant: str, inputs: int, *, day: date | None = None, request_id: str | None = None) -> Usage:
    return Usage(
        tenant=tenant,
        model="m",
        request_id=request_id or f"job-{uuid.uuid4().hex}",
        inputs=inputs,
        tokens=inputs * 7,
        compute_ms=inputs * 3,
        day=day,
    )


def counters(ledger: UsageLedger, tenant: str, month: str | None = None) -> tuple[int, int, int]:
    """(units, reserved, calls) of the tenant's month item."""
    return (
        ledger.month_units(tenant, month),
        ledger.month_reserved(tenant, month),
        ledger.month_calls(tenant, month),
    )


def test_one_record_per_request_id(ledger):
    day = date(2026, 3, 4)
    usage = Usage(tenant="t_ledger", model="m", request_id="req-1", inputs=3, tokens=40, compute_ms=12, day=day)
    assert ledger.record(usage) is True
    assert ledger.record(usage) is False  # a retry of the same request changes nothing
    ledger.record(Usage(tenant="t_ledger", model="m", request_id="req-2", inputs=2, tokens=10, day=day))
    ledger.record(Usage(tenant="t_ledger", model="other", request_id="req-3", inputs=1, day=day))
    rows = {r.model: r for r in ledger.rows("t_ledger", day, day)}
    assert (rows["m"].calls, rows["m"].inputs, rows["m"].tokens, rows["m"].compute_ms) == (2, 5, 50, 12)
    assert rows["other"].calls == 1
    assert ledger.month_calls("t_ledger", "2026-03") == 3
    assert ledger.month_units("t_ledger", "2026-03") == 6  # one unit per input


def test_rows_are_per_tenant_and_within_the_period(ledger):
    ledger.record(Usage(tenant="t_a", model="m", request_id="a-1", day=date(2026, 1, 31)))
    ledger.record(Usage(tenant="t_a", model="m", request_id="a-2", day=date(2026, 2, 1)))
    ledger.record(Usage(tenant="t_b", model="m", request_id="b-1", day=date(2026, 2, 1)))
    assert [r.day for r in ledger.rows("t_a", date(2026, 2, 1), date(2026, 2, 28))] == ["2026-02-01"]
    assert len(ledger.rows("t_a", date(2026, 1, 1), date(2026, 12, 31))) == 2
    assert len(ledger.rows("t_b", date(2026, 1, 1), date(2026, 12, 31))) == 1


def test_quota(ledger):
    tenant = new_tenant("quota")
    for i in range(3):
        ledger.record(Usage(tenant=tenant, model="m", request_id=f"{tenant}-{i}"))  # 0 inputs: still 1 unit
    ledger.check_quota(tenant, 4)
    with pytest.raises(QuotaExceededError):
        ledger.check_quota(tenant, 4, units=2)
    with pytest.raises(QuotaExceededError) as err:
        ledger.check_quota(tenant, 3)
    assert 0 < err.value.retry_after_s <= 31 * 24 * 3600
    ledger.check_quota(tenant, 0, units=10**9)  # 0 = unlimited
    with pytest.raises(QuotaExceededError, match="no quota configured"):
        ledger.check_quota(tenant, NO_QUOTA)


def test_a_call_draws_one_unit_per_input_and_a_big_one_cannot_pass(ledger):
    tenant = new_tenant("units")
    assert ledger.record(job_usage(tenant, 64), monthly_limit=100) is True
    assert counters(ledger, tenant) == (64, 0, 1)
    with pytest.raises(QuotaExceededError):
        ledger.record(job_usage(tenant, 37), monthly_limit=100)  # 64 + 37 > 100
    assert ledger.record(job_usage(tenant, 36), monthly_limit=100) is True  # exactly to the limit
    with pytest.raises(QuotaExceededError):
        ledger.record(job_usage(tenant, 1), monthly_limit=100)
    assert counters(ledger, tenant) == (100, 0, 2)

    fresh = new_tenant("units_fresh")  # no month item yet: the size alone is checked before writing
    with pytest.raises(QuotaExceededError):
        ledger.record(job_usage(fresh, 11), monthly_limit=10)
    assert counters(ledger, fresh) == (0, 0, 0)
    assert ledger.rows(fresh, date(2000, 1, 1), date(2100, 1, 1)) == []


def test_a_tenant_without_quota_is_refused_everywhere(ledger):
    tenant = new_tenant("noquota")
    with pytest.raises(QuotaExceededError, match="no quota configured"):
        ledger.record(job_usage(tenant, 1), monthly_limit=NO_QUOTA)
    with pytest.raises(QuotaExceededError, match="no quota configured"):
        ledger.reserve(tenant, f"r-{tenant}", 1, NO_QUOTA)
    assert ledger.reservation(f"r-{tenant}") is None
    assert counters(ledger, tenant) == (0, 0, 0)
    assert ledger.rows(tenant, date(2000, 1, 1), date(2100, 1, 1)) == []


def test_reserve_extend_settle_exact_counters(ledger):
    tenant, rid = new_tenant("settle"), f"r-{uuid.uuid4().hex}"
    ledger.record(job_usage(tenant, 5), monthly_limit=100)
    assert ledger.reserve(tenant, rid, 30, 100) is True
    assert counters(ledger, tenant) == (35, 30, 1)
    ledger.extend(tenant, rid, 10, 100)
    assert counters(ledger, tenant) == (45, 40, 1)
    held = ledger.reservation(rid)
    assert held is not None and (held.tenant, held.units, held.limit, held.state) == (tenant, 40, 100, "open")

    usage = job_usage(tenant, 33)
    assert ledger.settle(usage, rid) is True
    assert counters(ledger, tenant) == (5 + 33, 0, 2)  # the unused 7 went back
    settled = ledger.reservation(rid)
    assert settled is not None and (settled.state, settled.billed, settled.units) == ("settled", 33, 40)
    today = datetime.now(UTC).date()
    (row,) = ledger.rows(tenant, today, today)
    assert (row.calls, row.inputs, row.tokens, row.compute_ms) == (2, 38, 38 * 7, 38 * 3)


def test_each_operation_is_idempotent(ledger):
    tenant, rid = new_tenant("idem"), f"r-{uuid.uuid4().hex}"
    assert ledger.reserve(tenant, rid, 20, 100) is True
    assert ledger.reserve(tenant, rid, 20, 100) is False  # a redelivered "accept" changes nothing
    assert ledger.reserve(tenant, rid, 50, 100) is False
    assert counters(ledger, tenant) == (20, 20, 0)

    usage = job_usage(tenant, 12)
    assert ledger.settle(usage, rid) is True
    before = (counters(ledger, tenant), ledger.rows(tenant, date(2000, 1, 1), date(2100, 1, 1)))
    assert ledger.settle(usage, rid) is False  # a retried settle
    assert ledger.settle(job_usage(tenant, 12), rid) is False  # another request id, same reservation
    ledger.release(tenant, rid)  # a settled reservation is not given back
    with pytest.raises(ReservationError):
        ledger.extend(tenant, rid, 5, 100)
    assert (counters(ledger, tenant), ledger.rows(tenant, date(2000, 1, 1), date(2100, 1, 1))) == before
    assert before[0] == (12, 0, 1)

    # a usage that was already metered (its request id) settles nothing and keeps the reservation open
    other = f"r-{uuid.uuid4().hex}"
    ledger.reserve(tenant, other, 4, 100)
    assert ledger.settle(usage, other) is False
    assert ledger.reservation(other).state == "open"  # type: ignore[union-attr]
    assert counters(ledger, tenant) == (16, 4, 1)


def test_release_gives_everything_back_once(ledger):
    tenant, rid = new_tenant("release"), f"r-{uuid.uuid4().hex}"
    ledger.reserve(tenant, rid, 25, 30)
    with pytest.raises(QuotaExceededError):
        ledger.reserve(tenant, f"r-{uuid.uuid4().hex}", 6, 30)  # 25 held + 6 > 30
    ledger.release(tenant, rid)
    assert counters(ledger, tenant) == (0, 0, 0)
    assert ledger.reservation(rid).state == "released"  # type: ignore[union-attr]
    ledger.release(tenant, rid)  # again: nothing
    ledger.release(tenant, "r-never-reserved")  # unknown: nothing
    assert counters(ledger, tenant) == (0, 0, 0)
    assert ledger.settle(job_usage(tenant, 3), rid) is False  # a released reservation bills nothing
    assert counters(ledger, tenant) == (0, 0, 0)
    assert ledger.reserve(tenant, f"r-{uuid.uuid4().hex}", 30, 30) is True  # the room is back


def test_a_reservation_that_does_not_fit_changes_nothing(ledger):
    tenant = new_tenant("nofit")
    ledger.record(job_usage(tenant, 8), monthly_limit=10)
    rid = f"r-{uuid.uuid4().hex}"
    with pytest.raises(QuotaExceededError) as err:
        ledger.reserve(tenant, rid, 3, 10)
    assert err.value.limit == 10 and err.value.retry_after_s > 0
    with pytest.raises(QuotaExceededError):
        ledger.reserve(tenant, rid, 11, 10)  # larger than the quota itself
    assert ledger.reservation(rid) is None
    assert counters(ledger, tenant) == (8, 0, 1)
    assert ledger.reserve(tenant, rid, 2, 10) is True
    with pytest.raises(QuotaExceededError):
        ledger.extend(tenant, rid, 1, 10)
    assert ledger.reservation(rid).units == 2  # type: ignore[union-attr]
    assert counters(ledger, tenant) == (10, 2, 1)
    with pytest.raises(ReservationError):
        ledger.extend(new_tenant("stranger"), rid, 1, 10)  # another tenant's reservation


def test_unlimited_reservations_are_still_recorded(ledger):
    tenant, rid = new_tenant("unlimited"), f"r-{uuid.uuid4().hex}"
    assert ledger.reserve(tenant, rid, 10**6, 0) is True
    ledger.extend(tenant, rid, 10**6, 0)
    assert counters(ledger, tenant) == (2 * 10**6, 2 * 10**6, 0)
    assert ledger.settle(job_usage(tenant, 3 * 10**6), rid) is True  # over the reservation, no limit
    assert counters(ledger, tenant) == (3 * 10**6, 0, 1)


def test_billing_past_the_reservation_is_conditional_on_the_limit(ledger):
    tenant, rid = new_tenant("excess"), f"r-{uuid.uuid4().hex}"
    ledger.reserve(tenant, rid, 5, 10)
    ledger.record(job_usage(tenant, 4), monthly_limit=10)  # 9 of 10 drawn
    with pytest.raises(QuotaExceededError):
        ledger.settle(job_usage(tenant, 7), rid)  # 2 more than reserved, 1 left
    assert counters(ledger, tenant) == (9, 5, 1)
    assert ledger.reservation(rid).state == "open"  # type: ignore[union-attr]
    assert ledger.settle(job_usage(tenant, 6), rid) is True  # 1 more than reserved: fits exactly
    assert counters(ledger, tenant) == (10, 0, 2)


def test_settle_after_a_month_boundary_adjusts_the_reservations_month(local_stack):
    tenant, rid = new_tenant("boundary"), f"r-{uuid.uuid4().hex}"
    january, february = on_day(local_stack, date(2026, 1, 31)), on_day(local_stack, date(2026, 2, 1))
    assert january.reserve(tenant, rid, 50, 100) is True
    assert counters(january, tenant, "2026-01") == (50, 50, 0)
    february.record(job_usage(tenant, 2), monthly_limit=100)  # February's own quota
    assert february.settle(job_usage(tenant, 40), rid) is True  # the job ends on February 1st
    assert counters(february, tenant, "2026-01") == (40, 0, 1)  # the reserved month is settled
    assert counters(february, tenant, "2026-02") == (2, 0, 1)  # February only has its own call
    (row,) = february.rows(tenant, date(2026, 2, 1), date(2026, 2, 1))
    assert (row.calls, row.inputs) == (2, 42)  # the day counters are the day the work ended


def test_settle_without_a_reservation_records_the_usage(ledger):
    tenant = new_tenant("legacy")
    usage = job_usage(tenant, 9)
    assert ledger.settle(usage, "r-unknown-" + tenant) is True
    assert ledger.settle(usage, "r-unknown-" + tenant) is False
    assert counters(ledger, tenant) == (9, 0, 1)


def test_concurrent_reservations_never_bill_past_the_quota(ledger):
    tenant, limit = new_tenant("race"), 300
    billed: list[int] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            rid = f"r-{uuid.uuid4().hex}"
            try:
                ledger.reserve(tenant, rid, rng.randint(1, 60), limit)
            except QuotaExceededError:
                continue
            if rng.random() < 0.3:
                with contextlib.suppress(QuotaExceededError):  # an extension may not fit
                    ledger.extend(tenant, rid, rng.randint(1, 20), limit)
            held = ledger.reservation(rid)
            assert held is not None
            action = rng.random()
            if action < 0.15:
                ledger.release(tenant, rid)
                continue
            inputs = rng.randint(0, held.units + (10 if action > 0.8 else 0))  # sometimes past the reservation
            try:
                ledger.settle(job_usage(tenant, inputs), rid)
            except QuotaExceededError:
                inputs = held.units  # keep billed <= reserved, as callers do
                assert ledger.settle(job_usage(tenant, inputs), rid) is True
            with lock:
                billed.append(inputs)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(worker, range(8)))
    assert 0 < sum(billed) <= limit
    assert ledger.month_units(tenant) == sum(billed)
    assert ledger.month_reserved(tenant) == 0
    assert ledger.month_calls(tenant) == len(billed)


def test_cost_and_month_boundary():
    from sif_inference.manifest import Price

    price = Price(usd_per_call=0.001, usd_per_1k_inputs=0.01, usd_per_1m_tokens=1.0, usd_per_gpu_second=0.5)
    assert cost_usd(price, calls=10, inputs=2000, tokens=500_000, gpu_ms=2000) == pytest.approx(0.01 + 0.02 + 0.5 + 1.0)

    assert seconds_to_next_month(datetime(2026, 12, 31, 23, 59, 0, tzinfo=UTC)) == 60


# ---------------------------------------------------------------------- revoked keys, inactive tenants
def guarded(local_stack) -> UsageLedger:
    """A ledger whose transactions check the tenant's profile (and the key, when named) in the tenants table."""
    return UsageLedger(
        client("dynamodb"), local_stack.table_name("usage"), tenants_table=local_stack.table_name("tenants")
    )


def test_a_revoked_key_or_an_inactive_tenant_is_refused_and_billed_nothing(local_stack):
    from sif_core import tenants

    table = local_stack.table("TenantsTable")
    ledger = guarded(local_stack)
    for attack in ("revoke key", "delete key", "disable tenant", "delete profile"):
        info, key = local_stack.create_tenant(f"ledger-{attack.replace(' ', '-')}", monthly_calls=1000)
        tenant, digest = info["tenant_id"], tenants.hash_key(key)
        assert ledger.record(
            Usage(tenant=tenant, model="m", request_id=f"ok-{uuid.uuid4().hex}", inputs=2), key_hash=digest
        )
        assert ledger.reserve(tenant, f"r-ok-{uuid.uuid4().hex}", 3, 1000, key_hash=digest)
        before = counters(ledger, tenant)
        assert before == (5, 3, 1)
        if attack == "revoke key":
            tenants.revoke_key(table, tenant, tenants.key_id_of(key))
        elif attack == "delete key":
            table.delete_item(Key={"key_hash": digest})
        elif attack == "disable tenant":
            tenants.disable_tenant(table, tenant)
        else:
            table.delete_item(Key={"key_hash": tenants.profile_key(tenant)})
        key_refused = attack in ("revoke key", "delete key")
        for _ in range(3):  # keep calling with the old key: refused every time, nothing written
            request_id = f"refused-{uuid.uuid4().hex}"
            with pytest.raises(TenantInactiveError) as refused:
                ledger.record(Usage(tenant=tenant, model="m", request_id=request_id, inputs=2), key_hash=digest)
            assert refused.value.key_revoked is key_refused, attack
            assert isinstance(refused.value, QuotaExceededError) and refused.value.limit == NO_QUOTA
            rid = f"r-refused-{uuid.uuid4().hex}"
            with pytest.raises(TenantInactiveError):
                ledger.reserve(tenant, rid, 3, 1000, key_hash=digest)
            assert ledger.reservation(rid) is None
            assert (
                client("dynamodb")
                .get_item(
                    TableName=local_stack.table_name("usage"),
                    Key={"pk": {"S": f"event#{request_id}"}, "sk": {"S": "event"}},
                )
                .get("Item")
                is None
            )
        assert counters(ledger, tenant) == before, attack


def test_work_without_a_key_is_held_to_the_tenant_profile(local_stack):
    """Jobs and dropped files carry no key: their reservations and extensions check the profile only."""
    from sif_core import tenants

    table = local_stack.table("TenantsTable")
    ledger = guarded(local_stack)
    info, key = local_stack.create_tenant("ledger-work", monthly_calls=0)
    tenant = info["tenant_id"]
    rid = f"r-{uuid.uuid4().hex}"
    assert ledger.reserve(tenant, rid, 10, 0)
    tenants.revoke_key(table, tenant, tenants.key_id_of(key))  # a revoked key does not stop the tenant's work
    ledger.extend(tenant, rid, 5, 0)
    tenants.disable_tenant(table, tenant)
    with pytest.raises(TenantInactiveError):
        ledger.extend(tenant, rid, 5, 0)  # a running file stops at its next extension
    with pytest.raises(TenantInactiveError):
        ledger.reserve(tenant, f"r-{uuid.uuid4().hex}", 1, 0)
    assert counters(ledger, tenant) == (15, 15, 0)
    # work accepted while active is still settled for what it scored (and released otherwise)
    assert ledger.settle(job_usage(tenant, 12, request_id=rid), rid) is True
    assert counters(ledger, tenant) == (12, 0, 1)
    tenants.enable_tenant(table, tenant)
    assert ledger.reserve(tenant, f"r-{uuid.uuid4().hex}", 1, 0)


def test_records_from_before_statuses_still_bill(local_stack):
    """A key item and a profile without status (written before statuses existed) are active."""
    from sif_core.tenants import hash_key, profile_key

    tenant, key = new_tenant("legacy-status"), f"sif_legacy_{uuid.uuid4().hex}"
    table = local_stack.table("TenantsTable")
    table.put_item(Item={"key_hash": hash_key(key), "tenant_id": tenant, "name": "legacy", "monthly_calls": 10})
    table.put_item(Item={"key_hash": profile_key(tenant), "tenant_id": tenant, "name": "legacy", "monthly_calls": 10})
    ledger = guarded(local_stack)
    usage = Usage(tenant=tenant, model="m", request_id=f"req-{uuid.uuid4().hex}", inputs=4)
    assert ledger.record(usage, monthly_limit=10, key_hash=hash_key(key)) is True
    assert ledger.record(usage, monthly_limit=10, key_hash=hash_key(key)) is False  # still idempotent
    with pytest.raises(QuotaExceededError) as over:  # the quota still applies, and is not mistaken for a refusal
        ledger.record(Usage(tenant=tenant, model="m", request_id="x-" + tenant, inputs=7), monthly_limit=10)
    assert not isinstance(over.value, TenantInactiveError)
    # a key of one tenant does not let another tenant be billed
    other = local_stack.create_tenant("ledger-other")[0]["tenant_id"]
    with pytest.raises(TenantInactiveError) as refused:
        ledger.record(Usage(tenant=other, model="m", request_id="y-" + tenant), key_hash=hash_key(key))
    assert refused.value.key_revoked
    assert counters(ledger, tenant) == (4, 0, 1)
