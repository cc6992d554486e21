"""Token-wise work: in bounded chunks, so long prefills keep activations small; and where the
token-wise layers find their fused kernels. On CUDA, when Triton imports, the norms, the
gated MLP and RoPE call backends/cuda_tokenwise.py (one pass each, the same rounding steps
as their torch code); everywhere else they run their torch code, which stays the
definition."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import cache
from types import ModuleType

import torch

from tr_engine.layers.context import current


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


_forced = False  # set by force_kernels (tests)
_forced_kernels: ModuleType | None = None


@cache
def _cuda_kernels() -> ModuleType | None:
    # imported on the first CUDA tensor, so CPU and NPU processes never load Triton
    try:
        from tr_engine.backends import cuda_tokenwise
    except ImportError:
        return None
    return cuda_tokenwise


def kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The fused token-wise kernels for `x`'s device, or None for the torch code."""
    if _forced:
        return _forced_kernels
    return _cuda_kernels() if x.is_cuda else None


@contextlib.contextmanager
def force_kernels(kernels: ModuleType | None) -> Iterator[None]:
    """Test hook, not for serving: inside the block tensors of every device take `kernels`
    (None: the torch code). The tests run the kernels on the CPU in Triton's interpreter this
    way, and on a GPU compare them with the torch code."""
    global _forced, _forced_kernels
    previous = _forced, _forced_kernels
    _forced, _forced_kernels = True, kernels
    try:
        yield
    finally:
        _forced, _forced_kernels = previous
