"""Constant reshape targets (sif_modelbuild.reshapes): rewritten only where provable, same bytes out."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sif_modelbuild.reshapes import static_reshapes

SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat"}


def heads_reshape(dims_from: str) -> onnx.ModelProto:
    """y = x + b reshaped to [d0, d1, -1, 32], with d0, d1 read at run time from `dims_from`'s shape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 64])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "other", 64])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    consts = [
        numpy_helper.from_array(np.linspace(-1, 1, 64, dtype=np.float32), "b"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "i0"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "i1"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
        numpy_helper.from_array(np.array([32], dtype=np.int64), "head"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "b"], ["y"]),
        helper.make_node("Shape", [dims_from], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["g0"]),
        helper.make_node("Gather", ["s", "i1"], ["g1"]),
        helper.make_node("Unsqueeze", ["g0", "axes"], ["u0"]),
        helper.make_node("Unsqueeze", ["g1", "axes"], ["u1"]),
        helper.make_node("Concat", ["u0", "u1", "minus_one", "head"], ["target"], axis=0),
        helper.make_node("Reshape", ["y", "target"], ["out"]),
    ]
    inputs = [x, z] if dims_from == "z" else [x]
    graph = helper.make_graph(nodes, "g", inputs, [out], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_a_target_built_from_the_data_tensors_own_dims_becomes_a_constant_with_the_same_bytes():
    model = heads_reshape("x")
    static, changed = static_reshapes(model)
    assert changed == 1
    reshape = next(n for n in static.graph.node if n.op_type == "Reshape")
    target = {t.name: numpy_helper.to_array(t) for t in static.graph.initializer}[reshape.input[1]]
    assert target.tolist() == [0, 0, -1, 32]  # 0: the data's own dim at that index
    assert not SHAPE_OPS & {n.op_type for n in static.graph.node}  # the arithmetic that fed it is gone
    rng = np.random.default_rng(0)
    for shape in [(1, 5, 64), (3, 2, 64), (2, 17, 64)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = run(static, {"x": x}), run(model, {"x": x})
        assert got.shape == (shape[0], shape[1], 2, 32)
        np.testing.assert_array_equal(got, want)


def test_dims_of_another_tensor_are_left_computed():
    # z's second dim is another symbol: [0, 0, -1, 32] would copy x's, a different shape.
    model = heads_reshape("z")
    static, changed = static_reshapes(model)
    assert changed == 0
    assert [n.op_type for n in static.graph.node] == [n.op_type for n in model.graph.node]
    x = np.ones((2, 4, 64), dtype=np.float32)
    z = np.ones((2, 8, 64), dtype=np.float32)
    assert run(static, {"x": x, "z": z}).shape == (2, 8, 1, 32)


def test_the_built_minilm_graphs_have_static_attention_reshapes(models_dir: Path):
    for variant in ("model.fp32.onnx", "model.int8.onnx"):
        graph = onnx.load(str(models_dir / "all-minilm-l6-v2" / "1" / variant)).graph
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        reshapes = [n for n in graph.node if n.op_type == "Reshape"]
        static = [initializers[n.input[1]].tolist() for n in reshapes if n.input[1] in initializers]
        # Six layers, each: query, key and value split into heads, and the heads joined again.
        assert sorted(static).count([0, 0, -1, 32]) == 18
        assert sorted(static).count([0, 0, -1]) == 6
        assert sum(n.op_type == "Concat" for n in graph.node) <= 2  # 14 when traced (attention and mask)
