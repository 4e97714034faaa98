"""The API's shapes around the inference core's tasks (sif_inference.tasks computes; this only dresses).

Decoding, limits, rounding and the numbers themselves are the task's, the same as files and jobs
get; what is here is what only the HTTP API has: its instance kinds, the openai client's base64
vectors, the `label` it puts beside image scores, a text prediction as a v2 tensor row, and the
KServe v2 run of a graph on the caller's own named tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sif_api.schemas import ImageInstance, ImagePrediction, TabularPrediction, ZeroShotPrediction
from sif_inference.registry import LoadedModel
from sif_inference.rounding import float32_base64 as float32_base64  # the one implementation (files, jobs too)
from sif_inference.tasks import Task
from sif_inference.tensors import run_tensors as core_run_tensors

Prediction = list[float] | ZeroShotPrediction | ImagePrediction | TabularPrediction | dict[str, Any]


def task_inputs(instances: list[str | ImageInstance | dict[str, Any]]) -> list[dict[str, Any]]:
    """Predict instances as a task takes them, keeping their kind: a string is a text, never base64
    for an image model to decode (that model answers wrong_task); an object is a tabular model's
    features or a tensor model's tensors, as it is."""
    return [
        {"text": i} if isinstance(i, str) else {"b64": i.b64} if isinstance(i, ImageInstance) else i for i in instances
    ]


def embedding_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[Any]:
    """`input` of POST /v1/embeddings as the task takes it: a text or texts; token ids (one list of
    integers, or a list of them) as `{"ids": [...]}` inputs, which the task reads in its vocabulary."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [{"ids": value}]
    return [{"ids": v} if isinstance(v, list) else v for v in value]


def prediction_body(task: Task, prediction: Any) -> Prediction:
    """One prediction as predict returns it: the task's JSON values, in the route's schema."""
    value = task.to_json(prediction)
    if task.name in ("zero-shot", "text-classification"):
        return ZeroShotPrediction.model_validate(value)
    if task.name == "tabular":
        return TabularPrediction.model_validate(value)
    if task.name == "tensor":
        outputs: dict[str, Any] = value
        return outputs
    if task.name == "image-classification":
        scores: dict[str, float] = value
        return ImagePrediction(label=max(scores, key=scores.__getitem__), scores=scores)
    result: list[float] = value
    return result


def scores_row(task: Task, prediction: Any) -> np.ndarray:
    """One text prediction as a float row (KServe v2): a vector as it is; label scores in the manifest's
    label order (`{"label": score}`, or `{"labels": [...], "scores": [...]}` best first)."""
    if isinstance(prediction, Mapping):
        labels = task.manifest.labels
        if "scores" in prediction and "labels" in prediction:
            by_label = dict(zip(prediction["labels"], prediction["scores"], strict=True))
        else:
            by_label = dict(prediction)
        order = labels or list(by_label)
        return np.asarray([float(by_label.get(label, 0.0)) for label in order], dtype=np.float32)
    return np.asarray(prediction, dtype=np.float32).reshape(-1)


@dataclass
class TensorRun:
    """A graph run on the caller's own named tensors (KServe v2), metered per row of the batch axis."""

    outputs: dict[str, np.ndarray]
    inputs: int
    tokens: int = 0
    pixels: int = 0


def run_tensors(model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str], rows: int) -> TensorRun:
    """The core's run on whole tensors (names, element types, shapes and limits checked there)."""
    return TensorRun(outputs=core_run_tensors(model, feeds, outputs=outputs or None), inputs=rows)
