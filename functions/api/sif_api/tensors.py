"""Typed tensors as the protocols spell them: KServe v2 datatypes and TF-Serving dtypes <-> numpy and onnx.

Pure functions (numpy in and out): a v2 request input becomes a checked numpy array (its element
count, element types and shape against the graph's), a numpy output becomes a v2 response output.
What a caller sent wrong is a BadInputError (400), with the tensor's name in the message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sif_api.schemas import TfDim, TfTensorInfo, TfTensorShape, V2RequestInput, V2ResponseOutput, V2TensorMetadata
from sif_inference.errors import BadInputError, InputLimitError
from sif_inference.manifest import TensorSpec

# onnx element type (as `tensor(float)` or `float`) -> (v2 datatype, numpy dtype, TF-Serving dtype)
ONNX_TYPES: dict[str, tuple[str, Any, str]] = {
    "bool": ("BOOL", np.bool_, "DT_BOOL"),
    "uint8": ("UINT8", np.uint8, "DT_UINT8"),
    "uint16": ("UINT16", np.uint16, "DT_UINT16"),
    "uint32": ("UINT32", np.uint32, "DT_UINT32"),
    "uint64": ("UINT64", np.uint64, "DT_UINT64"),
    "int8": ("INT8", np.int8, "DT_INT8"),
    "int16": ("INT16", np.int16, "DT_INT16"),
    "int32": ("INT32", np.int32, "DT_INT32"),
    "int64": ("INT64", np.int64, "DT_INT64"),
    "float16": ("FP16", np.float16, "DT_HALF"),
    "float": ("FP32", np.float32, "DT_FLOAT"),
    "double": ("FP64", np.float64, "DT_DOUBLE"),
    "string": ("BYTES", np.object_, "DT_STRING"),
}
V2_NUMPY: dict[str, Any] = {v2: dtype for v2, dtype, _ in ONNX_TYPES.values()}
_NUMPY_V2: dict[str, str] = {
    np.dtype(dtype).name: v2 for v2, dtype, _ in ONNX_TYPES.values() if dtype is not np.object_
}
# A request body is at most 6 MB: no tensor in it holds more elements than this (one digit and a comma each).
MAX_ELEMENTS = 3 * 1024 * 1024


def element_type(onnx_type: str) -> str:
    """`tensor(float)` -> `float` (manifest signatures may write either)."""
    inner = onnx_type.strip()
    if inner.startswith("tensor(") and inner.endswith(")"):
        inner = inner[len("tensor(") : -1]
    return inner


def is_tensor(spec: TensorSpec) -> bool:
    """A tensor of a type the protocols carry (not a sequence or a map, as skl2onnx's ZipMap outputs)."""
    return element_type(spec.dtype) in ONNX_TYPES


def v2_datatype(onnx_type: str) -> str:
    entry = ONNX_TYPES.get(element_type(onnx_type))
    if entry is None:
        raise BadInputError(f"the model has a tensor of type {onnx_type}, which the v2 protocol cannot carry")
    return entry[0]


def v2_shape(shape: Sequence[int | str | None]) -> list[int]:
    """A graph shape with -1 where an axis is dynamic (a name or None in onnx)."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def v2_metadata(spec: TensorSpec) -> V2TensorMetadata:
    return V2TensorMetadata.model_validate(
        {"name": spec.name, "datatype": v2_datatype(spec.dtype), "shape": v2_shape(spec.shape)}
    )


def tf_tensor_info(spec: TensorSpec) -> TfTensorInfo:
    entry = ONNX_TYPES.get(element_type(spec.dtype))
    dims = [TfDim(size=str(d)) for d in v2_shape(spec.shape)]
    return TfTensorInfo(dtype=entry[2] if entry else "DT_INVALID", tensor_shape=TfTensorShape(dim=dims), name=spec.name)


def flatten(data: list[Any]) -> list[Any]:
    """Nested lists in row-major order as one flat list (iterative: no recursion on deep input)."""
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _elements_are(flat: list[Any], datatype: str) -> bool:
    if datatype == "BYTES":
        return all(isinstance(x, str) for x in flat)
    if datatype == "BOOL":
        return all(isinstance(x, bool) for x in flat)
    if datatype.startswith(("INT", "UINT")):
        return all(isinstance(x, int) and not isinstance(x, bool) for x in flat)
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat)


def decode(tensor: V2RequestInput, max_elements: int | None = None) -> np.ndarray:
    """A request input as a numpy array of its datatype and shape (BadInputError if the data does not fit)."""
    name = tensor.name
    count = math.prod(tensor.shape)
    cap = min(max_elements or MAX_ELEMENTS, MAX_ELEMENTS)
    if count > cap:
        raise InputLimitError(f"input {name!r}: {count} elements; the limit is {cap}")
    if count == 0:  # onnxruntime may abort the process on an empty batch (skl2onnx graphs do)
        raise BadInputError(f"input {name!r}: shape {tensor.shape} has no elements; an input needs at least one")
    flat = flatten(tensor.data)
    if len(flat) != count:
        raise BadInputError(f"input {name!r}: shape {tensor.shape} has {count} elements, data has {len(flat)}")
    if not _elements_are(flat, tensor.datatype):
        what = "strings" if tensor.datatype == "BYTES" else f"{tensor.datatype} values"
        raise BadInputError(f"input {name!r}: data must be {what}")
    try:
        array = np.asarray(flat, dtype=V2_NUMPY[tensor.datatype])
    except (OverflowError, ValueError, TypeError) as exc:
        raise BadInputError(f"input {name!r}: a value does not fit {tensor.datatype}: {exc}") from exc
    try:
        return array.reshape(tensor.shape)
    except ValueError as exc:  # e.g. an axis numpy cannot index, with another of length 0
        raise BadInputError(f"input {name!r}: shape {tensor.shape} cannot hold the data: {exc}") from exc


def check_datatype(tensor: V2RequestInput, spec: TensorSpec) -> None:
    """The v2 datatype a request input declares is the graph input's (no silent casts between them)."""
    want = v2_datatype(spec.dtype)
    if tensor.datatype != want:
        raise BadInputError(f"input {tensor.name!r}: datatype {tensor.datatype}; the model takes {want}")


def texts(inputs: Sequence[V2RequestInput]) -> list[str]:
    """The strings of a text model's one BYTES input (shape [n] or [n, 1])."""
    if len(inputs) != 1 or inputs[0].datatype != "BYTES":
        raise BadInputError("a text model takes one BYTES input: the texts, shape [n]")
    tensor = inputs[0]
    if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise BadInputError(f"input {tensor.name!r}: shape {tensor.shape}; texts are [n] (or [n, 1])")
    return [str(x) for x in decode(tensor).reshape(-1).tolist()]


def encode(name: str, array: np.ndarray) -> V2ResponseOutput:
    """A numpy output as a v2 response output: its datatype, shape and flattened data."""
    array = np.asarray(array)
    if array.dtype == np.object_ or array.dtype.kind in "US":
        datatype = "BYTES"
        data = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in array.reshape(-1).tolist()]
    else:
        datatype = _NUMPY_V2.get(array.dtype.name, "FP64")
        if datatype == "FP64" and array.dtype.name not in _NUMPY_V2:
            array = array.astype(np.float64)
        data = array.reshape(-1).tolist()
    return V2ResponseOutput.model_validate(
        {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}
    )
