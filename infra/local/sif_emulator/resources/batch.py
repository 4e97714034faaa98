"""AWS Batch: compute environments, job queues and job definitions (the local Batch executor runs
the jobs: sif_emulator.batch)."""

from __future__ import annotations

import logging
from typing import Any

from sif_emulator.resources.common import Creation, camel

log = logging.getLogger(__name__)


def batch_service_role(c: Creation) -> str:
    """Batch's service-linked role (the template uses it implicitly; moto wants it to exist)."""
    if "batch_service_role" not in c.cache:
        iam = c.client("iam")
        prefix = "/aws-service-role/batch.amazonaws.com/"
        roles = iam.list_roles(PathPrefix=prefix)["Roles"]
        if roles:
            arn = roles[0]["Arn"]
        else:
            arn = iam.create_service_linked_role(AWSServiceName="batch.amazonaws.com")["Role"]["Arn"]
        c.cache["batch_service_role"] = str(arn)
    return c.cache["batch_service_role"]


def create_compute_environment(c: Creation, lid: str, props: dict[str, Any]) -> None:
    batch = c.client("batch")
    kwargs: dict[str, Any] = {
        "computeEnvironmentName": c.name(lid),
        "type": props["Type"],
        "state": props.get("State", "ENABLED"),
        # The template relies on Batch's service-linked role; moto wants a role to exist.
        "serviceRole": props.get("ServiceRole") or batch_service_role(c),
    }
    if "ComputeResources" in props:
        resources = camel(props["ComputeResources"])
        for key in ("minvCpus", "maxvCpus", "desiredvCpus", "bidPercentage"):
            if key in resources:
                resources[key] = int(resources[key])
        kwargs["computeResources"] = resources
    if "Tags" in props:
        kwargs["tags"] = props["Tags"]
    resp = batch.create_compute_environment(**kwargs)
    c.template.bind(lid, ref=resp["computeEnvironmentArn"], Arn=resp["computeEnvironmentArn"])


def create_job_queue(c: Creation, lid: str, props: dict[str, Any]) -> None:
    batch = c.client("batch")
    order = [
        {"order": int(o["Order"]), "computeEnvironment": o["ComputeEnvironment"]}
        for o in props["ComputeEnvironmentOrder"]
    ]
    kwargs: dict[str, Any] = {
        "jobQueueName": c.name(lid),
        "state": props.get("State", "ENABLED"),
        "priority": int(props["Priority"]),
        "computeEnvironmentOrder": order,
    }
    if "Tags" in props:
        kwargs["tags"] = props["Tags"]
    resp = batch.create_job_queue(**kwargs)
    c.template.bind(lid, ref=resp["jobQueueArn"], Arn=resp["jobQueueArn"])


def create_job_definition(c: Creation, lid: str, props: dict[str, Any]) -> None:
    batch = c.client("batch")
    kwargs: dict[str, Any] = {"jobDefinitionName": c.name(lid), "type": props["Type"]}
    for key in (
        "Parameters",
        "ContainerProperties",
        "RetryStrategy",
        "Timeout",
        "PlatformCapabilities",
        "PropagateTags",
        "Tags",
    ):
        if key in props:
            kwargs[key[:1].lower() + key[1:]] = camel(props[key]) if key not in {"Parameters", "Tags"} else props[key]
    if "retryStrategy" in kwargs:
        kwargs["retryStrategy"]["attempts"] = int(kwargs["retryStrategy"].get("attempts", 1))
    if "timeout" in kwargs:
        kwargs["timeout"] = {k: int(v) for k, v in kwargs["timeout"].items()}
    resp = batch.register_job_definition(**kwargs)
    c.template.bind(lid, ref=resp["jobDefinitionArn"], Arn=resp["jobDefinitionArn"])
