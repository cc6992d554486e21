"""tr_engine: long-context LLM inference with the sequence sharded over all cards."""

from __future__ import annotations

__version__ = "0.1.0"
