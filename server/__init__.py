"""The OpenAI-compatible HTTP server: request schema, its translation to SamplingParams, and
the routes. Nothing here touches tensors; the engine is reached through AsyncEngine only."""

from __future__ import annotations

from .app import build_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "build_app"]
