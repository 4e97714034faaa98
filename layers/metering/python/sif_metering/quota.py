"""The quota check before inference, without a DynamoDB read on every call.

The authoritative check is the conditional units counter in `UsageLedger` (one transaction, so
concurrent calls can never overshoot). This gate only refuses early, so an over-quota tenant costs
no inference: it reads the month's units counter, remembers it for a few seconds together with the
units this process metered since, and reads again whenever that estimate gets near the limit.

Limits as everywhere in metering: 0 = unlimited, negative (NO_QUOTA) = the tenant has no quota
configured and is always refused (fail closed).
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
    units: int
    read_at: float


def _month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def safety_margin(limit: int) -> int:
    """Units left under which every check reads DynamoDB (1% of the quota, at least 10)."""
    return max(10, limit // 100)


class QuotaGate:
    def __init__(self, ledger: UsageLedger, *, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.ledger = ledger
        self.max_age_s = max_age_s
        self._readings: dict[tuple[str, str], _Reading] = {}
        self._lock = threading.Lock()

    def check(self, tenant: str, monthly_calls: int, units: int = 1) -> None:
        """Raise QuotaExceededError when `units` more inputs do not fit in this month's quota.

        `monthly_calls` is the tenant's quota in units (inputs) per month: 0 = unlimited,
        negative = no quota configured (always refused).
        """
        if monthly_calls == 0:
            return
        if monthly_calls < 0 or units > monthly_calls:
            raise QuotaExceededError(tenant, monthly_calls, seconds_to_next_month())
        key = (tenant, _month())
        now = time.monotonic()
        with self._lock:
            seen = self._readings.get(key)
        if seen is not None and now - seen.read_at < self.max_age_s:
            if seen.units + units > monthly_calls:  # known not to fit a moment ago
                raise QuotaExceededError(tenant, monthly_calls, seconds_to_next_month())
            if seen.units + units <= monthly_calls - safety_margin(monthly_calls):  # plenty left
                return
        seen = _Reading(self.ledger.month_units(tenant, key[1]), now)
        with self._lock:
            self._readings[key] = seen
        if seen.units + units > monthly_calls:
            raise QuotaExceededError(tenant, monthly_calls, seconds_to_next_month())

    def recorded(self, tenant: str, units: int = 1) -> None:
        """Count units this process metered, so the estimate stays current between reads."""
        with self._lock:
            seen = self._readings.get((tenant, _month()))
            if seen is not None:
                seen.units += units

    def exhausted(self, tenant: str, monthly_calls: int, units: int = 1) -> None:
        """The ledger refused `units` for the quota: remember that more than limit - units are used."""
        floor = max(0, monthly_calls - units + 1)
        now = time.monotonic()
        with self._lock:
            key = (tenant, _month())
            seen = self._readings.get(key)
            fresh = seen.units if seen is not None and now - seen.read_at < self.max_age_s else 0
            self._readings[key] = _Reading(max(floor, fresh), now)
