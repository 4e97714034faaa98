"""The quota check before inference, without a DynamoDB read on every call.

The authoritative check is the conditional counter in `UsageLedger.record` (one transaction, so
concurrent calls can never overshoot). This gate only refuses early, so an over-quota tenant costs
no inference: it reads the month's counter, remembers it for a few seconds together with the calls
this process metered since, and reads again whenever that estimate gets near the limit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sif_metering.ledger import QuotaExceededError, UsageLedger, seconds_to_next_month

DEFAULT_MAX_AGE_S = 5.0


@dataclass
class _Reading:
    calls: int
    read_at: float


def _month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def safety_margin(limit: int) -> int:
    """Calls left under which every check reads DynamoDB (1% of the quota, at least 10)."""
    return max(10, limit // 100)


class QuotaGate:
    def __init__(self, ledger: UsageLedger, *, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.ledger = ledger
        self.max_age_s = max_age_s
        self._readings: dict[tuple[str, str], _Reading] = {}
        self._lock = threading.Lock()

    def check(self, tenant: str, monthly_calls: int) -> None:
        """Raise QuotaExceededError when the tenant has no calls left this month (0 = unlimited)."""
        if monthly_calls <= 0:
            return
        key = (tenant, _month())
        now = time.monotonic()
        with self._lock:
            seen = self._readings.get(key)
        if seen is not None and now - seen.read_at < self.max_age_s:
            if seen.calls >= monthly_calls:  # known to be used up a moment ago
                raise QuotaExceededError(tenant, monthly_calls, seconds_to_next_month())
            if seen.calls < monthly_calls - safety_margin(monthly_calls):  # plenty left
                return
        seen = _Reading(self.ledger.month_calls(tenant, key[1]), now)
        with self._lock:
            self._readings[key] = seen
        if seen.calls >= monthly_calls:
            raise QuotaExceededError(tenant, monthly_calls, seconds_to_next_month())

    def recorded(self, tenant: str, calls: int = 1) -> None:
        """Count a call this process metered, so the estimate stays current between reads."""
        with self._lock:
            seen = self._readings.get((tenant, _month()))
            if seen is not None:
                seen.calls += calls

    def exhausted(self, tenant: str, monthly_calls: int) -> None:
        """The ledger refused a call for the quota: remember the tenant as out of calls."""
        with self._lock:
            self._readings[(tenant, _month())] = _Reading(monthly_calls, time.monotonic())
