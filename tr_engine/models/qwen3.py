"""Qwen3: the Llama decoder with an RMSNorm over each head of q and of k before RoPE."""

from __future__ import annotations

import torch

from tr_engine.layers import RMSNorm

from .config import ModelConfig
from .llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)  # shared by all q heads
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q [T, Hq, D], k [T, Hkv, D]: normalised over D, per token and head
        return self.q_norm(q), self.k_norm(k)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen3Attention
