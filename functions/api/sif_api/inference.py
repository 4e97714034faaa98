"""What each route computes, on the inference core's objects: numpy in, API shapes out, no AWS.

Every function returns an `Outcome`: the predictions plus what the call cost (inputs, tokens,
pixels, truncated inputs), which the service meters.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sif_api.errors import BadRequestError
from sif_api.schemas import ImageInstance, ImagePrediction, ZeroShotPrediction
from sif_inference.embedder import TextEmbedder
from sif_inference.errors import InputLimitError, WrongTaskError
from sif_inference.images import ImageClassifier

# Cosine similarities of normalised sentence embeddings sit in a narrow band; a temperature of
# 0.05 (as in contrastive training of such models) turns them into usable label probabilities.
ZERO_SHOT_TEMPERATURE = 0.05
LABEL_CACHE_SIZE = 4096


@dataclass
class Outcome:
    predictions: list[Any]
    inputs: int
    tokens: int = 0
    pixels: int = 0
    truncated: list[int] = field(default_factory=list)


def float32_base64(vector: np.ndarray) -> str:
    """What the openai client decodes: the vector as little-endian float32 bytes, base64."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def texts_of(instances: list[str | ImageInstance], model: str) -> list[str]:
    if not all(isinstance(i, str) for i in instances):
        raise WrongTaskError(f"model {model!r} takes text instances (strings), not images")
    return [i for i in instances if isinstance(i, str)]


def images_of(instances: list[str | ImageInstance], model: str) -> list[bytes]:
    images = []
    for n, instance in enumerate(instances):
        if not isinstance(instance, ImageInstance):
            raise WrongTaskError(f'model {model!r} takes image instances ({{"b64": ...}}), not text')
        images.append(decode_b64(instance.b64, n))
    return images


def decode_b64(data: str, index: int) -> bytes:
    compact = "".join(data.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.urlsafe_b64decode(compact)
        except (binascii.Error, ValueError) as exc:
            raise BadRequestError(f"instance {index}: b64 is not valid base64") from exc


def embed(embedder: TextEmbedder, texts: list[str]) -> Outcome:
    embedder.check_limits(texts)
    result = embedder.embed(texts)
    return Outcome(
        predictions=list(result.vectors),
        inputs=len(texts),
        tokens=result.total_tokens,
        truncated=[i for i, cut in enumerate(result.truncated) if cut],
    )


class LabelCache:
    """Label embeddings per model variant and phrasing: zero-shot calls repeat the same labels."""

    def __init__(self, size: int = LABEL_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, str], tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, embedder: TextEmbedder, phrases: list[str]) -> tuple[np.ndarray, int]:
        """Vectors of `phrases` and the tokens they cost (billed whether cached or not)."""
        key = id(embedder)
        with self._lock:
            cached = {p: self._items[(key, p)] for p in phrases if (key, p) in self._items}
        missing = [p for p in dict.fromkeys(phrases) if p not in cached]
        if missing:
            result = embedder.embed(missing)
            fresh = {p: (result.vectors[i], result.tokens[i]) for i, p in enumerate(missing)}
            with self._lock:
                for p, value in fresh.items():
                    self._items[(key, p)] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            cached.update(fresh)
        vectors = np.stack([cached[p][0] for p in phrases])
        return vectors, sum(cached[p][1] for p in phrases)


def zero_shot(embedder: TextEmbedder, texts: list[str], labels: list[str], template: str, cache: LabelCache) -> Outcome:
    if len(set(labels)) != len(labels):
        raise BadRequestError("parameters.labels has duplicates")
    text_part = embed(embedder, texts)
    label_vectors, label_tokens = cache.embed(embedder, [template.replace("{}", label) for label in labels])
    sims = np.stack(text_part.predictions) @ label_vectors.T  # both L2-normalised: cosine
    logits = sims / ZERO_SHOT_TEMPERATURE
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    predictions = []
    for row in probs:
        order = np.argsort(-row, kind="stable")
        predictions.append(
            ZeroShotPrediction(
                label=labels[order[0]],
                labels=[labels[j] for j in order],
                scores=[round(float(row[j]), 6) for j in order],
            )
        )
    text_part.predictions = predictions
    text_part.tokens += label_tokens
    return text_part


def classify_images(classifier: ImageClassifier, images: list[bytes]) -> Outcome:
    cap = classifier.manifest.limits.max_inputs
    if len(images) > cap:
        raise InputLimitError(f"{len(images)} images; {classifier.manifest.name} takes at most {cap} per call")
    result = classifier.classify(images)
    labels = classifier.labels
    predictions = [
        ImagePrediction(
            label=labels[int(np.argmax(row))],
            scores={label: round(float(score), 6) for label, score in zip(labels, row, strict=True)},
        )
        for row in result.scores
    ]
    return Outcome(predictions=predictions, inputs=len(images), pixels=sum(result.pixels))
