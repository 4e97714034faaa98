"""Usage metering: one idempotent usage record per successful call, counters by tenant/model/day."""

from sif_metering.ledger import QuotaExceededError, Usage, UsageLedger, UsageRow
from sif_metering.pricing import cost_usd

__all__ = ["QuotaExceededError", "Usage", "UsageLedger", "UsageRow", "cost_usd"]
