"""Texts through a graph: tokenize, run, one row of a named output per text, in input order.

Every text task (embeddings, text classification) runs its texts here. On CPU each text runs alone
on one thread (`pool`: one worker per usable CPU), so a row is bitwise the same whatever its
batch-mates, the call's size, the thread count or the instance, and no work is spent on padding.
On a GPU texts go in length-sorted micro-batches: wide tensors are what a GPU is for
(batch-invariance is a CPU promise)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sif_inference.batching import length_sorted_batches
from sif_inference.errors import InferenceError
from sif_inference.tokenization import TextTokenizer

if TYPE_CHECKING:  # onnxruntime is imported where sessions are built, not on import
    import onnxruntime as ort
    from tokenizers import Encoding

MAX_BATCH_ITEMS = 32  # measured: 32 x 4096 beats 64 x 8192 by ~13% on int8 (cache-sized GEMMs)
MAX_BATCH_TOKENS = 4096
# CPU path: texts go to the pool's threads in runs of this many consecutive texts (each still run
# alone), so a 64-text call is 8 hand-offs rather than 64, and a one-text call runs in the caller's thread.
TEXTS_PER_HANDOFF = 8

# (the graph's output for a batch, the batch's attention mask) -> one row per text (pooling, say)
Head = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TextRows:
    values: np.ndarray  # (n, width) float32, input order
    tokens: list[int]  # tokens each text cost, special tokens included
    truncated: list[bool]

    @property
    def vectors(self) -> np.ndarray:
        """The rows, as an embedding model's callers call them."""
        return self.values

    @property
    def total_tokens(self) -> int:
        return int(sum(self.tokens))


class TextRunner:
    """One graph output per text: `output` (default: the graph's first), through `head` if given.

    `width` is the row length the manifest promises (None: whatever the graph gives); a graph that
    gives another is an InferenceError, not a silently misread row."""

    def __init__(
        self,
        session: ort.InferenceSession,
        tokenizer: TextTokenizer,
        *,
        output: str | None = None,
        width: int | None = None,
        head: Head | None = None,
        pool: Executor | None = None,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.width = width
        self.head = head
        self.pool = pool  # set: one text per run, spread over the pool's threads (the CPU path)
        outputs = [o.name for o in session.get_outputs()]
        self.output = output or outputs[0]
        if self.output not in outputs:
            raise InferenceError(f"the graph has no output {self.output!r}; its outputs are {outputs}")
        self._input_names = {i.name for i in session.get_inputs()}

    def run(
        self, texts: list[str], *, max_items: int = MAX_BATCH_ITEMS, max_tokens: int = MAX_BATCH_TOKENS
    ) -> TextRows:
        """Rows for any number of texts (callers enforce per-call limits).

        `max_items` / `max_tokens` size the GPU path's micro-batches; the session's peak memory
        grows with `max_tokens`."""
        if not texts:
            return TextRows(np.zeros((0, self.width or 0), dtype=np.float32), [], [])
        encodings = self.tokenizer.encode(texts)
        lengths = [len(e.ids) for e in encodings]
        out: np.ndarray | None = None
        if self.pool is not None:
            runs = [encodings[i : i + TEXTS_PER_HANDOFF] for i in range(0, len(encodings), TEXTS_PER_HANDOFF)]
            done = map(self._run_each, runs) if len(runs) == 1 else self.pool.map(self._run_each, runs)
            for i, rows in enumerate(done):
                if out is None:
                    out = np.empty((len(texts), *rows.shape[1:]), dtype=np.float32)
                out[i * TEXTS_PER_HANDOFF : i * TEXTS_PER_HANDOFF + len(rows)] = rows
        else:
            for idx in length_sorted_batches(lengths, max_items=max_items, max_tokens=max_tokens):
                rows = self._run([encodings[i] for i in idx])
                if out is None:
                    out = np.empty((len(texts), *rows.shape[1:]), dtype=np.float32)
                out[idx] = rows
        assert out is not None
        return TextRows(values=out, tokens=lengths, truncated=[self.tokenizer.was_truncated(e) for e in encodings])

    def _run_each(self, encodings: list[Encoding]) -> np.ndarray:
        """Each text in its own session run, one after the other: rows that do not depend on batch-mates."""
        return np.concatenate([self._run([e]) for e in encodings])

    def _run(self, encodings: list[Encoding]) -> np.ndarray:
        batch = self.tokenizer.pad(encodings)
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = batch.token_type_ids
        (values,) = self.session.run([self.output], feed)
        rows = np.asarray(values, dtype=np.float32)
        if self.head is not None:
            rows = self.head(rows, batch.attention_mask)
        if rows.ndim != 2 or rows.shape[0] != len(encodings) or (self.width and rows.shape[1] != self.width):
            expected = f"[{len(encodings)}, {self.width or 'width'}]"
            raise InferenceError(f"graph output {self.output!r} has shape {list(rows.shape)}, not {expected}")
        return rows
