"""CUDA backend: NCCL for communication; cuDNN SDPA with LSE, flash SDPA as fallback.

Both raw ops take grouped-query attention natively (fewer K/V heads than Q heads),
rectangular blocks and head dims 64 and 128, and return the natural-log LSE (cuDNN as
[B, H, S, 1], flash as [B, H, S]). They are called on [1, H, T, D] views of our [T, H, D]
tensors, so nothing is copied on the way in. float32 inputs use the math path.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from .base import Backend
from .reference import math_attention

log = logging.getLogger("tr_engine")


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D], a view


def _cudnn_batched(q, k, v, causal, scale):
    """cuDNN on `[B, H, T, D]` views -> out `[B, T, Hq, D]`, lse `[B, T, Hq]` (views)."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    out, lse = res[0], res[1]
    return out.transpose(1, 2), lse.reshape(lse.shape[:3]).transpose(1, 2)


def _cudnn(q, k, v, causal, scale):
    out, lse = _cudnn_batched(_bhsd(q), _bhsd(k), _bhsd(v), causal, scale)
    return out[0], lse[0]


def _cudnn_pair(q2, k, v, scale):
    """Non-causal: q2 `[2, T, Hq, D]` (the same queries twice) against two pieces of n keys
    at once, k and v `[2n, Hkv, D]` (a batch of two, views of the pieces where they lie);
    returns out `[2, T, Hq, D]` and lse `[2, T, Hq]`, the first piece's then the second's."""
    n = k.shape[0] // 2
    return _cudnn_batched(q2.transpose(1, 2), k.unflatten(0, (2, n)).transpose(1, 2),
                          v.unflatten(0, (2, n)).transpose(1, 2), False, scale)


def _flash(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale
    )
    out, lse = res[0], res[1]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


FP8_CAPABILITY = (8, 9)


def cuda_kv_cache_dtypes(capability: tuple[int, int]) -> tuple[str, ...]:
    """The kv_cache_dtype values a card of this compute capability takes."""
    fp8 = ("fp8", "fp8_e4m3", "fp8_e5m2") if tuple(capability) >= FP8_CAPABILITY else ()
    return ("auto", *fp8)


def _math(q, k, v, causal, scale):
    return math_attention(q, k, v, causal, scale)


def _count_triton_builds(backend: Backend) -> None:
    """Every Triton specialisation compiled (or loaded from Triton's disk cache) in this
    process counts as a kernel build of `backend` (Backend.count_build)."""
    try:
        from triton import knobs

        runtime = knobs.runtime
        previous = runtime.jit_post_compile_hook
    except (ImportError, AttributeError):  # a Triton without the hook: not counted
        return

    def hook(**kw):
        backend.count_build(f"Triton {kw.get('repr', '?')}")
        return previous(**kw) if previous is not None else None

    runtime.jit_post_compile_hook = hook


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"

    # cuDNN is the fastest on big blocks (about 1.7x flash) but builds an execution graph
    # (~0.1 s) for every new shape; flash needs no build. Real traffic brings a new prompt
    # length (and a new cached prefix length) almost every request, and a step under a token
    # budget a new chunk length, so blocks of up to SMALL_QUERY_BLOCK queries meet cuDNN
    # only in shapes built at start-up (prepare_attention), the queries padded up to the
    # next of QUERY_BUCKETS (four a doubling from 512: at most a quarter of padding):
    # - against many keys without a mask (a chunk's queries over its cached prefix, a
    #   follow-up on a document), the keys go in pieces of KEY_PIECES keys, the largest while
    #   that many are left (a long prefix in few calls, a short one still on cuDNN); flash
    #   takes the keys left over. Two of the largest pieces go in one call as a batch of
    #   two: a chunk of a few hundred queries is only 1.2-1.5 waves of cuDNN's programs over
    #   the SMs, and twice as many fill them (one H100, 768 queries: 510 TFLOP/s one piece
    #   at a time, about 620 two at once);
    # - a causal square block of CAUSAL_MIN queries or more (a chunk over its own keys) is
    #   padded at its end, queries and keys alike: no real query sees a pad key under the
    #   mask, and the pad rows are dropped.
    # Other small blocks go to flash. Bigger blocks come from long prompts, whose chunks the
    # block-aligned layout pads to a bounded set of lengths (layout.padded_len); each new
    # cuDNN shape is logged.
    _BIG = (("cudnn", _cudnn), ("flash", _flash), ("math", _math))
    _SMALL = (("flash", _flash), ("cudnn", _cudnn), ("math", _math))
    SMALL_QUERY_BLOCK = 8192
    KEY_PIECES = (16384, 4096)
    CAUSAL_MIN = 1024
    QUERY_BUCKETS = (64, 128, 256, 512, *(b * m // 4 for b in (512, 1024, 2048, 4096)
                                          for m in (5, 6, 7, 8)))  # 64 .. 8192

    def __init__(self) -> None:
        super().__init__()
        try:
            from .cuda_merge import fused_merge_
        except ImportError:  # no Triton: the portable merge
            fused_merge_ = None
        self._fused_merge = fused_merge_
        try:
            from . import cuda_decode
        except ImportError:  # no Triton: the portable decode attention, no graphs
            cuda_decode = None
        self._decode = cuda_decode
        try:
            from .cuda_dequant import dequantize_rows
        except ImportError:  # no Triton: the portable dequantization
            dequantize_rows = None
        self._dequant = dequantize_rows
        self._sms: int | None = None
        self.cudnn_shapes: set[tuple] = set()  # shapes cuDNN has built a graph for
        if cuda_decode is not None:
            _count_triton_builds(self)
        self._piece_rows: tuple[int, ...] = ()  # query buckets prepared for key pieces
        self._pairs = False  # two of the largest pieces in one call (prepared)
        self._prepared: tuple | None = None  # prepare_attention's arguments
        self._prepared_on: set[int] = set()  # the threads that built its graphs

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def set_device(self, local_rank: int) -> torch.device:
        torch.cuda.set_device(local_rank)
        return self.device(local_rank)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def new_stream(self):
        return torch.cuda.Stream()

    def current_stream(self):
        return torch.cuda.current_stream()

    def stream(self, stream):
        return torch.cuda.stream(stream)

    def new_event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def graph_safe_decode(self, dtype: torch.dtype, head_dim: int) -> bool:
        return self._decode is not None and head_dim >= 16 and head_dim & (head_dim - 1) == 0

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def graph_capture(self, graph, pool=None):
        return torch.cuda.graph(graph, pool=pool)

    def decode_attention(self, q, k_cache, v_cache, tables, rows, lens, block_size, scale,
                         out=None, lse=None, keys=None, k_scale=None, v_scale=None):
        d = q.shape[-1]
        if not self.graph_safe_decode(q.dtype, d):
            return super().decode_attention(q, k_cache, v_cache, tables, rows, lens,
                                            block_size, scale, out, lse, keys, k_scale, v_scale)
        if self._sms is None:
            self._sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        splits = self._decode.decode_splits(q.shape[0], k_cache.shape[1], self._sms,
                                            quant=k_scale is not None)
        return self._decode.decode_attention(q, k_cache, v_cache, tables, rows, lens,
                                             block_size, scale, splits, out, lse,
                                             k_scale=k_scale, v_scale=v_scale)

    # fp8 pages: the decode kernel widens them in registers, which Triton builds for
    # compute capability 8.9 on (Ada, Hopper, Blackwell). No int8 kernel is built for CUDA.
    def kv_cache_dtypes(self) -> tuple[str, ...]:
        return cuda_kv_cache_dtypes(torch.cuda.get_device_capability())

    def _kv_cache_dtype_note(self) -> str:
        major, minor = torch.cuda.get_device_capability()
        return (f" (compute capability {major}.{minor}: fp8 pages need 8.9 or later; int8 pages "
                "are for Ascend and the CPU)")

    def dequantize_rows(self, stored, scale, slots, out):
        strided = isinstance(slots, slice) and slots.step not in (None, 1)
        if self._dequant is None or strided or not (stored.is_contiguous()
                                                    and scale.is_contiguous()):
            return super().dequantize_rows(stored, scale, slots, out)
        return self._dequant(stored, scale, slots, out)

    def prepare_dequantize(self, storage, hkv, d, dtype, device):
        """Build both variants (a run of slots, a list of them) and check them against the
        portable dequantization on this card: a wrong result turns the kernel off."""
        if self._dequant is None:
            return
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn((300, hkv, d), generator=g) * 4
        stored = x.clamp(-100, 100).to(storage).to(device)
        scale = torch.rand((300, hkv), generator=g).add_(0.01).to(device)
        slots = torch.randperm(300, generator=g)[:77].to(device)
        try:
            for rows in (slice(5, 282), slots):
                n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
                got = self._dequant(stored, scale, rows, torch.empty((n, hkv, d), dtype=dtype,
                                                                     device=device))
                want = super().dequantize_rows(stored, scale, rows, torch.empty_like(got))
                if not torch.equal(got, want):
                    raise RuntimeError(f"max difference {(got - want).abs().max().item():.3g}")
        except Exception as e:  # any failure: the portable path is right
            log.warning("Triton KV dequantization (%s) disagreed with the portable one or "
                        "failed (%s); 8-bit prefixes are widened by torch", storage, e)
            self._dequant = None

    def merge_gathered(self, gathered, dtype):
        if self._decode is None:
            return super().merge_gathered(gathered, dtype)
        return self._decode.merge_packed(gathered, dtype)

    def merge_(self, out, lse, out_b, lse_b) -> None:
        d = out.shape[-1]
        fusable = out.is_contiguous() and lse.is_contiguous() and d & (d - 1) == 0
        if fusable and self._fused_merge is not None:
            self._fused_merge(out, lse, out_b, lse_b)
        else:
            super().merge_(out, lse, out_b, lse_b)

    def prepare_shapes(self) -> list[tuple[int, int, bool]]:
        """The (queries, keys, causal) blocks prepare_attention builds."""
        return [(rows, keys, False) for keys in self.KEY_PIECES
                for rows in self.QUERY_BUCKETS] + \
            [(rows, rows, True) for rows in self.QUERY_BUCKETS if rows >= self.CAUSAL_MIN]

    def prepare_pair_shapes(self) -> list[tuple[int, int]]:
        """The (queries, keys of each piece) batches of two pieces prepare_attention builds."""
        return [(rows, max(self.KEY_PIECES)) for rows in self.QUERY_BUCKETS]

    def prepare_attention(self, hq, hkv, d, dtype, device):
        # torch keeps cuDNN's attention graphs per thread: they are built for this one
        self._prepared = (hq, hkv, d, dtype, device)
        self._prepared_on.add(threading.get_ident())
        if (dtype == torch.float32 or all(name != "cudnn" for name, _ in self._BIG)
                or ("cudnn", dtype, d, hq // hkv, False, self.SMALL_QUERY_BLOCK + 1)
                in self._refused):  # no cuDNN: float32, or the self-check turned it off
            return
        t = time.perf_counter()
        shapes = self.prepare_shapes()
        keys = max(max(n for _, n, _ in shapes), 2 * max(self.KEY_PIECES))  # pairs: two
        k = torch.randn((keys, hkv, d), dtype=dtype, device=device)
        q = torch.randn((max(self.QUERY_BUCKETS), hq, d), dtype=dtype, device=device)
        for rows, keys, causal in shapes:
            try:
                _cudnn(q[:rows], k[:keys], k[:keys], causal, d**-0.5)
            except RuntimeError as e:  # this build refuses the shape: flash then
                log.info("cuDNN attention refused %d x %d keys (%s); small blocks stay on "
                         "flash", rows, keys, e)
                self._piece_rows = ()
                return
            self.cudnn_shapes.add((rows, keys, hq, hkv, d, causal, dtype))
        self._piece_rows = self.QUERY_BUCKETS
        self._pairs = self._prepare_pairs(q, k, hq, hkv, d, dtype)
        torch.cuda.synchronize()
        built = len(shapes) + (len(self.prepare_pair_shapes()) if self._pairs else 0)
        log.info("cuDNN attention: %d block shapes built in %.1f s (thread %s)", built,
                 time.perf_counter() - t, threading.current_thread().name)

    def _prepare_pairs(self, q, k, hq, hkv, d, dtype) -> bool:
        """Build the batches of two key pieces; False (single pieces only) if refused."""
        for rows, keys in self.prepare_pair_shapes():
            try:
                _cudnn_pair(torch.stack([q[:rows], q[:rows]]), k[: 2 * keys], k[: 2 * keys],
                            d**-0.5)
            except RuntimeError as e:
                log.info("cuDNN attention refused two pieces of %d keys for %d queries "
                         "(%s); pieces go one at a time", keys, rows, e)
                return False
            self.cudnn_shapes.add((2, rows, keys, hq, hkv, d, False, dtype))
        return True

    def prepare_matmuls(self, weights, rows, heads, head_rows):
        """cuBLAS picks a kernel by shape, and CUDA loads a kernel at its first launch
        (lazy loading, the default since CUDA 12.2); loading may wait for the work queued
        on the device, such as a host-tier restore on a copy stream (one H100: the first
        follow-up from host memory held its first projection 284 ms until its restore had
        ended). Each shape once here loads the kernels the steps will use."""
        if not weights and not heads:
            return
        t = time.perf_counter()
        most = max([*rows, *head_rows])
        inputs = {}  # contiguous, as a step's are: one per input width
        with torch.inference_mode():
            for group, counts in ((weights, rows), (heads, head_rows)):
                for w in group:
                    x = inputs.get(w.shape[1])
                    if x is None:
                        x = inputs[w.shape[1]] = torch.randn((most, w.shape[1]), dtype=w.dtype,
                                                             device=w.device)
                    for m in counts:
                        torch.nn.functional.linear(x[:m], w)
        torch.cuda.synchronize()
        log.info("matrix products: %d shapes run once in %.1f s", len(weights) * len(rows)
                 + len(heads) * len(head_rows), time.perf_counter() - t)

    def prepare_thread(self):
        if self._prepared is not None and threading.get_ident() not in self._prepared_on:
            self.prepare_attention(*self._prepared)

    def _attention(self, q, k, v, causal, scale):
        tq = q.shape[0]
        rows = next((r for r in getattr(self, "_piece_rows", ()) if r >= tq), None)
        if rows is not None and q.dtype != torch.float32:
            try:
                if causal and tq >= self.CAUSAL_MIN:
                    return self._padded_causal(q, k, v, scale, rows)
                if not causal and k.shape[0] >= min(self.KEY_PIECES):
                    return self.attention_in_pieces(
                        lambda *a: _cudnn(*a[:3], False, a[3]),
                        lambda *a: _flash(*a[:3], False, a[3]), q, k, v, scale,
                        self.KEY_PIECES, rows, _cudnn_pair if self._pairs else None)
            except RuntimeError as e:  # refused after all: plain blocks from now on
                if self._pairs:  # the pairs first: single pieces may still be taken
                    self._pairs = False
                    log.warning("cuDNN attention on two key pieces at once failed (%s); "
                                "pieces go one at a time from now on", e)
                    return self._attention(q, k, v, causal, scale)
                log.warning("cuDNN attention in prepared shapes failed (%s); small blocks "
                            "go to flash from now on", e)
                self._piece_rows = ()
        shape_class = (q.dtype, q.shape[-1], q.shape[1] // k.shape[1], causal,
                       min(q.shape[0], self.SMALL_QUERY_BLOCK + 1))
        kernels = self._SMALL if q.shape[0] <= self.SMALL_QUERY_BLOCK else self._BIG
        if q.dtype == torch.float32:
            kernels = [kv for kv in kernels if kv[0] == "math"]
        elif kernels[0][0] == "cudnn":
            shape = (q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2], causal, q.dtype)
            if shape not in self.cudnn_shapes:
                self.cudnn_shapes.add(shape)
                q_rows, keys, hq, hkv, d, causal_, dtype = shape
                self.count_build(f"cuDNN attention graph for queries {q_rows}, keys {keys}, "
                                 f"heads {hq}/{hkv}, dim {d}, causal {causal_}, {dtype}")
        return self._first_accepting(kernels, shape_class, q, k, v, causal, scale)

    @staticmethod
    def _padded_causal(q, k, v, scale, rows):
        """Causal attention of a square block padded at its end to `rows` (a prepared
        shape): queries and keys of the pad come after every real one, so the causal mask
        keeps them out of every real row, and the pad rows are dropped. A block of exactly
        `rows` goes in contiguous too: torch keys cuDNN's graphs by strides as well as
        shapes, and a chunk's v is a view of the fused projection (one H100: mixed steps
        whose chunk was a bucket's size took 50-70 ms more, once per size)."""
        tq = q.shape[0]

        def pad(x):
            if rows == tq:
                return x.contiguous()
            return torch.cat([x, x.new_zeros((rows - tq, *x.shape[1:]))])

        out, lse = _cudnn(pad(q), pad(k), pad(v), True, scale)
        return out[:tq], lse[:tq]

    # Kernel self-check (Backend.self_check): the attention kernels and the Triton merge.
    _NAMES = {"cudnn": "cuDNN attention", "flash": "flash attention"}

    def self_check_kernels(self):
        attention = {self._NAMES[name]: fn for name, fn in self._BIG if name in self._NAMES}
        merges = {"Triton merge": self._fused_merge} if self._fused_merge is not None else {}
        return attention, merges

    def self_check_admits(self, kernel, q, k, causal):
        return q.dtype != torch.float32  # float32 goes to the math kernel

    def disable_kernel(self, kernel: str) -> str:
        if kernel == "Triton merge":
            self._fused_merge = None
            return "the portable merge"
        name = next(n for n, full in self._NAMES.items() if full == kernel)
        # the preference lists lose it, for this instance only (class attributes stay)
        self._BIG = tuple(kv for kv in self._BIG if kv[0] != name)
        self._SMALL = tuple(kv for kv in self._SMALL if kv[0] != name)
        rest = [self._NAMES.get(n, "the float32 math kernel") for n, _ in self._BIG]
        return ", then ".join(rest)
