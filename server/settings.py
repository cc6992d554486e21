"""Server settings: one frozen dataclass, checked on creation (the engine has EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP server needs besides the engine.

    api_key: if set, every /v1 route, /tokenize and /detokenize need
      `Authorization: Bearer <api_key>`; /health, /metrics and /version stay open.
    graceful_shutdown_s: how long a shutdown waits for open requests before cutting them.
    retry_after_s: the Retry-After header sent with 503 when the queue is full.
    default_max_tokens: the most a request that sets no max_tokens may generate (it gets the
      room left in the context, up to this).
    max_request_bytes: the largest request body (413 beyond, before it is read); None = room
      for a prompt of the whole context as text or as token ids (see limits.body_limit).
    allowed_origins: origins browsers may call the API from (CORS; "*" for any); empty, the
      default, leaves CORS off. allowed_methods, allowed_headers, allow_credentials: what
      such a request may use, send and carry (vLLM's names).
    enable_auto_tool_choice, tool_call_parser: tool_choice "auto" reads tool calls out of
      the model's text with this parser (tool_parsers.PARSERS; vLLM's flags and names).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    log_level: str = "info"
    graceful_shutdown_s: float = 2.0
    retry_after_s: int = 1
    default_max_tokens: int = 4096
    max_request_bytes: int | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string; got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) \
                or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535]; got {self.port!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string when set")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}; "
                             f"got {self.log_level!r}")
        if not 0 <= self.graceful_shutdown_s <= 600:
            raise ValueError(f"graceful_shutdown_s must be in [0, 600]; "
                             f"got {self.graceful_shutdown_s}")
        if not isinstance(self.retry_after_s, int) or self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be a non-negative integer; "
                             f"got {self.retry_after_s!r}")
        if self.max_request_bytes is not None and (
                not isinstance(self.max_request_bytes, int) or self.max_request_bytes < 1024):
            raise ValueError(f"max_request_bytes must be an integer >= 1024; "
                             f"got {self.max_request_bytes!r}")
        if not isinstance(self.default_max_tokens, int) or self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be a positive integer; "
                             f"got {self.default_max_tokens!r}")
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            names = (value,) if isinstance(value, str) else value  # YAML: one or a list
            if not isinstance(names, list | tuple) or not all(
                    isinstance(n, str) and n for n in names):
                raise ValueError(f"{name} must be a list of non-empty strings; got {value!r}")
            object.__setattr__(self, name, tuple(names))
        if not isinstance(self.allow_credentials, bool):
            raise ValueError(f"allow_credentials must be true or false; "
                             f"got {self.allow_credentials!r}")

        from .tool_parsers import PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(sorted(PARSERS))}; "
                             f"got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
