"""Metering as the API uses it: the quota (in units: one per input) enforced exactly by the usage
transaction, even under concurrency; the pre-inference QuotaGate that avoids a DynamoDB read per
call; and a tenant without a quota, which fails closed."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from sif_api.caller import Caller, caller_from_event
from sif_api.service import ApiService
from sif_emulator.stack import LocalStack
from sif_inference import ModelRegistry
from sif_metering import NO_QUOTA, QuotaExceededError, QuotaGate, Usage, UsageLedger
from sif_metering.quota import safety_margin

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(local_stack: LocalStack) -> UsageLedger:
    return UsageLedger(local_stack.client("dynamodb"), local_stack.table_name("usage"))


def usage(tenant: str, inputs: int = 1) -> Usage:
    return Usage(tenant=tenant, model="m", request_id=str(uuid.uuid4()), inputs=inputs, tokens=5)


def test_concurrent_calls_never_overshoot_the_quota(ledger: UsageLedger) -> None:
    tenant = f"t_race_{uuid.uuid4().hex[:6]}"

    def call(_: int) -> bool:
        try:
            return ledger.record(usage(tenant), monthly_limit=5)
        except QuotaExceededError:
            return False

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(12)))
    assert results.count(True) == 5
    assert ledger.month_calls(tenant) == 5 and ledger.month_units(tenant) == 5
    with pytest.raises(QuotaExceededError) as err:
        ledger.record(usage(tenant), monthly_limit=5)
    assert err.value.retry_after_s > 0 and err.value.tenant == tenant


def test_a_refused_call_changes_nothing(ledger: UsageLedger) -> None:
    tenant = f"t_refused_{uuid.uuid4().hex[:6]}"
    ledger.record(usage(tenant), monthly_limit=1)
    with pytest.raises(QuotaExceededError):
        ledger.record(usage(tenant), monthly_limit=1)
    today = datetime.now(UTC).date()
    (row,) = ledger.rows(tenant, today, today)
    assert (row.calls, row.inputs, row.tokens) == (1, 1, 5)
    assert ledger.record(usage(tenant), monthly_limit=0) is True  # 0 = unlimited


def test_a_64_input_call_draws_64_units(ledger: UsageLedger) -> None:
    tenant = f"t_batchcall_{uuid.uuid4().hex[:6]}"
    assert ledger.record(usage(tenant, 64), monthly_limit=100) is True
    assert (ledger.month_calls(tenant), ledger.month_units(tenant)) == (1, 64)
    with pytest.raises(QuotaExceededError):
        ledger.record(usage(tenant, 64), monthly_limit=100)  # one call, but 64 more inputs do not fit
    assert ledger.record(usage(tenant, 36), monthly_limit=100) is True
    assert (ledger.month_calls(tenant), ledger.month_units(tenant)) == (2, 100)


def test_quota_gate_reads_only_near_the_limit(ledger: UsageLedger) -> None:
    reads: list[str] = []
    original = ledger.month_units

    def counting_month_units(tenant: str, month: str | None = None) -> int:
        reads.append(tenant)
        return original(tenant, month)

    ledger.month_units = counting_month_units  # type: ignore[method-assign]
    gate = QuotaGate(ledger, max_age_s=60)
    roomy, tight = f"t_roomy_{uuid.uuid4().hex[:6]}", f"t_tight_{uuid.uuid4().hex[:6]}"
    for _ in range(5):
        gate.check(roomy, 100_000)
        gate.recorded(roomy)
    assert reads.count(roomy) == 1  # far from the limit: one read, then the local estimate

    for _ in range(3):
        gate.check(tight, 3)
        ledger.record(usage(tight), monthly_limit=3)
        gate.recorded(tight)
    assert reads.count(tight) == 3  # within the safety margin: every check reads
    with pytest.raises(QuotaExceededError):
        gate.check(tight, 3)
    gate.check(tight, 0)  # unlimited
    assert safety_margin(3) == 10 and safety_margin(100_000) == 1000


def test_quota_gate_remembers_an_exhausted_tenant(ledger: UsageLedger) -> None:
    gate = QuotaGate(ledger)
    tenant = f"t_done_{uuid.uuid4().hex[:6]}"
    gate.exhausted(tenant, 50)
    with pytest.raises(QuotaExceededError):
        gate.check(tenant, 50)


def test_quota_gate_counts_units(ledger: UsageLedger) -> None:
    reads: list[str] = []
    original = ledger.month_units

    def counting_month_units(tenant: str, month: str | None = None) -> int:
        reads.append(tenant)
        return original(tenant, month)

    ledger.month_units = counting_month_units  # type: ignore[method-assign]
    gate = QuotaGate(ledger, max_age_s=60)
    tenant = f"t_units_{uuid.uuid4().hex[:6]}"
    with pytest.raises(QuotaExceededError):
        gate.check(tenant, 100, units=101)  # can never fit: refused without a read
    assert reads == []
    gate.check(tenant, 100, units=64)
    ledger.record(usage(tenant, 64), monthly_limit=100)
    gate.recorded(tenant, 64)
    with pytest.raises(QuotaExceededError):
        gate.check(tenant, 100, units=37)  # 64 + 37 > 100, known from the estimate: no read
    gate.check(tenant, 100, units=36)  # near the limit: read again before letting it through
    assert reads.count(tenant) == 2

    exhausted = f"t_units_done_{uuid.uuid4().hex[:6]}"
    gate.exhausted(exhausted, 1000, 64)  # 64 did not fit: more than 936 are used
    gate.check(exhausted, 1000, units=1)
    with pytest.raises(QuotaExceededError):
        gate.check(exhausted, 1000, units=64)


def test_a_missing_quota_fails_closed(ledger: UsageLedger, registry: ModelRegistry) -> None:
    tenant = f"t_noquota_{uuid.uuid4().hex[:6]}"
    # the authorizer context without monthly_calls (or with NO_QUOTA) is never "unlimited"
    caller = caller_from_event({"requestContext": {"authorizer": {"tenant_id": tenant}}})
    assert caller.monthly_calls == NO_QUOTA
    assert Caller.model_validate({"tenant_id": tenant, "monthly_calls": str(NO_QUOTA)}).monthly_calls == NO_QUOTA

    gate = QuotaGate(ledger)
    with pytest.raises(QuotaExceededError, match="no quota configured") as err:
        gate.check(tenant, NO_QUOTA)
    assert err.value.limit == NO_QUOTA and err.value.retry_after_s > 0

    service = ApiService(registry, ledger, quota=gate)
    ran: list[bool] = []

    def work() -> Any:
        ran.append(True)
        raise AssertionError("no inference for a tenant without a quota")

    manifest = registry.manifest("all-minilm-l6-v2")
    with pytest.raises(QuotaExceededError, match="no quota configured"):
        service._metered(caller, manifest, str(uuid.uuid4()), work, units=3)
    assert ran == []
    assert ledger.month_units(tenant) == 0 and ledger.month_calls(tenant) == 0


def test_metered_calls_check_their_inputs_before_inference(ledger: UsageLedger, registry: ModelRegistry) -> None:
    tenant = f"t_metered_{uuid.uuid4().hex[:6]}"
    service = ApiService(registry, ledger, quota=QuotaGate(ledger))
    manifest = registry.manifest("all-minilm-l6-v2")
    caller = Caller(tenant_id=tenant, monthly_calls=10)
    ran: list[int] = []

    def work(n: int) -> Any:
        def run() -> Any:  # what _metered reads of an inference outcome
            ran.append(n)
            return SimpleNamespace(predictions=[[0.0]] * n, inputs=n, tokens=n, pixels=0, truncated=[])

        return run

    with pytest.raises(QuotaExceededError):
        service._metered(caller, manifest, str(uuid.uuid4()), work(11), units=11)  # refused early
    _, metered = service._metered(caller, manifest, str(uuid.uuid4()), work(7), units=7)
    assert metered.inputs == 7 and ledger.month_units(tenant) == 7
    with pytest.raises(QuotaExceededError):
        service._metered(caller, manifest, str(uuid.uuid4()), work(4), units=4)  # 7 + 4 > 10
    assert ran == [7]
    service._metered(caller, manifest, str(uuid.uuid4()), work(3))  # units unknown: 1 checked, 3 charged
    assert ledger.month_units(tenant) == 10 and ran == [7, 3]
