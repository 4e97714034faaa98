"""The int8 build's integer products are exact on this CPU, so its vectors do not depend on the CPU.

onnxruntime multiplies u8 activations by s8 weights; on x86 without VNNI (AVX2) it sums pairs of
products in 16 bits, which saturate when weights use the full 8-bit range. The build quantizes weights
to 7 bits (sif_modelbuild.minilm.REDUCE_RANGE), where no pair sum can saturate.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def integer_matmul(weights: np.ndarray) -> ort.InferenceSession:
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [None, weights.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [None, weights.shape[1]])
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g", [a], [y], [numpy_helper.from_array(weights, "b")]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_7_bit_weights_multiply_exactly_even_at_the_extremes():
    rng = np.random.default_rng(0)
    activations = rng.integers(200, 256, size=(8, 384), dtype=np.uint8)  # large u8 values, as after a ReLU/GELU
    weights = np.where(rng.random((384, 64)) < 0.5, -64, 64).astype(np.int8)  # the extremes the build writes
    got = integer_matmul(weights).run(None, {"a": activations})[0]
    np.testing.assert_array_equal(got, activations.astype(np.int32) @ weights.astype(np.int32))


def test_the_built_int8_model_has_7_bit_weights(models_dir: Path):
    model = onnx.load(str(models_dir / "all-minilm-l6-v2" / "1" / "model.int8.onnx"))
    quantized = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == TensorProto.INT8 and t.name.endswith("_quantized")
    ]
    assert len(quantized) == 36  # every weight MatMul
    assert all(w.min() >= -64 and w.max() <= 64 for w in quantized)  # symmetric, 7 bits: 255 * 64 * 2 < 2**15
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in quantized) >= 60  # the range is used, not shrunk
