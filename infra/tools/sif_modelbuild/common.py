"""Shared pieces of the model build: spec files, fingerprints, manifest writing."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from sif_inference.integrity import sha256_file
from sif_inference.manifest import ModelManifest

REPO = Path(__file__).resolve().parents[3]
SPECS = REPO / "shared" / "models"
TEXTS = REPO / "shared" / "data" / "texts.txt"


def load_spec(name: str) -> dict[str, Any]:
    return json.loads((SPECS / f"{name}.json").read_text())


def fingerprint(spec: dict[str, Any], packages: list[str], code: list[Path]) -> str:
    """Changes when the spec, a source package's version or the build code changes."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for pkg in packages:
        h.update(f"{pkg}=={metadata.version(pkg)}".encode())
    for path in code:
        h.update(path.read_bytes())
    return h.hexdigest()


def is_current(out_dir: Path, fp: str) -> bool:
    path = out_dir / "manifest.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    if data.get("build", {}).get("fingerprint") != fp:
        return False
    manifest = ModelManifest.model_validate(data)
    return all((out_dir / f).is_file() and sha256_file(out_dir / f) == e.sha256 for f, e in manifest.files.items())


def write_manifest(out_dir: Path, spec: dict[str, Any], files: list[str], build: dict[str, Any]) -> ModelManifest:
    data = dict(spec)
    data["files"] = {f: {"sha256": sha256_file(out_dir / f), "bytes": (out_dir / f).stat().st_size} for f in files}
    data["build"] = build
    manifest = ModelManifest.model_validate(data)  # the published manifest must parse
    (out_dir / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    return manifest


def load_texts() -> list[str]:
    return [t for t in TEXTS.read_text().splitlines() if t.strip()]


def signature_of(onnx_path: Path) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs and outputs as the manifest's `signature`: name, ONNX element type in lower
    case (float, int64, string, ...) and shape, None where an axis is dynamic (named or unknown)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(), "shape": dims}

    return {
        "inputs": [spec(v) for v in graph.input if v.name not in initializers],
        "outputs": [spec(v) for v in graph.output],
    }
