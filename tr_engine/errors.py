"""Errors a request can meet before any work starts; the server maps them to HTTP codes."""

from __future__ import annotations

from .sampling_params import InvalidParameter


class RequestTooLong(ValueError):
    """Prompt plus max_tokens exceed the context length or the KV cache (HTTP 400).
    The message names both numbers."""

    param = "max_tokens"


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (HTTP 503 with Retry-After)."""


class RequestFailed(RuntimeError):
    """Serving one request raised; that request ended, its KV freed, the engine goes on
    (HTTP 500)."""


class ReaderTooSlow(RequestFailed):
    """The request's outputs piled up unread past envs.max_queued_outputs (a client that
    stopped reading): it was aborted and its KV freed."""


class EngineDead(RuntimeError):
    """The engine loop or a rank has died (HTTP 503 until restarted)."""


__all__ = ["EngineDead", "InvalidParameter", "QueueFull", "ReaderTooSlow", "RequestFailed",
           "RequestTooLong"]
