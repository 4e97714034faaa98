"""Tabular models: an object of named features per input, checked against the manifest's `features`.

An input is `{"sepal_length": 5.1, "color": "red", ...}` (or `{"features": {...}}`): every declared
feature, no other, numbers as JSON numbers (finite), categories as strings (one of `categories`
when the manifest lists them). A bad input fails alone with a BadInputError that names the feature.

The graph takes them as `tabular.input_mode` says: "named", one [N, 1] tensor per feature, typed
as the graph's input of that name (float, double, int64, int32 or string: skl2onnx's way), or
"matrix", one [N, F] float tensor in the manifest's feature order.

The prediction is `{"label": ..., "probabilities": {label: p, ...}}` from the graph's
`tabular.label_output` and `tabular.probabilities_output` (a [N, C] tensor, or skl2onnx's ZipMap
sequence of maps). Class k is `labels[k]` when the graph's classes are integers and the manifest
has labels; otherwise the graph's own class (a string, or the integer). No probabilities output
(a regressor): `{"label": value}`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from sif_inference.batching import iter_batch
from sif_inference.errors import BadInputError, InferenceError, WrongTaskError
from sif_inference.manifest import FeatureSpec, TabularConfig
from sif_inference.rounding import round_significant
from sif_inference.taskbase import BatchProfile, RawOutput, Task, json_type, kind_of, name_list, objects, unwrap
from sif_inference.tensors import graph_signature

if TYPE_CHECKING:
    from sif_inference.registry import LoadedModel

# Rows are a few numbers: wide windows, wide runs.
TABULAR = BatchProfile(window_rows=2048, max_items=1024)
FLOAT32_MAX = float(np.finfo(np.float32).max)
NUMBER_INPUTS = {"float": np.float32, "double": np.float64, "int64": np.int64, "int32": np.int32}


class TabularTask(Task):
    """A label (and class probabilities) per object of named features (see the module's docstring)."""

    name = "tabular"
    model_task = "tabular"
    field = "features"
    cpu_profile = TABULAR
    gpu_profile = TABULAR

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        super().__init__(model, profile=profile)
        manifest = self.manifest
        if not manifest.features:
            raise InferenceError(f"model {manifest.name!r}: a tabular model declares its features in the manifest")
        self.session = model.session
        self.specs: dict[str, FeatureSpec] = {f.name: f for f in manifest.features}
        self.kinds: dict[str, str] = {f.name: f.type for f in manifest.features}
        self.features = self.kinds  # what a CSV file's columns are read as
        self.cfg = manifest.tabular or TabularConfig()
        self.labels = list(manifest.labels)
        signature = model.signature or graph_signature(model.session)
        inputs = {s.name: s.dtype for s in signature.inputs}
        self.dtypes = self._input_types(inputs)  # per graph input
        matrix = self.cfg.input_mode == "matrix"
        self.feature_dtypes = {f: next(iter(self.dtypes.values())) if matrix else self.dtypes[f] for f in self.specs}
        self._int_bounds = {
            f: (int(np.iinfo(d).min), int(np.iinfo(d).max))
            for f, d in self.feature_dtypes.items()
            if d is not object and np.issubdtype(d, np.integer)
        }
        outputs = {s.name: s for s in signature.outputs}
        self.outputs = [self.cfg.label_output]
        if self.cfg.probabilities_output is not None:
            self.outputs.append(self.cfg.probabilities_output)
        missing = [o for o in self.outputs if o not in outputs]
        if missing:
            raise InferenceError(
                f"{manifest.name}: the graph has no output {name_list(missing)}; it has {name_list(list(outputs))}"
            )

    def _input_types(self, inputs: dict[str, str]) -> dict[str, Any]:
        """numpy dtype per graph input; a graph that cannot take the declared features is refused at load."""
        name = self.manifest.name
        if self.cfg.input_mode == "matrix":
            categories = [f for f, kind in self.kinds.items() if kind == "category"]
            if len(inputs) != 1 or next(iter(inputs.values())) not in ("float", "double") or categories:
                raise InferenceError(f"{name}: matrix input needs one float input and number features only")
            ((graph_input, dtype),) = inputs.items()
            return {graph_input: NUMBER_INPUTS[dtype]}
        unknown = [i for i in inputs if i not in self.specs]
        absent = [f for f in self.specs if f not in inputs]
        if unknown or absent:
            raise InferenceError(
                f"{name}: the graph's inputs ({name_list(list(inputs))}) are not the manifest's features "
                f"({name_list(list(self.specs))})"
            )
        dtypes: dict[str, Any] = {}
        for feature, kind in self.kinds.items():
            dtype = inputs[feature]
            if (kind == "number" and dtype not in NUMBER_INPUTS) or (kind == "category" and dtype != "string"):
                raise InferenceError(f"{name}: feature {feature!r} is a {kind}, the graph's input is {dtype}")
            dtypes[feature] = object if dtype == "string" else NUMBER_INPUTS[dtype]
        return dtypes

    # ------------------------------------------------------------------ inputs
    def prepare(self, raw: Any) -> list[Any]:
        values = unwrap(raw, "features", self.specs)
        if not isinstance(values, dict):
            raise WrongTaskError(
                f"model {self.manifest.name!r} takes objects of named features ({{feature: value}}), not {kind_of(raw)}"
            )
        unknown = [k for k in values if k not in self.specs]
        if unknown:
            raise BadInputError(
                f"unknown feature(s) {name_list(unknown)}; the features are {name_list(list(self.specs))}"
            )
        missing = [k for k in self.specs if k not in values]
        if missing:
            raise BadInputError(f"missing feature(s) {name_list(missing)}")
        return [self._value(spec, values[name]) for name, spec in self.specs.items()]

    def _value(self, spec: FeatureSpec, value: Any) -> Any:
        name = spec.name
        if spec.type == "category":
            if not isinstance(value, str):
                raise BadInputError(f"feature {name!r} is a category (a string), not {json_type(value)}")
            if spec.categories is not None and value not in spec.categories:
                raise BadInputError(f"feature {name!r} is {value[:100]!r}, not one of {name_list(spec.categories)}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadInputError(f"feature {name!r} is a number, not {json_type(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer past any float
            number = math.inf
        if not math.isfinite(number):
            raise BadInputError(f"feature {name!r} is {str(value)[:30]}: a feature must be a finite number")
        dtype = self.feature_dtypes[name]
        bounds = self._int_bounds.get(name)
        if bounds is not None:
            if not number.is_integer() or not bounds[0] <= int(number) <= bounds[1]:
                raise BadInputError(
                    f"feature {name!r} must be a whole number (the model takes {dtype.__name__}), not {value}"
                )
            return int(number)
        if dtype is np.float32 and abs(number) > FLOAT32_MAX:
            raise BadInputError(f"feature {name!r} is {value}: out of the float32 range")
        return value

    # ------------------------------------------------------------------ the session
    def feed(self, rows: list[list[Any]]) -> dict[str, np.ndarray]:
        if self.cfg.input_mode == "matrix":
            ((graph_input, dtype),) = self.dtypes.items()
            return {graph_input: np.asarray(rows, dtype=dtype).reshape(len(rows), len(self.specs))}
        return {
            name: np.array([row[j] for row in rows], dtype=dtype).reshape(len(rows), 1)
            for j, (name, dtype) in enumerate(self.dtypes.items())
        }

    def run(self, items: list[Any]) -> RawOutput:
        results: list[dict[str, Any]] = []
        for chunk in iter_batch(items, self.profile.max_items):
            results += self.predictions(len(chunk), self.session.run(self.outputs, self.feed(chunk)))
        return RawOutput(objects(results))

    # ------------------------------------------------------------------ outputs
    def class_name(self, value: Any) -> Any:
        """The graph's class as the prediction names it: labels[k] for an integer class k when the
        manifest has labels, else the class itself (a string or an integer)."""
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.labels):
            return self.labels[value]
        return value

    def predictions(self, n: int, outs: list[Any]) -> list[dict[str, Any]]:
        """A batch's predictions, rounded a batch at a time (7 significant digits)."""
        labels = np.asarray(outs[0]).reshape(n, -1)
        if labels.dtype.kind == "f":  # a regressor's value
            rows = round_significant(labels).tolist()
        else:
            rows = [[self.class_name(v) for v in row] for row in labels.tolist()]
        values = [row[0] if len(row) == 1 else row for row in rows]
        if len(outs) == 1:
            return [{"label": v} for v in values]
        probabilities = outs[1]
        if isinstance(probabilities, list):  # ZipMap: a {class: p} per row, the same classes in each
            classes = list(probabilities[0]) if probabilities else []
            matrix = np.array([[row[c] for c in classes] for row in probabilities], dtype=np.float64)
        else:
            matrix = np.asarray(probabilities, dtype=np.float64).reshape(n, -1)
            classes = list(range(matrix.shape[1]))
        names = [str(self.class_name(c)) for c in classes]
        scores = round_significant(matrix.reshape(n, len(names))).tolist()
        return [
            {"label": v, "probabilities": dict(zip(names, row, strict=True))}
            for v, row in zip(values, scores, strict=True)
        ]
