"""Structured outputs on rank 0: a request's StructuredOutputs compiled by xgrammar into a
grammar over this tokenizer's vocabulary, and a matcher per request that knows which tokens
may come next.

xgrammar (the default of vLLM and SGLang) compiles JSON schemas, regular expressions and
EBNF grammars against the vocabulary once, caches what it compiled, fills the next-token
bitmasks of a whole batch in one call (on its own threads, without the GIL), and applies them
to the logits with a device kernel. It is imported on first use, so an engine that never sees
a grammar never loads it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from ..sampling_params import InvalidParameter, StructuredOutputs

_CACHE_BYTES = 256 << 20  # compiled grammars kept for reuse (xgrammar's LRU cache)


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer; thread-safe (the server compiles on its
    tokenizer pool to refuse a bad schema before any work, the engine thread again, which
    is then a cache hit)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler = None

    def _xgr(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size,
                    stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=True,
                                                     cache_limit_bytes=_CACHE_BYTES)
            return self._compiler

    def compile(self, so: StructuredOutputs) -> Any:
        """The compiled grammar; InvalidParameter naming what the library could not take."""
        compiler = self._xgr()
        try:
            if so.json is not None:
                # compact JSON (no free whitespace): a small model can otherwise loop on
                # newlines inside an object until max_tokens
                return compiler.compile_json_schema(so.json, any_whitespace=False)
            if so.json_object:
                return compiler.compile_builtin_json_grammar()
            if so.regex is not None:
                return compiler.compile_regex(so.regex)
            if so.choice is not None:
                return compiler.compile_grammar(choice_grammar(so.choice))
            return compiler.compile_grammar(so.grammar)
        except Exception as e:  # the library reports a bad spec as any of several types
            raise InvalidParameter(so.param, f"{so.param}: the {so.kind} cannot be compiled: "
                                   f"{_message(e)}") from None

    def matcher(self, so: StructuredOutputs):
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(so), override_stop_tokens=self.stop_token_ids)


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (JSON string literals are the
    grammar's literals, escapes included)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _message(e: Exception) -> str:
    # xgrammar prefixes its errors with "[time] /path/file.cc:line: "
    text = " ".join(str(e).split())
    if text.startswith("[") and ": " in text:
        head, _, rest = text.partition(": ")
        if ".cc:" in head or ".h:" in head:
            text = rest
    return text
