"""Model families, chosen by the checkpoint's architecture. Classes import lazily."""

from __future__ import annotations

import importlib

from .config import ARCHITECTURES, ModelConfig, RopeConfig, UnsupportedModel
from .weights import WeightsMismatch

# Architecture -> module of tr_engine.models that defines a class of that name.
_MODULES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
assert set(_MODULES) == set(ARCHITECTURES)

__all__ = ["ModelConfig", "RopeConfig", "UnsupportedModel", "WeightsMismatch", "model_class"]


def model_class(config: ModelConfig) -> type:
    """The model class for `config.architecture`."""
    module = _MODULES.get(config.architecture)
    if module is None:
        raise UnsupportedModel(f"model architecture {config.architecture!r} is not supported; "
                               f"supported: {', '.join(_MODULES)}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), config.architecture)
