"""Rotary position embedding (RoPE) with the frequency scalings of the supported checkpoints.

Layout: the half-split one of Hugging Face checkpoints (dimension i pairs with i + D/2).
Positions are global token positions; a rank's tokens need not be contiguous, so cos and sin
are looked up per token from a table built once on the device. The table is computed in
float64 on the host (angles of positions in the hundreds of thousands lose digits in float32)
and kept in float32; the rotation runs in the activations' dtype (see `_rotate`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .tokenwise import kernels_for

if TYPE_CHECKING:
    from tr_engine.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] float64, factor that scales cos and sin) for `rope`."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv = rope.theta**-exponent  # [D/2]
    if rope.type == "linear":
        return inv / rope.factor, 1.0
    if rope.type == "llama3":
        # Wavelengths shorter than original/high_freq_factor keep their frequency, longer than
        # original/low_freq_factor are slowed by `factor`; in between, a linear blend in
        # original/wavelength.
        wavelen = 2 * math.pi / inv
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smooth = smooth.clamp(0.0, 1.0)
        return (1 - smooth) * inv / rope.factor + smooth * inv, 1.0
    if rope.type == "yarn":
        # Dimensions that turn fewer than beta_slow times over the original context are
        # interpolated (slowed by `factor`), more than beta_fast times kept, a ramp between.
        def dim_for(rotations: float) -> float:
            turns = rope.original_max_positions / (rotations * 2 * math.pi)
            return head_dim * math.log(turns) / (2 * math.log(rope.theta))

        low = max(math.floor(dim_for(rope.beta_fast)), 0)
        high = min(math.ceil(dim_for(rope.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low))
        ramp = ramp.clamp(0.0, 1.0)
        scale = rope.attention_factor
        if scale is None:
            scale = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
        return ramp * inv / rope.factor + (1 - ramp) * inv, float(scale)
    return inv, 1.0


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their tokens' positions. One instance serves every layer.

    The cos/sin table is a non-persistent buffer: models are built on the meta device, so the
    loader calls `build_cache(device)` once the weights are in place.
    """

    def __init__(self, head_dim: int, rope: RopeConfig, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.rope, self.max_positions = head_dim, rope, max_positions
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)

    def build_cache(self, device: torch.device, max_positions: int | None = None) -> None:
        """Compute the table for positions [0, max_positions) and place it on `device`."""
        if max_positions is not None:
            self.max_positions = max_positions
        inv, scale = inverse_frequencies(self.rope, self.head_dim)
        pos = torch.arange(self.max_positions, dtype=torch.float64)
        angles = torch.outer(pos, inv)  # [N, D/2]
        self.cos = (angles.cos() * scale).float().to(device)
        self.sin = (angles.sin() * scale).float().to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T]; q [T, Hq, D], k [T, Hkv, D] (views of the fused projection allowed)
        kernels = kernels_for(q)
        if kernels is not None:
            return kernels.rope(q, k, positions, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # float32 stays float32; half precision rotates in its own dtype (as transformers does),
    # which halves the memory traffic of this step in long prefills
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
