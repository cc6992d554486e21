"""Tensor parallelism: the Megatron split of a model over `size` ranks, applied from outside.

The ranks of the engine form a mesh (`Mesh`): `tp` consecutive ranks split the model's
weights between them and hold the same sequence shard; the `world / tp` groups of them
shard the sequence, each rank's ring running among the ranks of its tensor-parallel index.

A rank's model is the model file built from `shard_config` (its share of the query heads,
of the key/value heads, of the MLP's columns and of the vocabulary), so the model files keep
no distributed code. `parallelize` then swaps, by layer, the modules whose outputs the
ranks must combine:
- the attention output and the MLP's down projection are row-parallel: each rank's partial
  product, then one all-reduce (a bias is added once, after it);
- the token embedding is split by vocabulary rows: each rank looks up the ids it holds,
  zeros elsewhere, then one all-reduce;
- the output head is split by vocabulary rows: each rank's logits, then one all-gather.
The fused q/k/v and gate/up projections need no change: their rows are already this rank's.

A vocabulary that `size` does not divide is padded to a multiple of it; the padding rows
are zeros and the logits of padded ids are dropped. When `size` exceeds the key/value
heads, each rank holds the one key/value head its query heads use (replicated
`size / num_kv_heads` times, as vLLM does).

`slice_of` says which part of every checkpoint tensor a rank reads, so the loader reads
only those bytes (`safe_open(...).get_slice`) and no rank ever holds the whole model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import Communicator
from ..models import ModelConfig, UnsupportedModel


@dataclass(frozen=True)
class Mesh:
    """Where global `rank` of `world` sits: `tp` consecutive ranks form a tensor-parallel
    group (inside one host under torchrun); the sequence is sharded over the
    `sp_size = world / tp` ranks of one tensor-parallel index."""

    rank: int
    world: int
    tp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world % self.tp:
            raise ValueError(f"tensor_parallel_size {self.tp} does not divide the "
                             f"{self.world} ranks")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def sp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def sp_size(self) -> int:
        return self.world // self.tp

    def tp_groups(self) -> list[list[int]]:
        """Every tensor-parallel group's global ranks, in order."""
        return [list(range(s * self.tp, (s + 1) * self.tp)) for s in range(self.sp_size)]

    def sp_groups(self) -> list[list[int]]:
        """Every sequence ring's global ranks (one per tensor-parallel index), in order."""
        return [list(range(t, self.world, self.tp)) for t in range(self.tp)]


@dataclass(frozen=True)
class Split:
    """One rank's part of a tensor-parallel group: `rank` of `size`, combining over `comm`."""

    size: int = 1
    rank: int = 0
    comm: Communicator | None = None


WHOLE = Split()  # no tensor parallelism: the whole model on this rank


def valid_sizes(config: ModelConfig, up_to: int = 64) -> list[int]:
    """The tensor-parallel sizes up to `up_to` that split `config` evenly."""
    return [t for t in range(1, up_to + 1) if _problem(config, t) is None]


def _problem(config: ModelConfig, size: int) -> str | None:
    if config.num_heads % size:
        return f"its {config.num_heads} query heads are not divisible by {size}"
    hkv = config.num_kv_heads
    if hkv % size and size % hkv:
        return (f"its {hkv} key/value heads can be neither split nor replicated evenly over "
                f"{size} ranks")
    if config.intermediate_size % size:
        return f"its MLP width {config.intermediate_size} is not divisible by {size}"
    return None


def check(config: ModelConfig, size: int) -> None:
    """Refuse a tensor-parallel size the model cannot be split by, naming those that work."""
    problem = _problem(config, size)
    if problem is not None:
        sizes = ", ".join(map(str, valid_sizes(config)))
        raise UnsupportedModel(f"tensor_parallel_size {size} does not fit the model: "
                               f"{problem}; sizes that work: {sizes}")


def padded_vocab(config: ModelConfig, size: int) -> int:
    return -(-config.vocab_size // size) * size


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """The model one rank of `size` builds: its share of heads, MLP columns, vocabulary."""
    check(config, size)
    if size == 1:
        return config
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // size,
        num_kv_heads=max(1, config.num_kv_heads // size),
        intermediate_size=config.intermediate_size // size,
        vocab_size=padded_vocab(config, size) // size,
    )


# Checkpoint modules, by their Hugging Face names: split by output rows (column-parallel),
# by input columns (row-parallel; their biases are whole), by vocabulary rows.
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")
VOCAB = ("embed_tokens", "lm_head")


def slice_of(name: str, shape: tuple[int, ...], config: ModelConfig, size: int, rank: int
             ) -> tuple[int, int, int, int] | None:
    """The part of checkpoint tensor `name` (of `shape`) that `rank` of `size` holds:
    (dim, start, stop, length) — rows or columns [start, stop) of dimension `dim`, padded
    with zeros to `length` — or None for the whole tensor."""
    if size == 1:
        return None
    module, kind = name.split(".")[-2:]
    d = config.head_dim
    if module in ("k_proj", "v_proj"):
        hkv = config.num_kv_heads
        per = max(1, hkv // size)
        first = rank * per if size <= hkv else rank * hkv // size
        return 0, first * d, (first + per) * d, per * d
    if module in COLUMN:
        n = shape[0] // size
        return 0, rank * n, (rank + 1) * n, n
    if module in ROW:
        if kind != "weight":
            return None
        n = shape[1] // size
        return 1, rank * n, (rank + 1) * n, n
    if module in VOCAB:
        n = padded_vocab(config, size) // size
        start = rank * n
        return 0, start, min(start + n, shape[0]), n
    return None


def is_split(name: str) -> bool:
    """Whether a model parameter (the model's own names) differs between the ranks."""
    module, kind = name.split(".")[-2:]
    if module in ROW:
        return kind == "weight"
    return module in ("qkv_proj", "gate_up_proj", *VOCAB)


class RowParallelLinear(nn.Linear):
    """This rank's columns of a linear layer: the partial product, all-reduced over the
    group, then the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Communicator
                 ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.comm.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + rows) of the embedding: ids elsewhere give zeros here, and the
    all-reduce over the group sums each id's one real row."""

    def __init__(self, rows: int, dim: int, start: int, comm: Communicator) -> None:
        super().__init__(rows, dim)
        self.start, self.comm = start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.comm.all_reduce(out.masked_fill(outside[:, None], 0))


class VocabParallelHead(nn.Linear):
    """This rank's vocabulary rows of the output head: the logits of every rank's rows come
    together in one all-gather, the padding's dropped."""

    def __init__(self, dim: int, rows: int, vocab: int, comm: Communicator) -> None:
        super().__init__(dim, rows, bias=False)
        self.vocab, self.comm = vocab, comm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        parts = self.comm.all_gather(F.linear(hidden, self.weight))  # [T, N, rows]
        return parts.permute(1, 0, 2).flatten(1)[:, : self.vocab]  # [N, vocab]


def parallelize(model: nn.Module, config: ModelConfig, split: Split) -> None:
    """Swap the modules whose outputs the ranks of `split` combine (see the module
    docstring) into `model`, built (on the meta device) from `shard_config`."""
    if split.size == 1:
        return
    local, comm = shard_config(config, split.size), split.comm
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in ROW and isinstance(child, nn.Linear):
                new = RowParallelLinear(child.in_features, child.out_features,
                                        child.bias is not None, comm)
            elif name == "embed_tokens":
                new = VocabParallelEmbedding(local.vocab_size, config.hidden_size,
                                             split.rank * local.vocab_size, comm)
            elif name == "lm_head":
                new = VocabParallelHead(config.hidden_size, local.vocab_size,
                                        config.vocab_size, comm)
            else:
                continue
            setattr(parent, name, new)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def weight_bytes(config: ModelConfig, element_size: int, size: int = 1) -> int:
    """Bytes of one rank's weights at tensor-parallel `size` (its shares and the whole
    norms)."""
    c, h = shard_config(config, size), config.hidden_size
    d = c.head_dim
    layer = (h * (c.num_heads + 2 * c.num_kv_heads) * d + c.num_heads * d * h
             + 3 * h * c.intermediate_size + 2 * h + 2 * d)
    vocab = c.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return element_size * (config.num_layers * layer + vocab + h)


def fit_error(config: ModelConfig, element_size: int, size: int, free: int) -> str | None:
    """Why the weights do not fit `free` bytes of a card at tensor-parallel `size` (with room
    to spare for the KV cache and activations), naming the smallest size at which they do;
    None where they fit."""
    need = weight_bytes(config, element_size, size)
    if need <= 0.95 * free:
        return None
    fits = [n for n in valid_sizes(config)
            if n > size and weight_bytes(config, element_size, n) <= 0.95 * free]
    hint = (f"tensor_parallel_size {fits[0]} fits (the weights split over {fits[0]} cards)"
            if fits else "no tensor_parallel_size the model can be split by fits")
    return (f"the weights take {need / 2**30:.1f} GiB per card at tensor_parallel_size "
            f"{size}, and {free / 2**30:.1f} GiB are free; {hint}")
