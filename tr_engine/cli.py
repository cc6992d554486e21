"""Console entry points: `tr-serve` (the OpenAI-compatible server) and `tr-bench`."""

from __future__ import annotations

import argparse
import sys


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tr-serve",
        description="Serve a model over an OpenAI-compatible HTTP API, the sequence sharded "
        "over all cards.",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    parser.parse_args(argv)
    print("tr-serve: the server is not built yet", file=sys.stderr)
    return 1


def bench_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tr-bench", description="Benchmarks.")
    parser.parse_args(argv)
    return 0
