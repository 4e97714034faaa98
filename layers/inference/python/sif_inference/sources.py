"""Where model files come from. The core knows only this protocol; the S3 source lives outside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from sif_inference.errors import ModelNotFoundError
from sif_inference.manifest import ModelManifest

MANIFEST_FILE = "manifest.json"


class ModelSource(Protocol):
    def list_models(self) -> list[str]: ...

    def latest_version(self, name: str) -> str: ...

    def read_manifest(self, name: str, version: str) -> ModelManifest: ...

    def read(self, name: str, version: str, filename: str) -> bytes:
        """One model file's bytes (the registry verifies them before use)."""
        ...


def version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


class LocalDirSource:
    """A folder laid out like the models bucket: {root}/{name}/{version}/files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob(f"*/{MANIFEST_FILE}")))

    def latest_version(self, name: str) -> str:
        versions = [p.parent.name for p in (self.root / name).glob(f"*/{MANIFEST_FILE}")]
        if not versions:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return max(versions, key=version_key)

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
