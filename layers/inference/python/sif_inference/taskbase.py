"""What every task shares: the pipeline (preprocess -> run -> postprocess), its data, batch profiles.

A task turns a chunk of raw inputs (texts; images as bytes, base64 text or {"b64": ...}; objects of
named features; objects of named tensors; a file row's value) into a `TaskResult`: a prediction per
good input, an error per bad one, what the call used and which texts were cut at the token limit.
It owns decoding, limits (the manifest's), batch sizes (a `BatchProfile` per provider), rounding
(7 significant digits) and the JSON text of a prediction, so callers differ only in what they do
with the result. The shape is fastembed's: `predict` = `preprocess` (each input checked and made
ready, `prepare`) -> `run` (the session) -> `postprocess` (a prediction per row); a task overrides
the steps that differ.

Two error modes. `strict=True` (the API): the first bad input raises the core's own error,
prefixed with its index (over a limit: InputLimitError; bad base64, text, features or tensors:
BadInputError; an image that does not decode: ImageDecodeError; an input of the wrong kind:
WrongTaskError). Otherwise (files, jobs): it becomes that input's entry in `errors` and the others
are scored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from sif_inference.errors import BadInputError, InferenceError, InputLimitError
from sif_inference.manifest import ModelManifest
from sif_inference.rounding import compact_json

if TYPE_CHECKING:
    from sif_inference.registry import LoadedModel

# The field of a file row (and of a job's instance) that carries a task's input: a text, an
# image's base64, an object of named features (tabular), an object of named tensors (tensor).
Field = Literal["text", "b64", "features", "inputs"]
FIELDS: tuple[Field, ...] = ("text", "b64", "features", "inputs")
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class BatchProfile:
    """How a task cuts its work; one per provider (a GPU wants wide tensors and has the memory)."""

    window_rows: int  # file rows scored together (the file scorer reads this many at a time)
    max_items: int  # inputs per session run
    max_tokens: int = 0  # padded tokens per session run (text): onnxruntime's peak memory follows it
    call_chars: int = 0  # characters per tokenizer call (text): bounds the tokenizer's memory


@dataclass
class TaskResult:
    """What a chunk of inputs gave: predictions and errors by input index, and what it used."""

    predictions: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    pixels: int = 0
    truncated: list[int] = field(default_factory=list)  # indices of texts cut at the token limit

    @property
    def inputs(self) -> int:
        """Inputs that were scored (what is billed per input)."""
        return len(self.predictions)


@dataclass
class Prepared:
    """`preprocess`'s output: the good inputs made ready for the session, and the others' errors."""

    index: list[int] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass
class RawOutput:
    """`run`'s output: one row per prepared item (an object array where rows are not numbers), what
    the run used, and the items the graph itself refused (by position among the prepared items)."""

    values: np.ndarray
    tokens: int = 0
    pixels: int = 0
    truncated: list[bool] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)


def objects(rows: Sequence[Any]) -> np.ndarray:
    """A 1-d object array of `rows` (per-item results that are not numbers: dicts, tuples)."""
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        out[i] = row
    return out


class Task(ABC):
    """preprocess -> run -> postprocess over a loaded model; subclasses override what differs."""

    name: ClassVar[str]
    model_task: ClassVar[str | None]  # the manifest task a model needs to do this task (None: any model)
    field: ClassVar[Field]  # the row field files carry this task's inputs in
    cpu_profile: ClassVar[BatchProfile]
    gpu_profile: ClassVar[BatchProfile]
    # Named features a CSV file's columns are read as ({name: "number" | "category"}); tabular only.
    features: dict[str, str] | None = None

    def __init__(self, model: LoadedModel, *, profile: BatchProfile | None = None) -> None:
        self.model = model
        self.manifest: ModelManifest = model.manifest
        self.variant = model.variant
        self.provider = model.session.get_providers()[0]
        self.profile = profile or (self.gpu_profile if self.provider == CUDA else self.cpu_profile)

    @classmethod
    def serves(cls, model_task: str) -> bool:
        """Whether a model whose manifest says `model_task` can do this task."""
        return cls.model_task is None or cls.model_task == model_task

    # ------------------------------------------------------------------ the pipeline
    def predict(self, inputs: Sequence[Any], *, strict: bool = False) -> TaskResult:
        """Score `inputs`; `strict` raises on the first bad one, else it becomes that input's error."""
        if strict:
            self.check_count(len(inputs))
        prepared = self.preprocess(inputs, strict=strict)
        output = self.run(prepared.items)
        if strict and output.errors:
            k = min(output.errors)
            raise BadInputError(f"input {prepared.index[k]}: {output.errors[k]}")
        return self.postprocess(prepared, output)

    def check_count(self, count: int) -> None:
        cap = self.manifest.limits.max_inputs
        if count > cap:
            raise InputLimitError(f"{count} inputs; {self.manifest.name} takes at most {cap} per call")

    def preprocess(self, inputs: Sequence[Any], *, strict: bool = False) -> Prepared:
        prepared = Prepared()
        for i, raw in enumerate(inputs):
            try:
                item = self.prepare(raw)
            except InferenceError as exc:
                if strict:
                    raise type(exc)(f"input {i}: {exc}") from exc
                prepared.errors[i] = str(exc)
                continue
            prepared.index.append(i)
            prepared.items.append(item)
        return prepared

    @abstractmethod
    def prepare(self, raw: Any) -> Any:
        """One raw input, checked and ready for `run`; raises an InferenceError if it cannot be."""

    @abstractmethod
    def run(self, items: list[Any]) -> RawOutput: ...

    def postprocess(self, prepared: Prepared, output: RawOutput) -> TaskResult:
        cut = output.truncated or [False] * len(prepared.index)
        errors = dict(prepared.errors)
        errors.update({prepared.index[k]: message for k, message in output.errors.items()})
        return TaskResult(
            predictions={
                i: self.prediction(output.values[k]) for k, i in enumerate(prepared.index) if k not in output.errors
            },
            errors=dict(sorted(errors.items())),
            tokens=output.tokens,
            pixels=output.pixels,
            truncated=[i for i, was_cut in zip(prepared.index, cut, strict=True) if was_cut],
        )

    def prediction(self, row: Any) -> Any:
        """One output row as this task's prediction (default: the row itself)."""
        return row

    # ------------------------------------------------------------------ numbers out
    def to_json(self, prediction: Any) -> Any:
        """A prediction as JSON-able values, floats at 7 significant digits (what the API returns)."""
        return prediction

    def dumps(self, prediction: Any) -> str:
        """A prediction as compact JSON text (what files and jobs write per line)."""
        return compact_json(self.to_json(prediction))

    def dumps_all(self, predictions: dict[int, Any]) -> dict[int, str]:
        return {i: self.dumps(p) for i, p in predictions.items()}


# ---------------------------------------------------------------------- describing inputs in errors
def json_type(value: Any) -> str:
    """What a JSON value is, for messages: "a string", "a number", "an object", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def kind_of(raw: Any) -> str:
    """What an input looks like, for a WrongTaskError ("texts", "images", ...)."""
    if isinstance(raw, dict):
        if "b64" in raw:
            return "images"
        if "text" in raw:
            return "texts"
        if "features" in raw:
            return "features"
        if "inputs" in raw:
            return "tensors"
        return "an object without text or b64"
    return "texts" if isinstance(raw, str) else type(raw).__name__


def unwrap(raw: Any, key: str, names: Collection[str]) -> Any:
    """`raw[key]` when `raw` is `{key: {...}}` and `key` is none of `names` (`{"features": {...}}`
    for a model without a feature called "features"), else `raw`: both forms are taken."""
    if isinstance(raw, dict) and len(raw) == 1 and key in raw and key not in names and isinstance(raw[key], dict):
        return raw[key]
    return raw


def name_list(names: Sequence[str], limit: int = 12) -> str:
    """`'a', 'b', 'c'` (the first `limit`, then how many more)."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
