"""Accuracy of the quantized KV cache: each kv_cache_dtype against `auto` on the embedded
model (SmolLM2-135M-Instruct, real weights), on the CPU or one GPU.

    python benchmarks/kv_quant.py [--device cpu] [--worlds 1,2,3] [--new 48] [--out FILE]

Six fixed chat prompts; `auto`'s greedy continuation is the reference. For each dtype:
- greedy first divergence: the mean index of the first token that differs from the
  reference (the full length where none does);
- teacher-forced through decode (every step reads the whole cache as stored, the reference
  tokens fed back): mean |Δ logprob| of the reference tokens, and top-1 agreement (the
  share of steps whose most likely token is the reference's);
- the pass-key test (tests/kv_measures.py): keys hidden at three depths of a filler
  haystack of 570-1,050 tokens, the haystack put in the prefix cache by a first question and
  read from there by the pass-key question; keys found in the greedy answers (`auto` too).
`fp8 (scale 1.0)` is fp8_e4m3 with every scale fixed at 1.0 (TR_ENGINE_KV_UNIT_SCALE=1),
what vLLM stores without calibrated scales; the other rows use per-token, per-head scales.
Worlds above 1 run the same through the sharded path (gloo on the CPU). The table goes to
stdout, and with --out into that file's `kv-quant` section.

    python benchmarks/kv_quant.py --pool [--out FILE]      (one GPU)

The KV pool of the Llama-3.1-8B shape (random bf16 weights, benchmarks/prefill.py's
checkpoint) sized from free memory for each kv_cache_dtype the card takes, in tokens. Decode
at long context and a follow-up's TTFT on a cached prefix come from benchmarks/prefill.py and
benchmarks/prefix.py with --kv-cache-dtype (docs/PERFORMANCE.md, kv-quant-1gpu).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kv_measures as km  # noqa: E402

from tr_engine import LLM  # noqa: E402

# (row label, kv_cache_dtype, every scale 1.0)
VARIANTS = (
    ("fp8 (scale 1.0)", "fp8", True),
    ("fp8 = fp8_e4m3", "fp8", False),
    ("fp8_e5m2", "fp8_e5m2", False),
    ("int8", "int8", False),
)


@contextlib.contextmanager
def unit_scale(on: bool):
    """TR_ENGINE_KV_UNIT_SCALE for the engine started inside (its ranks inherit it)."""
    old = os.environ.get("TR_ENGINE_KV_UNIT_SCALE")
    os.environ["TR_ENGINE_KV_UNIT_SCALE"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TR_ENGINE_KV_UNIT_SCALE"]
        else:
            os.environ["TR_ENGINE_KV_UNIT_SCALE"] = old


def run(device: str, world: int, new: int) -> list[tuple[str, dict]]:
    kw = dict(device=device, world_size=world, dtype="float32" if device == "cpu" else "auto",
              shard_min_tokens=0)
    with LLM(None, **kw) as llm:
        prompts = km.chat_prompts(llm)
        ref = km.greedy(llm, prompts, new)
        keys = km.pass_keys(llm)
    rows = [("auto", {"keys": keys})]
    for label, name, unit in VARIANTS:
        t = time.perf_counter()
        with unit_scale(unit), LLM(None, kv_cache_dtype=name, **kw) as llm:
            row = km.agreement(ref, km.greedy(llm, prompts, new), km.forced(llm, prompts, ref))
            row["keys"] = km.pass_keys(llm)
        print(f"  P{world} {label}: {row} ({time.perf_counter() - t:.0f} s)", flush=True)
        rows.append((label, row))
    return rows


def table(results: dict[int, list], new: int, device: str) -> str:
    lines = [f"Embedded SmolLM2-135M-Instruct (real weights), {len(km.PROMPTS)} chat prompts, "
             f"{new} greedy tokens each, {device}; the reference is `auto` at the same "
             "world size.", "",
             "| ranks | kv_cache_dtype | greedy first divergence (of "
             f"{new}) | mean abs Δ logprob | top-1 agreement | pass keys found "
             "(haystack cached) |",
             "|---|---|---|---|---|---|"]
    for world, rows in results.items():
        for label, r in rows:
            keys = r["keys"]
            found = f"{sum(k[0] for k in keys)} of {len(km.PASS_KEYS)} (cached " + \
                ", ".join(f"{c}/{n}" for _, c, n in keys) + ")"
            if "top1" not in r:  # the reference itself
                lines.append(f"| {world} | {label} | - | - | - | {found} |")
                continue
            lines.append(f"| {world} | {label} | {r['first_divergence']:.1f} | "
                         f"{r['dlogprob']:.4f} | {100 * r['top1']:.1f}% | {found} |")
    return "\n".join(lines)


def pool(ckpt: str) -> str:
    """The 8B shape's KV pool on this GPU for each dtype it takes (fresh engine each)."""
    import gc

    import torch
    from common import machine, today
    from prefill import write_checkpoint
    from tr_engine.backends import get_backend

    from tr_engine.config import EngineConfig
    from tr_engine.engine.llm_engine import LLMEngine
    from tr_engine.kv.cache import KVCache
    from tr_engine.kv.quant import kv_format

    longest = 1 << 21  # the pool, not the context, is the limit
    write_checkpoint(Path(ckpt), longest)
    lines = [f"## KV pool of the 8B shape by kv_cache_dtype — {today()}", "",
             f"Machine: {machine()}. Command: `python benchmarks/kv_quant.py --pool`. One "
             "GPU, max_model_len 2M, max_num_seqs 1, kv_cache_fraction 0.9 of the memory left "
             "after the weights and the prefill workspace.", "",
             "| kv_cache_dtype | bytes per token (K/V + scales) | pool (tokens) | vs auto |",
             "|---|---|---|---|"]
    base = None
    for name in get_backend("cuda").kv_cache_dtypes():
        if name == "fp8":  # = fp8_e4m3
            continue
        engine = LLMEngine(EngineConfig(model=ckpt, device="cuda", dtype="bfloat16",
                                        max_model_len=longest, max_num_seqs=1,
                                        prefill_chunk=32768, kv_cache_dtype=name))
        tokens = engine.kv_capacity
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        kv, scales = KVCache.bytes_per_token(32, 8, 128, torch.bfloat16, kv_format(name))
        base = base or tokens
        lines.append(f"| {name} | {kv} + {scales} | {tokens} | {tokens / base:.2f}x |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", action="store_true", help="the 8B shape's pool on one GPU")
    ap.add_argument("--ckpt", default="/tmp/llama31-8b-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worlds", default="1,2,3")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.pool:
        text = pool(args.ckpt)
        print(text)
        if args.out:
            from common import write_section

            write_section(args.out, "kv-pool-1gpu", text)
        return
    results = {}
    for world in (int(w) for w in args.worlds.split(",")):
        results[world] = run(args.device, world, args.new)
    text = table(results, args.new, args.device)
    print(text)
    if args.out:
        from common import write_section

        write_section(args.out, "kv-quant", text)


if __name__ == "__main__":
    main()
