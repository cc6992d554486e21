"""NPU backend (Huawei Ascend): HCCL for communication, torch_npu fused attention kernels.

torch_npu is imported only when this backend is chosen. Every torch_npu call below is
written against its documentation (listed with versions in docs/deploy-ascend.md) and
binds to the op schemas of the pinned wheels (tests/torch_npu_schemas.py); none has run on
an Ascend card yet. tests/test_npu_backend.py checks our use of the API against a CPU
stand-in written from the same documentation, which says nothing about the hardware. On a
card, the start-up self-check (Backend.self_check) runs each fused kernel below against the
portable math first and disables for the process any that raises or disagrees.

Block attention, tensors kept in the engine's token-major layout and handed to the kernels
as BSND views with B = 1 (q `[1, Tq, Hq, D]`, k/v `[1, Tk, Hkv, D]`, no copy):
- `npu_fused_infer_attention_score(..., softmax_lse_flag=True)`, the inference kernel
  (graph-capturable), is the main path: float16/bfloat16, head dim a multiple of 16 up to
  512, at most 256 query heads and 64 query heads per key/value head (GQA through
  `num_key_value_heads`); with more than one query row N * D below 65535 and S at most 20M.
  Its LSE comes back as `[B, N, S, 1]`. A one-row query (decode) takes the kernel's
  incremental branch, which allows at most 262144 keys; longer shards are attended in
  slices and merged.
- `npu_fusion_attention` covers the rest (float32, other head dims up to 768, N * D too
  large), only on the products its documentation names (Atlas A2 training series, Ascend
  950DT; never recorded in a graph). It returns softmax max and sum as `[B, N, S, 8]`
  (eight equal values); lse = max + log(sum).
- Anything neither admits falls back to the float32 math kernel of the CPU backend.
`kernels_for` checks these limits before a kernel runs. Causal blocks reaching the kernel
are square (the base class splits the others), and use `sparse_mode=3` (bottom-right
causal) with the compressed 2048 x 2048 mask the documentation asks for: upper triangle
True = masked out.

The paged form (`block_table`) is not used: the KV cache keeps each sequence's shard
contiguous on its rank, so decode passes the shard itself.

int8 KV (`kv_cache_dtype` int8, tr_engine/kv/quant.py): decode hands a sequence's int8 K and V
to `npu_fused_infer_attention_score` with their scales as antiquant parameters, in the
per-token + per-head mode (key/value_antiquant_mode 3, key/value_antiquant_scale
`[B, KV_N, KV_S]` float32, no offsets: value = stored x scale), documented for Q_S = 1
(Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_fused_infer_attention_score.md),
so the kernel reads the 8-bit pages. Prefill over a cached prefix dequantizes it first: for
Q_S > 1 the kernel documents only per-token scales without heads, and only up to 16 queries.
If the installed CANN refuses the mode, decode dequantizes from then on.

Merge: `npu_ring_attention_update` (release line 26.1.0 on: torch_npu 2.7.1.post8, 2.9.0.post6,
2.10.0.post4, 2.11.0 and later) where present. CANN documents its softmax max and sum as 8
identical positive values, so `ring_stats` shifts each row's pair of lse values to a
positive range the op weighs exactly as the lse themselves (see there). Absent, refused by
the installed CANN, or failed in the self-check: the portable merge.

Environment (applied by `init_env`, only where the user has not set a value; it must run
before the HCCL communicators exist, so `NpuBackend()` calls it first thing):
- HCCL_CONNECT_TIMEOUT = 600 s (HCCL default 120, allowed 120..7200): how long ranks wait
  for each other while HCCL links are built. Ranks reach their first collective or
  point-to-point call after loading weights at different speeds; torch_npu advises 600 s
  once point-to-point runs on its own communicators.
- HCCL_BUFFSIZE = 200 MB (the HCCL default): buffer of each collective communicator
  (2x this per communicator). Our collectives (decode all-gather) are small.
- P2P_HCCL_BUFFSIZE = 64 MB (torch_npu default 20): buffer of the separate point-to-point
  communicators, one per pair of ranks that exchange messages, 2x this each. TokenRing
  sends queries and partial results of tens to hundreds of MB per step; a larger buffer
  means fewer rounds per message, at 2 x 64 MB x (P - 1) of device memory per rank.
- ASCEND_RT_VISIBLE_DEVICES: left alone (all cards visible). If set, e.g. "4,5,6,7", the
  process sees those cards as local ranks 0..3; set it before the process starts.
Point-to-point goes through `batch_isend_irecv` (backends/comm.py); plain simultaneous
isends in both directions have been reported to hang on NPUs.
"""

from __future__ import annotations

import logging
import os

import torch

from .base import Backend, empty_result
from .errors import BackendUnavailable
from .reference import math_attention

log = logging.getLogger("tr_engine")

ENV_DEFAULTS = {
    "HCCL_CONNECT_TIMEOUT": "600",
    "HCCL_BUFFSIZE": "200",
    "P2P_HCCL_BUFFSIZE": "64",
}
# Documented bounds of each variable (inclusive; None = unbounded).
_ENV_BOUNDS = {
    "HCCL_CONNECT_TIMEOUT": (120, 7200),
    "HCCL_BUFFSIZE": (1, None),
    "P2P_HCCL_BUFFSIZE": (0, None),
}

# The Ascend/pytorch COMPATIBILITY.md rows the project supports (the `npu` extras of
# pyproject.toml, the Dockerfile's default, docs/deploy-ascend.md): torch-npu -> (torch, CANN).
# tests/torch_npu_schemas.py holds the op schemas of the first, read from its wheel.
COMPATIBLE = {"2.10.0.post4": ("2.10.0", "9.1.0"), "2.9.0.post2": ("2.9.0", "9.0.0")}

# Limits from the torch_npu documentation of the attention kernels (torch_npu 2.10.0.post4's
# `_op_plugin_docs.py`); `kernels_for` checks them before a kernel runs.
FIA_MAX_HEAD_DIM, FIA_HEAD_DIM_ALIGN, FIA_MAX_GROUP = 512, 16, 64
FIA_MAX_ND = 65535  # Q_S > 1, layout BSND: N * D must be less than this
FIA_MAX_SEQ = 20971520  # Q_S > 1: S of query and key at most 20M
FIA_MAX_DECODE_KEYS = 262144  # keys per call when Q_S == 1
# KV antiquant (int8 pages): key/value_antiquant_mode 3 is per-token + per-head, scales
# [B, KV_N, KV_S] float32, documented for Q_S == 1 on Atlas A2/A3; int8 inputs want D
# aligned to 32 (documented for Q_S > 1; asked here too).
ANTIQUANT_PER_TOKEN_HEAD = 3
FIA_INT8_HEAD_DIM_ALIGN = 32
FA_MAX_HEAD_DIM = 768
FA_MAX_SEQ = 1 << 20  # S of query and key in 1..1M
# npu_fusion_attention is documented for the Atlas A2 training series (SoC names Ascend910B*)
# and Ascend 950DT only, and without graph capture (this backend records no graphs).
FA_PRODUCTS = ("Ascend910B", "Ascend950DT")
MAX_HEADS = 256
MASK_SIZE = 2048  # side of the compressed causal mask for sparse_mode 2/3/4
RING_GAP = 200.0  # exp(-RING_GAP) is 0 in float32: how far below the other an empty side sits
# Names of the kernels in logs and in disable_kernel.
KERNELS = {"fused_infer": "npu_fused_infer_attention_score", "fusion": "npu_fusion_attention"}
RING_UPDATE = "npu_ring_attention_update"


def init_env(environ=None) -> dict[str, str]:
    """Apply ENV_DEFAULTS where unset and check all three against their documented bounds.

    Returns the defaults it applied. Raises BackendUnavailable for a value HCCL would refuse.
    """
    environ = os.environ if environ is None else environ
    applied = {}
    for name, value in ENV_DEFAULTS.items():
        if not environ.get(name):
            environ[name] = applied[name] = value
        low, high = _ENV_BOUNDS[name]
        raw = environ[name]
        try:
            number = int(raw)
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise BackendUnavailable(
                f"{name}={raw!r} is not a whole number {bound}, so HCCL cannot start.",
                f"Set {name} to a whole number {bound}, or unset it for the default "
                f"{ENV_DEFAULTS[name]}.",
            )
    return applied


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line (the launcher prints exactly two), cut to `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def import_torch_npu():
    """Import torch_npu, or raise BackendUnavailable with what failed and how to fix it.

    Any exception counts: torch_npu's own start-up checks raise RuntimeError, e.g. "Two
    accelerators cannot be used at the same time" next to a CUDA build of torch."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as e:
        if "torch_npu" in str(e) and "No module named" in str(e):
            raise BackendUnavailable(
                "torch_npu is not installed, so the NPU backend cannot start.",
                "Install the Ascend CANN toolkit, then `pip install --extra-index-url "
                "https://download.pytorch.org/whl/cpu 'tr_engine[npu]'` (torch 2.10.0 + "
                "torch-npu 2.10.0.post4; docs/deploy-ascend.md has the other row), or use "
                "--device cuda/cpu.",
            ) from e
        raise BackendUnavailable(
            f"torch_npu is installed but cannot load: {_one_line(e)}",
            "Source the Ascend toolkit first (`source /usr/local/Ascend/ascend-toolkit/set_env.sh`)"
            " and check that the CANN and torch-npu versions match.",
        ) from e
    except OSError as e:
        raise BackendUnavailable(
            f"torch_npu is installed but cannot load the Ascend libraries: {_one_line(e)}",
            "Source the Ascend toolkit first "
            "(`source /usr/local/Ascend/ascend-toolkit/set_env.sh`).",
        ) from e
    except Exception as e:
        what = f"importing torch_npu failed with {type(e).__name__}: {_one_line(e)}"
        if "Two accelerators" in str(e):
            fix = ("torch_npu needs the CPU build of torch: `pip install --index-url "
                   "https://download.pytorch.org/whl/cpu torch==<the version torch-npu pairs "
                   "with>` (docs/deploy-ascend.md lists the pairs), or use --device cuda.")
        else:
            fix = ("Check that CANN, torch and torch-npu form one row of the table in "
                   "docs/deploy-ascend.md, and source "
                   "/usr/local/Ascend/ascend-toolkit/set_env.sh.")
        raise BackendUnavailable(what, fix) from e
    import torch_npu

    return torch_npu


def per_token_head(scale: torch.Tensor) -> torch.Tensor:
    """A cache's scales `[S, Hkv]` -> FIA's per-token + per-head antiquant scale
    `[1, Hkv, S]` (B, KV_N, KV_S) float32."""
    return scale.float().t().contiguous().unsqueeze(0)


def bsnd(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [1, T, H, D] (BSND, B = 1); a view when x is contiguous."""
    return x.contiguous().unsqueeze(0)


def causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed mask of sparse_mode 2/3/4: 2048 x 2048 bool, True above the diagonal."""
    ones = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


def lse_from_stats(softmax_max: torch.Tensor, softmax_sum: torch.Tensor) -> torch.Tensor:
    """npu_fusion_attention's `[1, N, S, 8]` max and sum -> lse `[S, N]` (natural log)."""
    return (softmax_max[0, :, :, 0] + torch.log(softmax_sum[0, :, :, 0])).transpose(0, 1)


def ring_stats(lse_a: torch.Tensor, lse_b: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two partial results' lse `[S, N]` -> (max_a, max_b, sum) `[1, N, S, 8]` for
    npu_ring_attention_update, inside its documented input range: 8 equal values, max and
    sum positive.

    The op weighs a side by sum * exp(max - max(max_a, max_b)), so only the difference of
    the two maxima matters: each row is shifted so that its smaller lse becomes 1, with
    sum = 1. A side that saw no key (lse -inf) sits RING_GAP below the other, where its
    weight is exactly 0 in float32; a row empty on both sides gets 1 and 1 (both outs are 0).
    The merged lse is then max(lse_a, lse_b) + log(new sum): see `_fused_merge_`.
    """
    a, b = lse_a.float(), lse_b.float()
    empty_a, empty_b = torch.isneginf(a), torch.isneginf(b)
    one_empty = empty_a | empty_b
    low = torch.minimum(a, b)
    max_a = torch.where(one_empty, 1 + RING_GAP * empty_b.float(), a - low + 1)  # [S, N]
    max_b = torch.where(one_empty, 1 + RING_GAP * empty_a.float(), b - low + 1)
    s, n = a.shape

    def eight(x):  # [S, N] -> [1, N, S, 8]
        return x.t().reshape(1, n, s, 1).expand(1, n, s, 8).contiguous()

    max_a, max_b = eight(max_a), eight(max_b)
    return max_a, max_b, torch.ones_like(max_a)


class NpuBackend(Backend):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"

    def __init__(self) -> None:
        super().__init__()
        init_env()
        self.torch_npu = import_torch_npu()
        self.npu = self.torch_npu.npu  # = torch.npu once torch_npu is imported
        version = str(getattr(self.torch_npu, "__version__", "unknown"))
        row = COMPATIBLE.get(version)
        if row is None or torch.__version__.split("+")[0] != row[0]:
            log.warning("torch-npu %s with torch %s is not one of the pairs this engine is "
                        "checked against (%s): docs/deploy-ascend.md", version,
                        torch.__version__, ", ".join(f"torch-npu {n} + torch {t} (CANN {c})"
                                                     for n, (t, c) in COMPATIBLE.items()))
        if not self.npu.is_available():
            raise BackendUnavailable(
                "torch_npu loaded but sees no NPU.",
                "Check `npu-smi info`, the /dev/davinci* device mounts and "
                "ASCEND_RT_VISIBLE_DEVICES, or use --device cuda/cpu.",
            )
        self._ring_update = getattr(self.torch_npu, RING_UPDATE, None)
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._disabled: set[str] = set()  # kernels the self-check found wrong on this card
        self._product: str | None = None
        self._antiquant = True  # until the installed CANN refuses int8 KV in FIA

    @property
    def product(self) -> str:
        """The SoC name of the current card (e.g. "Ascend910B3"); asked after set_device."""
        if self._product is None:
            self._product = str(self.npu.get_device_name(self.npu.current_device()))
        return self._product

    @classmethod
    def is_available(cls) -> bool:
        from . import npu_usable

        return npu_usable()

    # Device, memory, streams: torch_npu.npu mirrors torch.cuda.
    def set_device(self, local_rank: int) -> torch.device:
        self.npu.set_device(local_rank)
        return self.device(local_rank)

    def synchronize(self) -> None:
        self.npu.synchronize()

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self.npu.mem_get_info()
        return int(free), int(total)

    def device_count(self) -> int:
        return self.npu.device_count()

    def new_stream(self):
        return self.npu.Stream()

    def current_stream(self):
        return self.npu.current_stream()

    def stream(self, stream):
        return self.npu.stream(stream)

    def new_event(self, timing: bool = False):
        return self.npu.Event(enable_timing=timing)

    # Attention.
    def kernels_for(self, q: torch.Tensor, k: torch.Tensor) -> list[str]:
        """Kernels whose documented limits admit this block, in order of preference, less
        those the self-check disabled; "math" (the float32 kernel) last."""
        (tq, hq, d), (tk, hkv) = q.shape, k.shape[:2]
        names = []
        if (
            q.dtype in (torch.float16, torch.bfloat16)
            and d <= FIA_MAX_HEAD_DIM
            and d % FIA_HEAD_DIM_ALIGN == 0
            and hq <= MAX_HEADS
            and hq // hkv <= FIA_MAX_GROUP
            # one query row: any key count (sliced in _fused_infer); more: N * D and S bounds
            and (tq == 1 or (hq * d < FIA_MAX_ND and max(tq, tk) <= FIA_MAX_SEQ))
        ):
            names.append("fused_infer")
        if (
            self.product.startswith(FA_PRODUCTS)
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and d <= FA_MAX_HEAD_DIM
            and hq <= MAX_HEADS
            and max(tq, tk) <= FA_MAX_SEQ
        ):
            names.append("fusion")
        return [*(n for n in names if n not in self._disabled), "math"]

    def _attention(self, q, k, v, causal, scale):
        shape_class = (q.dtype, q.shape[-1], q.shape[1] // k.shape[1], causal, q.shape[0] == 1)
        kernels = [(name, getattr(self, f"_{name}")) for name in self.kernels_for(q, k)]
        return self._first_accepting(kernels, shape_class, q, k, v, causal, scale)

    def _mask(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            self._masks[device] = causal_mask(device)
        return self._masks[device]

    def _fused_infer(self, q, k, v, causal, scale):
        tq, tk = q.shape[0], k.shape[0]
        if tq == 1 and tk > FIA_MAX_DECODE_KEYS:  # decode over a long shard: slices, merged
            from tr_engine.attention.merge import merge_

            step, acc = FIA_MAX_DECODE_KEYS, None
            for a in range(0, tk, step):
                o, lse = self._fused_infer(q, k[a : a + step], v[a : a + step], False, scale)
                if acc is None:
                    acc = o.float(), lse.float().clone()
                else:
                    merge_(*acc, o, lse)
            return acc[0].to(q.dtype), acc[1]
        causal = causal and tq > 1  # a 1 x 1 causal block is unmasked
        out, lse = self.torch_npu.npu_fused_infer_attention_score(
            bsnd(q), bsnd(k), bsnd(v),
            atten_mask=self._mask(q.device) if causal else None,
            num_heads=q.shape[1],
            num_key_value_heads=k.shape[1],
            scale=scale,
            input_layout="BSND",
            sparse_mode=3 if causal else 0,
            softmax_lse_flag=True,
        )
        return out[0], lse[0, :, :, 0].transpose(0, 1)  # [Tq, Hq, D], [Tq, Hq]

    def _fusion(self, q, k, v, causal, scale):
        causal = causal and q.shape[0] > 1
        res = self.torch_npu.npu_fusion_attention(
            bsnd(q), bsnd(k), bsnd(v), q.shape[1], "BSND",
            atten_mask=self._mask(q.device) if causal else None,
            scale=scale,
            sparse_mode=3 if causal else 0,
        )
        out, softmax_max, softmax_sum = res[0], res[1], res[2]
        return out[0], lse_from_stats(softmax_max, softmax_sum)

    def _math(self, q, k, v, causal, scale):
        return math_attention(q, k, v, causal, scale)

    # Decode over an int8 cache: FIA dequantizes the pages itself (antiquant, per-token and
    # per-head mode), reading 8-bit K and V.
    def kv_cache_dtypes(self) -> tuple[str, ...]:
        return ("auto", "int8")

    def _kv_cache_dtype_note(self) -> str:
        return (" (fp8 KV is not offered on Ascend: the documented antiquant modes of "
                "npu_fused_infer_attention_score take int8 pages)")

    def _decode_row(self, q, k, v, k_scale, v_scale, scale):
        if (k_scale is None or k.dtype != torch.int8 or self._antiquant is False
                or q.shape[-1] % FIA_INT8_HEAD_DIM_ALIGN
                or "fused_infer" not in self.kernels_for(q, k)):
            return super()._decode_row(q, k, v, k_scale, v_scale, scale)
        try:
            return self._fused_infer_int8(q, k, v, k_scale, v_scale, scale)
        except RuntimeError as e:  # this CANN refuses the mode: dequantized pages from now on
            log.warning("%s refused int8 KV with per-token scales (%s); decode dequantizes "
                        "the pages first from now on", KERNELS["fused_infer"], _one_line(e))
            self._antiquant = False
            return super()._decode_row(q, k, v, k_scale, v_scale, scale)

    def _fused_infer_int8(self, q, k, v, k_scale, v_scale, scale):
        """q `[1, Hq, D]` against int8 k, v `[S, Hkv, D]` whose slot s of head h holds
        stored x scale[s, h]: FIA's per-token + per-head antiquant (mode 3, scales
        `[B, KV_N, KV_S]` float32, documented for Q_S = 1)."""
        tk = k.shape[0]
        if tk == 0:
            return empty_result(q)
        if tk > FIA_MAX_DECODE_KEYS:  # as _fused_infer: slices, merged
            from tr_engine.attention.merge import merge_

            step, acc = FIA_MAX_DECODE_KEYS, None
            for a in range(0, tk, step):
                o, lse = self._fused_infer_int8(q, k[a : a + step], v[a : a + step],
                                                k_scale[a : a + step], v_scale[a : a + step],
                                                scale)
                if acc is None:
                    acc = o.float(), lse.float().clone()
                else:
                    merge_(*acc, o, lse)
            return acc[0].to(q.dtype), acc[1]
        out, lse = self.torch_npu.npu_fused_infer_attention_score(
            bsnd(q), bsnd(k), bsnd(v),
            key_antiquant_scale=per_token_head(k_scale),
            value_antiquant_scale=per_token_head(v_scale),
            key_antiquant_mode=ANTIQUANT_PER_TOKEN_HEAD,
            value_antiquant_mode=ANTIQUANT_PER_TOKEN_HEAD,
            num_heads=q.shape[1],
            num_key_value_heads=k.shape[1],
            scale=scale,
            input_layout="BSND",
            softmax_lse_flag=True,
        )
        return out[0], lse[0, :, :, 0].transpose(0, 1)

    def merge_(self, out, lse, out_b, lse_b) -> None:
        if self._ring_update is not None:
            try:
                self._fused_merge_(out, lse, out_b, lse_b)
                return
            except RuntimeError:  # the installed CANN lacks the kernel: portable from now on
                self._ring_update = None
        super().merge_(out, lse, out_b, lse_b)

    def _fused_merge_(self, out, lse, out_b, lse_b) -> None:
        """npu_ring_attention_update in its SBH layout: out `[S, B, N*D]`, stats `[B, N, S, 8]`."""
        rows, h, d = out.shape
        prev_max, cur_max, ones = ring_stats(lse, lse_b)
        new_out, _, new_sum = self._ring_update(
            out.reshape(rows, 1, h * d), prev_max, ones,
            out_b.float().reshape(rows, 1, h * d), cur_max, ones,
            input_layout="SBH",
        )
        # new_sum is the sum over both sides relative to the larger one, whose lse is known
        # exactly; a row empty on both sides stays -inf (the maximum of -inf and -inf).
        new_lse = torch.maximum(lse, lse_b.float()) + torch.log(new_sum[0, :, :, 0].t())
        out.copy_(new_out.view(rows, h, d))
        lse.copy_(new_lse)

    # Kernel self-check (Backend.self_check): the kernels this card's limits will use.
    def self_check_kernels(self):
        attention = {KERNELS["fused_infer"]: self._fused_infer}
        if self.product.startswith(FA_PRODUCTS):
            attention[KERNELS["fusion"]] = self._fusion
        attention = {full: fn for full, fn in attention.items()
                     if all(KERNELS[n] != full for n in self._disabled)}
        merges = {RING_UPDATE: self._fused_merge_} if self._ring_update is not None else {}
        return attention, merges

    def self_check_admits(self, kernel, q, k, causal):
        return any(KERNELS[n] == kernel for n in self.kernels_for(q, k) if n != "math")

    def disable_kernel(self, kernel: str) -> str:
        if kernel == RING_UPDATE:
            self._ring_update = None
            return "the portable merge"
        short = next(n for n, full in KERNELS.items() if full == kernel)
        self._disabled.add(short)
        if (short == "fused_infer" and "fusion" not in self._disabled
                and self.product.startswith(FA_PRODUCTS)):
            return f"{KERNELS['fusion']} where its limits admit a block, else the float32 math"
        return "the float32 math kernel"
