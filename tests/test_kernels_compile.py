"""The Triton kernels compiled for a GPU that is not here (sm_90: H100, H200), down to the
GPU binary. The CPU tests run the kernels in Triton's interpreter, which runs them as Python
and so accepts what the GPU compiler refuses (globals that are not constexpr, loop-carried
values that change type); this runs the real compiler, in a process of its own since the
interpreter is on in this one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the CUDA kernels are checked where Triton is installed")

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tr_engine.backends import cuda_decode, cuda_sample

    def build(fn, kinds, constexprs, **options):
        sig = {n: kinds.get(n, "i32") for n in fn.arg_names if n not in constexprs}
        sig.update(dict.fromkeys(constexprs, "constexpr"))
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32), options=options)
        assert "cubin" in k.asm

    pointers = dict(x_ptr="*fp32", counts_ptr="*i32", rows_ptr="*i64", settings="*fp32",
                    noise_ptr="*fp32", work_ptr="*fp32", out_ptr="*i64")
    for penalty in (True, False):
        build(cuda_sample._sample_kernel, pointers,
              dict(BLOCK=cuda_sample.BLOCK, PENALTY=penalty, ROUNDS=cuda_sample.ROUNDS),
              num_warps=cuda_sample.WARPS)
        print("sampler, penalty", penalty, "ok")
    kinds = dict(q="*bf16", k="*fp8e4nv", v="*fp8e4nv", k_scale="*fp32", v_scale="*fp32",
                 tables="*i32", rows_of="*i64", lens="*i64", part_out="*fp32",
                 part_lse="*fp32", scale="fp32")
    block, warps, stages, _ = cuda_decode.QUANT_TILES
    for widen in (False, True):
        build(cuda_decode._split_kernel, kinds,
              dict(GROUP=4, ROWS=16, D=128, BLOCK=block, PAGE=16, PRECISION="tf32",
                   QUANT=True, WIDEN_FP16=widen), num_warps=warps, num_stages=stages)
        print("fp8 decode, widened to float16", widen, "ok")
''')


def test_the_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == 4, done.stdout
