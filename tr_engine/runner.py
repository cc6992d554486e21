"""The model runner: one per rank, runs the forward a step plan describes.

Every rank runs the same plan: a prefill chunk (zigzag-sharded over the ranks, attention by
the plan's strategy, the chunk's KV stored where the plan says), a decode step (the same
new tokens on every rank, each rank attending its own KV shard, one all-gather per layer to
merge), or a mixed step: both in one forward, the chunk's shard of tokens followed by the
decode tokens, so the weights are read once for both. Only rank 0 needs the logits.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from .attention import Rates, gather_merge, get_strategy, layout
from .backends import Backend, Communicator
from .config import EngineConfig
from .context import ForwardContext, forward_context
from .graphs import DecodeGraphs
from .kv_cache import BlockTables, KVCache
from .loader import load_model
from .plan import DecodePlan, PrefillPlan, StepPlan

log = logging.getLogger("tr_engine")


class PrefillContext(ForwardContext):
    def __init__(self, runner: ModelRunner, plan: PrefillPlan, n_valid: int) -> None:
        self.runner, self.plan, self.n_valid = runner, plan, n_valid
        self.token_chunk = runner.config.token_chunk
        cached = plan.prefix_len[runner.rank]
        tables = runner.tables
        # the same slots in every layer: worked out once per forward. Every rank passes a
        # prefix (maybe empty) when any has one: the strategies' collectives depend on it.
        self.prefix = None if sum(plan.prefix_len) == 0 else _on(
            tables.slots(plan.row, 0, cached), runner.device)
        self.store = _on(tables.slots(plan.row, cached, n_valid), runner.device)

    def attention(self, layer, q, k, v, scale):
        cache = self.runner.kv
        prefix = {}
        if self.prefix is not None:  # this rank's share of the prefix (order does not matter)
            prefix["k_prefix"], prefix["v_prefix"] = cache.gather(layer, self.prefix)
        strategy = get_strategy(self.plan.strategy)
        out, _ = strategy(q, k, v, self.runner.group, causal=True, scale=scale, **prefix)
        cache.store(layer, self.store, k[: self.n_valid], v[: self.n_valid])
        return out


def _on(slots, device):
    return slots if isinstance(slots, slice) else slots.to(device)


class DecodeContext(ForwardContext):
    """One new token per sequence, the same on every rank. Everything this rank needs is in
    device tensors `[B]`: each sequence's block-table row, how many of its keys this rank
    attends (the new one included on its owner), and the slot the new K/V goes to (a spare
    slot on the ranks that do not keep it). No host value steers the kernels, so a graph
    captured once replays every step."""

    def __init__(self, runner: ModelRunner, rows: torch.Tensor, lens: torch.Tensor,
                 slots: torch.Tensor, keys: list | None = None) -> None:
        self.runner, self.rows, self.lens, self.slots = runner, rows, lens, slots
        self.keys = keys  # host-driven backends: each sequence's key slots, from the host

    def attention(self, layer, q, k, v, scale):
        # q [B, Hq, D], k/v [B, Hkv, D]
        runner = self.runner
        k_cache, v_cache = runner.kv.layer(layer)
        k_cache.index_copy_(0, self.slots, k)
        v_cache.index_copy_(0, self.slots, v)
        tables = runner.tables
        args = (q, k_cache, v_cache, tables.device, self.rows, self.lens, tables.block_size,
                scale)
        attend = runner.backend.decode_attention
        if runner.world == 1:
            return attend(*args, keys=self.keys)[0]
        # out and lse go straight into the one float32 buffer the ranks all-gather
        b, h, d = q.shape
        packed = torch.empty((b, h, d + 1), dtype=torch.float32, device=q.device)
        attend(*args, packed[..., :d], packed[..., d], keys=self.keys)
        return gather_merge(packed, q.dtype, runner.group)[0]


class MixedContext(ForwardContext):
    """A prefill chunk and a decode batch in one forward: the first `n` tokens are this
    rank's shard of the chunk, the rest the decode tokens. Each part's attention runs as in
    a step of its own (the chunk's collectives, then the decode merge, in that order on
    every rank); the token-wise layers see them together."""

    def __init__(self, prefill: PrefillContext, decode: DecodeContext, n: int) -> None:
        self.prefill, self.decode, self.n = prefill, decode, n
        self.token_chunk = prefill.token_chunk

    def attention(self, layer, q, k, v, scale):
        n = self.n
        out = self.prefill.attention(layer, q[:n], k[:n], v[:n], scale)
        return torch.cat([out, self.decode.attention(layer, q[n:], k[n:], v[n:], scale)])


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, backend: Backend, rank: int,
                 world: int, local_rank: int, group: dist.ProcessGroup | None) -> None:
        self.config, self.backend = config, backend
        self.rank, self.world, self.group = rank, world, group
        self.comm = Communicator(group)
        self.device = backend.set_device(local_rank)

        t = time.perf_counter()
        self.model, self.model_config = load_model(model_path, self.device, config.dtype,
                                                   load_format=config.load_format,
                                                   seed=config.seed)
        self.dtype = next(self.model.parameters()).dtype
        log.info("rank %d: weights loaded in %.1f s (%s, %s)", rank, time.perf_counter() - t,
                 self.model_config.architecture, self.dtype)

        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.block_size = config.block_size
        self.num_pages = self._plan_memory() // self.block_size
        self.capacity = self.num_pages * self.block_size
        mc = self.model_config
        self.kv = KVCache(mc.num_layers, self.num_pages, self.block_size, mc.num_kv_heads,
                          mc.head_dim, self.dtype, self.device)
        # a row per running sequence and one for prompt_logits
        self.tables = BlockTables(config.max_num_seqs + 1,
                                  -(-self.max_model_len // self.block_size) + 1,
                                  self.block_size, self.device)
        backend.prepare_attention(mc.num_heads, mc.num_kv_heads, mc.head_dim, self.dtype,
                                  self.device)
        self.rates = self._calibrate()
        self.graphs = None
        # whether decode attention reads the block tables on the device (else the host
        # works out each sequence's key slots once a step)
        self.device_decode = backend.graph_safe_decode(self.dtype, mc.head_dim)
        if not config.enforce_eager and self.device_decode:
            self.graphs = DecodeGraphs(self, config.max_num_seqs)

    # ---- set-up ------------------------------------------------------------------------
    def _plan_memory(self) -> int:
        """KV slots per rank: a share of the free memory after the prefill workspace, no more
        than the configured limits can ever use, and the same on every rank."""
        mc, cfg = self.model_config, self.config
        per_token = KVCache.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                            self.dtype)
        # a sequence's share of the pool, plus the blocks an uneven last chunk may add
        useful = (-(-self.max_model_len * cfg.max_num_seqs // self.world)
                  + 3 * cfg.block_size * cfg.max_num_seqs)
        if cfg.kv_cache_tokens is not None:
            capacity = cfg.kv_cache_tokens
        else:
            free, _ = self.backend.mem_get_info()
            if self.backend.device_type == "cpu":
                free //= self.world  # the ranks share the host's memory
            budget = (free - self._workspace_bytes()) * cfg.kv_cache_fraction
            capacity = min(useful, max(0, int(budget // per_token)))
        cap = torch.tensor([capacity], dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.all_reduce(cap, op=dist.ReduceOp.MIN, group=self.group)
        capacity = int(cap.item())
        if capacity < 2 * cfg.block_size:
            raise RuntimeError(
                f"no memory left for the KV cache ({capacity} tokens per rank, less than two "
                f"blocks of {cfg.block_size}); lower "
                "prefill_chunk/token_chunk, use more ranks, or set kv_cache_tokens"
            )
        log.info("rank %d: KV cache %d tokens per rank (%.2f GiB), %d in all", self.rank,
                 capacity, capacity * per_token / 2**30, capacity * self.world)
        return capacity

    def _workspace_bytes(self) -> int:
        """An upper estimate of prefill activations for one chunk on one rank."""
        mc, cfg = self.model_config, self.config
        e = torch.empty((), dtype=self.dtype).element_size()
        n = layout.padded_len(min(cfg.prefill_chunk, self.max_model_len), self.world,
                              cfg.block_size) // self.world
        c = min(cfg.token_chunk, n)
        hidden = 3 * n * mc.hidden_size * e
        qkv = n * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim * e
        attn = n * mc.num_heads * (mc.head_dim * (3 * e + 4) + 8)  # out, fp32 acc, buffers
        mlp = 3 * c * mc.intermediate_size * e
        logits = 4 * mc.vocab_size * 4
        return int(1.3 * (hidden + qkv + attn + mlp + logits))

    def _calibrate(self) -> Rates:
        """Measure this platform's attention rate and link bandwidth for the cost model."""
        mc, dev = self.model_config, self.device
        n = 1024 if self.backend.device_type != "cpu" else 128
        q = torch.randn(n, mc.num_heads, mc.head_dim, dtype=self.dtype, device=dev)
        k = torch.randn(n, mc.num_kv_heads, mc.head_dim, dtype=self.dtype, device=dev)
        self.backend.attention(q, k, k, False)  # warm up
        self.backend.synchronize()
        t = time.perf_counter()
        self.backend.attention(q, k, k, False)
        self.backend.synchronize()
        flops = 4.0 * n * n * mc.num_heads * mc.head_dim / max(time.perf_counter() - t, 1e-9)
        link = 100e9
        if self.world > 1:
            buf = torch.randn(n * 64, mc.num_heads, dtype=self.dtype, device=dev)
            recv = torch.empty_like(buf)
            for _ in range(2):  # the first exchange sets up the connection
                t = time.perf_counter()
                self.comm.exchange([(buf, self.comm.peer(1))], [(recv, self.comm.peer(-1))]).wait()
                self.backend.synchronize()
            link = buf.numel() * buf.element_size() / max(time.perf_counter() - t, 1e-9)
        return Rates(flops=flops, link=link)

    def close(self) -> None:
        """Release what must go before the process group does (the decode graphs)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    # ---- steps ---------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """Run one step; returns float32 logits on rank 0 (None elsewhere)."""
        for op in plan.tables:
            if op.rank == self.rank:
                self.tables.apply(op)
        if plan.kind == "prefill":
            return self.prefill(plan.prefill)
        if plan.kind == "mixed":
            return self.mixed(plan.prefill, plan.decode)
        return self.decode(plan.decode)

    def _prefill_inputs(self, p: PrefillPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of a chunk: token ids and positions, on the device."""
        total, world, r, b = len(p.tokens), self.world, self.rank, self.block_size
        ids = layout.shard(torch.tensor(p.tokens, dtype=torch.long), world, r, align=b)
        positions = layout.positions(total, world, r, b) + p.start
        positions = positions.clamp(max=p.start + total - 1)  # pads: any
        return ids.to(self.device), positions.to(self.device)

    def _prefill_context(self, p: PrefillPlan) -> PrefillContext:
        n_valid = layout.local_len(len(p.tokens), self.world, self.rank, self.block_size)
        return PrefillContext(self, p, n_valid)

    def _last_hidden(self, p: PrefillPlan, hidden: torch.Tensor) -> torch.Tensor:
        """The chunk's last position's hidden state, on every rank (its owner sends it)."""
        owner, index = layout.owner(len(p.tokens), self.world, len(p.tokens) - 1,
                                    self.block_size)
        last = hidden[index : index + 1].contiguous() if self.rank == owner \
            else hidden[:1].clone()
        self.comm.broadcast(last, src=owner)
        return last

    def prefill(self, p: PrefillPlan) -> torch.Tensor | None:
        ids, positions = self._prefill_inputs(p)
        with forward_context(self._prefill_context(p)):
            hidden = self.model(ids, positions)  # [2L, hidden]
        if p.all_logits:
            shards = self.comm.all_gather(hidden)
            full = layout.unshard(list(shards.unbind(0)), len(p.tokens))
            return self.model.compute_logits(full) if self.rank == 0 else None
        if not p.sample:
            return None
        last = self._last_hidden(p, hidden)
        return self.model.compute_logits(last) if self.rank == 0 else None

    def mixed(self, p: PrefillPlan, d: DecodePlan) -> torch.Tensor | None:
        """A chunk and a decode batch in one forward (eager: the chunk's shapes vary).
        Logits: the chunk's last position first if it ends the prompt, then the decode
        tokens'."""
        ids, positions = self._prefill_inputs(p)
        meta = self._decode_meta(d)
        keys = self._host_keys(d, meta)
        ids_d, positions_d, rows, lens, slots = meta.to(self.device)
        ctx = MixedContext(self._prefill_context(p),
                           DecodeContext(self, rows, lens, slots, keys), len(ids))
        with forward_context(ctx):
            hidden = self.model(torch.cat([ids, ids_d]), torch.cat([positions, positions_d]))
        out = hidden[len(ids) :]
        if p.sample:
            out = torch.cat([self._last_hidden(p, hidden[: len(ids)]), out])
        return self.model.compute_logits(out) if self.rank == 0 else None

    def decode(self, p: DecodePlan) -> torch.Tensor | None:
        meta = self._decode_meta(p)
        graph = self.graphs.get(len(p.tokens)) if self.graphs is not None else None
        if graph is not None:
            return self.graphs.replay(graph, meta)
        return self.decode_forward(meta.to(self.device), self._host_keys(p, meta))

    def _host_keys(self, p: DecodePlan, meta: torch.Tensor) -> list | None:
        """For a backend whose decode attention reads them from the host: the slots of each
        sequence's keys, worked out once per step (None where the device reads the tables)."""
        if self.device_decode:
            return None
        return [_on(self.tables.slots(row, 0, n), self.device)
                for row, n in zip(p.rows, meta[3].tolist())]

    def _decode_meta(self, p: DecodePlan) -> torch.Tensor:
        """`[5, B]` int64 on the host: token ids, positions, block-table rows, keys to
        attend on this rank, and the slots the new K/V go to."""
        r, b, host = self.rank, self.block_size, self.tables.host
        lens = [n[r] + (o == r) for n, o in zip(p.kv_len, p.owner)]
        slots = [host[row][n[r] // b] * b + n[r] % b if o == r else self.kv.spare
                 for row, n, o in zip(p.rows, p.kv_len, p.owner)]
        return torch.tensor([p.tokens, p.positions, p.rows, lens, slots], dtype=torch.long)

    def decode_forward(self, meta: torch.Tensor, keys: list | None = None
                       ) -> torch.Tensor | None:
        """The decode forward for `meta` (as `_decode_meta` lays it out, on the device);
        `keys`: each sequence's key slots, for a backend whose decode attention reads them
        on the host."""
        ids, positions, rows, lens, slots = meta
        with forward_context(DecodeContext(self, rows, lens, slots, keys)):
            hidden = self.model(ids, positions)  # [B, hidden], the same on every rank
        return self.model.compute_logits(hidden) if self.rank == 0 else None
