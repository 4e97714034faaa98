"""Tokenization with dynamic padding: a one-word input costs a handful of tokens, not 128."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from sif_inference.errors import BadInputError, InferenceError


@dataclass(frozen=True)
class TokenizedBatch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray


class TextTokenizer:
    """Wraps a tokenizer.json; padding and truncation come from the model manifest, not the file.

    The packaged tokenizer.json pads every input to a fixed 128 and truncates at 128; we
    turn fixed padding off (batches are padded to their own longest input) and truncate
    at the model's real maximum.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.max_length = max_length
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        self.pad_id = 0

    @classmethod
    def from_file(cls, path: Path | str, max_length: int) -> TextTokenizer:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise InferenceError(f"cannot load tokenizer from {path}: {exc}") from exc
        return cls(tok, max_length)

    @classmethod
    def from_bytes(cls, data: bytes, max_length: int) -> TextTokenizer:
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:
            raise InferenceError(f"cannot load tokenizer: {exc}") from exc
        return cls(tok, max_length)

    def decode_ids(self, ids: Sequence[int]) -> str:
        """The text token ids stand for (special tokens dropped), as OpenAI's token-array inputs are
        read: the tokenizer's vocabulary bounds them (BadInputError outside it)."""
        vocab = self._tok.get_vocab_size(with_added_tokens=True)
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise BadInputError(f"token id {bad} is outside the tokenizer's vocabulary (0 to {vocab - 1})")
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def encode(self, texts: list[str]) -> list[Encoding]:
        return self._tok.encode_batch(texts)

    @staticmethod
    def was_truncated(encoding: Encoding) -> bool:
        return bool(encoding.overflowing)

    def pad(self, encodings: list[Encoding]) -> TokenizedBatch:
        """Pad to the longest encoding in this batch only."""
        width = max(len(e.ids) for e in encodings)
        n = len(encodings)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            k = len(enc.ids)
            ids[row, :k] = enc.ids
            mask[row, :k] = 1
            types[row, :k] = enc.type_ids
        return TokenizedBatch(input_ids=ids, attention_mask=mask, token_type_ids=types)
