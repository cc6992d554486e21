"""The gated SiLU MLP (SwiGLU) with gate and up fused into one projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tokenwise import kernels_for


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)). `gate_up_proj` holds gate's rows, then up's."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        kernels = kernels_for(gate_up)
        if kernels is not None:
            return self.down_proj(kernels.silu_mul(gate_up))  # [T, hidden]
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)
