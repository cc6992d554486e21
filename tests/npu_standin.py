"""A CPU stand-in for the torch_npu functions that backends/npu.py calls.

Written from the torch_npu documentation, not from its code, and installed as
`sys.modules["torch_npu"]` inside test processes. It checks our use of the API: keyword
names, layouts, shapes, dtypes, the 8-wide softmax statistics, sparse_mode and mask
conventions, the merge formula, and the input limits the documentation states (a call
outside them raises RuntimeError, as the real op's checks do). It says nothing about the
hardware: the real kernels' rounding, speed, HCCL and graph capture stay untested until
the code runs on an Ascend card. Where the documentation leaves a case open (a query row
that sees no key, the LSE of an empty key set), the stand-in raises rather than guess, so
the backend cannot come to rely on it.

Signatures: exactly the schemas of the pinned torch_npu 2.10.0.post4 wheel
(tests/torch_npu_schemas.py, held to them by tests/test_npu_schemas.py).

Sources of the behaviour (Ascend/op-plugin unless noted):
- npu_fused_infer_attention_score: docs/zh/custom_APIs/torch_npu/
  torch_npu-npu_fused_infer_attention_score.md and the same text in torch_npu
  2.10.0.post4's `_op_plugin_docs.py` (N * D < 65535 for BSH/BSND when Q_S > 1).
  KV antiquant (int8 key and value dequantized in the kernel) is modelled in the one mode the
  backend uses, per-token + per-head (key/value_antiquant_mode 3): scales
  (B, KV_N, KV_S) float32, documented for Q_S = 1 only, value = scale x stored without
  offsets; other modes and offsets raise NotImplementedError.
- npu_fusion_attention: docs/zh/custom_APIs/torch_npu/torch_npu-npu_fusion_attention.md and
  `_op_plugin_docs.py` (training only, no aclgraph, Atlas A2 training series; CANN's
  aclnnFlashAttentionScore adds Ascend 950DT). The keywords 2.10.0.post4 added at the end
  (softmax_layout, sink, dropout_mask, seed, offset) are accepted but not modelled.
- npu_ring_attention_update: codegen/templates/_op_plugin_docs.py, the input checks of
  op_plugin/ops/opapi/RingAttentionUpdateKernelNpuOpApi.cpp (26.1.0 and later), and CANN's
  aclnnRingAttentionUpdate: softmax max and sum are 8 identical values and must be positive.
- torch_npu.npu.*: Ascend/pytorch docs/zh/api/native_api/pytorch_2-11-0/torch-cuda.md
  (torch.cuda functions under the name torch_npu.npu.*); get_device_name returns the SoC
  name (Ascend910B* on Atlas A2, Ascend910_93* on A3, as torch_npu's own checks read it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import sys
import types
from collections import Counter

import torch

INT_MAX = 2147483647
FIA_MAX_DECODE_KEYS = 262144  # documented KV_S limit when Q_S == 1
FIA_MAX_SEQ = 20971520  # documented S limit when Q_S > 1
FIA_MAX_ND = 65535  # Q_S > 1, layouts BSH/BSND: N * D must be less
FA_MAX_SEQ = 1 << 20
FA_PRODUCTS = ("Ascend910B", "Ascend950DT")  # npu_fusion_attention's documented products
MASK_SIZE = 2048
HALF = (torch.float16, torch.bfloat16)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"torch_npu stand-in: {message}")


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """Any supported layout -> [B, N, S, D]."""
    if layout == "BNSD":
        _check(x.dim() == 4, f"layout BNSD needs a 4-D tensor, got {x.dim()}-D")
        return x
    if layout == "BSND":
        _check(x.dim() == 4, f"layout BSND needs a 4-D tensor, got {x.dim()}-D")
        return x.transpose(1, 2)
    if layout in ("BSH", "SBH"):
        _check(x.dim() == 3, f"layout {layout} needs a 3-D tensor, got {x.dim()}-D")
        if layout == "SBH":
            x = x.transpose(0, 1)
        b, s, h = x.shape
        _check(h % heads == 0, f"H={h} is not a multiple of the head count {heads}")
        return x.reshape(b, s, heads, h // heads).transpose(1, 2)
    raise NotImplementedError(f"torch_npu stand-in: layout {layout!r} is not modelled")


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    b, n, s, d = x.shape
    bsh = x.transpose(1, 2).reshape(b, s, n * d)
    return bsh if layout == "BSH" else bsh.transpose(0, 1)


@functools.cache
def _compressed_mask() -> torch.Tensor:
    return torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool), 1)


def _allowed(sq: int, skv: int, sparse_mode: int, mask, pre: int, nxt: int) -> torch.Tensor:
    """[.., Sq, Skv] bool, True where a key takes part, per the documented sparse modes."""
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(skv).unsqueeze(0)
    if sparse_mode in (2, 3, 4):
        _check(mask is not None, f"sparse_mode {sparse_mode} needs the compressed atten_mask")
        _check(
            tuple(mask.shape[-2:]) == (MASK_SIZE, MASK_SIZE)
            and all(s == 1 for s in mask.shape[:-2]) and mask.dim() <= 4,
            f"sparse_mode {sparse_mode} needs a ({MASK_SIZE}, {MASK_SIZE}) mask, "
            f"got {tuple(mask.shape)}",
        )
        _check(
            torch.equal(mask.reshape(MASK_SIZE, MASK_SIZE).bool().cpu(), _compressed_mask()),
            "the compressed mask must be lower-triangular with True (masked) above the diagonal",
        )
        if sparse_mode == 2:  # leftUpCausal
            return j <= i
        if sparse_mode == 3:  # rightDownCausal
            return j <= i + (skv - sq)
        return (j >= i + (skv - sq) - pre) & (j <= i + (skv - sq) + nxt)  # band, bottom-right
    if mask is None:  # defaultMask without a mask: everything (pre/next tokens ignored)
        return torch.ones(sq, skv, dtype=torch.bool)
    _check(mask.dtype in (torch.bool, torch.int8, torch.uint8), f"mask dtype {mask.dtype}")
    _check(tuple(mask.shape[-2:]) == (sq, skv), f"mask shape {tuple(mask.shape)}, want S1 x S2")
    allowed = ~mask.bool().cpu()
    if sparse_mode == 0:  # keys between pre and next tokens, from the top left
        allowed = allowed & (j >= i - pre) & (j <= i + nxt)
    return allowed


def _attend(q, k, v, allowed, scale):
    """q [B, N, Sq, D], k/v [B, Nkv, Skv, D] -> out float32, scaled+masked scores float32."""
    g = q.shape[1] // k.shape[1]  # query head h reads key/value head h // g
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    _check(
        bool(allowed.any(dim=-1).all()),
        "a query row sees no key; the documentation leaves that result unspecified",
    )
    return torch.matmul(torch.softmax(s, dim=-1), vf), s


def npu_fused_infer_attention_score(
    query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
    actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
    quant_scale2=None, quant_offset2=None, antiquant_scale=None, antiquant_offset=None,
    key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None,
    value_antiquant_offset=None, block_table=None, query_padding_size=None,
    kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None,
    actual_shared_prefix_len=None, query_rope=None, key_rope=None,
    key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=INT_MAX,
    next_tokens=INT_MAX, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
    inner_precise=0, block_size=0, antiquant_mode=0, key_antiquant_mode=0,
    value_antiquant_mode=0, softmax_lse_flag=False,
):
    """-> (attention_out in query's layout and dtype, softmax_lse [B, N, Q_S, 1] float32, or
    a [1] zero tensor without softmax_lse_flag)."""
    calls["npu_fused_infer_attention_score"] += 1
    unmodelled = (pse_shift, actual_seq_lengths, actual_seq_lengths_kv, dequant_scale1,
                  quant_scale1, dequant_scale2, quant_scale2, quant_offset2, antiquant_scale,
                  antiquant_offset, key_antiquant_offset, value_antiquant_offset, block_table,
                  query_padding_size, kv_padding_size, key_shared_prefix, value_shared_prefix,
                  actual_shared_prefix_len, query_rope, key_rope, key_rope_antiquant_scale)
    if any(x is not None for x in unmodelled) or block_size or antiquant_mode:
        raise NotImplementedError("torch_npu stand-in: only the plain float path and KV "
                                  "antiquant without offsets are modelled")
    _check(query.dtype in HALF, f"query dtype {query.dtype}; float16 and bfloat16 only")
    antiquant = key_antiquant_scale is not None or value_antiquant_scale is not None
    if antiquant:
        _check_antiquant(key, value, key_antiquant_scale, value_antiquant_scale,
                         key_antiquant_mode, value_antiquant_mode)
    else:
        _check(key.dtype == query.dtype and value.dtype == query.dtype, "q, k, v dtypes differ")
        _check(key_antiquant_mode == 0 and value_antiquant_mode == 0,
               "an antiquant mode without antiquant scales")
    _check(key.shape == value.shape, "key and value shapes differ")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check(t.is_contiguous(), f"{name} is not contiguous")
    _check(input_layout in ("BSH", "BSND", "BNSD"), f"layout {input_layout!r} not modelled")
    kv_heads = num_key_value_heads or num_heads
    _check(num_heads % kv_heads == 0, "num_heads is not a multiple of num_key_value_heads")
    _check(num_heads // kv_heads <= 64, "more than 64 query heads per key/value head")
    _check(num_heads <= 256 and kv_heads <= 256, "more than 256 heads")
    q = _to_bnsd(query, input_layout, num_heads)
    k = _to_bnsd(key, input_layout, kv_heads)
    v = _to_bnsd(value, input_layout, kv_heads)
    _check(q.shape[1] == num_heads, f"num_heads={num_heads} but query has {q.shape[1]} heads")
    _check(k.shape[1] == kv_heads, f"num_key_value_heads={kv_heads}, key has {k.shape[1]}")
    b, _, sq, d = q.shape
    skv = k.shape[2]
    _check(b <= 65536 and k.shape[0] == b, "batch")
    _check(k.shape[3] == d and d <= 512, f"head dim {d}")
    if antiquant:
        _check(sq == 1, "key/value_antiquant_mode 3 (per-token + per-head) is documented for "
               "Q_S = 1 only (Q_S >= 2 takes modes 0 and 1)")
        want = (b, kv_heads, skv)
        for name, t in (("key", key_antiquant_scale), ("value", value_antiquant_scale)):
            _check(tuple(t.shape) == want, f"{name}_antiquant_scale has shape "
                   f"{tuple(t.shape)}; per-token + per-head mode takes (B, KV_N, KV_S) = {want}")
        # symmetric antiquant (no offsets): value = scale x stored, per token and head
        k = k.float() * key_antiquant_scale.float().unsqueeze(-1)
        v = v.float() * value_antiquant_scale.float().unsqueeze(-1)
    _check(sparse_mode in (0, 1, 2, 3, 4), f"sparse_mode {sparse_mode} unsupported")
    if sq == 1:  # incremental branch: sparse_mode and pre/next tokens have no effect
        _check(skv <= FIA_MAX_DECODE_KEYS, f"{skv} keys > {FIA_MAX_DECODE_KEYS} with Q_S = 1")
        allowed = torch.ones(1, skv, dtype=torch.bool)
        if atten_mask is not None:
            _check(atten_mask.shape[-1] == skv, "decode mask must end in KV_S")
            allowed = ~atten_mask.bool().cpu().reshape(-1, skv)[:1]
    else:
        _check(d % 16 == 0, f"head dim {d} is not a multiple of 16")
        if input_layout in ("BSH", "BSND"):
            _check(num_heads * d < FIA_MAX_ND, f"N * D = {num_heads * d} is not below "
                   f"{FIA_MAX_ND} (layout {input_layout}, Q_S > 1)")
        _check(sq <= FIA_MAX_SEQ and skv <= FIA_MAX_SEQ, "sequence too long")
        allowed = _allowed(sq, skv, sparse_mode, atten_mask, pre_tokens, next_tokens)
    if skv == 0:
        _check(not softmax_lse_flag, "the LSE of an empty key set is not documented")
        return torch.zeros_like(query), torch.zeros(1)
    out, s = _attend(q, k, v, allowed, scale)
    out = _from_bnsd(out.to(query.dtype), input_layout).contiguous()
    if not softmax_lse_flag:
        return out, torch.zeros(1)
    return out, torch.logsumexp(s, dim=-1, keepdim=True)  # [B, N, Sq, 1]


def _check_antiquant(key, value, k_scale, v_scale, k_mode, v_mode) -> None:
    """KV antiquant as the backend uses it: per-token + per-head mode (3), int8 key and
    value, float32 scales for both (the documented dtype of that mode), no offsets."""
    _check(k_scale is not None and v_scale is not None,
           "key_antiquant_scale and value_antiquant_scale are both given or neither")
    _check(k_mode == v_mode, f"key_antiquant_mode {k_mode} and value_antiquant_mode {v_mode} "
           "differ")
    if k_mode != 3:
        raise NotImplementedError(f"torch_npu stand-in: antiquant mode {k_mode} is not "
                                  "modelled (3, per-token + per-head, is)")
    _check(key.dtype == torch.int8 and value.dtype == torch.int8,
           f"antiquant takes int8 key and value, got {key.dtype} and {value.dtype}")
    _check(k_scale.dtype == torch.float32 and v_scale.dtype == torch.float32,
           "per-token + per-head antiquant scales are float32")


def npu_fusion_attention(
    query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
    scale=1.0, keep_prob=1.0, pre_tockens=INT_MAX, next_tockens=INT_MAX, inner_precise=0,
    prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
    gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None,
    seed=0, offset=0,
):
    """-> (attention_out, softmax_max [B, N, S1, 8], softmax_sum [B, N, S1, 8], softmax_out
    (reserved, empty), seed, offset, numels). Only on the documented products."""
    calls["npu_fusion_attention"] += 1
    _check(_host["device_name"].startswith(FA_PRODUCTS),
           f"npu_fusion_attention is not documented for {_host['device_name']}")
    if softmax_layout or sink is not None or dropout_mask is not None or seed or offset:
        raise NotImplementedError("torch_npu stand-in: softmax_layout/sink/dropout_mask/"
                                  "seed/offset not modelled")
    if pse is not None or padding_mask is not None or prefix is not None:
        raise NotImplementedError("torch_npu stand-in: pse/padding_mask/prefix not modelled")
    if actual_seq_qlen is not None or actual_seq_kvlen is not None or keep_prob != 1.0:
        raise NotImplementedError("torch_npu stand-in: varlen and dropout not modelled")
    _check(query.dtype in (*HALF, torch.float32), f"query dtype {query.dtype}")
    _check(key.dtype == query.dtype and value.dtype == query.dtype, "q, k, v dtypes differ")
    _check(key.shape == value.shape, "key and value shapes differ")
    _check(input_layout in ("BSH", "SBH", "BSND", "BNSD"), f"layout {input_layout!r}")
    q = _to_bnsd(query, input_layout, head_num)
    _check(q.shape[1] == head_num, f"head_num={head_num} but query has {q.shape[1]} heads")
    kv_heads = key.shape[2] if input_layout == "BSND" else key.shape[1]
    if input_layout in ("BSH", "SBH"):
        kv_heads = key.shape[-1] // q.shape[-1]
    k = _to_bnsd(key, input_layout, kv_heads)
    v = _to_bnsd(value, input_layout, kv_heads)
    b, n, sq, d = q.shape
    skv = k.shape[2]
    _check(n <= 256 and n % k.shape[1] == 0, "Nq must be a multiple of Nkv, at most 256")
    _check(1 <= d <= 768 and k.shape[3] == d, f"head dim {d}")
    _check(1 <= sq <= FA_MAX_SEQ and 1 <= skv <= FA_MAX_SEQ, "S must be in 1..1M")
    _check(k.shape[0] == b, "batch sizes differ")
    _check(sparse_mode in range(9), f"sparse_mode {sparse_mode}")
    if atten_mask is None:  # sparse_mode and pre/next tokens have no effect: full attention
        allowed = torch.ones(sq, skv, dtype=torch.bool)
    else:
        _check(sparse_mode in (0, 1, 2, 3, 4), f"sparse_mode {sparse_mode} not modelled")
        allowed = _allowed(sq, skv, sparse_mode, atten_mask, pre_tockens, next_tockens)
    out, s = _attend(q, k, v, allowed, scale)
    softmax_max = s.amax(dim=-1, keepdim=True)  # [B, N, S1, 1]
    softmax_sum = torch.exp(s - softmax_max).sum(dim=-1, keepdim=True)
    out = _from_bnsd(out.to(query.dtype), input_layout).contiguous()
    eight = (b, n, sq, 8)
    return (out, softmax_max.expand(eight).contiguous(), softmax_sum.expand(eight).contiguous(),
            torch.empty(0, dtype=query.dtype), 0, 0, 0)


def npu_ring_attention_update(
    prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max,
    cur_softmax_sum, *, actual_seq_qlen=None, input_layout="SBH", input_softmax_layout="",
):
    """-> (attn_out, softmax_max, softmax_sum), shapes and dtypes of the prev_* inputs.

    softmax_max = max(prev_max, cur_max)
    softmax_sum = prev_sum * exp(prev_max - softmax_max) + cur_sum * exp(cur_max - softmax_max)
    attn_out = prev_out * exp(prev_max - softmax_max) * prev_sum / softmax_sum
             + cur_out * exp(cur_max - softmax_max) * cur_sum / softmax_sum
    """
    calls["npu_ring_attention_update"] += 1
    _check(input_layout in ("SBH", "TND"), f"input_layout {input_layout!r}")
    _check(input_softmax_layout in ("", "SBH", "TND"), "input_softmax_layout")
    _check(prev_attn_out.shape == cur_attn_out.shape, "attn_out shapes differ")
    _check(prev_attn_out.dtype == cur_attn_out.dtype, "attn_out dtypes differ")
    _check(prev_attn_out.dtype in (*HALF, torch.float32), f"attn_out dtype {prev_attn_out.dtype}")
    stats = (prev_softmax_max, prev_softmax_sum, cur_softmax_max, cur_softmax_sum)
    _check(all(t.shape == prev_softmax_max.shape for t in stats), "softmax shapes differ")
    _check(all(t.dtype == torch.float32 for t in stats), "softmax tensors must be float32")
    _check(prev_softmax_max.shape[-1] == 8, "softmax tensors need a last dimension of 8")
    for t in stats:  # CANN (aclnnRingAttentionUpdate): "8 identical values, must be positive"
        _check(bool((t == t[..., :1]).all()), "softmax max/sum must hold 8 identical values")
        _check(bool(torch.isfinite(t).all() and (t > 0).all()),
               "softmax max and sum must be positive")
    _check(prev_attn_out.dim() == 3, "attn_out must be 3-D")
    if input_layout == "TND":
        raise NotImplementedError("torch_npu stand-in: TND layout not modelled")
    _check(prev_softmax_max.dim() == 4, "softmax tensors must be 4-D for SBH")
    b, n, s, _ = prev_softmax_max.shape
    s_out, b_out, h = prev_attn_out.shape
    _check((s_out, b_out) == (s, b) and h % n == 0, "attn_out [S, B, H] vs softmax [B, N, S, 8]")
    pm, ps, cm, cs = (t[..., 0] for t in stats)  # [B, N, S]
    m = torch.maximum(pm, cm)
    pw, cw = ps * torch.exp(pm - m), cs * torch.exp(cm - m)
    total = pw + cw

    def per_row(w):  # [B, N, S] -> [S, B, N, 1] against attn_out viewed [S, B, N, D]
        return (w / total).permute(2, 0, 1).unsqueeze(-1)

    po = prev_attn_out.float().reshape(s, b, n, h // n)
    co = cur_attn_out.float().reshape(s, b, n, h // n)
    out = (po * per_row(pw) + co * per_row(cw)).reshape(s, b, h).to(prev_attn_out.dtype)
    eight = (b, n, s, 8)
    return (out, m.unsqueeze(-1).expand(eight).contiguous(),
            total.unsqueeze(-1).expand(eight).contiguous())


# torch_npu.npu.*: the torch.cuda functions the backend uses, for a host with `device_count`
# cards and `mem_info` = (free, total) bytes on each.
class Stream:
    def __init__(self, device=None, priority=0):
        self.device, self.priority = device, priority

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


class Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.enable_timing = enable_timing
        self.recorded = self.waited = 0

    def record(self, stream=None):
        _check(stream is None or isinstance(stream, Stream), "record() takes a Stream")
        self.recorded += 1

    def wait(self, stream=None):
        _check(self.recorded > 0, "an event waited for before it was recorded")
        self.waited += 1

    def query(self):
        return True

    def elapsed_time(self, end):
        _check(self.enable_timing and end.enable_timing, "elapsed_time needs timing events")
        return 0.0

    def synchronize(self):
        pass


def _npu_module(device_count: int, mem_info: tuple[int, int]) -> types.ModuleType:
    npu = types.ModuleType("torch_npu.npu")
    npu.current = 0

    def set_device(device):
        calls["npu.set_device"] += 1
        index = device if isinstance(device, int) else torch.device(device).index
        _check(0 <= index < device_count, f"device {index} of {device_count}")
        npu.current = index

    def synchronize(device=None):
        calls["npu.synchronize"] += 1

    @contextlib.contextmanager
    def stream(s):
        _check(s is None or isinstance(s, Stream), "stream() takes a torch_npu.npu.Stream")
        yield

    def get_device_name(device=None):
        index = npu.current if device is None else device
        index = index if isinstance(index, int) else torch.device(index).index
        _check(0 <= index < device_count, f"device {index} of {device_count}")
        return _host["device_name"]

    npu.get_device_name = get_device_name
    npu.is_available = lambda: device_count > 0
    npu.device_count = lambda: device_count
    npu.current_device = lambda: npu.current
    npu.mem_get_info = lambda device=None: mem_info
    npu.set_device, npu.synchronize, npu.stream = set_device, synchronize, stream
    npu.current_stream = lambda device=None: Stream(device)
    npu.Stream, npu.Event = Stream, Event
    return npu


calls: Counter = Counter()
_host = {"device_name": "Ascend910B3"}  # the SoC name of the cards of the last build()


def build(ring_update: bool = True, device_count: int = 8,
          mem_info: tuple[int, int] = (60 << 30, 64 << 30),
          device_name: str = "Ascend910B3", version: str = "0.0.0+cpu-standin"
          ) -> types.ModuleType:
    """A fresh `torch_npu` module object; `ring_update=False` models releases before 26.1.0.
    `device_name` is the cards' SoC name: Ascend910B* is Atlas A2, Ascend910_93* Atlas A3."""
    _host["device_name"] = device_name
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    module.__version__ = version
    module.npu = _npu_module(device_count, mem_info)
    module.npu_fused_infer_attention_score = npu_fused_infer_attention_score
    module.npu_fusion_attention = npu_fusion_attention
    if ring_update:
        module.npu_ring_attention_update = npu_ring_attention_update
    module.calls = calls
    return module


@contextlib.contextmanager
def install(**kwargs):
    """Make `import torch_npu` return a stand-in (see `build`) inside the block.

    Like torch_npu, it names torch's PrivateUse1 device type "npu" (once per process; torch
    cannot undo that), so torch.device("npu", i) is valid. Call counts start from zero.
    """
    if torch._C._get_privateuse1_backend_name() == "privateuseone":
        torch.utils.rename_privateuse1_backend("npu")
    saved = {name: sys.modules.get(name) for name in ("torch_npu", "torch_npu.npu")}
    module = build(**kwargs)
    calls.clear()
    sys.modules["torch_npu"], sys.modules["torch_npu.npu"] = module, module.npu
    try:
        yield module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def run_strategy_on_npu_backend(ctx, name, q, k, v, causal, prefixes, ring_update):
    """Inside a gloo rank: run strategy `name` with the NPU backend's code computing every
    block and merge on CPU tensors. Returns (out, lse, kernel call counts)."""
    from attention_cases import run_strategy
    from tr_engine.backends import override_backend
    from tr_engine.backends.npu import NpuBackend

    with install(ring_update=ring_update):
        with override_backend("cpu", NpuBackend()):
            out, lse = run_strategy(ctx, name, q, k, v, causal, prefixes)
        return out, lse, dict(calls)
