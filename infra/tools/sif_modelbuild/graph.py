"""An ONNX file as the publisher reads it: parsed, checked, loadable by this onnxruntime, its signature.

Each refusal is a PublishError that says what is wrong with the file, raised before anything is
written: not ONNX at all, a graph the ONNX checker rejects, tensors kept in external data files (sif
builds sessions from the bytes it verified), or a graph this onnxruntime cannot load (an operator or
an opset it lacks). What loads here loads in Lambda: the layer pins the same onnxruntime.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sif_inference.manifest import Signature, TensorSpec
from sif_inference.tensors import graph_signature
from sif_modelbuild.errors import PublishError

# The ONNX-ML operators that make a graph a classical (tabular) model.
ML_DOMAIN = "ai.onnx.ml"
QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"}
)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")
_ORT_SOURCE = re.compile(r"^/\S+:\d+ [^(]*\([^)]*\)(?: const)? ")
NUMPY_DTYPES: dict[str, Any] = {
    "float": np.float32,
    "double": np.float64,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "string": np.str_,
}


@dataclass
class Graph:
    """One ONNX file, checked and loadable: its bytes (what is hashed and published) and what it declares."""

    path: Path
    data: bytes
    signature: Signature
    ops: set[tuple[str, str]] = field(default_factory=set)  # (domain, op_type) of every node
    attributes: dict[str, list[tuple[list[str], dict[str, Any]]]] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)  # tensor -> the non-constant inputs of its node
    session: Any = None  # an onnxruntime session on CPU, one thread (shape probes; never served)

    @property
    def sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.data).hexdigest()

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.signature.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.signature.outputs if t.name == name), None)

    def has_ml_ops(self) -> bool:
        return any(domain == ML_DOMAIN for domain, _ in self.ops)

    def quantized(self) -> bool:
        return any(op in QUANTIZED_OPS for _, op in self.ops)

    def nodes(self, op_type: str) -> list[tuple[list[str], dict[str, Any]]]:
        """(inputs, attributes) of every node of `op_type`."""
        return self.attributes.get(op_type, [])

    def source_input(self, tensor: str, limit: int = 16) -> str | None:
        """The graph input a tensor is computed from, following nodes that have one non-constant input."""
        inputs = {t.name for t in self.signature.inputs}
        for _ in range(limit):
            if tensor in inputs:
                return tensor
            parents = self.producers.get(tensor)
            if not parents or len(parents) != 1:
                return None
            tensor = parents[0]
        return None

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        names = [o.name for o in self.signature.outputs]
        return dict(zip(names, self.session.run(names, feed), strict=True))


def ort_message(exc: BaseException) -> str:
    """onnxruntime's error without its code prefix and C++ source location."""
    text = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", str(exc).strip()))
    return text.splitlines()[0] if text else type(exc).__name__


def dim(value: int | str | None) -> int | None:
    """A fixed axis length, or None where the axis is dynamic (named or unknown)."""
    return value if isinstance(value, int) and value > 0 else None


def load_graph(path: Path, data: bytes | None = None) -> Graph:
    """Parse, check and load `path`; a PublishError says why a file cannot be served."""
    import onnx
    import onnxruntime as ort
    from google.protobuf.message import DecodeError

    data = path.read_bytes() if data is None else data
    label = path.name
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise PublishError(f"{label} is not an ONNX model: it does not parse as an ONNX protobuf ({exc})") from exc
    if not model.graph.node or not model.graph.output or not model.opset_import:
        raise PublishError(f"{label} is not an ONNX model: it has no graph (no nodes, outputs or opset)")
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise PublishError(
                f"{label} keeps its weights in external data files; save the model with every tensor inside "
                "the .onnx file (onnx.save(model, path, save_as_external_data=False), under 2 GB)"
            )
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PublishError(f"{label} is not a valid ONNX model: {first}") from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors derive from Exception only
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        raise PublishError(
            f"{label}: onnxruntime {ort.__version__} cannot load this graph (opsets: {opsets}): {ort_message(exc)}"
        ) from exc
    signature = graph_signature(session)  # as the registry reads it when it serves the model
    constants = {t.name for t in model.graph.initializer}
    graph = Graph(path=path, data=data, signature=signature, session=session)
    for node in model.graph.node:
        graph.ops.add((node.domain, node.op_type))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.type != a.GRAPH}
        graph.attributes.setdefault(node.op_type, []).append((list(node.input), attrs))
        parents = [i for i in node.input if i and i not in constants]
        for out in node.output:
            graph.producers[out] = parents
    return graph


def variant_name(graph: Graph) -> str:
    """A name for a graph's variant when the publisher gives none: int8, fp16 or fp32."""
    if graph.quantized():
        return "int8"
    if any(t.dtype == "float16" for t in graph.signature.inputs):
        return "fp16"
    return "fp32"


def same_interface(a: Graph, b: Graph) -> str | None:
    """Why two variants cannot stand in for each other (inputs and outputs by name and type), or None."""
    for kind, left, right in (
        ("inputs", a.signature.inputs, b.signature.inputs),
        ("outputs", a.signature.outputs, b.signature.outputs),
    ):
        lhs = sorted((t.name, t.dtype, len(t.shape)) for t in left)
        rhs = sorted((t.name, t.dtype, len(t.shape)) for t in right)
        if lhs != rhs:
            return f"{kind} differ: {lhs} vs {rhs}"
    return None
