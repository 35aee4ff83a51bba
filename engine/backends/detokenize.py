"""Incremental detokenization: token ids, as they are generated, to text deltas."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDecoder:
    """Turns token ids, as they are generated, into text deltas without splitting UTF-8
    sequences. Fast tokenizers go through ``tokenizers``' ``DecodeStream`` (constant work per
    token); any other tokenizer re-decodes everything so far (quadratic, kept as a fallback)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._backend: Tokenizer | None = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = (DecodeStream(skip_special_tokens=True)
                        if self._backend is not None else None)
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_ids: list[int]) -> str:
        if self._stream is not None and self._backend is not None:
            backend, stream = self._backend, self._stream
            pieces = (stream.step(backend, token_id) for token_id in token_ids)
            return "".join(piece for piece in pieces if piece)
        self._ids.extend(token_ids)
        text: str = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character; wait for more
            return ""
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta

    def flush(self) -> str:
        if self._stream is not None:
            return ""  # what DecodeStream still holds is an incomplete character
        text: str = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta.rstrip("\ufffd")
