"""Read -> compute -> write with the three overlapped: a reader thread, compute here, a writer thread.

The accelerator (or the CPU's intra-op threads) should never wait for S3 or for JSON: the reader
parses and chunks rows ahead of compute, the writer serialises results behind it, and bounded
queues keep memory flat however large the input is. onnxruntime and the tokenizer release the GIL
while they work, so the Python on either side runs in their shadow.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sif_core.jobs import ChunkResult, InputRow

T = TypeVar("T")
_DONE = object()


@dataclass
class PipelineStats:
    rows: int = 0
    chunks: int = 0
    tokens: int = 0
    pixels: int = 0
    compute_s: float = 0.0
    wall_s: float = 0.0
    waits: dict[str, float] = field(default_factory=lambda: {"compute_waited_for_reader_s": 0.0})

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0


class PipelineAborted(Exception):
    """Another stage failed; this one stops quietly (the first error is re-raised)."""


class _Stage:
    """A daemon thread with its first exception kept for the caller."""

    def __init__(self, name: str, target: Callable[[], None], abort: threading.Event) -> None:
        self.error: BaseException | None = None
        self._abort = abort
        self._target = target
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._target()
        except PipelineAborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self.error = exc
            self._abort.set()


def _put(q: queue.Queue[Any], item: Any, abort: threading.Event) -> None:
    while True:
        if abort.is_set():
            raise PipelineAborted
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue[Any], abort: threading.Event) -> Any:
    while True:
        if abort.is_set():
            raise PipelineAborted
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue


def chunked(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_pipeline(
    rows: Iterable[InputRow],
    predict: Callable[[list[Any]], ChunkResult],
    sink: Callable[[list[Any], list[Any]], None],
    *,
    chunk_items: int,
    depth: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> PipelineStats:
    """Stream `rows` through `predict` in chunks into `sink(ids, predictions)`, in input order."""
    stats = PipelineStats()
    abort = threading.Event()
    inbox: queue.Queue[Any] = queue.Queue(maxsize=depth)
    outbox: queue.Queue[Any] = queue.Queue(maxsize=depth)

    def read() -> None:
        for chunk in chunked(rows, chunk_items):
            _put(inbox, chunk, abort)
        _put(inbox, _DONE, abort)

    def write() -> None:
        while True:
            item = _get(outbox, abort)
            if item is _DONE:
                return
            ids, predictions = item
            sink(ids, predictions)
            stats.rows += len(ids)
            if on_progress is not None:
                on_progress(stats.rows)

    started = time.perf_counter()
    reader = _Stage("sif-reader", read, abort)
    writer = _Stage("sif-writer", write, abort)
    reader.thread.start()
    writer.thread.start()
    try:
        while True:
            waited = time.perf_counter()
            chunk = _get(inbox, abort)
            stats.waits["compute_waited_for_reader_s"] += time.perf_counter() - waited
            if chunk is _DONE:
                break
            t0 = time.perf_counter()
            result = predict([r.value for r in chunk])
            stats.compute_s += time.perf_counter() - t0
            stats.chunks += 1
            stats.tokens += result.tokens
            stats.pixels += result.pixels
            _put(outbox, ([r.id for r in chunk], result.predictions), abort)
        _put(outbox, _DONE, abort)
    except PipelineAborted:
        pass
    except BaseException:
        abort.set()
        raise
    finally:
        writer.thread.join(timeout=None if not abort.is_set() else 5)
        if abort.is_set():
            reader.thread.join(timeout=5)
    for stage in (reader, writer):
        if stage.error is not None:
            raise stage.error
    reader.thread.join(timeout=5)
    stats.wall_s = time.perf_counter() - started
    return stats
