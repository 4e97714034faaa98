"""Where model files come from. The core knows only this protocol; the S3 source lives outside it.

A source is laid out like the models bucket: `{name}/{version}/manifest.json` beside the version's
files, and `{name}/aliases.json` (the model's index of aliases and retired versions, optional).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from sif_inference.errors import ModelNotFoundError
from sif_inference.manifest import ModelManifest
from sif_inference.versions import INDEX_FILE, ModelIndex, version_key

MANIFEST_FILE = "manifest.json"

__all__ = ["INDEX_FILE", "MANIFEST_FILE", "LocalDirSource", "ModelSource", "version_key"]


class ModelSource(Protocol):
    def list_models(self) -> list[str]: ...

    def list_versions(self, name: str) -> list[str]:
        """Versions of `name` that have a manifest (ModelNotFoundError when none)."""
        ...

    def read_index(self, name: str) -> ModelIndex | None:
        """The model's aliases and retired versions, or None when it has no index."""
        ...

    def read_manifest(self, name: str, version: str) -> ModelManifest: ...

    def read(self, name: str, version: str, filename: str) -> bytes:
        """One model file's bytes (the registry verifies them before use)."""
        ...


class LocalDirSource:
    """A folder laid out like the models bucket: {root}/{name}/{version}/files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob(f"*/{MANIFEST_FILE}")))

    def list_versions(self, name: str) -> list[str]:
        versions = [p.parent.name for p in (self.root / name).glob(f"*/{MANIFEST_FILE}")]
        if not versions:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return sorted(versions, key=version_key)

    def read_index(self, name: str) -> ModelIndex | None:
        path = self.root / name / INDEX_FILE
        return ModelIndex.model_validate_json(path.read_bytes()) if path.is_file() else None

    def read_manifest(self, name: str, version: str) -> ModelManifest:
        path = self.root / name / version / MANIFEST_FILE
        if not path.is_file():
            raise ModelNotFoundError(f"unknown model {name!r} version {version!r}")
        return ModelManifest.model_validate(json.loads(path.read_text()))

    def read(self, name: str, version: str, filename: str) -> bytes:
        src = self.root / name / version / filename
        if not src.is_file():
            raise ModelNotFoundError(f"{name}/{version} has no file {filename!r}")
        return src.read_bytes()
