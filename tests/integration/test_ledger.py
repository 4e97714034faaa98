"""UsageLedger against the usage table that the local stack creates from template.yaml."""

from datetime import date

import pytest

from sif_core.aws import client
from sif_metering import QuotaExceededError, Usage, UsageLedger, cost_usd
from sif_metering.ledger import seconds_to_next_month


@pytest.fixture
def ledger(local_stack):
    return UsageLedger(client("dynamodb"), local_stack.table_name("usage"))


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


def test_rows_are_per_tenant_and_within_the_period(ledger):
    ledger.record(Usage(tenant="t_a", model="m", request_id="a-1", day=date(2026, 1, 31)))
    ledger.record(Usage(tenant="t_a", model="m", request_id="a-2", day=date(2026, 2, 1)))
    ledger.record(Usage(tenant="t_b", model="m", request_id="b-1", day=date(2026, 2, 1)))
    assert [r.day for r in ledger.rows("t_a", date(2026, 2, 1), date(2026, 2, 28))] == ["2026-02-01"]
    assert len(ledger.rows("t_a", date(2026, 1, 1), date(2026, 12, 31))) == 2
    assert len(ledger.rows("t_b", date(2026, 1, 1), date(2026, 12, 31))) == 1


def test_quota(ledger):
    for i in range(3):
        ledger.record(Usage(tenant="t_quota", model="m", request_id=f"q-{i}"))
    ledger.check_quota("t_quota", 4)
    with pytest.raises(QuotaExceededError) as err:
        ledger.check_quota("t_quota", 3)
    assert 0 < err.value.retry_after_s <= 31 * 24 * 3600
    ledger.check_quota("t_quota", 0)  # 0 = unlimited


def test_cost_and_month_boundary():
    from sif_inference.manifest import Price

    price = Price(usd_per_call=0.001, usd_per_1k_inputs=0.01, usd_per_1m_tokens=1.0, usd_per_gpu_second=0.5)
    assert cost_usd(price, calls=10, inputs=2000, tokens=500_000, gpu_ms=2000) == pytest.approx(0.01 + 0.02 + 0.5 + 1.0)
    from datetime import UTC, datetime

    assert seconds_to_next_month(datetime(2026, 12, 31, 23, 59, 0, tzinfo=UTC)) == 60
