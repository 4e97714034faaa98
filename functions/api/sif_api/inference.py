"""The API's shapes around the inference core's tasks (sif_inference.tasks computes; this only dresses).

Decoding, limits, rounding and the numbers themselves are the task's, the same as files and jobs
get; what is here is what only the HTTP API has: its instance kinds, the openai client's base64
vectors and the `label` it puts beside image scores.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from sif_api.schemas import ImageInstance, ImagePrediction, ZeroShotPrediction
from sif_inference.tasks import Task

Prediction = list[float] | ZeroShotPrediction | ImagePrediction


def float32_base64(vector: np.ndarray) -> str:
    """What the openai client decodes: the vector as little-endian float32 bytes, base64."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def task_inputs(instances: list[str | ImageInstance]) -> list[dict[str, str]]:
    """Predict instances as a task takes them, keeping their kind: a string is a text, never base64
    for an image model to decode (that model answers wrong_task)."""
    return [{"text": i} if isinstance(i, str) else {"b64": i.b64} for i in instances]


def prediction_body(task: Task, prediction: Any) -> Prediction:
    """One prediction as predict returns it: the task's JSON values, in the route's schema."""
    value = task.to_json(prediction)
    if task.name == "zero-shot":
        return ZeroShotPrediction.model_validate(value)
    if task.name == "image-classification":
        scores: dict[str, float] = value
        return ImagePrediction(label=max(scores, key=scores.__getitem__), scores=scores)
    result: list[float] = value
    return result
