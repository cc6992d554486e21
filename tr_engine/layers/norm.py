"""RMSNorm as the Llama family defines it: normalise in float32, scale in the model dtype.

Also where the token-wise layers find their fused kernels: on CUDA, when Triton imports, they
call backends/cuda_tokenwise.py (one pass per layer, same rounding steps as the torch code
here); everywhere else they run the torch code, which stays the definition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache
from types import ModuleType

import torch
from torch import nn

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., dim]
        kernels = kernels_for(x)
        if kernels is not None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return self._norm(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm."""
        kernels = kernels_for(x)
        if kernels is not None:
            return kernels.add_rms_norm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self._norm(summed), summed

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # the cast back before the weight matches the checkpoints' training code
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
