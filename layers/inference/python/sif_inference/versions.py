"""Model versions and aliases: what `name`, `name@version` and `name@alias` mean.

Versions are immutable folders (`{name}/{version}/`); a model's index (`{name}/aliases.json`) names
its aliases and retired versions. An alias points at one version, or splits traffic between
versions by weight (a canary): which version serves a request is a stable function of the request's
routing key, so a retried request lands on the same version. `latest`, unless the index says
otherwise, is the highest version that is not retired.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pydantic import BaseModel, Field, field_validator

from sif_inference.errors import BadModelRefError, ModelNotFoundError
from sif_inference.manifest import ALIAS_PATTERN, NAME_PATTERN, VERSION_PATTERN

INDEX_FILE = "aliases.json"
LATEST = "latest"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_ALIAS = re.compile(ALIAS_PATTERN)


class ModelIndex(BaseModel):
    """`{name}/aliases.json`: alias -> {version: weight}, and the retired versions."""

    aliases: dict[str, dict[str, int]] = Field(default_factory=dict)
    retired: list[str] = Field(default_factory=list)

    @field_validator("aliases")
    @classmethod
    def _weights(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for alias, split in value.items():
            if not _ALIAS.match(alias):
                raise ValueError(f"alias {alias!r} is not a valid alias name")
            if not split or any(not _VERSION.match(v) for v in split):
                raise ValueError(f"alias {alias!r} must name versions")
            if any(w < 0 for w in split.values()) or sum(split.values()) <= 0:
                raise ValueError(f"alias {alias!r} needs positive weights")
        return value


def version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: `name`, `name@version` or `name@alias` (no suffix: the `latest` alias)."""

    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        name, sep, tag = ref.partition("@")
        if not _NAME.match(name) or (sep and not tag):
            raise BadModelRefError(f"{ref!r} is not a model reference (name, name@version or name@alias)")
        if not sep:
            return cls(name)
        if _VERSION.match(tag):
            return cls(name, version=tag)
        if _ALIAS.match(tag):
            return cls(name, alias=tag)
        raise BadModelRefError(f"{ref!r}: {tag!r} is neither a version nor an alias name")

    def __str__(self) -> str:
        tag = self.version or self.alias
        return f"{self.name}@{tag}" if tag else self.name


def pick(split: dict[str, int], routing_key: str) -> str:
    """The version a routing key gets from a weighted split: stable per key, proportional to weight."""
    versions = sorted(split, key=version_key)
    total = sum(split[v] for v in versions)
    point = int.from_bytes(hashlib.sha256(routing_key.encode()).digest()[:8], "big") % total
    for v in versions:
        point -= split[v]
        if point < 0:
            return v
    return versions[-1]  # pragma: no cover - the weights sum to total


def choose_version(ref: ModelRef, versions: list[str], index: ModelIndex | None, routing_key: str | None = None) -> str:
    """The version `ref` means given the published versions and the index (ModelNotFoundError if none)."""
    retired = set(index.retired) if index else set()
    if ref.version is not None:
        if ref.version not in versions:
            raise ModelNotFoundError(f"model {ref.name!r} has no version {ref.version!r}")
        if ref.version in retired:
            raise ModelNotFoundError(f"model {ref.name!r} version {ref.version!r} is retired")
        return ref.version
    alias = ref.alias or LATEST
    split = (index.aliases.get(alias) if index else None) or {}
    split = {v: w for v, w in split.items() if v in versions and v not in retired and w > 0}
    if split:
        return pick(split, f"{ref.name}@{alias}:{routing_key or ''}")
    if alias != LATEST:
        raise ModelNotFoundError(f"model {ref.name!r} has no alias {alias!r}")
    live = [v for v in versions if v not in retired]
    if not live:
        raise ModelNotFoundError(f"unknown model {ref.name!r}")
    return max(live, key=version_key)
