"""DynamoDB: tables (keys, indexes, billing, SSE, streams, TTL, point-in-time recovery)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from sif_emulator.resources.common import Creation, tag_list

log = logging.getLogger(__name__)


def create_table(c: Creation, lid: str, props: dict[str, Any]) -> None:
    ddb = c.client("dynamodb")
    name = c.name(lid)
    kwargs: dict[str, Any] = {
        "TableName": name,
        "KeySchema": props["KeySchema"],
        "AttributeDefinitions": props["AttributeDefinitions"],
        "BillingMode": props.get("BillingMode", "PROVISIONED"),
    }
    if "ProvisionedThroughput" in props:
        kwargs["ProvisionedThroughput"] = {k: int(v) for k, v in props["ProvisionedThroughput"].items()}
    for index_kind in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        if index_kind in props:
            keep = {"IndexName", "KeySchema", "Projection", "ProvisionedThroughput"}
            kwargs[index_kind] = [{k: v for k, v in ix.items() if k in keep} for ix in props[index_kind]]
    if "SSESpecification" in props:
        kwargs["SSESpecification"] = {
            "Enabled" if k == "SSEEnabled" else k: v for k, v in props["SSESpecification"].items()
        }
    if "StreamSpecification" in props:
        kwargs["StreamSpecification"] = {"StreamEnabled": True, **props["StreamSpecification"]}
    if "Tags" in props:
        kwargs["Tags"] = tag_list(props["Tags"])
    table = ddb.create_table(**kwargs)["TableDescription"]
    if "TimeToLiveSpecification" in props:
        ttl = props["TimeToLiveSpecification"]
        ddb.update_time_to_live(
            TableName=name,
            TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": bool(ttl["Enabled"])},
        )
    pitr = props.get("PointInTimeRecoverySpecification", {})
    if pitr.get("PointInTimeRecoveryEnabled"):
        with contextlib.suppress(Exception):  # cosmetic locally
            ddb.update_continuous_backups(
                TableName=name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
            )
    c.template.bind(lid, ref=name, Arn=table["TableArn"])
