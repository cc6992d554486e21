"""Building blocks the model files use; none of them makes distributed calls."""

from __future__ import annotations

from .attention import Attention
from .tokenwise import map_tokens

__all__ = ["Attention", "map_tokens"]
