"""Numpy pooling and normalisation: what an embedding graph leaves to sif (and the reference for
graphs that do it themselves)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sif_inference.errors import InferenceError
from sif_inference.manifest import EmbeddingConfig


def mean_pooling(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Average of the token vectors that the mask marks as real, per row."""
    mask = attention_mask[..., None].astype(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    return summed / counts


def cls_pooling(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The first token's vector ([CLS]), per row."""
    return np.ascontiguousarray(token_embeddings[:, 0])


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, eps)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped matrices."""
    return (l2_normalize(a) * l2_normalize(b)).sum(axis=-1)


POOLINGS = {"mean": mean_pooling, "cls": cls_pooling}


def embedding_head(cfg: EmbeddingConfig) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """(graph output, attention mask) -> one vector per text, as the manifest's `embedding` says.

    A graph output of [batch, tokens, dim] is pooled (`pooling`); one of [batch, dim] has been
    pooled by the graph and is taken as it is. None when there is nothing to do: the graph's
    output is served exactly as it comes (all-MiniLM-L6-v2)."""
    if cfg.pooling == "none" and not cfg.normalize:
        return None
    pool = POOLINGS.get(cfg.pooling)

    def head(values: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if values.ndim == 3:
            if pool is None:
                raise InferenceError("the graph gives one vector per token and the manifest sets no pooling")
            values = pool(values, attention_mask)
        return l2_normalize(values) if cfg.normalize else values

    return head
