"""Engine configuration: one frozen dataclass, checked on creation, `auto` resolved once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "npu")
LOAD_FORMATS = ("auto", "dummy")
# the sharded attention algorithms (tr_engine.attention), the cost model's order of preference
STRATEGIES = ("tokenring", "ring", "allgather_kv", "local")
# how the KV pool stores K and V (vLLM's names; tr_engine/kv/quant.py)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to start.

    model: a local Hugging Face checkpoint folder; None serves the embedded SmolLM2 model.
    load_format: `auto` reads the folder's safetensors weights; `dummy` reads only its
      config.json and fills the weights with seeded random values on the device (`seed`),
      the same on every rank: for benchmarks of shapes whose checkpoints are not at hand.
    world_size: ranks (cards) in all.
    tensor_parallel_size: consecutive ranks that split the model's weights between them
      (Megatron-style, vLLM's name); the sequence is sharded over the
      world_size / tensor_parallel_size groups of them (`sequence_parallel_size`).
    max_model_len: longest prompt + output; None = the model's own limit.
    kv_cache_fraction: share of the device memory left after weights and the prefill
      workspace that the KV pool takes. kv_cache_tokens, if set, fixes the pool's capacity
      per rank instead (tests use it for exact numbers).
    token_chunk: tokens per slice of token-wise work (projections, MLP) in a prefill.
    prefill_chunk: a prompt longer than this is prefilled in pieces of this many tokens.
    max_num_batched_tokens: the token budget of a step while requests decode (vLLM's name),
      per rank: the decoding sequences' tokens a rank computes plus prefill work cut to the
      rest, counting each new prompt token's attention over the tokens before it as well
      (engine/scheduler.py). It bounds how long streams wait during a prefill. None: whole
      prefill_chunk chunks.
    shard_min_tokens: prompts shorter than this are not sharded: each lives on one rank
      (its KV, its prefill and decode), and the ranks serve different short requests side
      by side; longer prompts shard over all ranks. 0 shards every prompt. The default is
      about where sharding starts to pay for a lone request with a few hundred tokens to
      generate (docs/serving.md).
    max_num_seqs: sequences decoded together in one step; max_waiting: queue bound.
    enforce_eager: run decode steps kernel by kernel instead of replaying them from device
      graphs recorded at start-up (graphs are used where the backend records them: CUDA).
    block_size: tokens per KV block (page). Prefix caching reuses whole blocks, and prefill
      chunks are padded to a multiple of 2 x world_size blocks, so small blocks reuse more
      and pad less; 16 keeps the padding of a short prompt under 32 tokens per rank.
    enable_prefix_caching: reuse the KV of cached prompt prefixes (vLLM's name).
    kv_offloading_size: GiB of host memory (over every rank together, vLLM's name) for the
      host tier: a cached KV block the device evicts is copied there first and comes back
      when a later prompt needs it, instead of being computed again. 0 (default): no tier.
    kv_cache_dtype: how the KV pool stores K and V (vLLM's name): `auto` the model's dtype;
      `fp8` (= `fp8_e4m3`) or `fp8_e5m2` on CUDA (compute capability 8.9 on) and the CPU,
      `int8` on Ascend and the CPU: 8 bits per value and a float32 scale per token and KV
      head, about half the bytes (kv/quant.py). A value the device cannot do is refused
      before any rank starts.
    skip_kernel_self_check: trust the backend's fused kernels without the start-up check
      against the portable math (Backend.self_check), which disables any that disagree.
    generation_config: where requests' sampling defaults come from (vLLM's flag): `auto`,
      the model folder's generation_config.json (its temperature, top_p, top_k, min_p,
      repetition_penalty, max_new_tokens); `vllm`, the plain defaults; or a folder holding
      a generation_config.json. A request's own values always win.
    """

    model: str | None = None
    load_format: str = "auto"
    device: str = "auto"
    world_size: int = 1
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    attention_strategy: str = "auto"
    kv_cache_fraction: float = 0.9
    kv_cache_tokens: int | None = None
    token_chunk: int = 8192
    prefill_chunk: int = 32768
    max_num_batched_tokens: int | None = 4096
    shard_min_tokens: int = 8192
    max_num_seqs: int = 64
    max_waiting: int = 256
    served_model_name: str | None = None
    seed: int = 0
    enforce_eager: bool = False
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    skip_kernel_self_check: bool = False
    generation_config: str = "auto"
    kv_offloading_size: float = 0.0

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got "
                             f"{self.kv_cache_dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got "
                             f"{self.load_format!r}")
        if self.attention_strategy not in ("auto", *STRATEGIES):
            raise ValueError(f"attention_strategy must be auto or one of {', '.join(STRATEGIES)}"
                             f"; got {self.attention_strategy!r}")
        positive = ("world_size", "tensor_parallel_size", "token_chunk", "prefill_chunk",
                    "max_num_seqs", "max_waiting", "block_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.world_size % self.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} does not "
                             f"divide world_size {self.world_size}")
        if self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two up to 256; got "
                             f"{self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2; got {self.max_model_len}")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1]; got {self.kv_cache_fraction}")
        budget = self.max_num_batched_tokens
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ValueError(f"max_num_batched_tokens must be a positive integer; got "
                             f"{budget!r}")
        if not isinstance(self.shard_min_tokens, int) or self.shard_min_tokens < 0:
            raise ValueError(f"shard_min_tokens must be a non-negative integer; got "
                             f"{self.shard_min_tokens!r}")
        size = self.kv_offloading_size
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not \
                0 <= size < float("inf"):
            raise ValueError(f"kv_offloading_size must be a size in GiB, 0 or more; got "
                             f"{size!r}")
        if size > 0 and not self.enable_prefix_caching:
            raise ValueError("kv_offloading_size needs enable_prefix_caching: the host tier "
                             "keeps evicted cached blocks")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be positive; got {self.kv_cache_tokens}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError(f"generation_config must be auto, vllm or a folder; got "
                             f"{self.generation_config!r}")

    @property
    def sequence_parallel_size(self) -> int:
        """The ranks (each a tensor-parallel group) the sequence is sharded over."""
        return self.world_size // self.tensor_parallel_size

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)
