"""The platform interface: one `Backend` per device family, chosen once by name.

A backend answers the few questions the engine asks of a platform (which torch device,
which torch.distributed backend, how much memory is free, how to order work on streams)
and supplies the one kernel everything else is built from: block attention that also
returns the log-sum-exp of each query row, so partial results can be merged exactly.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod

import torch


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
            from tr_engine.attention.merge import merge

            p = tk - tq
            out, lse = self._attention(q, k[:p], v[:p], False, scale)
            out_b, lse_b = self._attention(q, k[p:], v[p:], True, scale)
            out, lse = merge(out.float(), lse, out_b, lse_b)
            return out.to(q.dtype), lse
        # More queries than keys: the first tq - tk rows see nothing.
        out, lse = empty_result(q)
        out[tq - tk :], lse[tq - tk :] = self._attention(q[tq - tk :], k, v, True, scale)
        return out, lse

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
        reads it on the host, gathers each sequence's keys and runs `attention` on them."""
        outs, lses = [], []
        table_rows = tables[rows].tolist()
        for i, (pages, n) in enumerate(zip(table_rows, lens.tolist())):
            idx = torch.arange(n)
            page = torch.tensor(pages[: -(-n // block_size)], dtype=torch.long)
            slots = (page[idx // block_size] * block_size + idx % block_size).to(q.device)
            o, row_lse = self.attention(q[i : i + 1], k_cache.index_select(0, slots),
                                        v_cache.index_select(0, slots), False, scale)
            outs.append(o)
            lses.append(row_lse)
        if out is None:
            return torch.cat(outs), torch.cat(lses)
        out.copy_(torch.cat(outs))
        lse.copy_(torch.cat(lses))
        return out, lse

    def merge_gathered(self, gathered: torch.Tensor, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge every rank's partial result for the same rows: gathered `[P, ..., D + 1]`
        float32 (out, then lse) -> (out `[..., D]` in `dtype`, lse float32)."""
        from tr_engine.attention.merge import merge_all

        out, lse = merge_all(gathered[..., :-1], gathered[..., -1])
        return out.to(dtype), lse

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


def empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The result of attending to nothing: out 0, lse -inf."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse
