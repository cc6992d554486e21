"""The per-forward context: what the attention layers need to know about this step.

The runner enters `with forward_context(ctx): model(...)`; the model's attention layers call
`current().attention(layer, q, k, v, scale)` and never see the distributed machinery. Outside
any context a forward is plain single-sequence causal attention on one device, which is how
the model files are tested on their own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


class ForwardContext:
    """Base class. `token_chunk` bounds how many tokens token-wise work (projections, MLP,
    norms) processes at once; None = all at once."""

    token_chunk: int | None = None
    # per layer, an event the forward waits for (on the device) before that layer's
    # attention: the host tier's copies of that layer (kv.host_tier); None: nothing to wait for
    layer_ready: list | None = None

    def before_layer(self, layer: int) -> None:
        if self.layer_ready is not None:
            self.layer_ready[layer].wait()

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention for `layer` of this step's tokens. q `[T, Hq, D]` (after RoPE), k and v
        `[T, Hkv, D]`; returns `[T, Hq, D]`. Implementations also store k and v in the cache."""
        raise NotImplementedError


class _PlainCausal(ForwardContext):
    def attention(self, layer, q, k, v, scale):
        from tr_engine.backends import backend_for

        return backend_for(q.device).attention(q, k, v, True, scale)[0]


_PLAIN = _PlainCausal()


def current() -> ForwardContext:
    """The context of the forward in progress (a plain causal one outside any)."""
    return getattr(_state, "ctx", None) or _PLAIN


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Scope `ctx` to one forward. Nesting is a bug, so it is refused."""
    if getattr(_state, "ctx", None) is not None:
        raise RuntimeError("forward contexts do not nest")
    _state.ctx = ctx
    try:
        yield ctx
    finally:
        _state.ctx = None
