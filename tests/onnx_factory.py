"""Small ONNX models the project does not ship, built inside the tests (what a user would bring).

Each returns the path it wrote. Text models come with a word-level tokenizer.json built here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
WORDS = ["hello", "world", "the", "a", "of", "and", "to", "in", "is", "it", "model", "text", "probe"]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tensor_model(path: Path, *, seed: int = 0) -> Path:
    """y = relu(x @ W + b) and a second output s = sum(x): x float [batch, 3] -> y [batch, 2], s [batch]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(3, 2)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(2,)).astype(np.float32), "b")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Relu", ["z"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tensor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"]),
        ],
        [w, b, axes],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def unknown_op_model(path: Path) -> Path:
    """A valid graph whose one node is in a domain onnxruntime does not know."""
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.custom")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[*OPSET, helper.make_opsetid("com.example.custom", 1)])
    return _save(model, path)


def random_bytes(path: Path, size: int = 4096) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def tokenizer_json(path: Path) -> Path:
    """A word-level tokenizer (lower case, whitespace and punctuation split) over WORDS, [UNK] for the rest."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.write_text(tok.to_str())
    return path


def text_model(path: Path, *, dim: int = 8, classes: int | None = None, token_output: bool = False) -> Path:
    """Token embeddings looked up and mean-pooled over the attention mask: [batch, dim] ("sentence_embedding"),
    or the token embeddings [batch, tokens, dim] with `token_output`, or logits [batch, classes]."""
    rng = np.random.default_rng(3)
    table = numpy_helper.from_array(rng.normal(size=(len(WORDS) + 2, dim)).astype(np.float32), "table")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    last = numpy_helper.from_array(np.array([-1], dtype=np.int64), "last")
    inits: list[Any] = [table, axes, last]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
    ]
    if token_output:
        nodes.append(helper.make_node("Identity", ["masked"], ["token_embeddings"]))
        out = helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "tokens", dim])
    else:
        nodes += [
            helper.make_node("ReduceSum", ["masked", "axes"], ["summed"], keepdims=0),
            helper.make_node("ReduceSum", ["maskf", "axes"], ["count"], keepdims=1),
            helper.make_node("Div", ["summed", "count"], ["pooled"]),
        ]
        if classes is None:
            nodes.append(helper.make_node("Identity", ["pooled"], ["sentence_embedding"]))
            out = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", dim])
        else:
            head = numpy_helper.from_array(rng.normal(size=(dim, classes)).astype(np.float32), "head")
            inits.append(head)
            nodes.append(helper.make_node("MatMul", ["pooled", "head"], ["logits"]))
            out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
    ]
    graph = helper.make_graph(nodes, "text", inputs, [out], inits)
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def image_model(path: Path, *, side: int = 16, classes: int = 3, layout: str = "NCHW") -> Path:
    """Global average pool + a linear head + softmax: float [batch, 3, side, side] (or NHWC) -> [batch, classes]."""
    rng = np.random.default_rng(5)
    head = numpy_helper.from_array(rng.normal(size=(3, classes)).astype(np.float32), "head")
    nodes = []
    source = "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    nodes += [
        helper.make_node("GlobalAveragePool", [source], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "head"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    shape = ["batch", 3, side, side] if layout == "NCHW" else ["batch", side, side, 3]
    graph = helper.make_graph(
        nodes,
        "image",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        [head],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def churn_frame(rows: int = 240, seed: int = 0) -> Any:
    """A small table with numeric and categorical columns, and a 3-class target."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.uniform(18, 80, rows).astype(np.float32),
            "monthly_spend": rng.uniform(5, 200, rows).astype(np.float32),
            "plan": rng.choice(["basic", "plus", "pro"], rows),
            "region": rng.choice(["north", "south"], rows),
        }
    )
    target = (frame.age > 45).astype(int) + (frame.plan == "pro").astype(int)
    return frame, np.asarray(target)


def sklearn_model(path: Path, *, zipmap: bool = False, handle_unknown: str = "ignore") -> Path:
    """scikit-learn: scaling + one-hot encoding + logistic regression, via skl2onnx, one [N, 1] input per column."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame, target = churn_frame()
    clf = LogisticRegression(max_iter=1000, random_state=0)
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), ["age", "monthly_spend"]),
            ("cat", OneHotEncoder(handle_unknown=handle_unknown), ["plan", "region"]),
        ]
    )
    pipe = Pipeline([("pre", pre), ("clf", clf)]).fit(frame, target)
    types = [
        ("age", FloatTensorType([None, 1])),
        ("monthly_spend", FloatTensorType([None, 1])),
        ("plan", StringTensorType([None, 1])),
        ("region", StringTensorType([None, 1])),
    ]
    model = convert_sklearn(
        pipe, initial_types=types, target_opset={"": 17, "ai.onnx.ml": 3}, options={id(clf): {"zipmap": zipmap}}
    )
    onnx.save(model, str(path))
    return path


def tabular_feed(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """What onnxruntime takes for churn rows: one [N, 1] column per feature."""
    feed: dict[str, np.ndarray] = {}
    for name in ("age", "monthly_spend"):
        feed[name] = np.asarray([[r[name]] for r in rows], dtype=np.float32)
    for name in ("plan", "region"):
        feed[name] = np.asarray([[r[name]] for r in rows], dtype=object)
    return feed
