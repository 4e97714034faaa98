"""Which task a graph does, and the manifest fields that task needs, read from the graph itself.

Task inference, when the publisher names none (the first rule that matches):

1. an `input_ids` input: text. `text-classification` when labels are given, else `embedding`;
2. one float input of rank 4 with 3 channels on axis 1 (NCHW) or 3 (NHWC): `image-classification`;
3. ONNX-ML operators (scikit-learn and the like), or outputs named label / probabilities: `tabular`;
4. anything else: `tensor` (named tensors in and out, as the signature says).

A task named by the publisher is checked the same way: a graph whose inputs do not fit it is
refused (an image model published as an embedding, a text model without attention_mask, ...).
Where a width the manifest needs (embedding dim, number of classes) is a dynamic axis, one
direct run on a sample input reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sif_inference.manifest import (
    ClassificationConfig,
    EmbeddingConfig,
    FeatureSpec,
    ImagePreprocessing,
    Limits,
    OutputSpec,
    TabularConfig,
    TensorSpec,
)
from sif_modelbuild.errors import PublishError
from sif_modelbuild.graph import NUMPY_DTYPES, Graph, dim, ort_message

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_LENGTH = 256
EMBEDDING_OUTPUTS = ("sentence_embedding", "sentence_embeddings", "embeddings", "embedding")
LABEL_OUTPUTS = ("output_label", "label", "labels")
PROBABILITY_OUTPUTS = ("output_probability", "probabilities", "probability", "probs")
CLASSIFIER_OPS = ("LinearClassifier", "TreeEnsembleClassifier", "SVMClassifier", "ZipMap")
CATEGORY_OPS = ("OneHotEncoder", "LabelEncoder", "CategoryMapper")
# Per-call limits by task (what one API call may carry); the route rule in publish.py checks that a
# full call of max_inputs fits the API's time budget.
LIMITS: dict[str, dict[str, Any]] = {
    "embedding": {"max_inputs": 256, "max_text_chars": 20_000},
    "text-classification": {"max_inputs": 256, "max_text_chars": 20_000},
    "image-classification": {"max_inputs": 16, "max_image_bytes": 4_000_000, "max_image_pixels": 40_000_000},
    "tabular": {"max_inputs": 10_000},
    "tensor": {"max_inputs": 64, "max_tensor_elements": 1_000_000},
}


@dataclass
class TaskFit:
    """A task and the manifest fields it fills (tokenizer, output, labels, preprocessing, ...)."""

    task: str
    fields: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None  # the TextTokenizer that loaded, for text tasks
    known_categories: dict[str, list[str]] = field(default_factory=dict)  # tabular: values for sample rows


@dataclass
class Declared:
    """What the publisher said about the model besides the graph (each optional)."""

    task: str | None = None
    labels: list[str] | None = None
    tokenizer: bytes | None = None
    max_length: int | None = None
    dim: int | None = None
    preprocessing: dict[str, Any] | None = None
    features: list[dict[str, Any]] | None = None  # {name, type?, categories?} each
    classification: dict[str, Any] | None = None


def fit_task(graph: Graph, declared: Declared) -> TaskFit:
    task = declared.task or infer_task(graph, declared)
    fitter = FITTERS.get(task)
    if fitter is None:
        raise PublishError(f"unknown task {task!r}; the tasks are {', '.join(FITTERS)}")
    fit = fitter(graph, declared)
    limits = dict(LIMITS[task])
    if fit.tokenizer is not None:
        limits["max_tokens"] = fit.tokenizer.max_length
    fit.fields["limits"] = Limits.model_validate(limits)
    if declared.labels is not None and task == "tensor":
        raise PublishError("labels are for classifiers; a tensor model returns its outputs as they are")
    return fit


def infer_task(graph: Graph, declared: Declared) -> str:
    names = {t.name for t in graph.signature.inputs}
    if "input_ids" in names:
        return "text-classification" if declared.labels else "embedding"
    if _image_layout(graph) is not None:
        return "image-classification"
    if _is_tabular(graph):
        return "tabular"
    return "tensor"


def a_task(task: str) -> str:
    """'an embedding', 'a tensor'."""
    return ("an " if task[0] in "aeiou" else "a ") + task


# ---------------------------------------------------------------------- text
def _check_text_inputs(graph: Graph, task: str) -> None:
    inputs = {t.name: t for t in graph.signature.inputs}
    missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
    if missing:
        raise PublishError(
            f"{a_task(task)} model takes input_ids and attention_mask (token_type_ids optional); "
            f"this graph has no {', '.join(missing)} (its inputs: {', '.join(inputs)})"
        )
    extra = [n for n in inputs if n not in TEXT_INPUTS]
    if extra:
        raise PublishError(f"{a_task(task)} model takes only {', '.join(TEXT_INPUTS)}; this graph also needs {extra}")
    for spec in inputs.values():
        if spec.dtype != "int64" or len(spec.shape) != 2:
            raise PublishError(
                f"{spec.name} is {spec.dtype} {spec.shape}; {a_task(task)} model takes int64 [batch, tokens]"
            )
        if dim(spec.shape[1]) is not None:
            raise PublishError(
                f"{spec.name} has a fixed length of {spec.shape[1]} tokens; export the graph with a dynamic "
                "sequence axis (sif pads each batch to its longest text)"
            )


def _tokenizer(graph: Graph, declared: Declared, task: str) -> Any:
    from sif_inference.errors import InferenceError
    from sif_inference.tokenization import TextTokenizer

    if declared.tokenizer is None:
        raise PublishError(f"{a_task(task)} model needs its tokenizer: --tokenizer tokenizer.json")
    max_length = declared.max_length or _tokenizer_max_length(declared.tokenizer) or DEFAULT_MAX_LENGTH
    if max_length <= 0:
        raise PublishError(f"--max-length must be positive, not {max_length}")
    try:
        tokenizer = TextTokenizer.from_bytes(declared.tokenizer, max_length)
        encodings = tokenizer.encode(["sif checks that this tokenizer loads."])
    except (InferenceError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise PublishError(f"the tokenizer does not load: {exc}") from exc
    except Exception as exc:  # the tokenizers crate raises plain Exception subclasses
        raise PublishError(f"the tokenizer does not load: {exc}") from exc
    if not encodings or not encodings[0].ids:
        raise PublishError("the tokenizer does not load: it turns a sentence into no tokens")
    return tokenizer


def _tokenizer_max_length(data: bytes) -> int | None:
    try:
        truncation = json.loads(data).get("truncation") or {}
    except (ValueError, AttributeError):
        return None  # not JSON: the tokenizer check says so
    value = truncation.get("max_length") if isinstance(truncation, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _text_feed(graph: Graph, tokenizer: Any) -> dict[str, np.ndarray]:
    batch = tokenizer.pad(tokenizer.encode(["hello world", "a second, longer sample sentence"]))
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if graph.input("token_type_ids") is not None:
        feed["token_type_ids"] = batch.token_type_ids
    return feed


def fit_embedding(graph: Graph, declared: Declared) -> TaskFit:
    _check_text_inputs(graph, "embedding")
    tokenizer = _tokenizer(graph, declared, "embedding")
    floats = [o for o in graph.signature.outputs if o.dtype in ("float", "float16", "double")]
    named = [o for o in floats if o.name in EMBEDDING_OUTPUTS and len(o.shape) == 2]
    pooled = named or [o for o in floats if len(o.shape) == 2]
    tokens = [o for o in floats if len(o.shape) == 3]
    if named or (pooled and not tokens):
        out, config = pooled[0], EmbeddingConfig(pooling="none", normalize=False)
    elif tokens:  # token embeddings: sif mean-pools over the attention mask and L2-normalises
        out, config = tokens[0], EmbeddingConfig(pooling="mean", normalize=True)
    else:
        raise PublishError(
            "an embedding model has a float output [batch, dim] or [batch, tokens, dim]; this graph's outputs are "
            + ", ".join(f"{o.name} {o.dtype} {o.shape}" for o in graph.signature.outputs)
        )
    width = dim(out.shape[-1]) or int(np.asarray(graph.run(_text_feed(graph, tokenizer))[out.name]).shape[-1])
    if declared.dim is not None and declared.dim != width:
        raise PublishError(f"the embedding output {out.name} has {width} dimensions, not --dim {declared.dim}")
    fields = {
        "tokenizer": {"file": TOKENIZER_FILE, "max_length": tokenizer.max_length},
        "embedding": config,
        "output": OutputSpec(name=out.name, dim=width),
    }
    return TaskFit("embedding", fields, tokenizer)


def _classes_output(graph: Graph, task: str) -> TensorSpec:
    floats = [o for o in graph.signature.outputs if o.dtype in ("float", "float16", "double") and len(o.shape) == 2]
    if not floats:
        raise PublishError(
            f"{a_task(task)} model has a float output [batch, classes]; this graph's outputs are "
            + ", ".join(f"{o.name} {o.dtype} {o.shape}" for o in graph.signature.outputs)
        )
    return floats[0]


def _check_labels(declared: Declared, classes: int, what: str) -> list[str]:
    labels = declared.labels or []
    if labels and len(labels) != classes:
        raise PublishError(f"{len(labels)} labels given, but {what} has {classes} classes")
    if len(set(labels)) != len(labels):
        raise PublishError("the labels have duplicates")
    return labels


def _activation(declared: Declared, rows: np.ndarray) -> ClassificationConfig:
    """softmax over logits, unless the publisher says otherwise or the graph already gives probabilities."""
    if declared.classification is not None:
        return ClassificationConfig.model_validate(declared.classification)
    rows = np.asarray(rows, dtype=np.float64)
    is_probability = bool(rows.size) and (rows >= 0).all() and np.allclose(rows.sum(axis=-1), 1.0, atol=1e-3)
    return ClassificationConfig(activation="none" if is_probability else "softmax")


def fit_text_classification(graph: Graph, declared: Declared) -> TaskFit:
    _check_text_inputs(graph, "text-classification")
    if not declared.labels:
        raise PublishError("a text-classification model needs its labels (--labels FILE, one per class)")
    tokenizer = _tokenizer(graph, declared, "text-classification")
    out = _classes_output(graph, "text-classification")
    rows = np.asarray(graph.run(_text_feed(graph, tokenizer))[out.name])
    classes = dim(out.shape[-1]) or int(rows.shape[-1])
    labels = _check_labels(declared, classes, f"the output {out.name}")
    fields = {
        "tokenizer": {"file": TOKENIZER_FILE, "max_length": tokenizer.max_length},
        "classification": _activation(declared, rows),
        "output": OutputSpec(name=out.name, dim=classes),
        "labels": labels,
    }
    return TaskFit("text-classification", fields, tokenizer)


# ---------------------------------------------------------------------- images
def _image_layout(graph: Graph) -> tuple[str, int | None] | None:
    """(layout, square side or None) when the graph takes one float image batch, else None."""
    inputs = graph.signature.inputs
    if len(inputs) != 1 or inputs[0].dtype != "float" or len(inputs[0].shape) != 4:
        return None
    shape = [dim(d) for d in inputs[0].shape]
    if shape[1] == 3:
        layout, sides = "NCHW", (shape[2], shape[3])
    elif shape[3] == 3:
        layout, sides = "NHWC", (shape[1], shape[2])
    else:
        return None
    side = sides[0] if sides[0] is not None and sides[0] == sides[1] else None
    return layout, side


def fit_image_classification(graph: Graph, declared: Declared) -> TaskFit:
    layout = _image_layout(graph)
    if layout is None:
        raise PublishError(
            "an image-classification model takes one float input [batch, 3, H, W] or [batch, H, W, 3]; "
            "this graph's inputs are " + ", ".join(f"{t.name} {t.dtype} {t.shape}" for t in graph.signature.inputs)
        )
    shape = [dim(d) for d in graph.signature.inputs[0].shape]
    spatial = shape[2:] if layout[0] == "NCHW" else shape[1:3]
    if all(s is not None for s in spatial) and spatial[0] != spatial[1]:
        raise PublishError(f"the image input is {spatial[0]}x{spatial[1]}; sif centre-crops square images")
    given = dict(declared.preprocessing or {})
    crop = layout[1] or int(given.get("crop", 224))
    defaults = {"layout": layout[0], "crop": crop, "resize": max(crop, round(crop * 256 / 224))}
    try:
        prep = ImagePreprocessing.model_validate({**defaults, **given})
    except ValueError as exc:
        raise PublishError(f"the image preprocessing is not valid: {exc}") from exc
    if prep.layout != layout[0]:
        raise PublishError(f"the preprocessing says layout {prep.layout}, but the graph's input is {layout[0]}")
    if layout[1] is not None and prep.crop != layout[1]:
        raise PublishError(f"the preprocessing crops {prep.crop} pixels, but the graph takes {layout[1]}x{layout[1]}")
    out = _classes_output(graph, "image-classification")
    size = (1, 3, prep.crop, prep.crop) if prep.layout == "NCHW" else (1, prep.crop, prep.crop, 3)
    rng = np.random.default_rng(0)
    rows = np.asarray(graph.run({graph.signature.inputs[0].name: rng.random(size, dtype=np.float32)})[out.name])
    classes = dim(out.shape[-1]) or int(rows.shape[-1])
    labels = _check_labels(declared, classes, f"the output {out.name}")
    fields = {
        "preprocessing": prep,
        "classification": _activation(declared, rows),
        "output": OutputSpec(name=out.name, dim=classes),
        "labels": labels,
    }
    return TaskFit("image-classification", fields)


# ---------------------------------------------------------------------- tabular
def _is_tabular(graph: Graph) -> bool:
    names = {o.name for o in graph.signature.outputs}
    return graph.has_ml_ops() or bool(names & set(LABEL_OUTPUTS) and names & set(PROBABILITY_OUTPUTS))


def _graph_classes(graph: Graph) -> list[str] | None:
    for op in CLASSIFIER_OPS:
        for _, attrs in graph.nodes(op):
            for key in ("classlabels_strings", "classlabels_int64s", "classlabels_ints"):
                if attrs.get(key):
                    return [v.decode() if isinstance(v, bytes) else str(v) for v in attrs[key]]
    return None


def _graph_categories(graph: Graph, feature: str) -> tuple[list[str], bool] | None:
    """(the values an encoder in the graph knows for a string input, whether it refuses any other).

    A OneHotEncoder with zeros=0 fails on an unknown value: those values become the feature's
    `categories` (sif then refuses others with a clear 400). One with zeros=1 (scikit-learn's
    handle_unknown="ignore") or a LabelEncoder with a default takes anything: its values only seed
    the probe's sample rows."""
    for op in CATEGORY_OPS:
        for inputs, attrs in graph.nodes(op):
            if inputs and graph.source_input(inputs[0]) == feature:
                for key in ("cats_strings", "keys_strings"):
                    if attrs.get(key):
                        values = [v.decode() if isinstance(v, bytes) else str(v) for v in attrs[key]]
                        return values, op == "OneHotEncoder" and attrs.get("zeros", 1) == 0
    return None


def _tabular_features(graph: Graph, declared: Declared) -> tuple[str, list[FeatureSpec], dict[str, list[str]]]:
    """(input mode, the features, values known per category feature for sample rows)."""
    inputs = graph.signature.inputs
    given = declared.features
    bad = [t for t in inputs if len(t.shape) != 2]
    if bad:
        raise PublishError(
            "a tabular model takes [batch, 1] inputs (one per feature) or one [batch, features] input; "
            + ", ".join(f"{t.name} is {t.shape}" for t in bad)
        )
    if len(inputs) == 1 and dim(inputs[0].shape[1]) is None and not given:
        raise PublishError(f"the input {inputs[0].name} has a dynamic number of columns: name them with --features")
    matrix = len(inputs) == 1 and inputs[0].shape[1] != 1
    if matrix:
        spec = inputs[0]
        if spec.dtype not in ("float", "double"):
            raise PublishError(f"one {spec.dtype} input {spec.name} {spec.shape}: sif feeds a feature matrix as float")
        width = dim(spec.shape[1])
        names = [f["name"] for f in given] if given else [f"f{i}" for i in range(width or 0)]
        if width is not None and len(names) != width:
            raise PublishError(f"{len(names)} features declared, but the input {spec.name} has {width} columns")
        if any(f.get("type", "number") != "number" for f in given or []):
            raise PublishError(f"the input {spec.name} is a float matrix: every feature is a number")
        return "matrix", [FeatureSpec(name=n) for n in names], {}
    by_name = {t.name: t for t in inputs}
    if given is not None and sorted(f["name"] for f in given) != sorted(by_name):
        raise PublishError(
            f"the features declared ({', '.join(f['name'] for f in given)}) are not the graph's inputs "
            f"({', '.join(by_name)})"
        )
    out: list[FeatureSpec] = []
    known: dict[str, list[str]] = {}
    for item in given if given is not None else [{"name": t.name} for t in inputs]:
        spec = by_name[item["name"]]
        kind = "category" if spec.dtype == "string" else "number"
        if item.get("type", kind) != kind:
            raise PublishError(f"feature {spec.name} is declared a {item['type']}, but the graph takes {spec.dtype}")
        categories: list[str] | None = list(item["categories"]) if item.get("categories") else None
        found = _graph_categories(graph, spec.name) if kind == "category" else None
        if found is not None:
            known[spec.name] = categories or found[0]
            categories = categories or (found[0] if found[1] else None)
        out.append(FeatureSpec(name=spec.name, type=kind, categories=categories))
    return "named", out, known


def sample_rows(
    features: list[FeatureSpec], count: int, known: dict[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    """Deterministic rows over the declared features: numbers, and each category's known values in turn."""
    rng = np.random.default_rng(11)
    rows = []
    for i in range(count):
        row: dict[str, Any] = {}
        for f in features:
            if f.type == "category":
                choices = f.categories or (known or {}).get(f.name) or ["a", "b"]
                row[f.name] = choices[i % len(choices)]
            else:
                row[f.name] = round(float(rng.normal(1.0, 1.0)), 3)
        rows.append(row)
    return rows


def tabular_feed(graph: Graph, mode: str, features: list[FeatureSpec], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The graph's feed for `rows` (what the tabular task builds; used here for a direct shape probe)."""
    if mode == "matrix":
        spec = graph.signature.inputs[0]
        values = [[row[f.name] for f in features] for row in rows]
        return {spec.name: np.asarray(values, dtype=NUMPY_DTYPES[spec.dtype])}
    feed = {}
    for f in features:
        named = graph.input(f.name)
        assert named is not None
        column = [[row[f.name]] for row in rows]
        feed[f.name] = np.asarray(column, dtype=object if named.dtype == "string" else NUMPY_DTYPES[named.dtype])
    return feed


def fit_tabular(graph: Graph, declared: Declared) -> TaskFit:
    mode, features, known = _tabular_features(graph, declared)
    outputs = graph.signature.outputs
    probs = next((o for o in outputs if o.name in PROBABILITY_OUTPUTS), None) or next(
        (o for o in outputs if o.dtype.startswith("seq(map(")), None
    )
    label = next((o for o in outputs if o.name in LABEL_OUTPUTS), None)
    label = label or next((o for o in outputs if o is not probs and len(o.shape) in (1, 2)), None)
    if label is None:
        raise PublishError("a tabular model has a label (or value) output; this graph has none")
    try:
        results = graph.run(tabular_feed(graph, mode, features, sample_rows(features, 3, known)))
    except Exception as exc:  # onnxruntime's errors derive from Exception only
        raise PublishError(f"the graph does not run on rows of its features: {ort_message(exc)}") from exc
    classes = _graph_classes(graph)
    width = None
    if probs is not None:
        value = results[probs.name]
        width = len(value[0]) if isinstance(value, list) and value else int(np.asarray(value).shape[-1])
        if classes is not None and len(classes) != width:
            raise PublishError(f"the classifier names {len(classes)} classes but {probs.name} has {width} columns")
    count = width if width is not None else len(classes or [])
    labels = _check_labels(declared, count, "the classifier") if count else list(declared.labels or [])
    fields: dict[str, Any] = {
        "features": features,
        "tabular": TabularConfig(
            label_output=label.name, probabilities_output=probs.name if probs else None, input_mode=mode
        ),
        "labels": labels or classes or [],
        "output": OutputSpec(name=probs.name if probs else label.name, dim=count),
    }
    return TaskFit("tabular", fields, known_categories=known)


# ---------------------------------------------------------------------- tensors
def fit_tensor(graph: Graph, declared: Declared) -> TaskFit:
    bad = [t for t in graph.signature.inputs if t.dtype not in NUMPY_DTYPES]
    if bad:
        raise PublishError(f"a tensor model takes tensors; {', '.join(f'{t.name} is {t.dtype}' for t in bad)}")
    first = graph.signature.outputs[0]
    width = (dim(first.shape[-1]) or 0) if first.shape else 0
    return TaskFit("tensor", {"output": OutputSpec(name=first.name, dim=width)})


def tensor_instance(spec: TensorSpec, seed: int) -> Any:
    """One instance of an input: its shape without the batch axis (dynamic axes 2), as nested lists."""
    rng = np.random.default_rng(seed)
    shape = tuple(dim(d) or 2 for d in spec.shape[1:])
    if spec.dtype == "string":
        return np.full(shape, "a", dtype=object).tolist()
    if spec.dtype == "bool":
        return (rng.random(shape) > 0.5).tolist()
    if spec.dtype.startswith(("float", "double")):
        return np.round(rng.normal(0.0, 1.0, shape), 4).tolist()
    return rng.integers(0, 2, shape).tolist()


FITTERS = {
    "embedding": fit_embedding,
    "text-classification": fit_text_classification,
    "image-classification": fit_image_classification,
    "tabular": fit_tabular,
    "tensor": fit_tensor,
}
