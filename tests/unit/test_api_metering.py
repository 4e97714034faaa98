"""Metering as the API uses it: the quota enforced exactly by the usage transaction, even under
concurrency, and the pre-inference QuotaGate that avoids a DynamoDB read per call."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from sif_local.stack import LocalStack
from sif_metering import QuotaExceededError, QuotaGate, Usage, UsageLedger
from sif_metering.quota import safety_margin

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(local_stack: LocalStack) -> UsageLedger:
    return UsageLedger(local_stack.client("dynamodb"), local_stack.table_name("usage"))


def usage(tenant: str) -> Usage:
    return Usage(tenant=tenant, model="m", request_id=str(uuid.uuid4()), inputs=1, tokens=5)


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
    assert ledger.month_calls(tenant) == 5
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


def test_quota_gate_reads_only_near_the_limit(ledger: UsageLedger) -> None:
    reads: list[str] = []
    original = ledger.month_calls

    def counting_month_calls(tenant: str, month: str | None = None) -> int:
        reads.append(tenant)
        return original(tenant, month)

    ledger.month_calls = counting_month_calls  # type: ignore[method-assign]
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
