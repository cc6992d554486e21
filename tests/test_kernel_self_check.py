"""The start-up kernel self-check (Backend.self_check): every fused kernel a backend plans
to use runs on small random inputs against the portable math, and one that raises or
disagrees is disabled for the process.

The NPU backend's kernels are computed by the CPU stand-in for torch_npu
(tests/npu_standin.py, written from the documentation); a test makes the stand-in wrong
(a perturbed LSE, a raised error, a wrong layout) to see the check catch it and the
fallback give exact results. The CUDA backend's check runs on CPU tensors too: its Triton
merge in Triton's interpreter, its cuDNN/flash kernels refusing CPU tensors.
"""

from __future__ import annotations

import logging
import math

import npu_standin
import pytest
import torch
from reference import attention64
from test_npu_backend import FA, FIA, UPDATE, compare, hccl_env_restored, merge_cases, qkv
from tr_engine.backends import npu as npu_mod
from tr_engine.backends.npu import NpuBackend

from tr_engine.attention import merge_


@pytest.fixture
def standin():
    """The stand-in installed as torch_npu; the HCCL variables NpuBackend() sets, restored."""
    with hccl_env_restored(), npu_standin.install() as module:
        yield module


def by_kernel(results):
    return {r.kernel: r for r in results}


def test_self_check_passes_on_the_faithful_standin(standin, caplog):
    backend = NpuBackend()
    with caplog.at_level(logging.INFO, logger="tr_engine"):
        results = by_kernel(backend.self_check(torch.device("cpu")))
    assert list(results) == [FIA, FA, UPDATE] and all(r.ok for r in results.values())
    assert results[FIA].cases == 5  # the bfloat16 and float16 blocks; float32 is not FIA's
    assert results[FA].cases == 6 and results[UPDATE].cases == 1
    assert standin.calls[FIA] == 5 and standin.calls[FA] == 6 and standin.calls[UPDATE] == 1
    assert "kernel self-check on cpu: 3 of 3 kernels passed" in caplog.text
    assert not backend._disabled and backend._ring_update is not None
    q, k, v = qkv(16, 16, 4, 2, 64, torch.bfloat16, 1)
    assert backend.kernels_for(q, k) == ["fused_infer", "fusion", "math"]
    standin.calls.clear()  # a second engine in the process: the results, not a second run
    assert by_kernel(backend.self_check(torch.device("cpu"))) == results
    assert not standin.calls


def _log2_lse(real):
    """The inference kernel returning its LSE in base 2 (a plausible slip)."""
    def fia(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out, lse / math.log(2)
    return fia


def _raises(*args, **kwargs):
    raise RuntimeError("EZ9999: inner error, aclnnFusedInferAttentionScoreV3 failed")


def _bnsd_out(real):
    """The inference kernel writing its output in BNSD order though BSND was asked."""
    def fia(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out.transpose(1, 2).contiguous().reshape(out.shape), lse
    return fia


@pytest.mark.parametrize("wrong,error", [
    (_log2_lse, "lse differs from the portable math by"),
    (lambda real: _raises, "raised RuntimeError: EZ9999: inner error"),
    (_bnsd_out, "out differs from the portable math by"),
])
def test_a_wrong_inference_kernel_is_disabled_and_the_fallback_is_exact(
        standin, monkeypatch, caplog, wrong, error):
    monkeypatch.setattr(standin, FIA, wrong(standin.npu_fused_infer_attention_score))
    backend = NpuBackend()
    with caplog.at_level(logging.INFO, logger="tr_engine"):
        results = by_kernel(backend.self_check(torch.device("cpu")))
    assert not results[FIA].ok and results[FIA].cases == 1  # the first case shows it
    assert error in results[FIA].error and results[FIA].error.startswith("prefill causal GQA")
    assert results[FA].ok and results[UPDATE].ok
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING
                   and r.message.startswith("kernel self-check"))
    assert FIA in warning.message and error in warning.message
    assert f"falling back to {FA} where its limits admit a block" in warning.message
    assert "2 of 3 kernels passed" in caplog.text
    # From now on the blocks FIA would have taken go to npu_fusion_attention, exactly.
    for seed, (tq, tk, causal) in enumerate([(24, 24, True), (5, 17, True), (1, 40, False)]):
        q, k, v = qkv(tq, tk, 8, 2, 64, torch.bfloat16, seed)
        standin.calls.clear()
        out, lse = backend.attention(q, k, v, causal)
        compare("self-check fallback", out, lse,
                *attention64(q, k, v, causal=causal, q_offset=tk - tq if causal else 0),
                torch.bfloat16)
        assert standin.calls[FIA] == 0 and standin.calls[FA] >= 1


def test_a_wrong_fusion_kernel_falls_back_to_math(standin, monkeypatch):
    real = standin.npu_fusion_attention

    def fa(*args, **kwargs):  # softmax_max scaled as if in base 2
        res = real(*args, **kwargs)
        return (res[0], res[1] / math.log(2), *res[2:])

    monkeypatch.setattr(standin, FA, fa)
    backend = NpuBackend()
    results = by_kernel(backend.self_check(torch.device("cpu")))
    assert results[FIA].ok and not results[FA].ok and "lse differs" in results[FA].error
    assert results[FA].fallback == "the float32 math kernel"
    q, k, v = qkv(9, 9, 4, 2, 64, torch.float32, 3)
    standin.calls.clear()
    compare("self-check fallback", *backend.attention(q, k, v, True),
            *attention64(q, k, v, causal=True), torch.float32)
    assert dict(standin.calls) == {}  # the math kernel


def test_a_wrong_ring_update_is_disabled_for_the_portable_merge(standin, monkeypatch):
    real = standin.npu_ring_attention_update

    def update(*args, **kwargs):  # the new sum doubled: every merged lse off by log 2
        out, new_max, new_sum = real(*args, **kwargs)
        return out, new_max, new_sum * 2

    monkeypatch.setattr(standin, UPDATE, update)
    backend = NpuBackend()
    backend._ring_update = standin.npu_ring_attention_update
    results = by_kernel(backend.self_check(torch.device("cpu")))
    assert not results[UPDATE].ok and "lse differs" in results[UPDATE].error
    assert results[UPDATE].fallback == "the portable merge" and backend._ring_update is None
    acc, acc_lse, part, part_lse = merge_cases(1)
    expected = acc.clone(), acc_lse.clone()
    standin.calls.clear()
    backend.merge_(acc, acc_lse, part, part_lse)
    merge_(*expected, part, part_lse)
    assert torch.equal(acc, expected[0]) and torch.equal(acc_lse, expected[1])
    assert standin.calls[UPDATE] == 0


def test_no_fusion_check_where_it_is_not_documented():
    with npu_standin.install(device_name="Ascend910_9392", ring_update=False) as module:
        results = by_kernel(NpuBackend().self_check(torch.device("cpu")))
    assert list(results) == [FIA] and results[FIA].ok and module.calls[FA] == 0


def test_cuda_self_check_on_cpu_tensors(caplog):
    """CudaBackend's own check and disable_kernel, without a GPU: the Triton merge runs in
    Triton's interpreter and passes; cuDNN and flash attention refuse CPU tensors, are
    disabled, and float32 math is what is left. On a GPU all three must pass."""
    pytest.importorskip("triton")
    from tr_engine.backends.cuda import CudaBackend

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: benchmarks/gpu_checks.py runs the check on it")
    backend = CudaBackend()
    backend.synchronize = lambda: None  # no CUDA to wait for
    with caplog.at_level(logging.INFO, logger="tr_engine"):
        results = by_kernel(backend.self_check(torch.device("cpu")))
    assert list(results) == ["cuDNN attention", "flash attention", "Triton merge"]
    assert results["Triton merge"].ok and results["Triton merge"].cases == 1
    for name in ("cuDNN attention", "flash attention"):
        assert not results[name].ok and "raised NotImplementedError" in results[name].error
    assert [n for n, _ in backend._BIG] == ["math"] == [n for n, _ in backend._SMALL]
    assert [n for n, _ in CudaBackend._BIG] == ["cudnn", "flash", "math"]  # class untouched
    assert "kernel self-check on cpu: 1 of 3 kernels passed (Triton merge)" in caplog.text
    q, k, v = qkv(70, 70, 4, 2, 64, torch.bfloat16, 2)
    compare("cuda fallback", *backend.attention(q, k, v, True),
            *attention64(q, k, v, causal=True), torch.bfloat16)


def test_cpu_backend_has_nothing_to_check(caplog):
    from tr_engine.backends.cpu import CpuBackend

    with caplog.at_level(logging.INFO, logger="tr_engine"):
        assert CpuBackend().self_check(torch.device("cpu")) == []
    assert "self-check" not in caplog.text


def test_npu_mod_names_match_the_standin():
    """The backend's limits are the stand-in's (both from the same documentation)."""
    for name in ("FIA_MAX_ND", "FIA_MAX_SEQ", "FIA_MAX_DECODE_KEYS", "FA_MAX_SEQ",
                 "FA_PRODUCTS", "MASK_SIZE"):
        assert getattr(npu_mod, name) == getattr(npu_standin, name), name


# The engine through the NPU backend's kernels (the stand-in computing them on CPU tensors),
# one rank in this process, against transformers.
class NpuKernelsOnCpu(NpuBackend):
    """NpuBackend's attention, merge and self-check on CPU tensors; device, memory and
    process group those of the CPU. Test-only: the engine has no such backend."""

    device_type, dist_backend = "cpu", "gloo"

    def set_device(self, local_rank):
        return torch.device("cpu")

    def device(self, local_rank=0):
        return torch.device("cpu")

    def mem_get_info(self):
        from tr_engine.backends.cpu import CpuBackend

        return CpuBackend().mem_get_info()

    def synchronize(self):
        pass

    def new_stream(self):
        return None

    def stream(self, stream):
        import contextlib

        return contextlib.nullcontext()

    def new_event(self, timing=False):
        return None


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A small random Qwen3 checkpoint, transformers' logits of a 40-token prompt and its
    greedy continuation (float32)."""
    from checkpoints import hf_greedy, make_checkpoint, sample_prompts
    from transformers import AutoModelForCausalLM

    path = make_checkpoint("qwen3", tmp_path_factory.mktemp("ckpt"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = sample_prompts()[-1]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    return str(path), prompt, logits, hf_greedy(model, [prompt], 8)[0]


def run_engine(path, prompt, skip):
    """(prompt logits, 8 greedy tokens, the self-check's results) of an engine whose every
    attention block and merge goes through NpuKernelsOnCpu, whose npu_fusion_attention (the
    kernel float32 blocks take) writes its output in BNSD order though BSND was asked."""
    from tr_engine.backends import override_backend

    from tr_engine import LLM, SamplingParams
    from tr_engine.worker import cluster as workers_mod

    backend = NpuKernelsOnCpu()
    real = npu_standin.npu_fusion_attention
    checks = []
    self_check = backend.self_check

    def recorded_self_check(device):
        checks.extend(self_check(device))
        return checks

    def fa(*args, **kwargs):
        res = real(*args, **kwargs)
        return (res[0].transpose(1, 2).contiguous().reshape(res[0].shape), *res[1:])

    backend.self_check = recorded_self_check
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend.torch_npu, FA, fa)
        mp.setattr(workers_mod, "get_backend", lambda name: backend)
        with override_backend("cpu", backend), LLM(
                path, device="cpu", dtype="float32", prefill_chunk=16, kv_cache_tokens=256,
                attention_strategy="local", skip_kernel_self_check=skip) as llm:
            logits = llm.prompt_logits(prompt)
            params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            tokens = llm.generate([{"prompt_token_ids": prompt}], params)[0].token_ids
    return logits, tokens, by_kernel(checks)


def test_engine_output_is_exact_after_the_fallback(standin, qwen3):
    path, prompt, ref_logits, ref_tokens = qwen3
    logits, tokens, checks = run_engine(path, prompt, skip=False)
    assert not checks[FA].ok and checks[FIA].ok and checks[UPDATE].ok
    err = (logits - ref_logits).abs().max().item()
    assert err < 1e-4 and tokens == ref_tokens, err
    # Without the check the wrong kernel serves, and the logits show it.
    logits, _, checks = run_engine(path, prompt, skip=True)
    assert checks == {}
    assert (logits - ref_logits).abs().max().item() > 1e-2
