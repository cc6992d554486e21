"""CPU backend: gloo for communication, attention in float32 with an explicit LSE. Every
KV cache dtype: 8-bit pages are dequantized before attention."""

from __future__ import annotations

import os

import torch

from .base import Backend
from .reference import math_attention


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def mem_get_info(self) -> tuple[int, int]:
        pages = os.sysconf("SC_PHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * page
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            free = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            pass
        return free, pages * page

    def kv_cache_dtypes(self) -> tuple[str, ...]:
        from tr_engine.config import KV_CACHE_DTYPES

        return KV_CACHE_DTYPES

    def _attention(self, q, k, v, causal, scale):
        return math_attention(q, k, v, causal, scale)
