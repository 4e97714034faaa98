"""SmoothQuant for dynamic int8: move activation outliers into the weights before quantizing.

Dynamic quantization gives each MatMul's activations one int8 scale per tensor, so a few channels
with large values (BERT's outlier features) squeeze every other channel into a few int8 steps.
For a MatMul X @ W with a constant W [K, N], scaling input channel j by 1 / s_j and W's row j by
s_j is exact in real numbers: X @ W = (X / s) @ (diag(s) W). With

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)

(Xiao et al., 2023) the activation's channels come out nearly level and the weights, quantized per
output channel, take the spread. The maxima of X come from running the fp32 graph on calibration
inputs. MatMuls that read the same X share one s (their weights are scaled alike) and one Mul node.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnx is imported where a model is built
    from onnx import ModelProto, NodeProto

MIN_SCALE, MAX_SCALE = 1e-3, 1e3  # a channel that is ~0 everywhere must not blow up its weights


def weight_matmuls(model: ModelProto) -> dict[str, list[NodeProto]]:
    """MatMul nodes with a constant 2-D weight, grouped by the activation tensor they read."""
    graph = model.graph
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    groups: dict[str, list[NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            groups[node.input[0]].append(node)
    return dict(groups)


def activation_maxima(
    model: ModelProto, names: list[str], feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """max |value| per last-axis channel of each named tensor, over every run of `feeds` (fp32 graph)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by name
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, dict(feed)), strict=True):
            channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], channel_max) if name in maxima else channel_max
    if len(maxima) != len(names):
        raise ValueError("no calibration inputs")
    return maxima


def smooth(model: ModelProto, maxima: Mapping[str, np.ndarray], alpha: float) -> int:
    """Rewrite `model` in place: a Mul by 1/s before each group of weight MatMuls, their weights x s.

    Returns how many MatMuls were smoothed."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    smoothed = 0
    for activation, nodes in weight_matmuls(model).items():
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        weight_max = np.concatenate([np.abs(w) for w in weights], axis=1).max(axis=1)
        scale = np.power(maxima[activation], alpha) / np.power(np.maximum(weight_max, 1e-8), 1.0 - alpha)
        scale = np.clip(scale, MIN_SCALE, MAX_SCALE).astype(np.float32)
        for node, weight in zip(nodes, weights, strict=True):
            name = node.input[1]
            initializers[name].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), name))
        inverse, smoothed_name = f"{activation}/smooth_inverse", f"{activation}/smoothed"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
        for node in nodes:
            node.input[0] = smoothed_name
        first = min(i for i, n in enumerate(graph.node) if n.input and smoothed_name in n.input)
        mul = helper.make_node("Mul", [activation, inverse], [smoothed_name], name=f"{activation}/Smooth")
        graph.node.insert(first, mul)
        smoothed += len(nodes)
    return smoothed
