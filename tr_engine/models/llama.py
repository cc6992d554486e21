"""Llama 2, 3, 3.1 (llama3 RoPE scaling) and 3.2 (tied embeddings); the base of the others.

A decoder layer is split around attention: `qkv` (norm, fused q/k/v projection, RoPE) and
`finish` (output projection, residual, norm, MLP, residual) treat tokens independently, so
the forward runs them through `map_tokens` in bounded chunks; only `attn` sees all of this
rank's tokens, and the forward context decides how it is computed over the sharded sequence.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from tr_engine.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, map_tokens

from .config import ModelConfig
from .weights import load_fused


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = d = config.head_dim
        self.q_size, self.kv_size = config.num_heads * d, config.num_kv_heads * d
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.attn = Attention(layer, config.num_heads, config.num_kv_heads, d)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = self.norm_qk(q, k)
        q, k = rotary(positions, q, k)
        return q, k, v

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for families that normalise q and k before RoPE (Qwen3)."""
        return q, k


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attention: type[LlamaAttention]
                 ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def qkv(self, rotary: RotaryEmbedding, hidden: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # hidden [T, hidden] (the residual stream), positions [T]
        return self.self_attn.qkv(self.input_layernorm(hidden), positions, rotary)

    def finish(self, hidden: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        # hidden [T, hidden], o [T, Hq, D] -> the next layer's residual stream [T, hidden]
        attn_out = self.self_attn.o_proj(o.flatten(1))  # [T, hidden]
        normed, hidden = self.post_attention_layernorm.add_forward(attn_out, hidden)
        return hidden + self.mlp(normed)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, attention: type[LlamaAttention]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, attention) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow the Hugging Face checkpoints except the fused projections."""

    attention_class: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.attention_class)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope, config.max_position_embeddings)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids [T], positions [T] (global) -> hidden [T, hidden] after the final norm
        hidden = map_tokens(self.model.embed_tokens, input_ids)  # [T, hidden]
        for layer in self.model.layers:
            q, k, v = map_tokens(partial(layer.qkv, self.rotary), hidden, positions)
            o = layer.self_attn.attn(q, k, v)  # [T, Hq, D]
            hidden = map_tokens(layer.finish, hidden, o)
        return map_tokens(self.model.norm, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [N, hidden] -> [N, vocab] float32
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in; raises WeightsMismatch naming what is missing
        or unexpected."""
        c = self.config
        q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        fused = {
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, kv),
            "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, inter),
            "up_proj": ("gate_up_proj", inter, inter),
        }
        load_fused(self, weights, fused, skip=self._derived)

    def _derived(self, name: str) -> bool:
        """Checkpoint tensors the model does not read: RoPE tables some exports include, and
        the output head of a tied model (it is the embedding)."""
        if name.endswith("rotary_emb.inv_freq"):
            return True
        return self.config.tie_word_embeddings and name == "lm_head.weight"
