"""Usage metering: one idempotent usage record per successful call, counters by tenant/model/day,
one monthly quota in units (inputs) that calls draw on directly and jobs/batches reserve and settle,
a quota check before inference, usage metrics (EMF) and cost from the manifests' price tables."""

from sif_metering.ledger import (
    NO_QUOTA,
    QuotaExceededError,
    Reservation,
    ReservationError,
    TenantInactiveError,
    Usage,
    UsageLedger,
    UsageRow,
)
from sif_metering.pricing import cost_usd
from sif_metering.quota import QuotaGate

__all__ = [
    "NO_QUOTA",
    "QuotaExceededError",
    "QuotaGate",
    "Reservation",
    "ReservationError",
    "TenantInactiveError",
    "Usage",
    "UsageLedger",
    "UsageRow",
    "cost_usd",
]
