"""SQS: queues (attributes, redrive policy, tags) and queue policies."""

from __future__ import annotations

import json
import logging
from typing import Any

from sif_emulator.resources.common import Creation, attr_value, tag_list

log = logging.getLogger(__name__)


def create_queue(c: Creation, lid: str, props: dict[str, Any]) -> None:
    sqs = c.client("sqs")
    name = c.name(lid)
    attributes = {k: attr_value(v) for k, v in props.items() if k not in {"QueueName", "Tags"}}
    kwargs: dict[str, Any] = {"QueueName": name, "Attributes": attributes}
    if "Tags" in props:
        kwargs["tags"] = {t["Key"]: t["Value"] for t in tag_list(props["Tags"])}
    url = sqs.create_queue(**kwargs)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    c.template.bind(lid, ref=url, Arn=arn, QueueUrl=url, QueueName=name)


def create_queue_policy(c: Creation, lid: str, props: dict[str, Any]) -> None:
    policy = json.dumps(props["PolicyDocument"])
    for url in props["Queues"]:
        c.client("sqs").set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy})
    c.template.bind(lid, ref=c.name(lid))
