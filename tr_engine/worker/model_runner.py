"""The model runner: one per rank, runs the forward a step plan describes.

Every rank runs the same plan: a prefill chunk (zigzag-sharded over the ranks, attention by
the plan's strategy, the chunk's KV stored where the plan says), a decode step (the same
new tokens on every rank, each rank attending its own KV shard, one all-gather per layer to
merge), or a mixed step: both in one forward, the chunk's shard of tokens followed by the
decode tokens, so the weights are read once for both.

Short requests live on one rank (their *home*, see the scheduler): a rank also runs the
chunk of a short prompt homed on it, and decodes its own short requests after the sharded
ones. Their attention is plain and local, and in the decode merge their rows keep the
rank's own result; every rank's merge buffer has the same rows (the sharded sequences,
then room for the most any rank has of its own), so the collectives match. Ranks with no
work of any kind in a step skip the forward.

Only rank 0 needs logits: the rows it does not have (the last position of another rank's
short prompt, another rank's short requests' tokens) come to it in one all-gather of hidden
states at the end of the step.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from .. import envs
from ..attention import Rates, gather_merge, get_strategy
from ..attention.cost import prefix_cost
from ..backends import SOLO, Backend, Communicator
from ..config import EngineConfig
from ..distributed import tensor_parallel, zigzag
from ..distributed.tensor_parallel import Mesh, Split
from ..kv.cache import BlockTables, KVCache
from ..kv.host_tier import HostTier
from ..kv.quant import kv_format
from ..layers.context import ForwardContext, forward_context
from ..models import ModelConfig
from ..models.loader import load_model, read_config, resolve_dtype
from ..plan import ClusterInfo, DecodePlan, PrefillPlan, StepPlan
from .graphs import DecodeGraphs

log = logging.getLogger("tr_engine")


class PrefillContext(ForwardContext):
    def __init__(self, runner: ModelRunner, plan: PrefillPlan, n_valid: int) -> None:
        self.runner, self.plan, self.n_valid = runner, plan, n_valid
        self.token_chunk = runner.config.token_chunk
        self.group = runner.group if plan.home < 0 else SOLO  # a short prompt: this rank's
        cached = plan.prefix_len[runner.rank]
        tables = runner.tables
        # the same slots in every layer: worked out once per forward. Every rank passes a
        # prefix (maybe empty) when any has one: the strategies' collectives depend on it.
        self.prefix = None if sum(plan.prefix_len) == 0 else _on(
            tables.slots(plan.row, 0, cached), runner.device)
        self.store = _on(tables.slots(plan.row, cached, n_valid), runner.device)

    def attention(self, layer, q, k, v, scale):
        cache = self.runner.kv
        if (cache.format.quantized and self.plan.strategy == "local"
                and self.prefix is not None and _count(self.prefix) > 0):
            out = self._local_over_pieces(layer, q, k, v, scale)
            cache.store(layer, self.store, k[: self.n_valid], v[: self.n_valid])
            return out
        prefix = {}
        if self.prefix is not None:  # this rank's share of the prefix (order does not matter)
            prefix["k_prefix"], prefix["v_prefix"] = cache.gather(layer, self.prefix)
        strategy = get_strategy(self.plan.strategy)
        out, _ = strategy(q, k, v, self.group, causal=True, scale=scale, **prefix)
        cache.store(layer, self.store, k[: self.n_valid], v[: self.n_valid])
        return out

    def _local_over_pieces(self, layer, q, k, v, scale):
        """The local strategy over an 8-bit prefix: up to `prefix_piece` keys at a time
        widened into one buffer (no copy of the whole prefix is made) and attended without
        a mask, the pieces merged by their LSE, then the chunk's own keys under the causal
        mask."""
        backend, slots, pool = self.runner.backend, self.prefix, self.runner.kv.layer(layer)
        n = _count(slots)
        piece = min(n, prefix_piece(k.shape[1], k.shape[2], k.element_size()))
        kp, vp = (torch.empty((piece, *k.shape[1:]), dtype=q.dtype, device=q.device)
                  for _ in range(2))
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for a in range(0, n, piece):
            rows = (slice(slots.start + a, min(slots.stop, slots.start + a + piece))
                    if isinstance(slots, slice) else slots[a : a + piece])
            m = _count(rows)
            backend.dequantize_rows(pool.k, pool.k_scale, rows, kp[:m])
            backend.dequantize_rows(pool.v, pool.v_scale, rows, vp[:m])
            backend.merge_(out, lse, *backend.attention(q, kp[:m], vp[:m], False, scale))
        backend.merge_(out, lse, *backend.attention(q, k, v, True, scale))
        return out.to(q.dtype)


def _feeds(plan: StepPlan, token: int) -> bool:
    """Whether a step computes `token` at some position (a prompt chunk or a decode)."""
    parts = [plan.prefill, *plan.local]
    return any(token in p.tokens for p in parts if p is not None) or (
        plan.decode is not None and token in plan.decode.tokens)


# An 8-bit prefix is widened for the local strategy in pieces of up to PREFIX_PIECE_BYTES
# per K (and per V): 128K keys of 8 KV heads of 128 in bf16, so a 128K follow-up's prefix goes
# to attention in one call, as it does unquantized. A piece is a multiple of PREFIX_PIECE keys
# (two of the largest key pieces the CUDA backend prepares cuDNN for, which it takes in one
# call), so each piece meets prepared shapes.
PREFIX_PIECE = 32768
PREFIX_PIECE_BYTES = 256 * 2**20


def prefix_piece(kv_heads: int, head_dim: int, elem: int) -> int:
    """Keys of an 8-bit prefix widened at a time (see PREFIX_PIECE_BYTES)."""
    keys = PREFIX_PIECE_BYTES // (kv_heads * head_dim * elem)
    return max(PREFIX_PIECE, keys // PREFIX_PIECE * PREFIX_PIECE)


def _count(slots) -> int:
    return slots.stop - slots.start if isinstance(slots, slice) else len(slots)


def _on(slots, device):
    return slots if isinstance(slots, slice) else slots.to(device)


class DecodeContext(ForwardContext):
    """One new token per sequence. Everything this rank needs is in one device tensor
    `meta` `[6, B]` (`ModelRunner._decode_meta`): each sequence's block-table row, how many
    of its keys this rank attends (the new one included on its owner), the slot the new K/V
    goes to (a spare slot on the ranks that do not keep it), and whether the row is this
    rank's own (a short request: no merge). No host value steers the kernels, so a graph
    captured once replays every step. `merge`: the rows' partial results are merged over
    the ranks (one all-gather per layer); else every row is this rank's alone."""

    def __init__(self, runner: ModelRunner, meta: torch.Tensor, keys: list | None = None,
                 merge: bool = True) -> None:
        self.runner = runner
        self.rows, self.lens, self.slots = meta[2], meta[3], meta[4]
        self.own = meta[5].bool()[:, None, None]  # once, not in every layer
        self.keys = keys  # host-driven backends: each sequence's key slots, from the host
        self.merge = merge and runner.world > 1

    def attention(self, layer, q, k, v, scale):
        # q [B, Hq, D], k/v [B, Hkv, D]
        runner = self.runner
        runner.kv.store(layer, self.slots, k, v)  # quantized there where the pages are 8-bit
        pool = runner.kv.layer(layer)  # as stored: the kernel reads 8-bit pages and scales
        tables = runner.tables
        args = (q, pool.k, pool.v, tables.device, self.rows, self.lens, tables.block_size,
                scale)
        attend = runner.backend.decode_attention
        extra = {"keys": self.keys}
        if pool.k_scale is not None:
            extra.update(k_scale=pool.k_scale, v_scale=pool.v_scale)
        if not self.merge:
            return attend(*args, **extra)[0]
        # out and lse go straight into the one float32 buffer the ranks all-gather
        b, h, d = q.shape
        packed = torch.empty((b, h, d + 1), dtype=torch.float32, device=q.device)
        attend(*args, packed[..., :d], packed[..., d], **extra)
        merged = gather_merge(packed, q.dtype, runner.group)[0]
        if not runner.placement:
            return merged
        own = packed[..., :d].to(q.dtype)  # a short request's result is whole already
        return torch.where(self.own, own, merged)


class StepContext(ForwardContext):
    """Several parts of one step in one forward (a sharded chunk's shard, a short prompt's
    chunk, the decode tokens), `(context, tokens)` in that order. Each part's attention
    runs as in a step of its own, in the same order on every rank (so the collectives
    match); the token-wise layers see them together."""

    def __init__(self, parts: list[tuple[ForwardContext, int]]) -> None:
        self.parts = parts
        self.token_chunk = next((c.token_chunk for c, _ in parts if c.token_chunk), None)

    def attention(self, layer, q, k, v, scale):
        outs, a = [], 0
        for ctx, n in self.parts:
            outs.append(ctx.attention(layer, q[a : a + n], k[a : a + n], v[a : a + n], scale))
            a += n
        return torch.cat(outs)


class ModelRunner:
    """`rank` and `world` are this rank's place on the sequence ring and the ring's size
    (the sequence-parallel ranks, which the plans index); with tensor parallelism
    (`mesh.tp` > 1) each of them is a group of ranks splitting the weights, all running
    the same plans on the same tokens."""

    def __init__(self, config: EngineConfig, model_path: str, backend: Backend, mesh: Mesh,
                 local_rank: int, group: dist.ProcessGroup | None, tp_group=SOLO) -> None:
        self.config, self.backend, self.mesh = config, backend, mesh
        self.rank, self.world, self.group = mesh.sp_rank, mesh.sp_size, group
        self.comm = Communicator(group)
        self.device = backend.set_device(local_rank)

        backend.check_kv_cache_dtype(config.kv_cache_dtype)  # every rank, torchrun's too
        self.kv_format = kv_format(config.kv_cache_dtype, envs.kv_unit_scale())
        t = time.perf_counter()
        full = read_config(model_path)
        self.dtype = resolve_dtype(config.dtype, full)
        self._check_fits(full)
        split = Split(mesh.tp, mesh.tp_rank, Communicator(tp_group))
        self.model, self.model_config = load_model(model_path, self.device, self.dtype,
                                                   load_format=config.load_format,
                                                   seed=config.seed, split=split)
        # this rank's share of the model: its heads (of the KV cache too), MLP, vocabulary
        self.shard_config = tensor_parallel.shard_config(self.model_config, mesh.tp)
        log.info("rank %d: weights loaded in %.1f s (%s, %s%s)", mesh.rank,
                 time.perf_counter() - t, self.model_config.architecture, self.dtype,
                 f", tensor-parallel {mesh.tp_rank} of {mesh.tp}" if mesh.tp > 1 else "")

        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.block_size = config.block_size
        # Whether this rank has passed its step's last collective (see `_head`); the
        # cluster clears it before each plan goes out.
        self.past_collectives = False
        self._layer_ready = None  # this step's host tier events per layer (run)
        self.fault_token = envs.inject_fault_token() if mesh.rank == 0 else None
        self._fault = False  # this step raises where rank 0 computes logits (tests)
        self.num_pages = self._plan_memory() // self.block_size
        self.capacity = self.num_pages * self.block_size
        mc = self.shard_config
        self.kv = KVCache(mc.num_layers, self.num_pages, self.block_size, mc.num_kv_heads,
                          mc.head_dim, self.dtype, self.device, self.kv_format)
        # the host tier: its share of kv_offloading_size (GiB over every rank)
        self.host_tier = None
        if config.kv_offloading_size > 0:
            size = config.kv_offloading_size * 2**30 / mesh.world
            self.host_tier = HostTier(self.kv, HostTier.slots_for(size, self.kv), backend,
                                      self.device)
            log.info("rank %d: host tier of %d pages (%.2f GiB)", mesh.rank,
                     self.host_tier.num_slots, size / 2**30)
        # a row per running sequence and one for prompt_logits
        self.tables = BlockTables(config.max_num_seqs + 1,
                                  -(-self.max_model_len // self.block_size) + 1,
                                  self.block_size, self.device)
        backend.prepare_attention(mc.num_heads, mc.num_kv_heads, mc.head_dim, self.dtype,
                                  self.device)
        if self.kv_format.quantized:
            backend.prepare_dequantize(self.kv_format.storage, mc.num_kv_heads, mc.head_dim,
                                       self.dtype, self.device)
        backend.prepare_matmuls(*self._matmul_shapes())
        # short requests may live on single ranks (their rows skip the decode merge)
        self.placement = self.world > 1 and config.shard_min_tokens > 0
        self.rates = self._calibrate()
        self.graphs = None
        # whether decode attention reads the block tables on the device (else the host
        # works out each sequence's key slots once a step)
        self.device_decode = backend.graph_safe_decode(self.dtype, mc.head_dim)
        if not config.enforce_eager and self.device_decode:
            # with several ranks, graphs that merge over them; with short requests placed on
            # single ranks also graphs of a rank's own requests alone (no collective)
            merging = [True] if self.world > 1 else [False]
            self.graphs = DecodeGraphs(backend, self.device, self.rank, self.decode_forward,
                                       self.blank_meta, config.max_num_seqs,
                                       [*merging, False] if self.placement else merging)

    def info(self) -> ClusterInfo:
        """What rank 0's engine and scheduler need to know of this rank's set-up."""
        sc = self.shard_config
        return ClusterInfo(num_pages=self.num_pages, block_size=self.block_size,
                           max_model_len=self.max_model_len,
                           prefix_cost=prefix_cost(self.model_config),
                           num_heads=sc.num_heads, num_kv_heads=sc.num_kv_heads,
                           head_dim=sc.head_dim, elem=self.dtype.itemsize, rates=self.rates,
                           host_slots=self.host_tier.num_slots if self.host_tier else 0,
                           page_bytes=self.kv.page_bytes())

    # ---- set-up ------------------------------------------------------------------------
    def _check_fits(self, full: ModelConfig) -> None:
        """Refuse, before loading, weights that would not fit this device at this
        tensor-parallel size, naming the smallest size at which they do."""
        if self.backend.device_type == "cpu":
            return
        free, _ = self.backend.mem_get_info()
        error = tensor_parallel.fit_error(full, self.dtype.itemsize, self.mesh.tp, free)
        if error is not None:
            raise ValueError(error)

    def _plan_memory(self) -> int:
        """KV slots per rank: a share of the free memory after the prefill workspace, no more
        than the configured limits can ever use, and the same on every rank."""
        mc, cfg = self.shard_config, self.config
        kv_bytes, scale_bytes = KVCache.bytes_per_token(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype, self.kv_format)
        per_token = kv_bytes + scale_bytes
        # a sequence's share of the pool, plus the blocks an uneven last chunk may add
        useful = (-(-self.max_model_len * cfg.max_num_seqs // self.world)
                  + 3 * cfg.block_size * cfg.max_num_seqs)
        if cfg.kv_cache_tokens is not None:
            capacity = cfg.kv_cache_tokens
        else:
            free, _ = self.backend.mem_get_info()
            if self.backend.device_type == "cpu":
                free //= self.mesh.world  # the ranks share the host's memory
            budget = (free - self._workspace_bytes()) * cfg.kv_cache_fraction
            capacity = min(useful, max(0, int(budget // per_token)))
        cap = torch.tensor([capacity], dtype=torch.int64, device=self.device)
        if self.mesh.world > 1:  # every rank of the world: a TP group's pools match too
            dist.all_reduce(cap, op=dist.ReduceOp.MIN)
        capacity = int(cap.item())
        if capacity < 2 * cfg.block_size:
            raise RuntimeError(
                f"no memory left for the KV cache ({capacity} tokens per rank, less than two "
                f"blocks of {cfg.block_size}); lower "
                "prefill_chunk/token_chunk, use more ranks, or set kv_cache_tokens"
            )
        fmt = self.kv_format
        stored = (f"{fmt.name}{' (every scale 1.0)' if fmt.unit_scale else ''}: "
                  f"{kv_bytes} B of K/V + {scale_bytes} B of scales"
                  if fmt.quantized else f"{self.dtype}: {kv_bytes} B")
        log.info("rank %d: KV cache %d tokens per rank (%.2f GiB; per token %s), %d in all",
                 self.mesh.rank, capacity, capacity * per_token / 2**30, stored,
                 capacity * self.world)
        return capacity

    def _workspace_bytes(self) -> int:
        """An upper estimate of prefill activations for one chunk on one rank."""
        mc, cfg = self.shard_config, self.config
        e = torch.empty((), dtype=self.dtype).element_size()
        n = zigzag.padded_len(min(cfg.prefill_chunk, self.max_model_len), self.world,
                              cfg.block_size) // self.world
        c = min(cfg.token_chunk, n)
        hidden = 3 * n * mc.hidden_size * e
        qkv = n * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim * e
        attn = n * mc.num_heads * (mc.head_dim * (3 * e + 4) + 8)  # out, fp32 acc, buffers
        mlp = 3 * c * mc.intermediate_size * e
        logits = 4 * self.model_config.vocab_size * 4
        widened = 0  # an 8-bit prefix's piece, K and V in the model's dtype
        if self.kv_format.quantized:
            widened = 2 * min(self.max_model_len, prefix_piece(
                mc.num_kv_heads, mc.head_dim, e)) * mc.num_kv_heads * mc.head_dim * e
        return int(1.3 * (hidden + qkv + attn + mlp + logits) + widened)

    def _matmul_shapes(self) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor],
                                      list[int]]:
        """What a step's matrix products can be, for Backend.prepare_matmuls: one weight of
        each shape among the model's linear layers (the head apart), the token counts a
        step hands them (at most token_chunk: prefill works in slices of that many), and
        the rows the head takes (a step's sampled rows)."""
        cfg = self.config
        weights: dict[tuple, torch.Tensor] = {}
        head = getattr(self.model, "lm_head", None)
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                weights.setdefault((*module.weight.shape, module.weight.dtype), module.weight)
        limit = cfg.token_chunk
        grid = {*range(1, 65), *range(64, 4096 + cfg.max_num_seqs + 1, 16),
                *range(4096, limit + 1, 64), limit}  # every count to 64, then 1 in 16 or 64
        rows = sorted(r for r in grid if r <= limit)
        head_rows = list(range(1, cfg.max_num_seqs + 2))
        heads = [head.weight] if head is not None else []
        return list(weights.values()), rows, heads, head_rows

    def _calibrate(self) -> Rates:
        """Measure this platform's attention rate and link bandwidth for the cost model."""
        mc, dev = self.shard_config, self.device
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
        """Run one step; returns float32 logits on rank 0 (None elsewhere), one row per
        entry of `plan.sampled()`."""
        self.past_collectives = False
        self._fault = self.fault_token is not None and _feeds(plan, self.fault_token)
        # host tier copies: layer by layer under a prefill's forward (its layer l waits for
        # their layer l); before a decode step's (graphs replay the whole model)
        self._layer_ready = None
        if plan.copy_wait:  # the step reuses pages or slots of copies ahead of eviction
            self.host_tier.wait_ahead(plan.copy_wait)
        if plan.copies:
            self._layer_ready = self.host_tier.copy(
                [c for c in plan.copies if c.rank == self.rank], timed=self.mesh.rank == 0,
                layered=plan.kind != "decode")
        for op in plan.tables:
            if op.rank == self.rank:
                self.tables.apply(op)
        try:
            if plan.kind == "prefill" and not plan.local:
                return self.prefill(plan.prefill)
            if plan.kind == "decode":
                return self.decode(plan)
            return self.mixed(plan)
        finally:
            if self._layer_ready is not None:
                self.host_tier.finish()
                self._layer_ready = None

    def _prefill_inputs(self, p: PrefillPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of a chunk: token ids and positions, on the device."""
        total, world, r, b = len(p.tokens), self.world, self.rank, self.block_size
        ids = zigzag.shard(torch.tensor(p.tokens, dtype=torch.long), world, r, align=b)
        positions = zigzag.positions(total, world, r, b) + p.start
        positions = positions.clamp(max=p.start + total - 1)  # pads: any
        return ids.to(self.device), positions.to(self.device)

    def _prefill_context(self, p: PrefillPlan) -> PrefillContext:
        n_valid = zigzag.local_len(len(p.tokens), self.world, self.rank, self.block_size)
        return PrefillContext(self, p, n_valid)

    def _last_hidden(self, p: PrefillPlan, hidden: torch.Tensor) -> torch.Tensor:
        """The chunk's last position's hidden state, on every rank (its owner sends it)."""
        owner, index = zigzag.owner(len(p.tokens), self.world, len(p.tokens) - 1,
                                    self.block_size)
        last = hidden[index : index + 1].contiguous() if self.rank == owner \
            else hidden[:1].clone()
        self.comm.broadcast(last, src=owner)
        return last

    def prefill(self, p: PrefillPlan) -> torch.Tensor | None:
        ids, positions = self._prefill_inputs(p)
        ctx = self._prefill_context(p)
        ctx.layer_ready = self._layer_ready  # (the forward's own context waits for them)
        with forward_context(ctx):
            hidden = self.model(ids, positions)  # [2L, hidden]
        if p.all_logits:
            shards = self.comm.all_gather(hidden)
            full = zigzag.unshard(list(shards.unbind(0)), len(p.tokens))
            return self._head(full) if self.rank == 0 else None
        if not p.sample:
            return None
        last = self._last_hidden(p, hidden)
        return self._head(last) if self.rank == 0 else None

    def mixed(self, plan: StepPlan) -> torch.Tensor | None:
        """Every part of a step this rank has in one forward (eager: the chunks' shapes
        vary): the sharded chunk's shard, the chunk of a short prompt homed here, the
        decode tokens (see StepContext)."""
        parts = []  # (context, ids, positions)
        p, d = plan.prefill, plan.decode
        if p is not None:
            parts.append((self._prefill_context(p), *self._prefill_inputs(p)))
        mine = next((lp for lp in plan.local if lp.home == self.rank), None)
        if mine is not None:
            n = len(mine.tokens)
            ids = torch.tensor(mine.tokens, dtype=torch.long, device=self.device)
            positions = torch.arange(mine.start, mine.start + n, device=self.device)
            parts.append((PrefillContext(self, mine, n), ids, positions))
        idx: list[int] = []
        if d is not None:
            idx, width, merge = self._decode_rows(d)
            if width:
                meta = self._decode_meta(d, idx, width)
                keys = self._host_keys(meta)
                meta = meta.to(self.device)
                parts.append((DecodeContext(self, meta, keys, merge), meta[0], meta[1]))
        if not parts:  # nothing of this step is this rank's
            return self._logits(plan, None, None, None, idx)
        ctx = StepContext([(c, len(ids)) for c, ids, _ in parts])
        ctx.layer_ready = self._layer_ready
        with forward_context(ctx):
            hidden = self.model(torch.cat([ids for _, ids, _ in parts]),
                                torch.cat([pos for _, _, pos in parts]))
        a, shared_last, local_last, dec = 0, None, None, None
        if p is not None:
            n = len(parts[0][1])
            if p.sample:
                shared_last = self._last_hidden(p, hidden[:n])
            a = n
        if mine is not None:
            a += len(mine.tokens)
            local_last = hidden[a - 1 : a] if mine.sample else None
        if idx:
            dec = hidden[a : a + len(idx)]
        return self._logits(plan, shared_last, local_last, dec, idx)

    def decode(self, plan: StepPlan) -> torch.Tensor | None:
        d = plan.decode
        idx, width, merge = self._decode_rows(d)
        dec = None
        if width:
            meta = self._decode_meta(d, idx, width)
            graph = self.graphs.get(width, merge) if self.graphs is not None else None
            if graph is not None:
                dec = self.graphs.replay(graph, meta)
            else:
                dec = self.decode_forward(meta.to(self.device), self._host_keys(meta), merge)
            dec = dec[: len(idx)]
        return self._logits(plan, None, None, dec, idx)

    def _decode_rows(self, d: DecodePlan) -> tuple[list[int], int, bool]:
        """The decode sequences this rank computes (indices into the plan), the rows of its
        batch (the merge buffer's, the same on every rank, when it merges), and whether
        it merges (any sharded sequence on a world of several ranks)."""
        idx = d.rows_of(self.rank)
        merge = self.world > 1 and d.num_sharded > 0
        return idx, d.width(self.world) if merge else len(idx), merge

    def _logits(self, plan: StepPlan, shared_last: torch.Tensor | None,
                local_last: torch.Tensor | None, dec: torch.Tensor | None,
                idx: list[int]) -> torch.Tensor | None:
        """Rank 0's logits for `plan.sampled()`, from this step's hidden states: the sharded
        chunk's last position (every rank has it), this rank's short prompt's last position,
        its decode rows `dec` (the plan's sequences `idx`). The rows of other ranks' short
        requests come in one all-gather (every rank takes part when any is needed)."""
        d = plan.decode
        homes = d.homes if d is not None else []
        # the seq_ids of the rows each rank alone has, in order: its short prompt's end,
        # its decode rows
        private = [[lp.seq_id for lp in plan.local if lp.sample and lp.home == r]
                   + [d.seq_ids[i] for i, h in enumerate(homes) if h == r]
                   for r in range(self.world)]
        width = max(len(ids) for ids in private)
        pool = [t for t in (shared_last, local_last, dec) if t is not None]
        gathered = None
        if any(private[1:]):
            mine = torch.zeros((width, self.model_config.hidden_size), dtype=self.dtype,
                               device=self.device)
            own = [t for t in (local_last, None if dec is None else
                               dec[len(idx) - homes.count(self.rank):]) if t is not None]
            if own:
                rows = torch.cat(own)
                mine[: len(rows)] = rows
            gathered = self.comm.all_gather(mine)  # [P, width, hidden]
        if self.rank != 0:
            return None
        # where each sampled row lies in cat(pool) (rank 0's own) + gathered.flatten
        at: dict[int, int] = {}  # seq_id -> index
        if shared_last is not None:
            at[plan.prefill.seq_id] = 0
        if local_last is not None:
            at[private[0][0]] = len(at)
        n = len(at)
        at.update((d.seq_ids[i], n + j) for j, i in enumerate(idx))
        base = sum(len(t) for t in pool)
        for r in range(1, self.world):
            at.update((s, base + r * width + j) for j, s in enumerate(private[r]))
        rows = [at[s] for s in plan.sampled()]
        if not rows:
            return None
        hidden = (pool[0] if len(pool) == 1 else torch.cat(pool)) if pool else None
        if gathered is not None:
            flat = gathered.flatten(0, 1)
            hidden = flat if hidden is None else torch.cat([hidden, flat])
        if rows != list(range(len(rows))) or len(rows) != len(hidden):
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return self._head(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rank 0's logits `[rows, vocab]` float32: the step's last work, after every
        collective of the other ranks' share (without tensor parallelism, whose vocabulary
        split gathers again), so an exception here (an out-of-memory on a long prompt's
        logprobs) fails the step alone and leaves the ranks in step."""
        self.past_collectives = self.mesh.tp == 1
        if self._fault:
            raise RuntimeError("injected fault (TR_ENGINE_INJECT_FAULT)")
        return self.model.compute_logits(hidden)

    def _host_keys(self, meta: torch.Tensor) -> list | None:
        """For a backend whose decode attention reads them from the host: the slots of each
        row's keys, worked out once per step (None where the device reads the tables)."""
        if self.device_decode:
            return None
        return [_on(self.tables.slots(row, 0, n), self.device)
                for row, n in zip(meta[2].tolist(), meta[3].tolist())]

    def blank_meta(self, width: int) -> torch.Tensor:
        """Decode inputs of rows that compute nothing useful: token 0 at position 0, no keys
        to attend, K/V stored in the spare slot, the rank's own (merged with nothing)."""
        meta = torch.zeros((6, width), dtype=torch.long)
        meta[4] = self.kv.spare
        meta[5] = 1
        return meta

    def _decode_meta(self, p: DecodePlan, idx: list[int], width: int) -> torch.Tensor:
        """`[6, width]` int64 on the host for the plan's sequences `idx`, then blank rows:
        token ids, positions, block-table rows, keys to attend on this rank, the slots the
        new K/V go to, and whether the row is this rank's own (a short request)."""
        r, b, host = self.rank, self.block_size, self.tables.host
        meta = self.blank_meta(width)
        if not idx:
            return meta
        homes = p.homes
        cols = []
        for i in idx:
            n, o, row = p.kv_len[i][r], p.owner[i], p.rows[i]
            slot = host[row][n // b] * b + n % b if o == r else self.kv.spare
            cols.append((p.tokens[i], p.positions[i], row, n + (o == r), slot, homes[i] >= 0))
        meta[:, : len(idx)] = torch.tensor(cols, dtype=torch.long).T
        return meta

    def decode_forward(self, meta: torch.Tensor, keys: list | None = None,
                       merge: bool = True) -> torch.Tensor:
        """The decode forward for `meta` (as `_decode_meta` lays it out, on the device) ->
        hidden states `[B, hidden]`; `keys`: each row's key slots, for a backend whose decode
        attention reads them on the host; `merge`: see DecodeContext."""
        with forward_context(DecodeContext(self, meta, keys, merge)):
            return self.model(meta[0], meta[1])
