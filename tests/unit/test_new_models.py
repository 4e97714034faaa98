"""efficientnet-lite0, minilm-topic and iris-species as built by `make models`, run with ONNX Runtime
directly, against values from their original libraries (PyTorch, scikit-learn; see
sif_modelbuild.references), and their manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sif_inference.images import load_image, preprocess
from sif_inference.integrity import sha256_file
from sif_inference.manifest import ModelManifest
from sif_inference.tokenization import TextTokenizer
from sif_modelbuild import efficientnet
from sif_modelbuild.common import signature_of

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
NEW_MODELS = ["efficientnet-lite0", "minilm-topic", "iris-species"]


@pytest.fixture(scope="module")
def built() -> Path:
    root = Path(os.environ.get("SIF_MODELS_DIR", REPO / ".cache" / "models"))
    missing = [m for m in NEW_MODELS if not (root / m / "1" / "manifest.json").is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not built in {root}: run `make models` first")
    return root


def manifest_of(built: Path, name: str) -> ModelManifest:
    return ModelManifest.model_validate_json((built / name / "1" / "manifest.json").read_text())


def session_of(built: Path, name: str) -> ort.InferenceSession:
    m = manifest_of(built, name)
    return ort.InferenceSession(str(built / name / "1" / m.variant_file()), providers=["CPUExecutionProvider"])


def reference(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_manifest_parses_and_describes_the_graph(built, name):
    m = manifest_of(built, name)
    directory = built / name / "1"
    assert m.name == name
    for file, entry in m.files.items():
        assert sha256_file(directory / file) == entry.sha256
    assert m.signature is not None
    assert m.signature.model_dump() == signature_of(directory / m.variant_file())
    outputs = {o.name: o for o in m.signature.outputs}
    assert m.output.name in outputs
    assert outputs[m.output.name].shape == [None, m.output.dim]
    assert len(m.labels) == m.output.dim == len(set(m.labels))
    session = session_of(built, name)
    assert [i.name for i in session.get_inputs()] == [i.name for i in m.signature.inputs]
    assert [o.name for o in session.get_outputs()] == [o.name for o in m.signature.outputs]


def test_manifests_carry_what_their_task_needs(built):
    eff = manifest_of(built, "efficientnet-lite0")
    assert eff.task == "image-classification"
    assert eff.preprocessing is not None and eff.preprocessing.resize_mode == "shorter_side"
    assert (eff.preprocessing.resize, eff.preprocessing.crop) == (224, 224)
    assert eff.classification is not None and eff.classification.activation == "softmax"
    assert eff.classification.top_k == 5
    assert eff.limits.max_inputs == 16 and eff.limits.max_image_pixels and eff.limits.max_image_bytes
    assert eff.signature is not None and eff.signature.inputs[0].shape == [None, 3, 224, 224]

    topic = manifest_of(built, "minilm-topic")
    assert topic.task == "text-classification"
    assert topic.tokenizer is not None and topic.tokenizer.max_length == 256
    assert topic.classification is not None and topic.classification.activation == "softmax"
    assert topic.signature is not None
    assert [(i.name, i.dtype) for i in topic.signature.inputs] == [
        ("input_ids", "int64"),
        ("attention_mask", "int64"),
        ("token_type_ids", "int64"),
    ]
    assert "tokenizer.json" in topic.files

    iris = manifest_of(built, "iris-species")
    assert iris.task == "tabular"
    assert iris.tabular is not None and iris.tabular.input_mode == "named"
    assert [f.name for f in iris.features] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert all(f.type == "number" for f in iris.features)
    assert iris.signature is not None
    assert [i.name for i in iris.signature.inputs] == [f.name for f in iris.features]
    outputs = {o.name: o for o in iris.signature.outputs}
    assert outputs[iris.tabular.label_output].dtype == "string"
    assert iris.tabular.probabilities_output is not None
    assert outputs[iris.tabular.probabilities_output].dtype == "float"


# --- efficientnet-lite0 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eff_reference() -> dict:
    return reference("efficientnet_lite0_reference.json")


def eff_probs(built: Path, batch: np.ndarray) -> np.ndarray:
    (logits,) = session_of(built, "efficientnet-lite0").run(["logits"], {"input": batch})
    return softmax(logits)


def test_efficientnet_labels_are_the_imagenet_names(built, eff_reference):
    labels = manifest_of(built, "efficientnet-lite0").labels
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca" and labels[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert (labels[134], labels[517]) == ("crane (bird)", "crane (machine)")
    for top5 in eff_reference["top5"].values():
        for index, label, _ in top5:
            assert labels[index] == label


def test_efficientnet_matches_pytorch_on_the_same_inputs(built, eff_reference):
    images = efficientnet.check_images()
    assert [n for n, _ in images] == list(eff_reference["top5"])
    probs = eff_probs(built, np.stack([efficientnet.package_preprocess(data) for _, data in images]))
    for (name, _), p in zip(images, probs, strict=True):
        top5 = eff_reference["top5"][name]
        assert int(p.argmax()) == top5[0][0], name
        got = p[[i for i, _, _ in top5]]
        np.testing.assert_allclose(got, [q for _, _, q in top5], atol=eff_reference["tolerance_same_inputs"])


def test_efficientnet_through_sifs_preprocessing_agrees_with_the_package(built, eff_reference):
    cfg = manifest_of(built, "efficientnet-lite0").preprocessing
    assert cfg is not None
    images = efficientnet.check_images()
    batch = np.stack(
        [preprocess(load_image(data, max_bytes=None, max_pixels=None, fit=224)[0], cfg) for _, data in images]
    )
    probs = eff_probs(built, batch)
    for (name, _), p in zip(images, probs, strict=True):
        top5 = eff_reference["top5"][name]
        assert int(p.argmax()) == top5[0][0], name
        got = p[[i for i, _, _ in top5]]
        np.testing.assert_allclose(got, [q for _, _, q in top5], atol=eff_reference["tolerance_sif_pipeline"])
    assert eff_reference["top5"]["grace_hopper.jpg"][0][1] == "military uniform"


def test_efficientnet_batch_axis_is_dynamic(built):
    _, data = efficientnet.photo()
    one = efficientnet.package_preprocess(data)[None]
    alone = eff_probs(built, one)
    batched = eff_probs(built, np.concatenate([one, np.zeros_like(one), one]))
    np.testing.assert_allclose(batched[[0, 2]], np.concatenate([alone, alone]), atol=1e-5)


# --- minilm-topic -------------------------------------------------------------------------------


def topic_probs(built: Path, texts: list[str]) -> np.ndarray:
    m = manifest_of(built, "minilm-topic")
    assert m.tokenizer is not None
    tok = TextTokenizer.from_file(built / "minilm-topic" / "1" / m.tokenizer.file, m.tokenizer.max_length)
    b = tok.pad(tok.encode(texts))
    feeds = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids}
    (logits,) = session_of(built, "minilm-topic").run(["logits"], feeds)
    assert logits.shape == (len(texts), len(m.labels))
    return softmax(logits)


def test_minilm_topic_matches_sklearn_on_pytorch_embeddings(built):
    ref = reference("minilm_topic_reference.json")
    labels = manifest_of(built, "minilm-topic").labels
    assert labels == ref["labels"]
    probs = topic_probs(built, ref["texts"])
    np.testing.assert_allclose(probs, np.array(ref["probabilities"]), atol=ref["tolerance"])
    assert [labels[int(i)] for i in probs.argmax(1)] == ref["top"]


def test_minilm_topic_gives_the_same_scores_alone_and_batched(built):
    texts = reference("minilm_topic_reference.json")["texts"]
    batched = topic_probs(built, texts)
    alone = np.concatenate([topic_probs(built, [t]) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


# --- iris-species -------------------------------------------------------------------------------


def test_iris_matches_sklearn(built):
    ref = reference("tabular_reference.json")
    m = manifest_of(built, "iris-species")
    assert m.labels == ref["labels"]
    assert m.tabular is not None and m.tabular.probabilities_output is not None
    rows = np.asarray(ref["rows"], dtype=np.float32)
    feeds = {f.name: rows[:, [i]] for i, f in enumerate(m.features)}
    label, probs = session_of(built, "iris-species").run(
        [m.tabular.label_output, m.tabular.probabilities_output], feeds
    )
    assert [str(v) for v in label] == ref["label"]
    assert probs.shape == (len(rows), len(m.labels))
    np.testing.assert_allclose(probs, np.array(ref["probabilities"]), atol=ref["tolerance"])
    assert [m.labels[int(i)] for i in probs.argmax(1)] == ref["label"]
