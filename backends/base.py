"""The platform interface: one `Backend` per device family, chosen once by name.

A backend answers the few questions the engine asks of a platform (which torch device,
which torch.distributed backend, how much memory is free, how to order work on streams)
and supplies the one kernel everything else is built from: block attention that also
returns the log-sum-exp of each query row, so partial results can be merged exactly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("tr_engine")

# The kernel self-check's cases: (label, dtype, Tq, Tk, Hq, Hkv, D, causal), the blocks the
# engine sends (square causal prefill, TokenRing's 2L x L and L x 2L blocks, a decode row),
# with GQA and MHA, head dims 64 and 128. Causal blocks are square, as kernels get them.
SELF_CHECK_CASES = (
    ("prefill causal GQA", torch.bfloat16, 128, 128, 8, 2, 128, True),
    ("prefill 2L x L GQA", torch.bfloat16, 128, 64, 8, 2, 128, False),
    ("prefill L x 2L MHA", torch.bfloat16, 64, 128, 4, 4, 64, False),
    ("decode row GQA", torch.bfloat16, 1, 200, 8, 2, 128, False),
    ("prefill causal float16", torch.float16, 48, 48, 4, 2, 64, True),
    ("decode row float32", torch.float32, 1, 96, 4, 2, 64, False),
)
# Agreement asked of a fused kernel against the float32 math on the same inputs: bfloat16
# tolerance (out is rounded to 8 mantissa bits, |out| < 3 here). The merge works in float32
# on float32 inputs, so it must agree far more closely.
SELF_CHECK_TOL = 2e-2
SELF_CHECK_MERGE_TOL = 1e-4


@dataclass(frozen=True)
class KernelCheck:
    """The self-check of one fused kernel: `cases` run; if not `ok`, `error` says what
    disagreed or what it raised, and `fallback` what the backend uses instead."""

    kernel: str
    ok: bool
    cases: int
    error: str = ""
    fallback: str = ""


class Backend(ABC):
    """A device family. Subclasses are stateless apart from lazily created handles.

    Attention tensors use the token-major layout the engine keeps everywhere:
    q `[Tq, Hq, D]`, k and v `[Tk, Hkv, D]` with Hq a multiple of Hkv (grouped-query
    attention: query head h reads key/value head h // (Hq // Hkv)).
    """

    name: str  # registry name: "cpu", "cuda", "npu"
    device_type: str  # torch device type
    dist_backend: str  # torch.distributed backend: "gloo", "nccl", "hccl"

    def __init__(self) -> None:
        self._refused: set[tuple] = set()  # (kernel, *shape class) pairs a kernel refused
        # kernel variants built in this process (a cuDNN graph for a shape met the first
        # time, a Triton specialisation), and how many of them came before start-up ended
        self.kernel_builds = 0
        self._builds_at_start: int | None = None

    def count_build(self, what: str) -> None:
        """A kernel variant was built: counted and logged, as late once start-up has ended
        (a request waited for it)."""
        self.kernel_builds += 1
        if self._builds_at_start is None:
            log.debug("kernel build at start-up: %s", what)
        else:
            log.info("kernel build on a request's path: %s (%d since start-up)", what,
                     self.late_builds())

    def started(self) -> None:
        """Start-up has ended: builds from now on are late."""
        self._builds_at_start = self.kernel_builds

    def late_builds(self) -> int:
        """Kernel variants built since start-up ended."""
        if self._builds_at_start is None:
            return 0
        return self.kernel_builds - self._builds_at_start

    @classmethod
    def is_available(cls) -> bool:
        """True when this platform can run here (driver present and a device visible)."""
        return True

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.device_type, local_rank)

    def set_device(self, local_rank: int) -> torch.device:
        """Bind this process to card `local_rank`; returns the torch device."""
        return self.device(local_rank)

    def synchronize(self) -> None:  # noqa: B027 (the CPU has nothing to wait for)
        """Block the host until all queued work on the current device is done."""

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        raise NotImplementedError

    def device_count(self) -> int:
        return 1

    # Streams and events. The CPU runs everything in order, so its versions are no-ops.
    def new_stream(self):
        return None

    def current_stream(self):
        """The stream work is queued on now (None: the CPU, in order)."""
        return None

    def stream(self, stream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def new_event(self, timing: bool = False):
        return None

    # Attention.
    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block attention with its log-sum-exp.

        Returns out `[Tq, Hq, D]` in q's dtype and lse `[Tq, Hq]` float32 (natural log of
        the softmax denominator, scale included). With `causal`, the mask is aligned to the
        bottom right: query i sits at key position Tk - Tq + i, so a few new queries after
        a long cached prefix see all of it. Rows that see no key get out 0 and lse -inf.
        """
        tq, hq, d = q.shape
        tk = k.shape[0]
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        if tq == 0 or tk == 0:
            return empty_result(q)
        if not causal or tq == tk:
            return self._attention(q, k, v, causal, scale)
        if tq < tk:
            # Bottom-right causal = the queries against the prefix (no mask) merged with a
            # square causal block; only square causal blocks reach the kernel.
            p = tk - tq
            return self.attention_prefixed(q, k[:p], v[:p], k[p:], v[p:], True, scale)
        # More queries than keys: the first tq - tk rows see nothing.
        out, lse = empty_result(q)
        out[tq - tk :], lse[tq - tk :] = self._attention(q[tq - tk :], k, v, True, scale)
        return out, lse

    def attention_prefixed(self, q: torch.Tensor, k_prefix: torch.Tensor,
                           v_prefix: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`attention(q, cat(k_prefix, k), cat(v_prefix, v), causal, scale)` without the
        concatenation: q against the prefix with no mask (every query comes after all of
        it), merged with q against k, v (the mask, if causal, bottom-right aligned)."""
        if k_prefix.shape[0] == 0:
            return self.attention(q, k, v, causal, scale)
        out, lse = self.attention(q, k_prefix, v_prefix, False, scale)
        if k.shape[0] == 0:
            return out, lse
        out, lse = out.float().contiguous(), lse.float().contiguous()
        out_b, lse_b = self.attention(q, k, v, causal, scale)
        self.merge_(out, lse, out_b, lse_b)
        return out.to(q.dtype), lse

    def attention_in_pieces(self, fixed, rest, q, k, v, scale: float,
                            pieces: tuple[int, ...], rows: int, paired=None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-causal attention of q over many keys, in pieces whose shapes come from a small
        fixed set: `fixed(q, k, v, scale)` sees q padded with zero rows to `rows` and exactly
        one of `pieces` keys at a time (the largest first, while that many are left),
        `rest(...)` the unpadded q and the keys left over (fewer than the smallest piece);
        the parts merge by their LSE in float32. Exact: padded query rows are dropped, and
        key order does not matter without a mask. A kernel that builds a plan per shape
        (cuDNN) then meets one shape per query bucket and piece, whatever the key count.
        `paired(q2, k, v, scale)`, if given, takes two of the largest pieces in one call
        (twice the programs of one: a few queries fill the device): q2 `[2, rows, Hq, D]`
        the padded queries twice, k and v the two pieces one after the other; it returns
        out `[2, rows, Hq, D]` and lse `[2, rows, Hq]`, one result per piece."""
        tq, tk = q.shape[0], k.shape[0]
        # contiguous as the fixed shapes were built (a kernel may key its plans by strides)
        q_pad = (torch.cat([q, q.new_zeros((rows - tq, *q.shape[1:]))]) if rows > tq
                 else q.contiguous())
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        a, q_two, largest = 0, None, max(pieces)
        for piece in sorted(pieces, reverse=True):
            while tk - a >= piece:
                if paired is not None and piece == largest and tk - a >= 2 * piece:
                    if q_two is None:
                        q_two = torch.stack([q_pad, q_pad])
                    o, s = paired(q_two, k[a : a + 2 * piece], v[a : a + 2 * piece], scale)
                    for i in (0, 1):
                        self.merge_(out, lse, o[i, :tq], s[i, :tq])
                    a += 2 * piece
                    continue
                o, s = fixed(q_pad, k[a : a + piece], v[a : a + piece], scale)
                self.merge_(out, lse, o[:tq], s[:tq])
                a += piece
        if a < tk:
            o, s = rest(q, k[a:], v[a:], scale)
            self.merge_(out, lse, o, s)
        return out.to(q.dtype), lse

    def _first_accepting(self, kernels, shape_class: tuple, q, k, v, causal, scale
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the first of `kernels` ((name, fn) pairs, in order of preference) that takes
        this block. A kernel that refuses a shape class (RuntimeError) is not offered that
        class again, so the refusal costs once."""
        last_error = None
        for name, kernel in kernels:
            if (name, *shape_class) in self._refused:
                continue
            try:
                out, lse = kernel(q, k, v, causal, scale)
                return out, lse.float()
            except RuntimeError as e:  # this build does not support the shape or dtype
                self._refused.add((name, *shape_class))
                last_error = e
        raise RuntimeError(f"no {self.name} attention kernel accepted {shape_class}"
                           ) from last_error

    @abstractmethod
    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The platform kernel. Called only with Tq, Tk > 0 and, when causal, Tq == Tk."""

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: torch.Tensor,
        rows: torch.Tensor,
        lens: torch.Tensor,
        block_size: int,
        scale: float,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
        keys: list | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query row per sequence against its keys in a paged cache: q `[B, Hq, D]`;
        `[N, Hkv, D]` caches cut into pages of `block_size` slots; sequence b reads its
        first lens[b] keys through its block table `tables[rows[b]]` (key i sits in slot
        `tables[rows[b], i // block_size] * block_size + i % block_size`). tables `[R, W]`
        and rows, lens `[B]` are integer tensors on the device. Returns (out `[B, Hq, D]`,
        lse `[B, Hq]` float32); a sequence with no keys gets (0, -inf). Given `out` and
        `lse` (views, any float dtype), the results are written there: decode packs both
        into one buffer.

        A backend that captures graphs reads all of it on the device; this portable version
        runs `attention` per sequence on its keys: `keys[b]`, the slots the caller worked
        out on the host (a slice, a view, when they are one run of pages), or else the
        slots read from the tables here.

        k_scale, v_scale `[N, Hkv]` float32 (both or neither): the caches are 8-bit (fp8 or
        int8, tr_engine/kv/quant.py) and slot n of head h holds cache[n, h] x scale[n, h]."""
        outs, lses = [], []
        if keys is None:
            keys = []
            for pages, n in zip(tables[rows].tolist(), lens.tolist()):
                idx = torch.arange(n)
                page = torch.tensor(pages[: -(-n // block_size)], dtype=torch.long)
                keys.append((page[idx // block_size] * block_size + idx % block_size
                             ).to(q.device))
        pool = (k_cache, v_cache, k_scale, v_scale)
        for i, slots in enumerate(keys):
            k, v, ks, vs = (None if t is None else _rows(t, slots) for t in pool)
            o, row_lse = self._decode_row(q[i : i + 1], k, v, ks, vs, scale)
            outs.append(o)
            lses.append(row_lse)
        if out is None:
            return torch.cat(outs), torch.cat(lses)
        out.copy_(torch.cat(outs))
        lse.copy_(torch.cat(lses))
        return out, lse

    def _decode_row(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence of `decode_attention`: q `[1, Hq, D]` against its keys k, v `[n, Hkv,
        D]` as stored (8-bit, with scales `[n, Hkv]`, or in q's dtype with None). Portable:
        dequantized, then `attention`."""
        if k_scale is not None:
            from tr_engine.kv.quant import dequantize

            k, v = dequantize(k, k_scale, q.dtype), dequantize(v, v_scale, q.dtype)
        return self.attention(q, k, v, False, scale)

    def dequantize_rows(self, stored: torch.Tensor, scale: torch.Tensor,
                        slots: torch.Tensor | slice, out: torch.Tensor) -> torch.Tensor:
        """Rows `slots` (a slice or an index tensor) of an 8-bit pool layer `stored` `[N, H,
        D]` with its scales `[N, H]`, as values in out's dtype written into `out` `[n, H, D]`
        (tr_engine/kv/quant.py's `dequantize`: the float32 product, rounded once)."""
        from tr_engine.kv.quant import dequantize

        return out.copy_(dequantize(_rows(stored, slots), _rows(scale, slots), out.dtype))

    def prepare_dequantize(self, storage: torch.dtype, hkv: int, d: int,  # noqa: B027
                           dtype: torch.dtype, device: torch.device) -> None:
        """Build, at start-up, what `dequantize_rows` needs for this format (no-op here)."""

    # Quantized KV (tr_engine/kv/quant.py): which kv_cache_dtype values this platform stores.
    def kv_cache_dtypes(self) -> tuple[str, ...]:
        """The kv_cache_dtype values this platform can store and attend."""
        return ("auto",)

    def check_kv_cache_dtype(self, kv_cache_dtype: str) -> None:
        """Raise ValueError, naming the values that work here, for one that does not."""
        ok = self.kv_cache_dtypes()
        if kv_cache_dtype not in ok:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not available on the "
                             f"{self.name} backend{self._kv_cache_dtype_note()}; it takes "
                             f"{', '.join(ok)}")

    def _kv_cache_dtype_note(self) -> str:
        """Why some values are missing here, as a parenthesis (or '')."""
        return ""

    def merge_gathered(self, gathered: torch.Tensor, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge every rank's partial result for the same rows: gathered `[P, ..., D + 1]`
        float32 (out, then lse) -> (out `[..., D]` in `dtype`, lse float32)."""
        from tr_engine.attention.merge import merge_all

        out, lse = merge_all(gathered[..., :-1], gathered[..., -1])
        return out.to(dtype), lse

    def prepare_attention(self, hq: int, hkv: int, d: int, dtype: torch.dtype,  # noqa: B027
                          device: torch.device) -> None:
        """Build, at start-up, whatever per-shape state the attention kernels need for the
        shapes the engine will meet (no-op where kernels need none)."""

    def prepare_matmuls(self, weights: list[torch.Tensor], rows: list[int],  # noqa: B027
                        heads: list[torch.Tensor], head_rows: list[int]) -> None:
        """At start-up, the matrix products a step can meet: `x @ w.T` for each of `weights`
        with x of each count in `rows`, and for each of `heads` with each of `head_rows`,
        where a library would otherwise set up its kernels on a request's path (no-op
        here)."""

    def prepare_thread(self) -> None:  # noqa: B027
        """Build that state again for the calling thread, where the libraries keep it per
        thread (cuDNN's attention graphs in torch): the server steps the engine on a thread
        of its own, not the one that started it. No-op where nothing is per thread."""

    # Graphs: record a step's kernels once, replay them with one launch.
    def graph_safe_decode(self, dtype: torch.dtype, head_dim: int) -> bool:
        """True when a decode forward of this dtype and head size can be recorded as a graph
        (this backend records graphs, and its decode attention reads its tables, rows and
        lens on the device)."""
        return False

    def new_graph(self):
        raise NotImplementedError(f"{self.name} does not capture graphs")

    def graph_capture(self, graph, pool=None) -> contextlib.AbstractContextManager:
        raise NotImplementedError(f"{self.name} does not capture graphs")

    def merge_(self, out, lse, out_b, lse_b) -> None:
        """Fold the partial result (out_b, lse_b) into the float32 accumulator (out, lse)."""
        from tr_engine.attention.merge import merge_

        merge_(out, lse, out_b, lse_b)

    # Kernel self-check: the fused kernels a backend plans to use, each run once at start-up on
    # small random inputs against the portable math. Their documentation can be wrong or
    # silent about a case (the LSE's values, an input range), and a wrong result raises
    # nothing, so a kernel is trusted only after it agreed on this card.
    def self_check_kernels(self) -> tuple[dict[str, Callable], dict[str, Callable]]:
        """The fused kernels to check, by name: attention kernels `fn(q, k, v, causal, scale)
        -> (out, lse)` (called only with blocks `self_check_admits` accepts) and in-place
        merges `fn(out, lse, out_b, lse_b)`. None here: the portable code is the reference."""
        return {}, {}

    def self_check_admits(self, kernel: str, q: torch.Tensor, k: torch.Tensor,
                          causal: bool) -> bool:
        """True when attention `kernel` would be given this block (its limits admit it)."""
        return True

    def disable_kernel(self, kernel: str) -> str:
        """Stop using `kernel` in this process; returns what is used instead."""
        raise NotImplementedError(f"{self.name} has no kernel {kernel!r}")

    def self_check(self, device: torch.device) -> list[KernelCheck]:
        """Check every kernel of `self_check_kernels` on `device`; disable those that raise
        or disagree with the portable math, logging the kernel, the error and the fallback.
        Returns one KernelCheck per kernel; deterministic (seeded), so all ranks agree. Runs
        once per device: later calls (another engine in the process) return the results."""
        done = self.__dict__.setdefault("_self_checked", {})  # per device, once a process
        if str(device) in done:
            return done[str(device)]
        attention, merges = self.self_check_kernels()
        if not attention and not merges:
            return []
        t = time.perf_counter()
        results = []
        for name, fn in attention.items():
            cases = [(case[0], functools.partial(_check_attention, fn, device, *case[1:]))
                     for case in SELF_CHECK_CASES
                     if self.self_check_admits(name, *_case_qk(*case[1:]))]
            if cases:
                results.append(self._check_one(name, cases))
        for name, fn in merges.items():  # one case: a Triton merge compiles per dtype
            cases = [("a merge of bfloat16 partials",
                      functools.partial(_check_merge, fn, device, torch.bfloat16))]
            results.append(self._check_one(name, cases))
        self.synchronize()
        passed = [r for r in results if r.ok]
        log.info("kernel self-check on %s: %d of %d kernels passed (%s), %d cases, in %.2f s",
                 device, len(passed), len(results), ", ".join(r.kernel for r in passed) or "none",
                 sum(r.cases for r in results), time.perf_counter() - t)
        done[str(device)] = results
        return results

    def _check_one(self, name: str, cases: list[tuple[str, Callable[[], str]]]) -> KernelCheck:
        for n, (label, run) in enumerate(cases, 1):
            try:
                error = run()
            except Exception as e:  # a kernel that raises on a documented input is unusable
                error = f"raised {type(e).__name__}: {_one_line(e)}"
            if error:
                fallback = self.disable_kernel(name)
                log.warning("kernel self-check: %s failed on %s: %s; disabled for this "
                            "process, falling back to %s", name, label, error, fallback)
                return KernelCheck(name, False, n, f"{label}: {error}", fallback)
        return KernelCheck(name, True, len(cases))


def _rows(t: torch.Tensor, slots: torch.Tensor | slice) -> torch.Tensor:
    """The rows `slots` of a pool tensor (a view for a slice); fp8 pools are gathered as bytes,
    since indexed copies are not built for float8 dtypes."""
    if isinstance(slots, slice):
        return t[slots]
    if t.is_floating_point() and t.element_size() == 1:
        return t.view(torch.uint8).index_select(0, slots).view(t.dtype)
    return t.index_select(0, slots)


def empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The result of attending to nothing: out 0, lse -inf."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _case_qk(dtype, tq, tk, hq, hkv, d, causal):
    """Shape-only stand-ins for a case's q and k (what `self_check_admits` looks at)."""
    q = torch.empty((tq, hq, d), dtype=dtype, device="meta")
    k = torch.empty((tk, hkv, d), dtype=dtype, device="meta")
    return q, k, causal


def _randn(shape, g, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def _check_attention(fn, device, dtype, tq, tk, hq, hkv, d, causal) -> str:
    """'' if fn agrees with the float32 math on a seeded random block, else what differed."""
    from .reference import math_attention

    g = torch.Generator().manual_seed(tq * 7919 + tk * 131 + hq * 17 + d)
    q = _randn((tq, hq, d), g, dtype, device)
    k = _randn((tk, hkv, d), g, dtype, device)
    v = _randn((tk, hkv, d), g, dtype, device)
    scale = 1.0 / math.sqrt(d)
    out, lse = fn(q, k, v, causal, scale)
    want_out, want_lse = math_attention(q, k, v, causal, scale)
    return (_differs("out", out, want_out, SELF_CHECK_TOL)
            or _differs("lse", lse, want_lse, SELF_CHECK_TOL))


def _check_merge(fn, device, dtype) -> str:
    """'' if the in-place merge fn agrees with the portable merge on seeded random partial
    results: lse of both signs, rows empty (-inf) on either side and on both."""
    from tr_engine.attention.merge import merge_

    g = torch.Generator().manual_seed(5)
    rows, h, d = 64, 4, 128
    out = _randn((rows, h, d), g, torch.float32, device)
    lse = _randn((rows, h), g, torch.float32, device) * 8
    out_b = _randn((rows, h, d), g, dtype, device)
    lse_b = _randn((rows, h), g, torch.float32, device) * 8
    empty = float("-inf")
    out[0], lse[0] = 0, empty
    out_b[1], lse_b[1] = 0, empty
    out[2], lse[2], out_b[2], lse_b[2] = 0, empty, 0, empty
    want_out, want_lse = out.clone(), lse.clone()
    merge_(want_out, want_lse, out_b, lse_b)
    fn(out, lse, out_b, lse_b)
    return (_differs("out", out, want_out, SELF_CHECK_MERGE_TOL)
            or _differs("lse", lse, want_lse, SELF_CHECK_MERGE_TOL))


def _differs(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    if tuple(got.shape) != tuple(want.shape):
        return f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.float(), want.float()
    empty = torch.isneginf(want)
    if not torch.equal(torch.isneginf(got), empty):
        return f"{what} is -inf in other rows than the portable math's"
    err = (got[~empty] - want[~empty]).abs().max().item() if (~empty).any() else 0.0
    if not err <= tol:  # also catches nan
        return f"{what} differs from the portable math by {err:.3g} (tolerance {tol:g})"
    return ""
