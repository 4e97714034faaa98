"""sif inference core: model registry, sessions, tokenization, preprocessing, batching, tasks.

Pure compute: numpy and pydantic in and out, no AWS. Where models come from is a
`ModelSource` the caller supplies (a local folder here, the models bucket in Lambda).
"""

from sif_inference.b64 import decode_b64
from sif_inference.embedder import EmbeddingResult, TextEmbedder
from sif_inference.errors import (
    BadInputError,
    ImageDecodeError,
    InferenceError,
    InputLimitError,
    IntegrityError,
    ModelNotFoundError,
)
from sif_inference.manifest import ModelManifest
from sif_inference.registry import LoadedModel, ModelRegistry
from sif_inference.sources import LocalDirSource, ModelSource
from sif_inference.tasks import TASKS, BatchProfile, Task, TaskResult, task_class, task_for
from sif_inference.tensors import run_tensors


def __getattr__(name: str) -> object:
    # ImageClassifier pulls in Pillow and onnxruntime; text-only processes never pay for that.
    if name == "ImageClassifier":
        from sif_inference.images import ImageClassifier

        return ImageClassifier
    raise AttributeError(name)


__all__ = [
    "TASKS",
    "BadInputError",
    "BatchProfile",
    "EmbeddingResult",
    "ImageClassifier",
    "ImageDecodeError",
    "InferenceError",
    "InputLimitError",
    "IntegrityError",
    "LoadedModel",
    "LocalDirSource",
    "ModelManifest",
    "ModelNotFoundError",
    "ModelRegistry",
    "ModelSource",
    "Task",
    "TaskResult",
    "TextEmbedder",
    "decode_b64",
    "run_tensors",
    "task_class",
    "task_for",
]
