"""SNS: topics and their subscriptions."""

from __future__ import annotations

import logging
from typing import Any

from sif_emulator.resources.common import Creation, attr_value, tag_list

log = logging.getLogger(__name__)


def create_topic(c: Creation, lid: str, props: dict[str, Any]) -> None:
    sns = c.client("sns")
    attrs = {
        k: attr_value(v)
        for k, v in props.items()
        if k in {"KmsMasterKeyId", "DisplayName", "FifoTopic", "ContentBasedDeduplication", "SignatureVersion"}
    }
    kwargs: dict[str, Any] = {"Name": c.name(lid), "Attributes": attrs}
    if "Tags" in props:
        kwargs["Tags"] = tag_list(props["Tags"])
    arn = sns.create_topic(**kwargs)["TopicArn"]
    for sub in props.get("Subscription", []):
        sns.subscribe(TopicArn=arn, Protocol=sub["Protocol"], Endpoint=sub["Endpoint"])
    c.template.bind(lid, ref=arn, TopicArn=arn, TopicName=c.name(lid))
