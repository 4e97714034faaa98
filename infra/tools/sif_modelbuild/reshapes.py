"""Static reshape targets: the attention's Reshape nodes get constant shapes, and their shape arithmetic goes.

A traced transformer computes each attention reshape's target at run time: `Shape` of a tensor,
`Gather` of its batch and sequence dims, `Unsqueeze`, `Concat` with the constant head sizes. That is
4-5 tiny operators per reshape, 24 reshapes in MiniLM-L6, each a kernel call per text. ONNX's Reshape
says the same thing with a constant: 0 copies a dim of the data tensor at the same index, -1 is
inferred. So a target whose computed entries are all "dim i of a tensor that has the same dim as the
data tensor at index i" (proved by symbolic shape inference, not assumed from names) becomes a
constant with 0 there, and the arithmetic that fed it, now unused, is removed.

Reshape moves no value, so the rewritten graph computes identical bytes (the build checks that).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, numpy_helper


def static_reshapes(model: ModelProto) -> tuple[ModelProto, int]:
    """A copy of `model` whose provable Reshape targets are constants; returns it and how many changed."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    dims = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input]}
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer = {o: n for n in graph.node for o in n.output}
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    changed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in consts:
            continue
        target = _static_target(node, producer, consts, dims)
        if target is None:
            continue
        name = f"{node.name or node.output[0]}_static_shape"
        graph.initializer.append(numpy_helper.from_array(np.asarray(target, dtype=np.int64), name))
        node.input[1] = name
        changed += 1
    _drop_unused(graph)
    return out, changed


def _dims(vi: onnx.ValueInfoProto) -> list[Any] | None:
    tensor = vi.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tensor.shape.dim]


def _static_target(
    node: NodeProto,
    producer: dict[str, NodeProto],
    consts: dict[str, np.ndarray],
    dims: dict[str, list[Any] | None],
) -> list[int] | None:
    """The constant equal to this Reshape's computed target, or None when that is not provable."""
    if any(a.name == "allowzero" and a.i for a in node.attribute):
        return None  # 0 would then mean a zero-sized dim, not "copy"
    concat = producer.get(node.input[1])
    data = dims.get(node.input[0])
    if concat is None or concat.op_type != "Concat" or data is None:
        return None
    target: list[int] = []
    for part in concat.input:
        if part in consts:
            values = consts[part].reshape(-1).tolist()
            if any(v == 0 for v in values):
                return None
            target.extend(int(v) for v in values)
            continue
        source = _shape_dim(part, producer, consts)
        if source is None:
            return None
        tensor, i = source
        known = dims.get(tensor)
        position = len(target)
        if known is None or i >= len(known) or position >= len(data) or known[i] is None:
            return None
        if known[i] != data[position]:  # a symbol (or size) the data tensor does not have at that index
            return None
        target.append(0)
    if target.count(-1) > 1:
        return None
    return target


def _shape_dim(name: str, producer: dict[str, NodeProto], consts: dict[str, np.ndarray]) -> tuple[str, int] | None:
    """(tensor, i) when `name` is Unsqueeze(Gather(Shape(tensor), i)) giving one entry, else None."""
    unsqueeze = producer.get(name)
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    gather = producer.get(unsqueeze.input[0])
    if gather is None or gather.op_type != "Gather" or gather.input[1] not in consts:
        return None
    index = consts[gather.input[1]]
    shape = producer.get(gather.input[0])
    if index.ndim != 0 or shape is None or shape.op_type != "Shape" or shape.attribute:
        return None  # a Shape with start/end slices its dims: not handled
    return shape.input[0], int(index)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is used (repeatedly), and initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = outputs | {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
