"""The operator's view of the models bucket: list, show, aliases (canaries, rollbacks) and retiring.

Every change is to the model's index (`{name}/aliases.json`, versions.ModelIndex), read and written
back whole with a conditional write (stores.py); a change that lost a race is re-applied to what the
other operator wrote, so neither change is lost. Serving processes see it within the registry's
index refresh (30 s).

- `alias(name, "latest", {"3": 1})`: latest -> version 3 (a rollback is the same call with the old version);
- `alias(name, "latest", {"3": 90, "4": 10})`: a canary, 10 % of requests on version 4, stable per request;
- `retire(name, "2")`: version 2 no longer serves; refused while an alias (or an implicit `latest`) points at it.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

from sif_inference.errors import ModelNotFoundError
from sif_inference.manifest import ALIAS_PATTERN, VERSION_PATTERN, ModelManifest
from sif_inference.versions import LATEST, ModelIndex, ModelRef, choose_version, version_key
from sif_modelbuild.errors import CatalogError, ConflictError
from sif_modelbuild.stores import ModelStore

INDEX_TRIES = 10
_ALIAS = re.compile(ALIAS_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)


class VariantInfo(BaseModel):
    file: str
    sha256: str
    bytes: int


class VersionInfo(BaseModel):
    version: str
    task: str = ""
    description: str = ""
    tenant: str | None = None
    default_variant: str = ""
    variants: dict[str, VariantInfo] = Field(default_factory=dict)
    sha256: str = ""  # the default variant's graph (what x-sif-model-sha256 says)
    bytes: int = 0  # every file of the version
    cpu_ms_per_item: float | None = None
    measured: bool = False
    route: str = ""
    retired: bool = False
    aliases: list[str] = Field(default_factory=list)
    error: str | None = None  # an unreadable manifest: listed, never served


class ModelInfo(BaseModel):
    name: str
    latest: str | None = None
    tenant: str | None = None  # of the version latest serves
    task: str = ""
    aliases: dict[str, dict[str, int]] = Field(default_factory=dict)
    retired: list[str] = Field(default_factory=list)
    versions: list[VersionInfo] = Field(default_factory=list)


# ---------------------------------------------------------------------- reading
def _version_info(store: ModelStore, name: str, version: str, index: ModelIndex) -> VersionInfo:
    info = VersionInfo(
        version=version,
        retired=version in index.retired,
        aliases=sorted(a for a, split in index.aliases.items() if split.get(version, 0) > 0),
    )
    try:
        manifest = store.source().read_manifest(name, version)
    except (ValueError, ModelNotFoundError) as exc:
        info.error = f"unreadable manifest: {str(exc).splitlines()[0]}"
        return info
    return _fill(info, manifest)


def _fill(info: VersionInfo, m: ModelManifest) -> VersionInfo:
    info.task, info.description, info.tenant, info.default_variant = m.task, m.description, m.tenant, m.default_variant
    entries = {v: (f, m.files.get(f)) for v, f in m.variants.items()}
    info.variants = {
        v: VariantInfo(file=f, sha256=e.sha256 if e else "", bytes=e.bytes if e else 0) for v, (f, e) in entries.items()
    }
    info.sha256 = m.sha256()
    info.bytes = sum(e.bytes for e in m.files.values())
    info.cpu_ms_per_item, info.measured, info.route = m.cost.cpu_ms_per_item, m.cost.measured, m.route
    return info


def _index(store: ModelStore, name: str) -> ModelIndex:
    try:
        index, _ = store.read_index(name)
    except ValueError:
        return ModelIndex()  # unreadable: the registry ignores it too (latest = the highest version)
    return index or ModelIndex()


def show(name: str, *, store: ModelStore) -> ModelInfo:
    """One model: every version (task, variants, sha256, size, measured cost, tenant), aliases, retired."""
    source = store.source()
    versions = source.list_versions(name)  # ModelNotFoundError when it has none
    index = _index(store, name)
    info = ModelInfo(name=name, aliases=index.aliases, retired=list(index.retired))
    info.versions = [_version_info(store, name, v, index) for v in versions]
    try:
        info.latest = choose_version(ModelRef(name), versions, index)
    except ModelNotFoundError:
        info.latest = None  # every version retired
    implicit = LATEST not in index.aliases
    for v in info.versions:
        if v.version == info.latest:
            info.tenant, info.task = v.tenant, v.task
            if implicit:
                v.aliases = sorted({*v.aliases, LATEST})
    return info


def list_models(*, store: ModelStore, tenant: str | None = None, all_tenants: bool = True) -> list[ModelInfo]:
    """Every model in the store; with `tenant` (and all_tenants False), only those that tenant may call."""
    found = []
    for name in store.source().list_models():
        try:
            info = show(name, store=store)
        except ModelNotFoundError:
            continue
        if not all_tenants and info.tenant is not None and info.tenant != tenant:
            continue
        found.append(info)
    return found


# ---------------------------------------------------------------------- changing the index
def update_index(store: ModelStore, name: str, change: Callable[[ModelIndex], ModelIndex]) -> ModelIndex:
    """Apply `change` to the model's index and write it back conditionally, re-reading after a lost race."""
    for attempt in range(INDEX_TRIES):
        try:
            current, token = store.read_index(name)
        except ValueError as exc:
            raise CatalogError(f"{name}'s aliases.json is not a valid index ({exc}); fix or delete it") from exc
        updated = change(current.model_copy(deep=True) if current else ModelIndex())
        if store.write_index(name, updated, token):
            return updated
        time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))  # jitter, not security
    raise ConflictError(f"{name}'s index kept changing under us ({INDEX_TRIES} tries); try again")


def _published(store: ModelStore, name: str) -> list[str]:
    try:
        return store.source().list_versions(name)
    except ModelNotFoundError as exc:
        raise CatalogError(f"unknown model {name!r} in {store.where}") from exc


def parse_split(items: list[str]) -> dict[str, int]:
    """`["3"]` -> {"3": 1}; `["3=90", "4=10"]` -> a canary. With two or more versions each needs a weight."""
    split: dict[str, int] = {}
    for item in items:
        version, sep, weight = item.partition("=")
        if not _VERSION.match(version):
            raise CatalogError(f"{item!r}: a version is a positive integer (VERSION or VERSION=WEIGHT)")
        if not sep and len(items) > 1:
            raise CatalogError(f"{item!r}: give each version of a split its weight (VERSION=WEIGHT)")
        if not (weight or "1").isdigit():
            raise CatalogError(f"{item!r}: a weight is a whole number >= 0")
        if version in split:
            raise CatalogError(f"version {version} is named twice")
        split[version] = int(weight or "1")
    if not split or sum(split.values()) <= 0:
        raise CatalogError("an alias needs at least one version with a positive weight")
    return split


def alias(name: str, alias_name: str, split: dict[str, int], *, store: ModelStore) -> ModelIndex:
    """Point `alias_name` at one version, or split it by weight (a canary). Rollback: point it back."""
    if not _ALIAS.match(alias_name):
        raise CatalogError(f"{alias_name!r} is not an alias name (lower case, starts with a letter: {ALIAS_PATTERN})")
    if not split or sum(split.values()) <= 0 or any(w < 0 for w in split.values()):
        raise CatalogError("an alias needs at least one version with a positive weight")
    versions = set(_published(store, name))
    unknown = sorted(set(split) - versions, key=version_key)
    if unknown:
        raise CatalogError(f"model {name!r} has no version {', '.join(unknown)} (it has {_listing(versions)})")

    def change(index: ModelIndex) -> ModelIndex:
        retired = sorted(set(split) & set(index.retired), key=version_key)
        if retired:
            raise CatalogError(f"model {name!r} version {', '.join(retired)} is retired")
        index.aliases[alias_name] = dict(sorted(split.items(), key=lambda kv: version_key(kv[0])))
        return index

    return update_index(store, name, change)


def remove_alias(name: str, alias_name: str, *, store: ModelStore) -> ModelIndex:
    """Drop an alias (`latest` then means the highest version that is not retired)."""
    _published(store, name)

    def change(index: ModelIndex) -> ModelIndex:
        if alias_name not in index.aliases:
            raise CatalogError(f"model {name!r} has no alias {alias_name!r}")
        del index.aliases[alias_name]
        return index

    return update_index(store, name, change)


def retire(name: str, version: str, *, store: ModelStore) -> ModelIndex:
    """Stop serving one version; refused while any alias points at it. Its files stay (versions are immutable)."""
    versions = _published(store, name)
    if version not in versions:
        raise CatalogError(f"model {name!r} has no version {version} (it has {_listing(set(versions))})")

    def change(index: ModelIndex) -> ModelIndex:
        if version in index.retired:
            return index
        pointing = sorted(a for a, split in index.aliases.items() if version in split)
        if pointing:
            raise CatalogError(
                f"model {name!r} version {version} is in use by alias {', '.join(pointing)}: "
                f"point {'them' if len(pointing) > 1 else 'it'} at another version first "
                f"(sif models alias {name} {pointing[0]} VERSION)"
            )
        if LATEST not in index.aliases and choose_version(ModelRef(name), versions, index) == version:
            raise CatalogError(
                f"model {name!r} version {version} is what latest serves (the highest version): point latest at "
                f"another version first (sif models alias {name} latest VERSION)"
            )
        index.retired = sorted({*index.retired, version}, key=version_key)
        return index

    return update_index(store, name, change)


def pin_latest(name: str, *, store: ModelStore) -> None:
    """Before an unpromoted version lands: make `latest` explicit, so it keeps serving what it serves now."""
    try:
        versions = store.source().list_versions(name)
    except ModelNotFoundError:
        return  # the first version: it will be latest whatever we do

    def change(index: ModelIndex) -> ModelIndex:
        if LATEST not in index.aliases:
            with contextlib.suppress(ModelNotFoundError):  # every version retired: nothing serves now
                index.aliases[LATEST] = {choose_version(ModelRef(name), versions, index): 1}
        return index

    update_index(store, name, change)


def _listing(versions: set[str]) -> str:
    return ", ".join(sorted(versions, key=version_key)) or "none"
