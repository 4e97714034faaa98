"""Text embeddings: tokenize, run, input order out.

On CPU each text runs alone on one thread (`pool`: one worker per usable CPU), so a vector is
bitwise the same whatever its batch-mates, the call's size, the thread count or the instance, and
no work is spent on padding. On a GPU texts go in length-sorted micro-batches: wide tensors are what
a GPU is for (batch-invariance is a CPU promise)."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sif_inference.batching import length_sorted_batches
from sif_inference.errors import InputLimitError
from sif_inference.manifest import ModelManifest
from sif_inference.tokenization import TextTokenizer

if TYPE_CHECKING:  # onnxruntime is imported where sessions are built, not on import
    import onnxruntime as ort
    from tokenizers import Encoding

MAX_BATCH_ITEMS = 32  # measured: 32 x 4096 beats 64 x 8192 by ~13% on int8 (cache-sized GEMMs)
MAX_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray  # (n, dim) float32, L2-normalised, input order
    tokens: list[int]  # tokens each input cost, special tokens included
    truncated: list[bool]

    @property
    def total_tokens(self) -> int:
        return int(sum(self.tokens))


class TextEmbedder:
    def __init__(
        self,
        session: ort.InferenceSession,
        tokenizer: TextTokenizer,
        manifest: ModelManifest,
        *,
        pool: Executor | None = None,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.pool = pool  # set: one text per run, spread over the pool's threads (the CPU path)
        self.dim = manifest.output.dim
        self._input_names = {i.name for i in session.get_inputs()}
        self._output = manifest.output.name or session.get_outputs()[0].name

    def check_limits(self, texts: list[str], *, max_inputs: int | None = None) -> None:
        limits = self.manifest.limits
        cap = max_inputs or limits.max_inputs
        if len(texts) > cap:
            raise InputLimitError(f"{len(texts)} inputs; {self.manifest.name} takes at most {cap} per call")
        if limits.max_text_chars is not None:
            for i, text in enumerate(texts):
                if len(text) > limits.max_text_chars:
                    raise InputLimitError(f"input {i} has {len(text)} characters; the limit is {limits.max_text_chars}")

    def embed(
        self, texts: list[str], *, max_items: int = MAX_BATCH_ITEMS, max_tokens: int = MAX_BATCH_TOKENS
    ) -> EmbeddingResult:
        """Embed any number of texts (callers enforce per-call limits with check_limits).

        `max_items` / `max_tokens` size the micro-batches; the session's peak memory grows with
        `max_tokens` (the file scorer passes a smaller one to stay within its memory budget)."""
        if not texts:
            return EmbeddingResult(np.zeros((0, self.dim), dtype=np.float32), [], [])
        encodings = self.tokenizer.encode(texts)
        lengths = [len(e.ids) for e in encodings]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if self.pool is not None:
            for i, vector in enumerate(self.pool.map(lambda e: self._run([e])[0], encodings)):
                out[i] = vector
        else:
            for idx in length_sorted_batches(lengths, max_items=max_items, max_tokens=max_tokens):
                out[idx] = self._run([encodings[i] for i in idx])
        return EmbeddingResult(
            vectors=out,
            tokens=lengths,
            truncated=[self.tokenizer.was_truncated(e) for e in encodings],
        )

    def _run(self, encodings: list[Encoding]) -> np.ndarray:
        batch = self.tokenizer.pad(encodings)
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = batch.token_type_ids
        (vectors,) = self.session.run([self._output], feed)
        return np.asarray(vectors, dtype=np.float32)
