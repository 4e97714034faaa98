"""sha256 checks: a model file is hashed before a session is built from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sif_inference.errors import IntegrityError
from sif_inference.manifest import FileEntry, ModelManifest

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_entry(manifest: ModelManifest, filename: str) -> FileEntry:
    entry = manifest.files.get(filename)
    if entry is None:
        raise IntegrityError(f"{manifest.name}/{manifest.version}: {filename} is not listed in the manifest")
    return entry


def require_sha256(manifest: ModelManifest, filename: str, data: bytes) -> None:
    """Raise IntegrityError unless `data` hashes to the manifest's sha256 for `filename`."""
    expected = manifest_entry(manifest, filename).sha256
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise IntegrityError(
            f"{manifest.name}/{manifest.version}: {filename} has sha256 {actual}, "
            f"manifest says {expected}; refusing to serve it"
        )
