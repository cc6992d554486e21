"""Qwen2 and Qwen2.5: the Llama decoder with a bias on the q/k/v projections (none on o_proj).

The bias comes from the config (ModelConfig sets qkv_bias for qwen2), so the blocks are
Llama's. Checkpoints that enable sliding-window attention are refused when the config is read.
"""

from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
