"""CloudWatch Logs: log groups and their retention."""

from __future__ import annotations

import logging
from typing import Any

from sif_emulator.resources.common import Creation

log = logging.getLogger(__name__)


def create_log_group(c: Creation, lid: str, props: dict[str, Any]) -> None:
    logs = c.client("logs")
    name = c.name(lid)
    logs.create_log_group(logGroupName=name)
    if "RetentionInDays" in props:
        logs.put_retention_policy(logGroupName=name, retentionInDays=int(props["RetentionInDays"]))
    c.template.bind(lid, ref=name)
