"""The Triton token-wise kernels (backends/cuda_tokenwise.py) against the torch code they
replace, run on the CPU in Triton's interpreter.

Triton reads TRITON_INTERPRET when a kernel is defined, so every check runs in one subprocess
started with it set: this file, run as a script, checks each case and prints one JSON line
per case; the tests read those lines. Each case also counts kernel launches, so a pass means
the Triton code ran, not the torch fallback.

Where the rounding steps alone decide the result, equality is exact: RoPE always, RMSNorm
on inputs whose sum of squares is exact in any order (the kernel and torch sum in different
orders), SiLU against the torch formula with numpy's exp (the interpreter's). Elsewhere the
bound is in units in the last place (ulp) of the dtype.

On a machine with a GPU, `test_kernels_on_cuda` runs the same checks with the compiled
kernels against torch's CUDA code, in bfloat16 too; SiLU must then equal torch exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

DTYPES = ("float32", "float16")  # the interpreter has no bfloat16; the GPU run adds it
KERNELS = ("_rms_norm_kernel", "_silu_mul_kernel", "_rope_kernel")
MAX_POS = 131_072


def _ulps(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest distance in units in the last place of the dtype (at the larger magnitude)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    info = torch.finfo(ref.dtype)
    big = torch.maximum(ours.abs(), ref.abs()).double()
    _, exponent = torch.frexp(big)  # big = m * 2**exponent, m in [0.5, 1)
    ulp = torch.clamp(torch.ldexp(torch.full_like(big, info.eps / 2), exponent),
                      min=info.smallest_normal * info.eps)
    return ((ours.double() - ref.double()).abs() / ulp).max().item()


def _exact_rows(t: int, n: int, dtype, device, gen) -> torch.Tensor:
    # multiples of 1/8 below 2 in magnitude (so sums of two below 4): their squares and any
    # sum of up to 4096 squares are exact in float32
    return (torch.randint(-15, 16, (t, n), generator=gen) / 8).to(device, dtype)


def _randn(*shape, dtype, device, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def _norm_ref(x, w, eps):
    from tr_engine.layers import RMSNorm

    norm = RMSNorm(w.shape[0], eps)
    norm.weight.data = w
    return norm._norm(x)  # the torch code, whatever the device


# Each check takes the kernels module and the device, returns numbers to report, and raises
# on a failure. They run on the CPU in the interpreter, and on a GPU where there is one.

def check_norm(k, device, dtype, n, t, residual):
    gen = torch.Generator().manual_seed(n * 1000 + t)
    dt = getattr(torch, dtype)
    w = _randn(n, dtype=dt, device=device, gen=gen, scale=0.5) + 1
    eps, worst = 1e-5, 0.0
    # the CPU's torch divides the sum by N, CUDA's torch and the kernel multiply it by
    # float32(1/N): the same where N is a power of two
    exact = device == "cuda" or n & (n - 1) == 0
    for draw in ("exact", "random"):
        if draw == "exact":
            x, r = (_exact_rows(t, n, dt, device, gen) for _ in range(2))
        else:  # sum order differs: a unit weight keeps the bound in ulps of the normalised rows
            x, r = (_randn(t, n, dtype=dt, device=device, gen=gen, scale=3) for _ in range(2))
            w = torch.ones_like(w)
        if residual:
            out, summed = k.add_rms_norm(x, r, w, eps)
            assert torch.equal(summed, x + r), "x + residual not rounded as torch rounds it"
            # and the norm is of that rounded sum: the same program as rms_norm's
            assert torch.equal(out, k.rms_norm(summed, w, eps)), "norm of an unrounded sum"
            ref = _norm_ref(x + r, w, eps)
        else:
            out, ref = k.rms_norm(x, w, eps), _norm_ref(x, w, eps)
        if draw == "exact" and exact:
            assert torch.equal(out, ref), f"{_ulps(out, ref)} ulps on exact-sum rows"
        worst = max(worst, _ulps(out, ref))
    # float32: the sum of squares in another order moves the mean a few ulps, the output
    # half as many plus its own rounding; half precision rounds that away, or moves one ulp
    limit = 4 if dt == torch.float32 else 1
    assert worst <= limit, f"{worst} ulps"
    return {"max_ulps": worst}


def check_norm_heads(k, device, dtype, d, t):
    # Qwen3's per-head norm of q and k, strided views of the fused qkv projection
    gen = torch.Generator().manual_seed(d + t)
    dt, hq, hkv = getattr(torch, dtype), 8, 2
    qkv = _exact_rows(t, (hq + 2 * hkv) * d, dt, device, gen)
    q = qkv[:, : hq * d].view(t, hq, d)
    kk = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    w = _randn(d, dtype=dt, device=device, gen=gen, scale=0.5) + 1
    for x in (q, kk):
        out = k.rms_norm(x, w, 1e-6)
        assert out.is_contiguous() and torch.equal(out, _norm_ref(x, w, 1e-6))
    # a float32 weight over half-precision rows promotes the output, as torch does
    w32 = _randn(d, dtype=torch.float32, device=device, gen=gen)
    out = k.rms_norm(q, w32, 1e-6)
    assert torch.equal(out, _norm_ref(q, w32, 1e-6))
    return {}


def check_silu(k, device, dtype, n, t):
    gen = torch.Generator().manual_seed(n + t)
    dt = getattr(torch, dtype)
    rows = _randn(2 * t, 2 * n, dtype=dt, device=device, gen=gen, scale=4)
    gate_up = rows[::2]  # rows further apart than 2I, as a slice of a bigger batch can be
    gate, up = gate_up.chunk(2, dim=-1)
    out = k.silu_mul(gate_up)
    assert out.shape == (t, n) and out.dtype == dt
    if device == "cuda":  # CUDA's expf on both sides
        assert torch.equal(out, F.silu(gate) * up), f"{_ulps(out, F.silu(gate) * up)} ulps"
        return {}
    # The interpreter's exp is numpy's: against the torch formula with it, exactly
    g = gate.float()
    ref = (g / (1 + torch.from_numpy(np.exp(-g.numpy())))).to(dt) * up
    assert torch.equal(out, ref), "rounding steps differ"
    # and against torch's silu, whose exp differs by an ulp or so; with up = 1 the bound is in
    # ulps of silu(gate)
    out = k.silu_mul(torch.cat([gate, torch.ones_like(up)], dim=-1))
    worst = _ulps(out, F.silu(gate))
    assert worst <= (4 if dt == torch.float32 else 1), f"{worst} ulps"
    return {"max_ulps_vs_torch_exp": worst}


_TABLES: dict[tuple[int, str], object] = {}


def _rotary(d, device):
    from tr_engine.layers import RotaryEmbedding
    from tr_engine.models.config import RopeConfig

    if (d, device) not in _TABLES:
        rotary = RotaryEmbedding(d, RopeConfig(theta=500000.0), MAX_POS)
        rotary.build_cache(torch.device(device))
        _TABLES[d, device] = rotary
    return _TABLES[d, device]


def check_rope(k, device, dtype, d, hq, hkv, t, views):
    from tr_engine.layers.rotary import _rotate

    gen = torch.Generator().manual_seed(d * t + hq)
    dt, rotary = getattr(torch, dtype), _rotary(d, device)
    if views:  # as llama.py's qkv has them: views of the fused projection's output
        qkv = _randn(t, (hq + 2 * hkv) * d, dtype=dt, device=device, gen=gen)
        q = qkv[:, : hq * d].view(t, hq, d)
        kk = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    else:
        q = _randn(t, hq, d, dtype=dt, device=device, gen=gen)
        kk = _randn(t, hkv, d, dtype=dt, device=device, gen=gen)
    # large, unordered positions, every other one of a longer tensor
    positions = torch.randint(100_000, MAX_POS, (2 * t,), generator=gen).to(device)[::2]
    q_out, k_out = k.rope(q, kk, positions, rotary.cos, rotary.sin)
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    assert torch.equal(q_out, _rotate(q, cos, sin)), "q differs"
    assert torch.equal(k_out, _rotate(kk, cos, sin)), "k differs"
    return {}


def check_model(k, device, dtype, chunk):
    """A small Qwen3 (per-head q/k norm, GQA) through its forward: kernels against torch."""
    from tr_engine.layers.context import ForwardContext, forward_context
    from tr_engine.layers.tokenwise import force_kernels
    from tr_engine.models.config import ModelConfig, RopeConfig
    from tr_engine.models.qwen3 import Qwen3ForCausalLM

    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    config = ModelConfig(
        architecture="Qwen3ForCausalLM", model_type="qwen3", vocab_size=64, hidden_size=96,
        intermediate_size=200, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
        rms_norm_eps=1e-6, rope=RopeConfig(theta=1e6), max_position_embeddings=MAX_POS,
        qk_norm=True,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "norm" in name else 0.2))
            if "norm" in name:
                p += 1
    model = model.to(device, dt)
    model.rotary.build_cache(torch.device(device))  # float32, as the loader builds it
    ids = torch.randint(0, 64, (37,), generator=gen).to(device)
    positions = (100_000 + torch.cumsum(torch.randint(1, 4, (37,), generator=gen), 0)).to(device)

    class Chunked(ForwardContext):
        token_chunk = chunk

        def attention(self, layer, q, kk, v, scale):
            from tr_engine.backends import backend_for

            return backend_for(q.device).attention(q, kk, v, True, scale)[0]

    outs = []
    for kernels in (None, k):
        with torch.no_grad(), forward_context(Chunked()), force_kernels(kernels):
            outs.append(model(ids, positions).double())
    ref, ours = outs
    err = (ours - ref).abs().max().item()
    # only the norms' sum order differs; it reaches the output through a few layers
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dt]
    assert err <= ref.abs().max().item() * tol, err
    return {"max_abs_err": err}


# Every kernel at T = 1, 3 and 100 tokens. The interpreter runs each program in numpy (a few
# milliseconds), so 100 tokens are not crossed with every width and dtype.
_NORM = [(dt, n, t) for dt in DTYPES for n in (64, 576, 4096) for t in (1, 3)] + [
    ("float32", 64, 100), ("float32", 576, 100), ("float16", 64, 100), ("float16", 4096, 100)]
CASES = {
    **{f"norm-{dt}-n{n}-t{t}{'-residual' if res else ''}": (check_norm, (dt, n, t, res))
       for dt, n, t in _NORM for res in (False, True)},
    **{f"norm-heads-{dt}-d{d}-t{t}": (check_norm_heads, (dt, d, t))
       for dt, d, t in (("float32", 64, 1), ("float32", 128, 3), ("float16", 64, 3),
                        ("float16", 128, 100))},
    **{f"silu-{dt}-i{n}-t{t}": (check_silu, (dt, n, t))
       for dt in DTYPES for n, t in ((64, 1), (64, 3), (1000, 3), (1000, 100))},
    **{f"rope-{dt}-d{d}-h{hq}x{hkv}-t{t}{'-views' if views else ''}":
       (check_rope, (dt, d, hq, hkv, t, views))
       for dt in DTYPES for d in (64, 128) for hq, hkv in ((8, 2), (4, 4)) for t in (1, 3)
       for views in (True, False)},
    "rope-float32-d64-h8x2-t100-views": (check_rope, ("float32", 64, 8, 2, 100, True)),
    "rope-float16-d128-h8x2-t100-views": (check_rope, ("float16", 128, 8, 2, 100, True)),
    "rope-float16-d96-h6x2-t3-views": (check_rope, ("float16", 96, 6, 2, 3, True)),
    "model-qwen3-float32": (check_model, ("float32", None)),
    "model-qwen3-float16-chunk8": (check_model, ("float16", 8)),
}


CUDA_CASES = {**CASES, **{name.replace("float16", "bfloat16"): (check, ("bfloat16", *args[1:]))
                          for name, (check, args) in CASES.items() if args[0] == "float16"}}


def _run_all() -> None:
    """Script mode: run every case with the kernels interpreted, one JSON line each."""
    from tr_engine.backends import cuda_tokenwise as k

    launches: Counter = Counter()
    for name in KERNELS:
        kernel = getattr(k, name)

        def counted(*args, _run=kernel.run, _name=name, **kwargs):
            launches[_name] += 1
            return _run(*args, **kwargs)

        kernel.run = counted
    interpreted = all(type(getattr(k, n)).__name__ == "InterpretedFunction" for n in KERNELS)
    for case, (check, args) in CASES.items():
        before = sum(launches.values())
        try:
            report = {"ok": True, **check(k, "cpu", *args)}
        except Exception as e:  # reported to the test, which fails with the message
            report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        report.update(case=case, launches=sum(launches.values()) - before,
                      interpreted=interpreted)
        print(json.dumps(report), flush=True)


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        pytest.fail(f"kernel checks did not run (exit {done.returncode}):\n{done.stderr}")
    return {r["case"]: r for r in lines}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_torch(reports, case):
    report = reports.get(case)
    assert report is not None, f"{case} did not report"
    assert report["interpreted"], "the kernels were compiled, not interpreted"
    assert report["ok"], report.get("error")
    assert report["launches"] > 0, "no Triton kernel ran"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_kernels_on_cuda():
    """The compiled kernels against torch's CUDA code, bfloat16 included; all cases in one
    test, failures listed together."""
    k = pytest.importorskip("tr_engine.backends.cuda_tokenwise", reason="Triton is not installed")
    from tr_engine.layers.tokenwise import kernels_for

    assert kernels_for(torch.empty(1, device="cuda")) is k, "CUDA tensors take the torch code"
    failures = {}
    for case, (check, args) in CUDA_CASES.items():
        try:
            check(k, "cuda", *args)
        except AssertionError as e:
            failures[case] = str(e)
    assert not failures, failures


if __name__ == "__main__":
    _run_all()
