"""EC2: the VPC, subnet and security group that parameters of VPC types get locally."""

from __future__ import annotations

import logging

from sif_emulator.resources.common import Creation

log = logging.getLogger(__name__)


def local_network(c: Creation) -> dict[str, str]:
    """One VPC, subnet and security group per stack: {"vpc", "subnet", "security_group"}."""
    if "vpc" not in c.cache:
        ec2 = c.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24", AvailabilityZone=f"{c.region}a")
        group = ec2.create_security_group(
            GroupName=f"{c.template.stack_name}-gpu", Description="sif local GPU workers", VpcId=vpc
        )
        c.cache.update(vpc=vpc, subnet=subnet["Subnet"]["SubnetId"], security_group=group["GroupId"])
    return {k: c.cache[k] for k in ("vpc", "subnet", "security_group")}
