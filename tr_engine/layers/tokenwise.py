"""Token-wise work in bounded chunks, so long prefills keep activations small."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tr_engine.context import current


def map_tokens(fn: Callable, *xs: torch.Tensor):
    """Apply `fn` to slices of the leading (token) dimension of every `xs` and concatenate.

    `fn` must treat tokens independently (projections, norms, MLP, RoPE). It returns a tensor
    or a tuple of tensors. The slice length is the context's `token_chunk` (None = one call).
    """
    chunk = current().token_chunk
    n = xs[0].shape[0]
    if chunk is None or n <= chunk:
        return fn(*xs)
    parts = [fn(*(x[a : a + chunk] for x in xs)) for a in range(0, n, chunk)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)
