"""Incremental detokenization that never splits a multi-byte character.

Byte-level tokenizers can cut a UTF-8 character across tokens; decoding such a prefix gives
U+FFFD. The new text of a step is the decode of a short window of recent tokens minus the
decode of the window without the newest ones, held back while it ends in U+FFFD.

With a fast tokenizer the same is done in one call per token by the tokenizers library's
own streaming decoder (`DecodeStream`, the same rule in Rust), instead of two decodes from
Python (about 20 us a token, a millisecond and more a step at large batches); the window
decodes remain for the end (`flush`) and for other tokenizers.
"""

from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # an older tokenizers: the window decodes alone
    DecodeStream = None


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        # A few prompt tokens give the first output token its context (a leading space that
        # some tokenizers drop at the start of a decode); they are never part of `text`.
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix_offset = 0  # window start
        self.read_offset = len(self.ids)  # tokens already turned into text
        self._pieces: list[str] = []  # the text, joined only when asked for
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = self._backend = None
        if DecodeStream is not None and backend is not None:
            self._backend = backend
            self._stream = DecodeStream(list(self.ids), skip_special_tokens=skip_special_tokens)

    @property
    def text(self) -> str:
        """All the text so far (joined on each call: the engine uses what `add` returns)."""
        return "".join(self._pieces)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id)
            if not delta:
                return ""
            self.prefix_offset = self.read_offset  # as below: the window this text ended
            self.read_offset = len(self.ids)
            self._pieces.append(delta)
            return delta
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self._pieces.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (a genuinely incomplete character)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        delta = full[len(prefix) :]
        self.read_offset = len(self.ids)
        self._pieces.append(delta)
        return delta
