"""The application core's services, built once per process (a handler's cold start, the GPU worker's start).

Every client comes from `sif_core.aws` (built once, reused while warm); every value from the one
`Settings`. Tests build `CoreServices` themselves with what they need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sif_core import tenants
from sif_core.announce import Announcer
from sif_core.lifecycle import CoreServices, Lifecycle
from sif_core.settings import Settings
from sif_core.work import WorkStore


def core_services(settings: Settings, **overrides: Any) -> CoreServices:
    from sif_core.aws import client, table
    from sif_metering.ledger import UsageLedger

    s3 = overrides.get("s3") or client("s3")
    # With the tenants table, a reservation refuses a disabled or deleted tenant (a ConditionCheck).
    tenants_table = settings.tenants_table or None
    values: dict[str, Any] = {
        "settings": settings,
        "s3": s3,
        "store": WorkStore(table(settings.work_table)),
        "ledger": UsageLedger(client("dynamodb"), settings.usage_table, tenants_table=tenants_table)
        if settings.usage_table
        else None,
        "batch": client("batch"),
        "announcer": Announcer(
            sns=client("sns") if settings.job_topic_arn else None,
            topic_arn=settings.job_topic_arn,
            # callbacks are only queued here; the callback function signs and delivers them
            sqs=client("sqs") if settings.callbacks_queue_url else None,
            callbacks_queue_url=settings.callbacks_queue_url,
        ),
    }
    if settings.tenants_table:
        values["quota_of"] = quota_lookup(table(settings.tenants_table))
    values.update(overrides)
    if "registry" not in values:  # the Batch-events function passes None: it runs no model (and has no numpy)
        from sif_core.model_store import registry_from_settings

        values["registry"] = registry_from_settings(settings)
    return CoreServices(**values)


def quota_lookup(tenants_table: Any) -> Callable[[str], int | None]:
    """The tenant's monthly quota by tenant id (None: no quota on record, which every reservation refuses)."""

    def quota_of(tenant_id: str) -> int | None:
        return tenants.tenant_quota(tenants_table, tenant_id)

    return quota_of


def lifecycle(settings: Settings, **overrides: Any) -> Lifecycle:
    return Lifecycle(core_services(settings, **overrides))
