"""Class scores: a graph's values -> scores (the manifest's `classification`), labels ranked best first.

One rule for every classifier: without a `classification` section the scores are the graph's
values as they are (open-nsfw's graph ends in a softmax); with one, `activation` says what to apply
(softmax by default: logits over single-label classes; sigmoid: independent labels) and `top_k`
how many labels each prediction keeps (default: all)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sif_inference.manifest import ClassificationConfig, ModelManifest
from sif_inference.rounding import round_significant

AS_GIVEN = ClassificationConfig(activation="none")


def classification(manifest: ModelManifest) -> ClassificationConfig:
    """The manifest's `classification`, or the values as the graph gives them when it has none."""
    return manifest.classification or AS_GIVEN


def activate(values: np.ndarray, activation: str) -> np.ndarray:
    """float32 scores over the last axis: softmax, sigmoid, or the values as they are ("none")."""
    if activation == "none":
        return np.asarray(values, dtype=np.float32)
    x = np.asarray(values, dtype=np.float64)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        out = e / e.sum(axis=-1, keepdims=True)
    elif activation == "sigmoid":
        out = np.exp(-np.logaddexp(0.0, -x))  # 1 / (1 + e^-x) without overflow
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return out.astype(np.float32)


def top_indices(row: np.ndarray, top_k: int | None) -> np.ndarray:
    """Indices of the `top_k` best scores (all when None), best first; ties keep label order."""
    order = np.argsort(-np.asarray(row, dtype=np.float64), kind="stable")
    return order if top_k is None else order[:top_k]


def ranked(row: np.ndarray, labels: list[str], top_k: int | None = None) -> dict[str, Any]:
    """`{"label": best, "labels": [best first], "scores": [...]}` at 7 significant digits."""
    order = top_indices(row, top_k)
    names = [labels[j] for j in order]
    return {"label": names[0], "labels": names, "scores": round_significant(row[order]).tolist()}


def scores_by_label(row: np.ndarray, labels: list[str], top_k: int | None = None) -> dict[str, float]:
    """`{label: score}` at 7 significant digits: every label in label order, or the `top_k` best, best first."""
    order = np.arange(len(labels)) if top_k is None else top_indices(row, top_k)
    return dict(zip([labels[j] for j in order], round_significant(row[order]).tolist(), strict=True))
