"""What every translator shares: the stack it creates into, and CloudFormation -> API shapes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sif_tools.template import Template


@dataclass
class Creation:
    """The stack being created: its clients, its template (names, bindings), notes and a cache."""

    client: Callable[[str], Any]
    template: Template
    region: str
    notes: dict[str, str] = field(default_factory=dict)  # logical id -> what differs locally
    cache: dict[str, str] = field(default_factory=dict)  # created once per stack (network, service roles)

    def name(self, logical_id: str) -> str:
        return self.template.physical_name(logical_id)


def camel(value: Any, keep_keys_under: frozenset[str] = frozenset({"tags", "parameters"})) -> Any:
    """CloudFormation's PascalCase property names -> the Batch API's camelCase (map values kept)."""
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            new_key = key[:1].lower() + key[1:]
            out[new_key] = inner if new_key in keep_keys_under else camel(inner, keep_keys_under)
        return out
    if isinstance(value, list):
        return [camel(v, keep_keys_under) for v in value]
    return value


def attr_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def tag_list(tags: Any) -> list[dict[str, str]]:
    if isinstance(tags, dict):
        return [{"Key": str(k), "Value": str(v)} for k, v in tags.items()]
    return [{"Key": str(t["Key"]), "Value": str(t["Value"])} for t in tags or []]
