"""SmoothQuant's rewrite (sif_modelbuild.smoothing) is exact in fp32 and levels the activations."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sif_modelbuild import smoothing


def graph_with_outliers(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Relu -> h; h @ Wq and h @ Wk (one shared activation), h @ Wq -> Tanh -> t @ Wo."""
    wq, wk = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(8, 6)).astype(np.float32)
    wo = rng.normal(size=(6, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
        helper.make_node("Tanh", ["q"], ["t"]),
        helper.make_node("MatMul", ["t", "wo"], ["o"], name="o"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, d]) for n, d in (("k", 6), ("o", 4))],
        [numpy_helper.from_array(w, n) for w, n in ((wq, "wq"), (wk, "wk"), (wo, "wo"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"x": x})


def test_smoothing_is_exact_in_fp32_and_shares_one_scale_per_activation() -> None:
    rng = np.random.default_rng(7)
    model = graph_with_outliers(rng)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    x[:, 3] *= 60.0  # an outlier channel, as BERT's activations have
    before = run(model, x, ["k", "o"])

    groups = smoothing.weight_matmuls(model)
    assert {a: [n.name for n in ns] for a, ns in groups.items()} == {"h": ["q", "k"], "t": ["o"]}
    maxima = smoothing.activation_maxima(model, list(groups), [{"x": x[:8]}, {"x": x[8:]}])
    np.testing.assert_allclose(maxima["h"], np.maximum(x, 0).max(0), rtol=1e-6)

    assert smoothing.smooth(model, maxima, 0.8) == 3
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("Mul") == 2  # one per activation, not per MatMul
    after = run(model, x, ["k", "o"])
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-4)
    # the outlier channel no longer dominates what the int8 activation scale must cover
    spread_before = maxima["h"].max() / np.median(maxima["h"])
    smoothed_max = smoothing.activation_maxima(model, ["h/smoothed"], [{"x": x}])["h/smoothed"]
    assert smoothed_max.max() / np.median(smoothed_max) < spread_before / 5
