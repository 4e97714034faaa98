"""Raw named tensors in and out: the `tensor` task (any model) and `run_tensors` (KServe v2).

An input of the tensor task is one item: `{input_name: nested list (or a scalar)}` for every graph
input, without the batch axis: the task adds it, and items of the same shapes run together. Values
are cast to the graph's element types (float, double, float16, int8-64, uint8-64, bool, string),
checked against its shapes (rank and fixed dims) and bounded by `limits.max_tensor_elements` per
item (all its tensors together). The prediction is `{output_name: nested list}` for every graph
output, floats at 7 significant digits, NaN and infinity as null (JSON has neither); a
sequence-of-maps output (skl2onnx's ZipMap) is an object per item.

A graph whose inputs do not all have a batch axis (rank >= 1, first axis dynamic or 1) takes an item
as its whole feed, run alone, and gives its outputs whole. An item the graph refuses (dims that must
agree and do not, say) fails alone: a batch it spoils is run again one item at a time.

`run_tensors` is the same for whole tensors, batch axis included, as KServe v2's infer sends them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from sif_inference.batching import iter_batch
from sif_inference.errors import BadInputError, InputLimitError, WrongTaskError
from sif_inference.manifest import Signature, TensorSpec
from sif_inference.rounding import round_significant
from sif_inference.taskbase import BatchProfile, RawOutput, Task, kind_of, name_list, objects, unwrap

if TYPE_CHECKING:
    import onnxruntime as ort

    from sif_inference.registry import LoadedModel

# onnx element type -> numpy dtype: what the tensor task and run_tensors cast values to
DTYPES: dict[str, Any] = {
    "float": np.float32,
    "double": np.float64,
    "float16": np.float16,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "string": np.object_,
}
DEFAULT_MAX_ELEMENTS = 1_000_000  # per item, when the manifest sets no limits.max_tensor_elements
# Tensor rows are large (a JSONL line may be megabytes): few per window, a handful per run.
TENSOR = BatchProfile(window_rows=64, max_items=16)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_KINDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "strings", "O": "mixed values"}


# ---------------------------------------------------------------------- the graph's signature
def onnx_type(ort_type: str) -> str:
    """onnxruntime's `tensor(float)` -> `float`; other types (sequences, maps) as onnxruntime writes them."""
    match = re.fullmatch(r"tensor\((\w+)\)", ort_type)
    return match.group(1) if match else ort_type


def _dim(d: object) -> int | str | None:
    if isinstance(d, int):
        return d if d >= 0 else None
    return d if isinstance(d, str) else None


def _spec(arg: Any) -> TensorSpec:
    shape = arg.shape if isinstance(arg.shape, list) else []
    return TensorSpec(name=arg.name, dtype=onnx_type(arg.type), shape=[_dim(d) for d in shape])


def graph_signature(session: ort.InferenceSession) -> Signature:
    """The graph's inputs and outputs as the manifest's `signature` writes them."""
    return Signature(inputs=[_spec(a) for a in session.get_inputs()], outputs=[_spec(a) for a in session.get_outputs()])


def has_batch_axis(spec: TensorSpec) -> bool:
    return bool(spec.shape) and (not isinstance(spec.shape[0], int) or spec.shape[0] == 1)


def _shape_text(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# ---------------------------------------------------------------------- values -> typed arrays
def as_array(name: str, value: Any, spec: TensorSpec) -> np.ndarray:
    """`value` (nested lists, a scalar or an array) as the graph's element type, or a BadInputError."""
    dtype = DTYPES.get(spec.dtype)
    if dtype is None:
        raise WrongTaskError(f"tensor {name!r} is a {spec.dtype}; raw tensors are numbers, booleans or strings")
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError, RecursionError) as exc:
        raise BadInputError(f"tensor {name!r} is not a rectangular array (rows of different lengths?)") from exc
    if arr.size == 0:  # onnxruntime may abort the whole process on an empty batch (skl2onnx graphs do)
        raise BadInputError(f"tensor {name!r} has no elements (shape {list(arr.shape)})")
    kind = arr.dtype.kind
    what = _KINDS.get(kind, str(arr.dtype))
    if spec.dtype == "string":
        if kind == "U" or (kind == "O" and all(isinstance(v, str) for v in arr.flat)):
            return arr.astype(object)
        raise BadInputError(f"tensor {name!r} must hold strings, not {what}")
    if spec.dtype == "bool":
        if kind != "b":
            raise BadInputError(f"tensor {name!r} must hold booleans, not {what}")
        return arr
    if np.issubdtype(dtype, np.integer):
        if kind not in "iu":
            raise BadInputError(f"tensor {name!r} must hold integers ({spec.dtype}), not {what}")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BadInputError(f"tensor {name!r} holds a value out of the {spec.dtype} range")
        return arr.astype(dtype, copy=False)
    if kind not in "iuf":
        raise BadInputError(f"tensor {name!r} must hold numbers ({spec.dtype}), not {what}")
    with np.errstate(over="ignore"):  # a value past the type's range becomes inf: refused below
        out = arr.astype(dtype, copy=False)
    if out.size and not np.isfinite(out).all():
        if kind == "f" and not np.isfinite(arr).all():
            raise BadInputError(f"tensor {name!r} holds NaN or infinity")
        raise BadInputError(f"tensor {name!r} holds a value out of the {spec.dtype} range")
    return out


def check_shape(name: str, arr: np.ndarray, shape: Sequence[int | str | None], *, item: bool) -> None:
    """Rank and fixed dims as the graph declares them (`item`: without the batch axis)."""
    if arr.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, arr.shape, strict=False)):
        one = " for one input (the batch axis is added)" if item else ""
        raise BadInputError(f"tensor {name!r} has shape {list(arr.shape)}; the model takes {_shape_text(shape)}{one}")


def check_names(given: Sequence[str], specs: Mapping[str, TensorSpec]) -> None:
    unknown = [n for n in given if n not in specs]
    if unknown:
        raise BadInputError(f"unknown tensor(s) {name_list(unknown)}; the model's inputs are {name_list(list(specs))}")
    missing = [n for n in specs if n not in given]
    if missing:
        raise BadInputError(f"missing tensor(s) {name_list(missing)}; the model's inputs are {name_list(list(specs))}")


@cache
def _ort_errors() -> tuple[type[Exception], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.RuntimeException)


def _ort_message(exc: Exception) -> str:
    return _ORT_PREFIX.sub("", str(exc)).strip()[:300]


# ---------------------------------------------------------------------- arrays -> JSON
def json_value(value: Any) -> Any:
    """An output value as JSON-able values: floats at 7 significant digits, NaN and infinity as null."""
    if isinstance(value, np.ndarray | np.generic):
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            rounded = round_significant(arr.reshape(-1)).reshape(arr.shape)  # 0-d arrays too
            finite = np.isfinite(rounded)
            if finite.all():
                return rounded.tolist()
            cells = rounded.astype(object)
            cells[~finite] = None
            return cells.tolist()
        if arr.dtype.kind == "O":
            return json_value(arr.tolist())
        return arr.tolist()
    if isinstance(value, float):
        return json_value(np.float64(value))
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


def _per_item(value: Any, n: int) -> list[Any] | None:
    """An output split along its batch axis (None: it has none of `n` items)."""
    if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == n:
        return list(value)
    if isinstance(value, list) and len(value) == n:
        return value
    return None


# ---------------------------------------------------------------------- the task
@dataclass(frozen=True)
class TensorItem:
    arrays: dict[str, np.ndarray]  # one per graph input, in the graph's order, without the batch axis
    key: tuple[tuple[int, ...], ...]  # their shapes: items with the same key run together


class TensorTask(Task):
    """Raw named tensors in and out, on any model (see the module's docstring)."""

    name = "tensor"
    model_task = None  # every model: KServe v2 serves each one on raw tensors
    field = "inputs"
    cpu_profile = TENSOR
    gpu_profile = TENSOR

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        super().__init__(model, profile=profile)
        self.session = model.session
        signature = model.signature or graph_signature(model.session)
        self.inputs = {s.name: s for s in signature.inputs}
        self.outputs = [s.name for s in signature.outputs]
        self.max_elements = self.manifest.limits.max_tensor_elements or DEFAULT_MAX_ELEMENTS
        self.batched = bool(self.inputs) and all(has_batch_axis(s) for s in self.inputs.values())
        # a first axis fixed at 1 takes one item per run; a dynamic one takes many
        self.many = self.batched and all(not isinstance(s.shape[0], int) for s in self.inputs.values())

    def prepare(self, raw: Any) -> TensorItem:
        values = unwrap(raw, "inputs", self.inputs)
        if not isinstance(values, dict):
            raise WrongTaskError(
                f"model {self.manifest.name!r} takes objects of named tensors ({{input: nested list}}), "
                f"not {kind_of(raw)}"
            )
        check_names(list(values), self.inputs)
        arrays: dict[str, np.ndarray] = {}
        total = 0
        for name, spec in self.inputs.items():
            arr = as_array(name, values[name], spec)
            check_shape(name, arr, spec.shape[1:] if self.batched else spec.shape, item=self.batched)
            total += arr.size
            if total > self.max_elements:
                raise InputLimitError(
                    f"the tensors hold more than {self.max_elements} values; the limit is {self.max_elements} per input"
                )
            arrays[name] = arr
        return TensorItem(arrays, tuple(a.shape for a in arrays.values()))

    def run(self, items: list[Any]) -> RawOutput:
        results: list[Any] = [None] * len(items)
        errors: dict[int, str] = {}
        groups: dict[object, list[int]] = {}
        for k, item in enumerate(items):
            groups.setdefault(item.key if self.many else k, []).append(k)
        for positions in groups.values():
            for chunk in iter_batch(positions, self.profile.max_items):
                self._run(items, chunk, results, errors)
        return RawOutput(objects(results), errors=errors)

    def _run(self, items: list[TensorItem], chunk: list[int], results: list[Any], errors: dict[int, str]) -> None:
        if self.batched:
            feed = {name: np.stack([items[k].arrays[name] for k in chunk]) for name in self.inputs}
        else:
            feed = items[chunk[0]].arrays
        try:
            outs = self.session.run(self.outputs, feed)
        except _ort_errors() as exc:
            if len(chunk) > 1:  # one item spoilt the batch: each runs alone, the bad one fails alone
                for k in chunk:
                    self._run(items, [k], results, errors)
                return
            errors[chunk[0]] = f"the model cannot run this input: {_ort_message(exc)}"
            return
        if not self.batched:
            results[chunk[0]] = dict(zip(self.outputs, outs, strict=True))
            return
        split = [_per_item(out, len(chunk)) for out in outs]
        if len(chunk) > 1 and any(s is None for s in split):  # an output that is not per item: one at a time
            for k in chunk:
                self._run(items, [k], results, errors)
            return
        for j, k in enumerate(chunk):
            results[k] = {
                name: out if parts is None else parts[j]
                for name, out, parts in zip(self.outputs, outs, split, strict=True)
            }

    def prediction(self, row: Any) -> dict[str, Any]:
        return {name: json_value(value) for name, value in row.items()}


# ---------------------------------------------------------------------- KServe v2
def run_tensors(
    model: LoadedModel, tensors: Mapping[str, Any], *, outputs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Run `model` on whole tensors (batch axis included, as KServe v2 sends them), with the tensor
    task's checks: names, element types (cast to the graph's), rank and fixed dims, at most
    `limits.max_inputs` items along the batch axis and `limits.max_tensor_elements` values per item.

    Returns the graph's tensor outputs (or those named in `outputs`), in the graph's order; outputs
    that are not tensors (skl2onnx's ZipMap) are left out, as KServe v2 carries tensors only."""
    signature = model.signature or graph_signature(model.session)
    specs = {s.name: s for s in signature.inputs}
    check_names(list(tensors), specs)
    limits = model.manifest.limits
    arrays = {}
    for name, spec in specs.items():
        arr = as_array(name, tensors[name], spec)
        check_shape(name, arr, spec.shape, item=False)
        arrays[name] = arr
    batched = bool(specs) and all(has_batch_axis(s) for s in specs.values())
    count = max((a.shape[0] for a in arrays.values()), default=1) if batched else 1
    if count > limits.max_inputs:
        raise InputLimitError(f"{count} inputs; {model.manifest.name} takes at most {limits.max_inputs} per call")
    cap = (limits.max_tensor_elements or DEFAULT_MAX_ELEMENTS) * max(count, 1)
    if sum(a.size for a in arrays.values()) > cap:
        raise InputLimitError(f"the tensors hold more than {cap} values; the limit is {cap // max(count, 1)} per input")
    tensor_outputs = [s.name for s in signature.outputs if s.dtype in DTYPES]
    wanted = list(outputs) if outputs else tensor_outputs
    refused = [n for n in wanted if n not in tensor_outputs]
    if refused:
        raise BadInputError(
            f"unknown or non-tensor output(s) {name_list(refused)}; the tensor outputs are {name_list(tensor_outputs)}"
        )
    try:
        values = model.session.run(wanted, arrays)
    except _ort_errors() as exc:
        raise BadInputError(f"the model cannot run these tensors: {_ort_message(exc)}") from exc
    return {name: np.asarray(value) for name, value in zip(wanted, values, strict=True)}
