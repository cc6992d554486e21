"""Mistral with full attention (v0.2 and later, Nemo): Llama's blocks, no biases.

Checkpoints whose sliding window is shorter than their context (Mistral 7B v0.1) are refused
when the config is read: full attention would give different results beyond the window.
"""

from __future__ import annotations

from .llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
