"""8-bit KV formats: which `kv_cache_dtype` stores what, and the quantization of K and V.

A quantized cache keeps K and V in 8 bits with one float32 scale per token and KV head,
computed when the token is stored: scale = amax over the head's D values / the format's
largest value, so every row uses the whole range of the format and no calibration is needed
(vLLM's fp8 cache keeps one scale per tensor, 1.0 unless calibrated, which clips or wastes
range where activations grow at long context). A value is read back as stored x scale.

- fp8 = fp8_e4m3 (float8_e4m3fn, largest 448: 3 mantissa bits, relative error <= 2^-4),
- fp8_e5m2 (largest 57344: 2 mantissa bits, relative error <= 2^-3),
- int8 (symmetric, -127..127: absolute error <= scale / 2 = amax / 254).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import KV_CACHE_DTYPES

_STORAGE = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
SCALE_DTYPE = torch.float32  # one per token and KV head, of K and of V


@dataclass(frozen=True)
class KVFormat:
    """How a cache stores K and V. `name`: auto | fp8_e4m3 | fp8_e5m2 | int8 (fp8
    resolved); `storage`: the dtype of the pages (None: the model's own, no scales);
    `unit_scale`: every scale fixed at 1.0 (vLLM's uncalibrated per-tensor default; for
    accuracy comparisons only)."""

    name: str
    storage: torch.dtype | None
    unit_scale: bool = False

    @property
    def quantized(self) -> bool:
        return self.storage is not None

    @property
    def max(self) -> float:
        """The largest value the format stores."""
        if self.storage == torch.int8:
            return 127.0
        return float(torch.finfo(self.storage).max)


def kv_format(kv_cache_dtype: str, unit_scale: bool = False) -> KVFormat:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got "
                         f"{kv_cache_dtype!r}")
    name = "fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype
    return KVFormat(name, _STORAGE.get(name), unit_scale and name != "auto")


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[T, H, D]` -> (stored `[T, H, D]` in fmt.storage, scale `[T, H]` float32).
    No host synchronisation (decode graphs record it)."""
    xf = x if x.dtype == torch.float64 else x.float()  # float64 stays (references)
    if fmt.unit_scale:
        scale = torch.ones(x.shape[:-1], dtype=SCALE_DTYPE, device=x.device)
    else:
        amax = xf.abs().amax(dim=-1)  # [T, H]
        # a row of zeros keeps scale 1 (its values are 0 whatever the scale)
        scale = torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax)).to(SCALE_DTYPE)
    y = (xf / scale.to(xf.dtype).unsqueeze(-1)).clamp_(-fmt.max, fmt.max)
    if fmt.storage == torch.int8:
        y = y.round_()
    return y.to(fmt.storage), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """stored `[T, H, D]`, scale `[T, H]` -> values `[T, H, D]` in `dtype`: the product taken
    in float32 (float64 for float64) and rounded once. Every 8-bit value is exact in any
    float dtype, so the stored values are widened to `dtype` first and the multiply writes
    `dtype` directly: two passes of 16-bit traffic instead of a float32 copy."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.mul(q.to(dtype), scale.to(work).unsqueeze(-1), out=out)


def round_trip(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """What the cache gives back for x (in x's dtype): the same quantization, for references."""
    if not fmt.quantized:
        return x
    return dequantize(*quantize(x, fmt), x.dtype)
