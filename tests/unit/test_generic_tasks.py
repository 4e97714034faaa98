"""The generic tasks (embedding with pooling, text classification, image classification, tabular, tensor)
on small real ONNX models built here, checked against onnxruntime run directly on the same inputs,
and the file rows that carry their inputs (`features`, `inputs`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from sif_core.rows import BadRow, BytesSource, FileFormatError, Row, open_rows
from sif_core.scoring import DirSink, FileCheckpointStore, TaskFileModel, score_file
from sif_inference import LocalDirSource, ModelRegistry
from sif_inference.embedder import TextEmbedder
from sif_inference.errors import BadInputError, InferenceError, InputLimitError, WrongTaskError
from sif_inference.rounding import round_significant
from sif_inference.scores import activate
from sif_inference.sessions import build_session
from sif_inference.tasks import (
    ImageClassification,
    TabularTask,
    TensorTask,
    TextClassification,
    TextEmbedding,
    run_tensors,
)
from sif_modelbuild.testimages import make_test_images

MINILM = "all-minilm-l6-v2"
LIMITS = {"max_inputs": 64, "max_text_chars": 2000}
COST = {"cpu_ms_per_item": 1.0, "gpu_ms_per_item": 1.0, "lambda_budget_ms": 1000.0}
TOPICS = ["sports", "finance", "cooking"]
SPECIES = ["setosa", "versicolor", "virginica"]


# ---------------------------------------------------------------------- building models
def publish(root: Path, name: str, graph: bytes, extra: dict[str, bytes] | None = None, **fields: Any) -> None:
    """A model folder as `sif models publish` lays it out: files, and a manifest with their sha256."""
    folder = root / name / "1"
    folder.mkdir(parents=True)
    files = {"model.onnx": graph, **(extra or {})}
    for filename, data in files.items():
        (folder / filename).write_bytes(data)
    manifest = {
        "name": name,
        "version": "1",
        "variants": {"fp32": "model.onnx"},
        "default_variant": "fp32",
        "files": {f: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for f, d in files.items()},
        "limits": {**LIMITS, **fields.pop("limits", {})},
        "cost": COST,
        **fields,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def graph_bytes(nodes: list, inputs: list, outputs: list, initializers: list | None = None) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def value(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def tensor_graph() -> bytes:
    """Five inputs of five types: y = 2x + 1, total = sum(x), log = ln(x), next_ids = ids + 1, echo, not."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Add", ["x2", "one"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axis1"], ["total"], keepdims=0),
        helper.make_node("Log", ["x"], ["log"]),
        helper.make_node("Add", ["ids", "one_i"], ["next_ids"]),
        helper.make_node("Identity", ["names"], ["echo"]),
        helper.make_node("Not", ["flag"], ["not_flag"]),
    ]
    inputs = [
        value("x", TensorProto.FLOAT, ["batch", 3]),
        value("ids", TensorProto.INT64, ["batch", "seq"]),
        value("names", TensorProto.STRING, ["batch"]),
        value("flag", TensorProto.BOOL, ["batch", 2]),
    ]
    outputs = [
        value("y", TensorProto.FLOAT, ["batch", 3]),
        value("total", TensorProto.FLOAT, ["batch"]),
        value("log", TensorProto.FLOAT, ["batch", 3]),
        value("next_ids", TensorProto.INT64, ["batch", "seq"]),
        value("echo", TensorProto.STRING, ["batch"]),
        value("not_flag", TensorProto.BOOL, ["batch", 2]),
    ]
    inits = [
        const("two", np.array([2.0], np.float32)),
        const("one", np.array([1.0], np.float32)),
        const("one_i", np.array([1], np.int64)),
        const("axis1", np.array([1], np.int64)),
    ]
    return graph_bytes(nodes, inputs, outputs, inits)


def adder_graph() -> bytes:
    """sum = a + b over dynamic dims that must agree (or broadcast): the graph refuses the others."""
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"])]
    inputs = [value("a", TensorProto.FLOAT, ["batch", "n"]), value("b", TensorProto.FLOAT, ["batch", "m"])]
    return graph_bytes(nodes, inputs, [value("sum", TensorProto.FLOAT, ["batch", None])])


def fixed_graph() -> bytes:
    """A fixed [2, 2] input: no batch axis for the task to add."""
    nodes = [helper.make_node("Transpose", ["z"], ["zt"])]
    return graph_bytes(nodes, [value("z", TensorProto.FLOAT, [2, 2])], [value("zt", TensorProto.FLOAT, [2, 2])])


def token_graph(table: np.ndarray) -> bytes:
    """A sentence-transformers-style export that does not pool: one vector per token ([batch, tokens, dim])."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["vectors"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["vectors", "mask3"], ["token_embeddings"]),
    ]
    inputs = [
        value("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        value("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [value("token_embeddings", TensorProto.FLOAT, ["batch", "sequence", table.shape[1]])]
    return graph_bytes(nodes, inputs, outputs, [const("table", table), const("last", np.array([-1], np.int64))])


def image_graph(weights: np.ndarray) -> bytes:
    """NCHW pixels -> channel means -> logits over four labels."""
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["means", "w"], ["logits"]),
    ]
    inputs = [value("pixels", TensorProto.FLOAT, ["batch", 3, 32, 32])]
    outputs = [value("logits", TensorProto.FLOAT, ["batch", weights.shape[1]])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[const("w", weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def text_classifier_graph(minilm_fp32: Path, head: np.ndarray, bias: np.ndarray) -> bytes:
    """all-MiniLM-L6-v2's fp32 graph plus a linear head: logits = embedding @ head + bias."""
    model = onnx.load(str(minilm_fp32))
    graph = model.graph
    graph.initializer.extend([const("head_w", head), const("head_b", bias)])
    graph.node.extend(
        [
            helper.make_node("MatMul", ["sentence_embedding", "head_w"], ["head_mm"]),
            helper.make_node("Add", ["head_mm", "head_b"], ["logits"]),
        ]
    )
    del graph.output[:]
    graph.output.append(value("logits", TensorProto.FLOAT, ["batch", head.shape[1]]))
    return model.SerializeToString()


def flowers_frame(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "sepal_length": rng.normal(5.5, 1.0, n).astype(np.float32),
            "petals": rng.integers(0, 10, n),
            "color": rng.choice(["red", "green", "blue"], n),
        }
    )
    target = ((frame.sepal_length > 5.5).astype(int) + (frame.color == "red").astype(int)).to_numpy()
    return frame, target


def flowers_graph(zipmap: bool) -> bytes:
    """A scikit-learn pipeline with numeric and categorical features (ColumnTransformer + OneHotEncoder)."""
    frame, target = flowers_frame(300)
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), ["sepal_length", "petals"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["color"]),
        ]
    )
    pipe = Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=500))]).fit(frame, target)
    types = [
        ("sepal_length", FloatTensorType([None, 1])),
        ("petals", Int64TensorType([None, 1])),
        ("color", StringTensorType([None, 1])),
    ]
    options = {id(pipe.steps[-1][1]): {"zipmap": zipmap}}
    return convert_sklearn(pipe, initial_types=types, options=options, target_opset=17).SerializeToString()


def matrix_graph() -> bytes:
    """One [N, 3] float input, string classes, probabilities as a tensor."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
    clf = LogisticRegression().fit(x, y)
    types = [("input", FloatTensorType([None, 3]))]
    return convert_sklearn(clf, initial_types=types, options={id(clf): {"zipmap": False}}).SerializeToString()


FLOWER_FEATURES = [
    {"name": "sepal_length", "type": "number"},
    {"name": "petals", "type": "number"},
    {"name": "color", "type": "category", "categories": ["red", "green", "blue"]},
]


@pytest.fixture(scope="module")
def zoo(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("zoo")
    tokenizer = (models_dir / MINILM / "1" / "tokenizer.json").read_bytes()
    tok = {"tokenizer": {"file": "tokenizer.json", "max_length": 64}}
    publish(root, "tensors", tensor_graph(), task="tensor", limits={"max_tensor_elements": 64})
    publish(root, "adder", adder_graph(), task="tensor")
    publish(root, "fixed", fixed_graph(), task="tensor")

    table = np.random.default_rng(1).normal(size=(30522, 8)).astype(np.float32)
    for name, pooling, normalize in [("tokvec-mean", "mean", True), ("tokvec-cls", "cls", False)]:
        publish(
            root,
            name,
            token_graph(table),
            {"tokenizer.json": tokenizer},
            task="embedding",
            embedding={"pooling": pooling, "normalize": normalize},
            output={"name": "token_embeddings", "dim": 8},
            **tok,
        )
    publish(root, "tokvec-unpooled", token_graph(table), {"tokenizer.json": tokenizer}, task="embedding", **tok)

    head = np.random.default_rng(2).normal(size=(384, 3)).astype(np.float32) * 4
    bias = np.array([0.1, -0.2, 0.05], np.float32)
    classifier = text_classifier_graph(models_dir / MINILM / "1" / "model.fp32.onnx", head, bias)
    for name, cfg in [("topic3", {"activation": "softmax"}), ("topic3-multi", {"activation": "sigmoid", "top_k": 2})]:
        publish(
            root,
            name,
            classifier,
            {"tokenizer.json": tokenizer},
            task="text-classification",
            classification=cfg,
            labels=TOPICS,
            output={"name": "logits", "dim": 3},
            **tok,
        )

    weights = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32) * 3
    pre = {
        "resize": 40,
        "crop": 32,
        "resize_mode": "shorter_side",
        "channel_order": "RGB",
        "layout": "NCHW",
        "scale": 1 / 255,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    image = {"task": "image-classification", "labels": ["a", "b", "c", "d"], "output": {"name": "logits", "dim": 4}}
    limits = {"max_image_bytes": 4_000_000, "max_image_pixels": 40_000_000}
    publish(
        root,
        "tiny-image",
        image_graph(weights),
        preprocessing=pre,
        classification={"activation": "softmax", "top_k": 2},
        limits=limits,
        **image,
    )
    publish(root, "tiny-image-all", image_graph(weights), preprocessing=pre, limits=limits, **image)
    publish(root, "tiny-image-nhwc", image_graph(weights), preprocessing={**pre, "layout": "NHWC"}, **image)

    flowers = {"task": "tabular", "features": FLOWER_FEATURES, "labels": SPECIES}
    publish(root, "flowers", flowers_graph(zipmap=True), **flowers)
    tensor_outputs = {"label_output": "label", "probabilities_output": "probabilities"}
    publish(root, "flowers-tensor", flowers_graph(zipmap=False), tabular=tensor_outputs, **flowers)
    publish(
        root,
        "matrix",
        matrix_graph(),
        task="tabular",
        features=[{"name": f} for f in ("f1", "f2", "f3")],
        labels=["no", "yes"],
        tabular={**tensor_outputs, "input_mode": "matrix"},
    )
    return ModelRegistry(LocalDirSource(root), tmp_path_factory.mktemp("zoo-cache"))


def significant_digits(x: float) -> int:
    return len(repr(abs(x)).split("e")[0].replace(".", "").strip("0"))


def direct(registry: ModelRegistry, name: str) -> ort.InferenceSession:
    """The model's graph in a plain onnxruntime session: the reference every task is checked against."""
    manifest = registry.manifest(name)
    return ort.InferenceSession(registry.read_verified(manifest, manifest.variant_file()))


# ---------------------------------------------------------------------- tensor
def test_tensor_predictions_are_onnxruntime_on_the_same_inputs(zoo):
    task = zoo.task("tensors")
    assert type(task) is TensorTask and task.field == "inputs" and task.batched and task.many
    items = [
        {"x": [1.0, 2.0, 1 / 3], "ids": [1, 2, 3], "names": "a", "flag": [True, False]},
        {"x": [0.5, -1.0, 4.0], "ids": [7, 8, 9], "names": "bé", "flag": [False, False]},  # log(-1): NaN -> null
        {"inputs": {"x": [3, 4, 5], "ids": [5], "names": "c", "flag": [True, True]}},  # ints cast to float
    ]
    result = task.predict(items, strict=True)
    assert sorted(result.predictions) == [0, 1, 2] and result.errors == {}
    session = direct(zoo, "tensors")
    names = [o.name for o in session.get_outputs()]
    for i, item in enumerate(items):
        item = item.get("inputs", item)
        feed = {
            "x": np.array([item["x"]], np.float32),
            "ids": np.array([item["ids"]], np.int64),
            "names": np.array([item["names"]], dtype=object),
            "flag": np.array([item["flag"]], dtype=bool),
        }
        expected = dict(zip(names, session.run(None, feed), strict=True))
        got = result.predictions[i]
        assert list(got) == names
        assert got["y"] == round_significant(expected["y"][0]).tolist()
        assert got["total"] == round_significant(expected["total"])[0]
        assert got["next_ids"] == expected["next_ids"][0].tolist()
        assert got["echo"] == item["names"] and got["not_flag"] == expected["not_flag"][0].tolist()
    assert result.predictions[1]["log"][1] is None  # NaN: JSON has none
    assert json.loads(task.dumps(result.predictions[1]))["log"][1] is None
    assert result.predictions[0]["y"] == [3.0, 5.0, 1.666667]  # 7 significant digits


def test_tensor_rows_fail_alone(zoo):
    task = zoo.task("tensors")
    good = {"x": [1.0, 2.0, 3.0], "ids": [1], "names": "a", "flag": [True, False]}
    cases = {
        1: ({**good, "extra": [1]}, "unknown tensor(s) 'extra'; the model's inputs are 'x', 'ids', 'names', 'flag'"),
        2: ({k: v for k, v in good.items() if k != "ids"}, "missing tensor(s) 'ids'"),
        3: ({**good, "x": [1.0, 2.0]}, "tensor 'x' has shape [2]; the model takes [3] for one input"),
        4: ({**good, "x": [[1.0, 2.0, 3.0]]}, "tensor 'x' has shape [1, 3]; the model takes [3]"),
        5: ({**good, "ids": [1.5]}, "tensor 'ids' must hold integers (int64), not floats"),
        6: ({**good, "x": ["1", "2", "3"]}, "tensor 'x' must hold numbers (float), not strings"),
        7: ({**good, "ids": [[1, 2], [3]]}, "tensor 'ids' is not a rectangular array"),
        8: ({**good, "x": [1.0, float("nan"), 3.0]}, "tensor 'x' holds NaN or infinity"),
        9: ({**good, "x": [1e39, 0, 0]}, "tensor 'x' holds a value out of the float range"),
        10: ({**good, "ids": [2**63]}, "tensor 'ids' holds a value out of the int64 range"),
        11: ({**good, "ids": list(range(60))}, "the tensors hold more than 64 values; the limit is 64 per input"),
        12: ({**good, "flag": [1, 0]}, "tensor 'flag' must hold booleans, not integers"),
        13: ({**good, "names": 5}, "tensor 'names' must hold strings, not integers"),
        14: ("a text", "model 'tensors' takes objects of named tensors ({input: nested list}), not texts"),
        15: ({**good, "flag": []}, "tensor 'flag' has no elements"),  # onnxruntime may abort on an empty batch
    }
    inputs = [good] + [case for case, _ in cases.values()] + [good]
    result = task.predict(inputs)
    assert sorted(result.predictions) == [0, len(inputs) - 1]
    for i, (_, message) in cases.items():
        assert result.errors[i].startswith(message), (i, result.errors[i])
    with pytest.raises(BadInputError, match=r"^input 1: unknown tensor\(s\) 'extra'"):
        task.predict(inputs, strict=True)
    with pytest.raises(InputLimitError, match=r"^input 1: the tensors hold more than 64 values"):
        task.predict([good, cases[11][0]], strict=True)


def test_an_input_the_graph_refuses_fails_alone_and_batches_of_one_shape_run_together(zoo):
    task = zoo.task("adder")
    calls = []
    real_run = task.session.run

    def counting(names, feed):
        calls.append(feed["a"].shape)
        return real_run(names, feed)

    task.session = type("Spy", (), {"run": staticmethod(counting)})()
    inputs = [
        {"a": [1.0, 2.0], "b": [3.0, 4.0]},
        {"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]},  # 2 + 3: the graph refuses it
        {"a": [5.0, 6.0], "b": [0.5, 0.25]},
        {"a": [1.0, 2.0], "b": [7.0, 8.0, 9.0]},  # refused too, in the same batch as 1
        {"a": [2.0], "b": [1.0, 1.0, 1.0]},  # broadcast: fine
    ]
    result = task.predict(inputs)
    assert result.predictions == {0: {"sum": [4.0, 6.0]}, 2: {"sum": [5.5, 6.25]}, 4: {"sum": [3.0, 3.0, 3.0]}}
    assert sorted(result.errors) == [1, 3] and result.errors[1].startswith("the model cannot run this input: ")
    assert "ONNXRuntimeError" not in result.errors[1]
    # items of the same shapes run together: [0, 2], then [1, 3] (refused), each again alone, then [4]
    assert calls == [(2, 2), (2, 2), (1, 2), (1, 2), (1, 1)]
    with pytest.raises(BadInputError, match=r"^input 1: the model cannot run this input"):
        task.predict(inputs[:2], strict=True)


def test_a_graph_without_a_batch_axis_takes_each_input_whole(zoo):
    task = zoo.task("fixed")
    assert not task.batched
    result = task.predict([{"z": [[1, 2], [3, 4]]}, {"z": [1, 2]}])
    assert result.predictions == {0: {"zt": [[1.0, 3.0], [2.0, 4.0]]}}
    assert result.errors[1] == "tensor 'z' has shape [2]; the model takes [2, 2]"


def test_run_tensors_runs_any_model_on_typed_tensors(zoo, registry):
    model = zoo.get("tensors")
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float64)  # cast to the graph's float
    feed = {
        "x": x,
        "ids": np.array([[1, 2], [3, 4]], np.int32),
        "names": np.array(["a", "b"]),
        "flag": np.array([[True, False], [False, True]]),
    }
    out = run_tensors(model, feed)
    assert list(out) == ["y", "total", "log", "next_ids", "echo", "not_flag"]
    assert out["y"].dtype == np.float32 and np.array_equal(out["y"], x.astype(np.float32) * 2 + 1)
    assert out["next_ids"].dtype == np.int64 and out["next_ids"].tolist() == [[2, 3], [4, 5]]
    assert run_tensors(model, feed, outputs=["total"])["total"].tolist() == [6.0, 15.0]
    for bad, error, message in [
        ({**feed, "x": x[:, :2]}, BadInputError, r"tensor 'x' has shape \[2, 2\]; the model takes \[batch, 3\]$"),
        ({**feed, "ids": np.ones((2, 2), np.float32)}, BadInputError, "must hold integers"),
        ({k: v for k, v in feed.items() if k != "x"}, BadInputError, "missing tensor"),
        ({**feed, "ids": np.ones((2, 70), np.int64)}, InputLimitError, "the limit is 64 per input"),
        ({**feed, "x": np.ones((65, 3))}, InputLimitError, "65 inputs; tensors takes at most 64"),
        ({**feed, "x": np.ones((0, 3))}, BadInputError, r"tensor 'x' has no elements \(shape \[0, 3\]\)"),
    ]:
        with pytest.raises(error, match=message):
            run_tensors(model, bad)
    with pytest.raises(BadInputError, match="unknown or non-tensor output"):
        run_tensors(model, feed, outputs=["nope"])
    # ZipMap's sequence of maps is no tensor: left out
    flowers = zoo.get("flowers")
    flower_feed = {
        "sepal_length": np.array([[5.0]], np.float32),
        "petals": np.array([[3]]),
        "color": np.array([["red"]]),
    }
    assert list(run_tensors(flowers, flower_feed)) == ["output_label"]
    # and the text models: token ids in, the pooled vector out, as the embedding task gives it
    minilm = registry.get(MINILM, "fp32")
    ids = minilm.text.tokenizer.encode(["a short text"])[0].ids
    tokens = np.array([ids])
    vector = run_tensors(
        minilm, {"input_ids": tokens, "attention_mask": np.ones_like(tokens), "token_type_ids": 0 * tokens}
    )
    embedding = registry.task(MINILM, "fp32").predict(["a short text"]).predictions[0]
    assert np.array_equal(vector["sentence_embedding"][0], embedding)


def test_every_model_does_tensors(zoo, registry):
    task = zoo.task("flowers", kind="tensor")
    item = {"sepal_length": [5.0], "petals": [3], "color": ["red"]}
    prediction = task.predict([item], strict=True).predictions[0]
    session = direct(zoo, "flowers")
    label, probabilities = session.run(
        None,
        {
            "sepal_length": np.array([[5.0]], np.float32),
            "petals": np.array([[3]], np.int64),
            "color": np.array([["red"]], dtype=object),
        },
    )
    assert prediction["output_label"] == int(label[0])
    assert prediction["output_probability"] == {
        str(k): round_significant(np.array([v]))[0] for k, v in probabilities[0].items()
    }
    image = registry.task("open-nsfw", kind="tensor")
    assert image.inputs["input:0"].shape[1:] == [224, 224, 3]
    scores = image.predict([{"input:0": np.zeros((224, 224, 3)).tolist()}], strict=True).predictions[0]
    assert set(scores) == {"outputs"} and len(scores["outputs"]) == 2


# ---------------------------------------------------------------------- embedding with pooling
def test_token_output_embeddings_are_pooled_as_the_manifest_says(zoo):
    texts = ["a short text", "Le chat est assis sur le tapis.", "hello"]
    mean = zoo.task("tokvec-mean")
    cls = zoo.task("tokvec-cls")
    session = direct(zoo, "tokvec-mean")
    got_mean = mean.predict(texts, strict=True)
    got_cls = cls.predict(texts, strict=True)
    for i, text in enumerate(texts):
        ids = np.array([mean.runner.tokenizer.encode([text])[0].ids])
        (tokens,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        pooled = tokens[0].mean(axis=0)
        np.testing.assert_allclose(got_mean.predictions[i], pooled / np.linalg.norm(pooled), rtol=1e-6, atol=1e-7)
        assert np.array_equal(got_cls.predictions[i], tokens[0, 0])  # cls, not normalised: the row itself
    assert got_mean.predictions[0].dtype == np.float32 and got_mean.predictions[0].shape == (8,)
    assert got_mean.tokens == got_cls.tokens > 0


def test_padded_batches_pool_only_real_tokens(zoo):
    """The GPU path (length-sorted, padded micro-batches) gives what one text per run gives."""
    model = zoo.get("tokvec-mean")
    batched = TextEmbedder(model.session, model.text.tokenizer, model.manifest)  # no pool: padded batches
    texts = ["one", "a somewhat longer text with more tokens in it", "two words"]
    alone = model.embedder.embed(texts).vectors
    together = batched.embed(texts, max_items=8, max_tokens=4096).vectors
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-7)


def test_a_token_output_without_pooling_is_refused_at_load(zoo):
    with pytest.raises(InferenceError, match=r"one vector per token; the manifest's embedding\.pooling must say"):
        zoo.get("tokvec-unpooled")


def test_minilm_embeddings_are_bitwise_onnxruntime_one_text_a_run(registry):
    """The graph pools and normalises: the task serves its output as it is, one text per run, each row
    in its place whichever thread ran it (19 texts: three hand-offs to the run threads, the last short)."""
    task = registry.task(MINILM, "fp32")
    assert type(task) is TextEmbedding and task.runner.head is None
    texts = ["The quick brown fox", "hello", "Le chat est assis sur le tapis.", "x " * 400]
    texts += [f"sentence number {i} of a longer call" + " and more" * i for i in range(15)]
    got = task.predict(texts, strict=True).predictions
    manifest = registry.manifest(MINILM)
    session = build_session(registry.read_verified(manifest, manifest.variant_file("fp32")), threads=1)
    for i, text in enumerate(texts):
        enc = task.runner.tokenizer.encode([text])[0]
        ids = np.array([enc.ids])
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        (vector,) = session.run(["sentence_embedding"], feed)
        assert np.array_equal(got[i], vector[0])


# ---------------------------------------------------------------------- text classification
def test_text_classification_is_the_graphs_logits_through_softmax(zoo):
    task = zoo.task("topic3")
    multi = zoo.task("topic3-multi")
    assert type(task) is TextClassification and task.field == "text" and task.labels == TOPICS
    texts = ["The striker scored twice in the cup final.", "Interest rates rose again.", "Whisk the eggs.", "é"]
    result = task.predict(texts, strict=True)
    result_multi = multi.predict(texts, strict=True)
    session = direct(zoo, "topic3")
    for i, text in enumerate(texts):
        ids = np.array([task.runner.tokenizer.encode([text])[0].ids])
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        (logits,) = session.run(["logits"], feed)
        x = logits[0].astype(np.float64)
        soft = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        sig = 1 / (1 + np.exp(-x))
        p = result.predictions[i]
        order = np.argsort(-soft, kind="stable")
        assert p["labels"] == [TOPICS[j] for j in order] and p["label"] == p["labels"][0]
        np.testing.assert_allclose(p["scores"], soft[order], atol=1e-6)
        q = result_multi.predictions[i]
        top2 = np.argsort(-sig, kind="stable")[:2]
        assert q["labels"] == [TOPICS[j] for j in top2] and len(q["scores"]) == 2
        np.testing.assert_allclose(q["scores"], sig[top2], atol=1e-6)
    assert all(significant_digits(s) <= 7 for p in result.predictions.values() for s in p["scores"])
    assert result.tokens == result_multi.tokens > 0
    assert json.loads(task.dumps(result.predictions[0])) == result.predictions[0]


def test_text_classification_takes_texts_as_embedding_does(zoo):
    task = zoo.task("topic3")
    long_words = " ".join(["word"] * 200)  # over the 64-token limit: truncated, not an error
    inputs = ["fine", "", "\ud800", "x" * 2001, 7, {"b64": "aGVsbG8="}, long_words, {"text": "ok"}]
    result = task.predict(inputs)
    assert sorted(result.predictions) == [0, 6, 7] and result.truncated == [6]
    assert result.errors == {
        1: "text is empty",
        2: "text is not valid Unicode (a lone surrogate, U+D800 at character 0)",
        3: "text has 2001 characters; the limit is 2000",
        4: "model 'topic3' takes texts (strings), not int",
        5: "model 'topic3' takes texts (strings), not images",
    }
    # one text per run on CPU: a prediction does not depend on its batch-mates
    alone = task.predict(["fine"]).predictions[0]
    assert task.dumps(alone) == task.dumps(result.predictions[0])
    with pytest.raises(WrongTaskError, match="does text-classification, not embedding"):
        zoo.task("topic3", kind="embedding")
    with pytest.raises(WrongTaskError, match="not zero-shot"):
        zoo.task("topic3", labels=["a", "b"])


# ---------------------------------------------------------------------- image classification
def test_image_classification_takes_layout_activation_and_top_k_from_the_manifest(zoo):
    task = zoo.task("tiny-image")
    every = zoo.task("tiny-image-all")
    assert type(task) is ImageClassification and task.top_k == 2
    images = make_test_images()[:6]
    result = task.predict([data for _, data in images], strict=True)
    raw = every.predict([data for _, data in images], strict=True)
    session = direct(zoo, "tiny-image")
    for i, (_, data) in enumerate(images):
        array, _ = task.classifier.prepare(data)
        assert array.shape == (3, 32, 32)  # NCHW
        (logits,) = session.run(["logits"], {"pixels": array[None]})
        probs = activate(logits, "softmax")[0]
        top = np.argsort(-probs.astype(np.float64), kind="stable")[:2]
        assert list(result.predictions[i]) == [["a", "b", "c", "d"][j] for j in top]  # the two best, best first
        assert list(result.predictions[i].values()) == round_significant(probs[top]).tolist()
        # no classification section: every label in label order, the graph's values as they are
        assert raw.predictions[i] == dict(zip("abcd", round_significant(logits[0]).tolist(), strict=True))
    assert result.pixels == raw.pixels > 0


def test_an_image_graph_that_disagrees_with_the_preprocessing_is_refused_at_load(zoo):
    with pytest.raises(InferenceError, match=r"input 'pixels' is \['batch', 3, 32, 32\].*NHWC.*\['batch', 32, 32, 3\]"):
        zoo.get("tiny-image-nhwc")


# ---------------------------------------------------------------------- tabular
FLOWERS = [
    {"sepal_length": 6.1, "petals": 3, "color": "red"},
    {"sepal_length": 4.2, "petals": 0, "color": "blue"},
    {"features": {"sepal_length": 5.5, "petals": 9.0, "color": "green"}},  # the wrapped form; 9.0 is whole
    {"sepal_length": 7, "petals": 2, "color": "green"},
]


def flowers_feed(rows: list[dict]) -> dict[str, np.ndarray]:
    rows = [r.get("features", r) for r in rows]
    return {
        "sepal_length": np.array([[r["sepal_length"]] for r in rows], np.float32),
        "petals": np.array([[r["petals"]] for r in rows], np.int64),
        "color": np.array([[r["color"]] for r in rows], dtype=object),
    }


@pytest.mark.parametrize("name", ["flowers", "flowers-tensor"])
def test_tabular_predictions_are_onnxruntime_on_the_same_features(zoo, name):
    task = zoo.task(name)
    assert type(task) is TabularTask and task.field == "features"
    assert task.features == {"sepal_length": "number", "petals": "number", "color": "category"}
    result = task.predict(FLOWERS, strict=True)
    label, probabilities = direct(zoo, name).run(None, flowers_feed(FLOWERS))
    for i in range(len(FLOWERS)):
        p = result.predictions[i]
        assert p["label"] == SPECIES[int(label[i])]
        row = probabilities[i]
        values = list(row.values()) if isinstance(row, dict) else row.tolist()
        assert p["probabilities"] == dict(zip(SPECIES, round_significant(np.array(values)).tolist(), strict=True))
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert task.dumps(result.predictions[0]).startswith('{"label":"')
    assert result.inputs == 4 and result.tokens == result.pixels == 0


def test_the_zipmap_and_tensor_forms_agree(zoo):
    a = zoo.task("flowers").predict(FLOWERS).predictions
    b = zoo.task("flowers-tensor").predict(FLOWERS).predictions
    assert a == b


def test_tabular_rows_fail_alone(zoo):
    task = zoo.task("flowers")
    good = FLOWERS[0]
    cases = {
        1: ({"sepal_length": 6.1, "petals": 3}, "missing feature(s) 'color'"),
        2: (
            {**good, "colour": "red"},
            "unknown feature(s) 'colour'; the features are 'sepal_length', 'petals', 'color'",
        ),
        3: ({**good, "sepal_length": "6.1"}, "feature 'sepal_length' is a number, not a string"),
        4: ({**good, "sepal_length": True}, "feature 'sepal_length' is a number, not a boolean"),
        5: ({**good, "sepal_length": float("nan")}, "feature 'sepal_length' is nan: a feature must be a finite number"),
        6: ({**good, "sepal_length": float("inf")}, "feature 'sepal_length' is inf: a feature must be a finite number"),
        7: ({**good, "color": 3}, "feature 'color' is a category (a string), not a number"),
        8: ({**good, "color": "purple"}, "feature 'color' is 'purple', not one of 'red', 'green', 'blue'"),
        9: ({**good, "petals": 2.5}, "feature 'petals' must be a whole number (the model takes int64), not 2.5"),
        10: ({**good, "sepal_length": 1e39}, "feature 'sepal_length' is 1e+39: out of the float32 range"),
        11: ({**good, "sepal_length": None}, "feature 'sepal_length' is a number, not null"),
        12: ("a text", "model 'flowers' takes objects of named features ({feature: value}), not texts"),
        13: ([1, 2, 3], "model 'flowers' takes objects of named features ({feature: value}), not list"),
    }
    inputs = [good] + [case for case, _ in cases.values()] + [good]
    result = task.predict(inputs)
    assert sorted(result.predictions) == [0, len(inputs) - 1]
    assert result.predictions[0] == result.predictions[len(inputs) - 1]
    assert result.errors == {i: message for i, (_, message) in cases.items()}
    with pytest.raises(BadInputError, match=r"^input 1: missing feature"):
        task.predict(inputs, strict=True)
    with pytest.raises(WrongTaskError, match=r"^input 0: model 'flowers' takes objects"):
        task.predict(["a text"], strict=True)


def test_a_matrix_model_takes_the_features_in_manifest_order(zoo):
    task = zoo.task("matrix")
    rows = [{"f1": 0.5, "f2": 1.0, "f3": -2.0}, {"f3": 0.0, "f2": -3.0, "f1": 0.25}]
    result = task.predict(rows, strict=True)
    matrix = np.array([[0.5, 1.0, -2.0], [0.25, -3.0, 0.0]], np.float32)
    label, probabilities = direct(zoo, "matrix").run(None, {"input": matrix})
    assert [result.predictions[i]["label"] for i in range(2)] == label.tolist() == ["yes", "no"]
    for i in range(2):
        expected = dict(zip(["no", "yes"], round_significant(probabilities[i]).tolist(), strict=True))
        assert result.predictions[i]["probabilities"] == expected


def test_a_tabular_manifest_the_graph_does_not_match_is_refused(zoo, tmp_path):
    publish(
        tmp_path,
        "wrong",
        flowers_graph(zipmap=True),
        task="tabular",
        features=[{"name": "sepal_length"}, {"name": "petals"}, {"name": "colour", "type": "category"}],
    )
    publish(
        tmp_path,
        "typed",
        flowers_graph(zipmap=True),
        task="tabular",
        features=[*FLOWER_FEATURES[:2], {"name": "color"}],
    )
    registry = ModelRegistry(LocalDirSource(tmp_path), tmp_path / "cache")
    with pytest.raises(InferenceError, match="are not the manifest's features"):
        registry.task("wrong")
    with pytest.raises(InferenceError, match="feature 'color' is a number, the graph's input is string"):
        registry.task("typed")


# ---------------------------------------------------------------------- rows: features and inputs
def read(data: bytes, fmt: str, field: str, **kwargs: Any) -> list[Row | BadRow]:
    return list(open_rows(BytesSource(data), fmt, field, **kwargs))  # type: ignore[arg-type]


FEATURE_TYPES = {"sepal_length": "number", "petals": "number", "color": "category"}


def test_jsonl_rows_carry_features_and_inputs_objects():
    data = b"\n".join(
        json.dumps(row).encode()
        for row in [
            {"id": 1, "features": {"sepal_length": 5.1, "color": "red"}},
            {"id": 2, "features": [5.1, "red"]},
            {"id": 3, "features": {}},
            {"id": 4, "text": "no features"},
            {"id": 5, "features": "a string"},
        ]
    )
    rows = read(data, "jsonl", "features")
    assert rows[0] == Row(
        0,
        1,
        1,
        {"sepal_length": 5.1, "color": "red"},
        len(json.dumps({"id": 1, "features": {"sepal_length": 5.1, "color": "red"}})) + 1,
    )
    assert [r.error for r in rows[1:]] == [  # type: ignore[union-attr]
        "field 'features' must be an object, not an array",
        "field 'features' is empty",
        "missing field 'features'",
        "field 'features' must be an object, not a string",
    ]
    tensors = read(b'{"id": "a", "inputs": {"x": [[1, 2], [3, 4]]}}\n{"id": "b", "inputs": [1]}\n', "jsonl", "inputs")
    assert isinstance(tensors[0], Row) and tensors[0].value == {"x": [[1, 2], [3, 4]]}
    assert isinstance(tensors[1], BadRow) and tensors[1].error == "field 'inputs' must be an object, not an array"


def test_csv_columns_are_the_declared_features():
    data = (
        b"ID,Sepal_Length,color,petals,note\n"
        b"a,5.1,red,3,ignored\n"
        b"b,abc,red,3,x\n"
        b"c,5.0,,3,x\n"
        b"d,6.5,blue\n"
        b",6.5,blue,1,x\n"
        b"e, 7 ,green,nan,x\n"
    )
    rows = read(data, "csv", "features", features=FEATURE_TYPES)
    assert isinstance(rows[0], Row) and rows[0].value == {"sepal_length": 5.1, "petals": 3.0, "color": "red"}
    assert rows[0].size == len("a,5.1,red,3,ignored\n")
    assert [(r.line, r.id, r.error) for r in rows[1:5]] == [  # type: ignore[union-attr]
        (3, "b", "feature 'sepal_length' is not a number: 'abc'"),
        (4, "c", "feature 'color' is empty"),
        (5, "d", "missing feature 'petals'"),
        (6, None, "field 'id' is empty"),
    ]
    assert isinstance(rows[5], Row) and rows[5].value["sepal_length"] == 7.0  # the task refuses the NaN petals
    with pytest.raises(
        FileFormatError, match=r"no column for feature\(s\) 'petals' \(columns: id, sepal_length, color\)"
    ):
        read(b"id,sepal_length,color\na,1,red\n", "csv", "features", features=FEATURE_TYPES)
    with pytest.raises(FileFormatError, match="no 'id' column"):
        read(b"sepal_length,petals,color\n1,2,red\n", "csv", "features", features=FEATURE_TYPES)
    with pytest.raises(FileFormatError, match="tensor inputs are read from JSONL files only"):
        read(b"id,inputs\n1,[1]\n", "csv", "inputs")


def test_a_tabular_csv_file_scores_row_by_row(zoo, tmp_path):
    """A CSV batch file end to end: the file engine, the task's features, a bad cell failing its row only."""
    task = zoo.task("flowers")
    data = (
        b"id,sepal_length,petals,color\n"
        b"r1,6.1,3,red\n"
        b"r2,4.2,oops,blue\n"
        b"r3,4.2,0,blue\n"
        b"r4,5.5,2.5,green\n"
        b"r5,5.5,1,purple\n"
    )
    summary = score_file(
        BytesSource(data), "csv", TaskFileModel(task), DirSink(tmp_path), FileCheckpointStore(tmp_path / "cp")
    )
    assert (summary.succeeded, summary.failed) == (2, 3)
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    direct_result = task.predict([FLOWERS[0], FLOWERS[1]]).predictions
    assert predictions == [{"id": "r1", "prediction": direct_result[0]}, {"id": "r3", "prediction": direct_result[1]}]
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert errors == [
        {"line": 3, "id": "r2", "error": "feature 'petals' is not a number: 'oops'"},
        {"line": 5, "id": "r4", "error": "feature 'petals' must be a whole number (the model takes int64), not 2.5"},
        {"line": 6, "id": "r5", "error": "feature 'color' is 'purple', not one of 'red', 'green', 'blue'"},
    ]


def test_a_tensor_jsonl_file_scores_row_by_row(zoo, tmp_path):
    task = zoo.task("adder")
    lines = [
        {"id": 1, "inputs": {"a": [1, 2], "b": [3, 4]}},
        {"id": 2, "inputs": {"a": [1, 2], "b": [1, 2, 3]}},
        {"id": 3, "inputs": {"a": [1]}},
        {"id": 4, "text": "not tensors"},
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    summary = score_file(
        BytesSource(data), "jsonl", TaskFileModel(task), DirSink(tmp_path), FileCheckpointStore(tmp_path / "cp")
    )
    assert (summary.succeeded, summary.failed) == (1, 3)
    assert (tmp_path / "predictions.jsonl").read_text() == '{"id":1,"prediction":{"sum":[4.0,6.0]}}\n'
    errors = [json.loads(line)["error"] for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert errors[0].startswith("the model cannot run this input")
    assert errors[1:] == ["missing tensor(s) 'b'; the model's inputs are 'a', 'b'", "missing field 'inputs'"]


# ---------------------------------------------------------------------- shipped models, when built
SHIPPED = {
    "efficientnet-lite0": ("image-classification", None),
    "minilm-topic": ("text-classification", ["The striker scored twice in the cup final."]),
    "iris-species": ("tabular", [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_generic_models_load_and_predict(models_dir, registry, name):
    if not (models_dir / name / "1" / "manifest.json").is_file():
        pytest.skip(f"{name} is not built in {models_dir}")
    task_name, inputs = SHIPPED[name]
    task = registry.task(name)
    assert task.name == task_name
    inputs = inputs or [data for _, data in make_test_images()[:2]]
    result = task.predict(inputs, strict=True)
    assert result.inputs == len(inputs) and result.errors == {}
    if name == "minilm-topic":
        assert result.predictions[0]["label"] == "sports"
    elif name == "iris-species":
        assert result.predictions[0]["label"] == "setosa" and list(result.predictions[0]["probabilities"]) == SPECIES
    else:
        assert len(result.predictions[0]) == 5  # top 5
