"""IAM: roles (inline and managed policies) and instance profiles."""

from __future__ import annotations

import json
import logging
from typing import Any

from botocore.exceptions import ClientError

from sif_emulator.resources.common import Creation

log = logging.getLogger(__name__)


def create_role(c: Creation, lid: str, props: dict[str, Any]) -> None:
    iam = c.client("iam")
    name = c.name(lid)
    kwargs: dict[str, Any] = {
        "RoleName": name,
        "AssumeRolePolicyDocument": json.dumps(props["AssumeRolePolicyDocument"]),
        "Path": props.get("Path", "/"),
    }
    if "Description" in props:
        kwargs["Description"] = props["Description"]
    role = iam.create_role(**kwargs)["Role"]
    for policy in props.get("Policies", []):
        iam.put_role_policy(
            RoleName=name, PolicyName=policy["PolicyName"], PolicyDocument=json.dumps(policy["PolicyDocument"])
        )
    for arn in props.get("ManagedPolicyArns", []):
        try:
            iam.attach_role_policy(RoleName=name, PolicyArn=arn)
        except ClientError as exc:  # moto only knows AWS managed policies when told to load them
            log.debug("%s: managed policy %s not attached locally: %s", lid, arn, exc)
    c.template.bind(lid, ref=name, Arn=role["Arn"], RoleId=role["RoleId"])


def create_instance_profile(c: Creation, lid: str, props: dict[str, Any]) -> None:
    iam = c.client("iam")
    name = c.name(lid)
    profile = iam.create_instance_profile(InstanceProfileName=name, Path=props.get("Path", "/"))
    for role in props.get("Roles", []):
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=role)
    c.template.bind(lid, ref=name, Arn=profile["InstanceProfile"]["Arn"])
