"""Shared helpers for the GPU benchmarks: process set-up, timing, ceilings, report files."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def setup() -> tuple[int, int, torch.device]:
    """Join the torchrun world (NCCL) or run alone; returns (rank, world, device)."""
    if "RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    torch.cuda.set_device(0)
    return 0, 1, torch.device("cuda", 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def time_ms(fn, warmup: int = 2, reps: int = 7, sync_ranks: bool = True) -> float:
    """Median milliseconds of fn() by CUDA events; with several ranks the slowest rank's."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if sync_ranks:
            barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor([statistics.median(times)], device="cuda")
    if sync_ranks and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=3, reps=10, sync_ranks=False)
    return 2 * 8192**3 / ms / 1e9


def copy_gbps() -> float:
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), warmup=2, reps=10, sync_ranks=False)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def link_gbps(world: int, rank: int) -> float:
    """Bytes per second one way while both directions of the ring carry data."""
    if world == 1:
        return 0.0
    x = torch.randn(128 << 20, device="cuda", dtype=torch.bfloat16)  # 256 MiB
    y = torch.empty_like(x)
    nxt, prv = (rank + 1) % world, (rank - 1) % world

    def go():
        ops = [dist.P2POp(dist.isend, x, nxt), dist.P2POp(dist.irecv, y, prv)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    ms = time_ms(go, warmup=2, reps=8)
    return x.numel() * x.element_size() / ms / 1e6


def machine() -> str:
    name = torch.cuda.get_device_name()
    n = torch.cuda.device_count()
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "?"
    return (f"{n} x {name}, driver {driver}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"Python {platform.python_version()}")


def write_section(path: str, name: str, body: str) -> None:
    """Replace (or append) the section between <!-- name:begin --> and <!-- name:end -->."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = "# Performance\n\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)


def drain(engine, t0: float) -> tuple[float | None, list[float], list]:
    """Step an LLMEngine until it has no work: (seconds from `t0` to the end of the first
    step that gave outputs — the time to first token of requests added at `t0` —, the
    durations of the later steps that gave outputs, that first step's outputs)."""
    ttft, steps, first = None, [], []
    while engine.has_work():
        t = time.perf_counter()
        outs = engine.step()
        if outs and ttft is None:
            ttft, first = time.perf_counter() - t0, outs
        elif outs:
            steps.append(time.perf_counter() - t)
    return ttft, steps, first


class Calling:
    """An object whose calls go to `fn` instead (a wrapper of its __call__: timed,
    labelled), its other attributes to the object."""

    def __init__(self, inner, fn) -> None:
        self.inner, self.fn = inner, fn

    def __call__(self, *a, **k):
        return self.fn(*a, **k)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def kernel_totals(prof, per: float = 1.0) -> dict[str, list[float]]:
    """GPU kernels a torch profiler saw: name -> [milliseconds, calls], each divided by
    `per` (the steps profiled, for per-step figures)."""
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(e.name, [0.0, 0.0])
            t[0] += e.device_time / per / 1e3
            t[1] += 1 / per
    return totals


def llama31_config(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                   mlp: int, vocab: int, max_len: int) -> dict:
    """config.json of a Llama-3.1-shaped model (llama3 RoPE, bf16, untied head)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": 1e-5, "max_position_embeddings": max_len, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 256,
        "eos_token_id": 257, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }


def today() -> str:
    return datetime.date.today().isoformat()


@contextlib.contextmanager
def tr_serve(flags: list[str], port: int, pythonpath: str | None = None,
             timeout_s: float = 400):
    """A real tr-serve on this machine, in a process group of its own, ended by that group
    when the block exits. Yields (base URL, seconds to a 200 from /health)."""
    import httpx

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-c", "import sys; from tr_engine.cli import serve_main; "
           "sys.exit(serve_main())", "--port", str(port), *flags]
    # run from elsewhere: the source folder would shadow the installed package
    server = subprocess.Popen(cmd, start_new_session=True, cwd="/tmp", env=env)
    # a SIGTERM (a time limit ending this script) still runs the finally below, which ends
    # the server's group: a server left behind would hold the card for the next benchmark
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"tr-serve exited with {server.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"tr-serve did not start in {timeout_s:.0f} s")
            time.sleep(0.5)
        ready = time.perf_counter() - t0
        print(f"tr-serve ready in {ready:.1f} s", flush=True)
        yield f"http://127.0.0.1:{port}", ready
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        signal.signal(signal.SIGTERM, previous)
