"""Correctness on the GPU: the engine's greedy generation against transformers' `generate`.

    python benchmarks/gpu_checks.py [--worlds 1,2]

The CPU test suite checks every family on gloo ranks; this runs the same small random
checkpoints on CUDA, where decode steps replay from recorded graphs and use the Triton
decode kernel. float32, five prompts of 1-40 tokens decoded together as one batch (the
40-token one prefilled in three chunks), 32 new tokens each, against transformers on the
CPU. With several ranks the same engine also runs with --enforce-eager: graphs and eager
launches must give the same tokens, and every rank must exit by itself at shutdown. First
the start-up kernel self-check runs on GPU 0 (cuDNN and flash attention, the Triton merge
against the portable math), with its cost. Prints one line per case and exits 1 on a
failed kernel, a mismatch or a rank that had to be killed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NEW_TOKENS = 32


def reference(path: str) -> list[list[int]]:
    from checkpoints import hf_greedy, sample_prompts
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf_greedy(model, sample_prompts(), NEW_TOKENS)


def check_engine(path: str, ref: list[list[int]], label: str, world: int, eager: bool,
                 max_num_seqs: int, strategy: str, tp: int = 1) -> bool:
    """Generate on CUDA, compare with `ref`, print the line, then shut the engine down (the
    line comes first, so a shutdown that hangs cannot hide it)."""
    from checkpoints import sample_prompts

    from tr_engine import LLM, SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    with LLM(path, device="cuda", world_size=world, tensor_parallel_size=tp,
             dtype="float32", prefill_chunk=16,
             kv_cache_tokens=1024, max_num_seqs=max_num_seqs, enforce_eager=eager,
             attention_strategy=strategy) as llm:
        graphs = llm.engine.cluster.runner.graphs
        assert (graphs is None) == eager, "graphs recorded unless eager"
        outs = llm.generate([{"prompt_token_ids": p} for p in sample_prompts()], params)
        assert llm.engine.scheduler.kv_used() == [0] * (world // tp)
        same = [o.token_ids == r for o, r in zip(outs, ref)]
        print(f"{label}: {sum(same)}/{len(same)} prompts equal to transformers "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        workers = list(llm.engine.cluster.procs)
        t = time.perf_counter()
    clean = all(p.exitcode == 0 for p in workers)
    print(f"{label}: shut down in {time.perf_counter() - t:.1f} s, "
          f"{'every rank exited by itself' if clean else 'a rank had to be killed'}", flush=True)
    return all(same) and clean


def check_kernels() -> bool:
    """The start-up kernel self-check on GPU 0 (what every engine rank runs first): prints
    each kernel's result and the engine's own log line, with its cost."""
    import logging

    from tr_engine.backends import get_backend

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    engine_log = logging.getLogger("tr_engine")
    engine_log.setLevel(logging.INFO)  # for the check's own line; the engines below stay quiet
    backend = get_backend("cuda")
    device = backend.set_device(0)
    t = time.perf_counter()
    results = backend.self_check(device)
    cost = time.perf_counter() - t
    engine_log.setLevel(logging.WARNING)
    for r in results:
        print(f"kernel self-check: {r.kernel}: {'passed' if r.ok else 'FAILED'} "
              f"({r.cases} case{'s' * (r.cases != 1)}){'' if r.ok else ': ' + r.error}",
              flush=True)
    print(f"kernel self-check on {torch.cuda.get_device_name(0)}: {cost:.2f} s", flush=True)
    return bool(results) and all(r.ok for r in results)


def main() -> int:
    from checkpoints import FAMILIES, make_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2",
                    help="world sizes; W:T for W GPUs with tensor_parallel_size T")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--eager-families", default="llama3.1,qwen3",
                    help="families also run eagerly on the largest world")
    ap.add_argument("--strategy", default="auto", help="prefill attention strategy")
    ap.add_argument("--modes", default="graphs", help="graphs, eager or both (graphs,eager)")
    ap.add_argument("--max-num-seqs", type=int, default=8,
                    help="decode batch limit (graphs are recorded for 1, 2, 4, ... up to it)")
    args = ap.parse_args()
    worlds = [tuple(map(int, (w + ":1").split(":")[:2])) for w in args.worlds.split(",")]
    failures = 0 if check_kernels() else 1
    with tempfile.TemporaryDirectory() as root:
        for family in args.families.split(","):
            path = str(make_checkpoint(family, root))
            ref = reference(path)
            modes = args.modes.split(",")
            runs = [(w, mode == "eager") for w in worlds for mode in modes]
            if "eager" not in modes and family in args.eager_families.split(","):
                runs.append((max(worlds), True))
            for (world, tp), eager in runs:
                label = (f"{family:>9} P={world}{f' T={tp}' if tp > 1 else ''} "
                         f"{'eager' if eager else 'graphs':>6}")
                failures += not check_engine(path, ref, label, world, eager, args.max_num_seqs,
                                             args.strategy, tp)
    print("all equal, clean shutdowns" if not failures else f"{failures} runs failed")
    return 1 if failures else 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_checks.py needs a CUDA GPU")
    sys.exit(main())
