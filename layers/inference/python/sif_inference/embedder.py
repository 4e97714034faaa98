"""Text embeddings: a TextRunner whose rows are vectors, pooled and normalised as the manifest says.

A sentence-transformers export that pools inside the graph (output [batch, dim], all-MiniLM-L6-v2)
is served as the graph gives it. One that outputs token vectors ([batch, tokens, dim]) is pooled
here with the attention mask (`embedding.pooling`: mean or cls) and L2-normalised if
`embedding.normalize` says so. See sif_inference.text for how texts are run (CPU: one per run)."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import TYPE_CHECKING

from sif_inference.errors import InferenceError, InputLimitError
from sif_inference.manifest import EmbeddingConfig, ModelManifest
from sif_inference.pooling import embedding_head
from sif_inference.text import MAX_BATCH_ITEMS, MAX_BATCH_TOKENS, TextRows, TextRunner
from sif_inference.tokenization import TextTokenizer

if TYPE_CHECKING:  # onnxruntime is imported where sessions are built, not on import
    import onnxruntime as ort

EmbeddingResult = TextRows  # vectors (n, dim) float32 in input order, tokens per text, truncated flags

__all__ = ["MAX_BATCH_ITEMS", "MAX_BATCH_TOKENS", "EmbeddingResult", "TextEmbedder"]


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
        self.pool = pool
        self.dim = manifest.output.dim
        cfg = manifest.embedding or EmbeddingConfig()
        output = manifest.output.name or session.get_outputs()[0].name
        declared = {o.name: o.shape for o in session.get_outputs()}.get(output)
        if declared is not None and len(declared) == 3 and cfg.pooling == "none":
            raise InferenceError(
                f"{manifest.name}: graph output {output!r} is one vector per token; "
                "the manifest's embedding.pooling must say how to pool them (mean or cls)"
            )
        self.runner = TextRunner(
            session, tokenizer, output=output, width=self.dim or None, head=embedding_head(cfg), pool=pool
        )

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
        return self.runner.run(texts, max_items=max_items, max_tokens=max_tokens)
