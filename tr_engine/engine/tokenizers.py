"""One copy of the tokenizer for each thread that uses it.

A Hugging Face tokenizer must not be used from two threads at once: the Rust tokenizer
behind a fast one raises "Already borrowed" when a call that changes its truncation or
padding meets another thread's encode or decode, and nothing promises more of a slow one.
The server tokenizes on a pool of threads, renders chat templates there, turns logprob
tokens into text on its event loop, and the engine detokenizes every stream on its own
thread; a lock would make a long prompt's tokenizing hold up every stream's next token.
So each thread gets its own copy (a deep copy: about 0.1 s for a 50K-token vocabulary,
made ahead of time for the threads known at start-up), and the original is never used.
"""

from __future__ import annotations

import copy
import threading


class ThreadTokenizers:
    def __init__(self, tokenizer) -> None:
        self._original = tokenizer  # only ever copied
        self._local = threading.local()
        self._lock = threading.Lock()  # copies are made one at a time
        self._spare: list = []

    def get(self):
        """This thread's tokenizer."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            with self._lock:
                tok = self._spare.pop() if self._spare else copy.deepcopy(self._original)
            self._local.tokenizer = tok
        return tok

    def own(self):
        """A copy of its own, for an object that keeps a tokenizer and is used by one thread
        at a time (the grammar compiler, the engine's token masks)."""
        with self._lock:
            return copy.deepcopy(self._original)

    def prepare(self, n: int) -> None:
        """Make `n` copies now, for threads that will ask later (a thread pool's)."""
        with self._lock:
            while len(self._spare) < n:
                self._spare.append(copy.deepcopy(self._original))
