"""Usage metering: one idempotent usage record per successful call, counters by tenant/model/day,
a quota check before inference, usage metrics (EMF) and cost from the manifests' price tables."""

from sif_metering.ledger import QuotaExceededError, Usage, UsageLedger, UsageRow
from sif_metering.pricing import cost_usd
from sif_metering.quota import QuotaGate

__all__ = ["QuotaExceededError", "QuotaGate", "Usage", "UsageLedger", "UsageRow", "cost_usd"]
