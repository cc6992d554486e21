"""Every environment variable tr_engine reads, typed, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def _int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def cache_dir() -> Path:
    """TR_ENGINE_CACHE: where converted models are kept (default ~/.cache/tr_engine)."""
    return Path(os.environ.get("TR_ENGINE_CACHE") or Path.home() / ".cache" / "tr_engine")


def dist_timeout_s() -> int:
    """TR_ENGINE_DIST_TIMEOUT: seconds a collective may wait before it fails (default 600)."""
    return _int("TR_ENGINE_DIST_TIMEOUT") or 600


def heartbeat_timeout_s() -> float:
    """TR_ENGINE_HEARTBEAT_TIMEOUT: seconds without a heartbeat after which a rank counts as
    lost and the engine as dead (default 10)."""
    value = os.environ.get("TR_ENGINE_HEARTBEAT_TIMEOUT")
    return float(value) if value else 10.0


def overlap_outputs(device_type: str) -> bool:
    """TR_ENGINE_OVERLAP_OUTPUTS: 1 or 0. With 1, the server hands a decode step's outputs to
    its event loop once the next step's device work is queued, so that turning them into
    chunks overlaps the device's work. Default: 1 on CUDA and NPU, 0 on the CPU (whose
    "queued" work is already done, so holding outputs would only delay them)."""
    value = os.environ.get("TR_ENGINE_OVERLAP_OUTPUTS")
    if value in (None, ""):
        return device_type != "cpu"
    return value not in ("0", "false", "no")


def inject_fault_token() -> int | None:
    """TR_ENGINE_INJECT_FAULT: for tests, a token id. Rank 0 raises where it computes the
    logits of a step that feeds this token (as an out-of-memory there would), so the
    handling of a failed step can be tried on a live engine. Unset in service."""
    return _int("TR_ENGINE_INJECT_FAULT")


def kv_unit_scale() -> bool:
    """TR_ENGINE_KV_UNIT_SCALE: 1 fixes every scale of a quantized KV cache at 1.0 instead of
    one per token and head (what an uncalibrated per-tensor fp8 cache stores): for accuracy
    comparisons (benchmarks/kv_quant.py), not for serving. Default 0."""
    return os.environ.get("TR_ENGINE_KV_UNIT_SCALE", "") not in ("", "0", "false", "no")


def step_trace_path() -> str | None:
    """TR_ENGINE_STEP_TRACE: a file to which rank 0 appends one JSON line per engine step
    (tr_engine/engine/step_trace.py); unset: no trace."""
    return os.environ.get("TR_ENGINE_STEP_TRACE") or None


def max_queued_outputs() -> int:
    """TR_ENGINE_MAX_QUEUED_OUTPUTS: how many of a request's outputs (about one a token) may
    wait unread before its reader counts as gone and the request is aborted (default 1024)."""
    return _int("TR_ENGINE_MAX_QUEUED_OUTPUTS") or 1024


def torchrun() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
    with MASTER_ADDR/MASTER_PORT for the rendezvous), else None."""
    rank, world = _int("RANK"), _int("WORLD_SIZE")
    if rank is None or world is None or "MASTER_ADDR" not in os.environ:
        return None
    return rank, world, _int("LOCAL_RANK") or 0
