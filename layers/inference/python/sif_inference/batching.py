"""Micro-batching: group inputs of similar length so padding costs little."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def iter_batch(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive chunks of at most `size` items."""
    if size < 1:
        raise ValueError("batch size must be >= 1")
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def length_sorted_batches(lengths: Sequence[int], *, max_items: int, max_tokens: int) -> list[np.ndarray]:
    """Index batches over inputs sorted by length; each batch's padded size stays under `max_tokens`.

    Padded size is items x longest item. Every index appears in exactly one batch; callers
    scatter results back by these indices, so output order is the input order.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        end = start + 1
        while end < n and end - start < max_items:
            longest = lengths[order[end]]  # sorted ascending: the newest item is the longest
            if (end - start + 1) * longest > max_tokens:
                break
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def padding_waste(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> float:
    """Fraction of the padded tensor that is padding (0 = none)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths)
    return 0.0 if padded == 0 else 1.0 - real / padded
