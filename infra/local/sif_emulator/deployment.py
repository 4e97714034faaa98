"""What the emulator's services see of a created stack: `Deployment`.

The API gateway, the event pollers, the Batch executor and the resource translators take a
`Deployment`; `stack.LocalStack` is the one that implements it, and it is the only module that
imports them, so the package's imports run one way (stack -> services -> template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from sif_tools.template import Template


class Deployment(Protocol):
    """template.yaml deployed into moto's server at `aws_endpoint_url`."""

    aws_endpoint_url: str
    region: str
    template: Template
    state_dir: Path
    created: dict[str, str]  # logical id -> resource type, for what exists in the emulator

    def client(self, service: str) -> Any:
        """A boto3 client for the emulator (dummy credentials, the stack's region)."""
        ...

    def ref(self, logical_id: str) -> str:
        """The resource's Ref value here: bucket/table name, queue URL, topic/Batch ARN."""
        ...

    def arn(self, logical_id: str) -> str: ...

    def function_env(self, logical_id: str | None = None) -> dict[str, str]:
        """A function's environment here: the template's variables plus what boto3 needs locally."""
        ...
