from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels (the CUDA backend's) run in Triton's interpreter. Triton
# reads this when it defines a kernel, its own library's included, so it is set before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (group label) -> list of (max_abs_err, mean_abs_err) recorded by tests that compare numbers.
ERRORS: dict[str, list[tuple[float, float]]] = defaultdict(list)


def record_error(label: str, max_err: float, mean_err: float) -> None:
    ERRORS[label].append((max_err, mean_err))


def pytest_terminal_summary(terminalreporter):
    if not ERRORS:
        return
    tr = terminalreporter
    tr.section("numerical error against the float64 reference")
    tr.write_line(f"{'case group':<56} {'cases':>6} {'max abs err':>12} {'mean abs err':>13}")
    for label in sorted(ERRORS):
        rows = ERRORS[label]
        worst = max(r[0] for r in rows)
        mean = sum(r[1] for r in rows) / len(rows)
        tr.write_line(f"{label:<56} {len(rows):>6} {worst:>12.3e} {mean:>13.3e}")
