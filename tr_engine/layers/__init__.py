"""Building blocks the model files use; none of them makes distributed calls."""

from __future__ import annotations

from .attention import Attention
from .mlp import GatedMLP
from .norm import RMSNorm
from .rotary import RotaryEmbedding
from .tokenwise import map_tokens

__all__ = ["Attention", "GatedMLP", "RMSNorm", "RotaryEmbedding", "map_tokens"]
