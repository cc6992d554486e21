"""What the model files need from a checkpoint's config.json, parsed without transformers.

Rank processes read the config with this small parser rather than transformers' AutoConfig,
so they stay light. Anything the models would compute differently from the checkpoint's own
definition (sliding windows, unknown RoPE scalings, other activations) is refused here with a
message that says why, instead of producing plausible but wrong text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Architecture name -> model_type, for configs that name only one of them.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("float32", "bfloat16", "float16")


class UnsupportedModel(ValueError):
    """The checkpoint asks for something the model files do not implement."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base `theta` and a frequency scaling.

    type: `default` (none), `linear` (positions divided by `factor`), `llama3` (Llama 3.1:
    long wavelengths divided by `factor`, short ones kept, a smooth blend between), `yarn`
    (YaRN, static: the same blend by rotation count, cos/sin scaled by `attention_factor`).
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise UnsupportedModel(
                f"RoPE scaling {self.type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise UnsupportedModel(f"RoPE theta and factor must be positive; got {self}")
        if self.type in ("llama3", "yarn") and self.original_max_positions is None:
            raise UnsupportedModel(f"RoPE {self.type} needs original_max_position_embeddings")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise UnsupportedModel("RoPE llama3 needs high_freq_factor > low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    """One decoder-only model. `eos_token_ids` are those of generation_config.json when the
    folder has one (that is what generation stops on), else config.json's."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModel(_unsupported(self.architecture))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UnsupportedModel(f"{name} must be a positive integer; got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(f"{self.num_heads} attention heads are not a multiple of "
                                   f"{self.num_kv_heads} key/value heads")
        if self.head_dim % 2:
            raise UnsupportedModel(f"head_dim must be even for RoPE; got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise UnsupportedModel(f"checkpoint dtype {self.dtype!r} is not supported; "
                                   f"supported: {', '.join(DTYPES)}")
        if not self.rms_norm_eps > 0:
            raise UnsupportedModel(f"rms_norm_eps must be positive; got {self.rms_norm_eps}")

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `path/config.json` (and `generation_config.json` when present)."""
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path} has no config.json; a Hugging Face checkpoint "
                                    "folder (config.json + *.safetensors) is required")
        raw = json.loads(file.read_text())
        gen_file = path / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        return cls.from_dict(raw, generation)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None
                  ) -> ModelConfig:
        """Parse a config.json dict (transformers 4 or 5 layout)."""
        architecture = _architecture(raw)
        model_type = ARCHITECTURES[architecture]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"hidden_act {act!r} is not supported; only silu (SwiGLU)")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise UnsupportedModel(f"config.json lacks {', '.join(missing)}")
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        layers = raw["num_hidden_layers"]
        max_pos = raw.get("max_position_embeddings", 2048)
        _check_full_attention(raw, model_type, layers, max_pos)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False  # Qwen2 always has q/k/v bias, never o_proj bias
        elif model_type == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
        eos = raw.get("eos_token_id")
        if generation and generation.get("eos_token_id") is not None:
            eos = generation["eos_token_id"]
        if eos is None:
            eos = ()
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            dtype=raw.get("dtype") or raw.get("torch_dtype") or "float32",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list | tuple) else (eos,),
        )


def _unsupported(name: str) -> str:
    return (f"model architecture {name!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}")


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name
    if names:
        raise UnsupportedModel(_unsupported(names[0]))
    by_type = {t: a for a, t in ARCHITECTURES.items()}
    model_type = raw.get("model_type")
    if model_type not in by_type:
        raise UnsupportedModel(_unsupported(f"model_type={model_type}"))
    return by_type[model_type]


def _check_full_attention(raw: dict[str, Any], model_type: str, layers: int, max_pos: int
                          ) -> None:
    """Refuse a sliding window that could ever bind (window < max_position_embeddings)."""
    if model_type == "llama":
        return  # Llama has no sliding window; transformers ignores the key there too
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            return
        first = raw.get("max_window_layers", layers)
        sliding = [i for i in range(layers) if i >= first]
    else:
        sliding = list(range(layers))
    if raw.get("layer_types"):
        sliding = [i for i, t in enumerate(raw["layer_types"]) if t != "full_attention"]
    if window is None or window >= max_pos or not sliding:
        return
    raise UnsupportedModel(
        f"sliding-window attention is not supported; this {model_type} checkpoint uses a "
        f"{window}-token window on {len(sliding)} of its {layers} layers, shorter than its "
        f"{max_pos}-token context. tr_engine computes full attention only, which would give "
        "different results beyond the window"
    )


def _rope(raw: dict[str, Any]) -> RopeConfig:
    """RoPE from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    params = raw.get("rope_parameters")
    if params is not None:
        if "rope_theta" not in params and "rope_type" not in params:
            raise UnsupportedModel("per-layer-type RoPE parameters are not supported")
        params = dict(params)
    else:
        params = dict(raw.get("rope_scaling") or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel("partial rotary embeddings (partial_rotary_factor) are not "
                               "supported")
    if kind == "yarn" and (params.get("mscale") or params.get("mscale_all_dim")):
        raise UnsupportedModel("YaRN with mscale/mscale_all_dim is not supported")
    if kind == "yarn" and params.get("truncate", True) is False:
        raise UnsupportedModel("YaRN with truncate=false is not supported")
    max_pos = raw.get("max_position_embeddings", 2048)
    original = None
    if kind in ("llama3", "yarn"):  # the pretraining length; a top-level key takes priority
        original = (raw.get("original_max_position_embeddings")
                    or params.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    if factor is None:  # transformers derives a missing YaRN factor from the context growth
        factor = max_pos / original if kind == "yarn" else 1.0
    return RopeConfig(
        theta=float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0),
        type=kind,
        factor=float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
    )
