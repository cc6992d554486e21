"""TR_ENGINE_STEP_TRACE=FILE: one JSON line per engine step, to find where a stall goes.

Each line: `t` (time.time() at the step's start), `idle_ms` (since the previous step
ended: the engine thread's own work between steps, adding requests, or waiting for the
interpreter lock), `schedule_ms`, `forward_ms` (the plan sent and the forward queued: on a
device that runs ahead of the host, most of the device's time shows in the next part, where
the host first waits for a result), `sample_ms` (with that wait), `outputs_ms`
(stop checks, text, the outputs handed over), the step's kind, its prefill chunks (`start`,
tokens, strategy, cached prefix per rank), its decode rows, `builds` (kernel variants
the backend built during the step: cuDNN graphs, Triton specialisations), and `gc_ms` and
`gc` (the time this process spent in the interpreter's garbage collections since the
previous line's step began, in any thread, and the oldest generation collected, -1 for
none). Off unless the variable names a file; on, it adds a line's writing a step and never
waits for the device.
"""

from __future__ import annotations

import gc
import json
import time


class StepTrace:
    def __init__(self, path: str, backend) -> None:
        # a line at a time: readable while it runs; closed by close() at shutdown
        self.file = open(path, "a", buffering=1)  # noqa: SIM115
        self.backend = backend
        self.ended = time.perf_counter()
        self.row: dict = {}
        self.t = self.ended
        self._gc_ms, self._gc_gen, self._gc_start = 0.0, -1, 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._gc_start = now
        else:
            self._gc_ms += now - self._gc_start
            self._gc_gen = max(self._gc_gen, info["generation"])

    def begin(self) -> None:
        now = time.perf_counter()
        self.row = {"t": time.time(), "idle_ms": round(1e3 * (now - self.ended), 3),
                    "builds": self.backend.late_builds()}
        self.t = now

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.row[f"{name}_ms"] = round(1e3 * (now - self.t), 3)
        self.t = now

    def end(self, plan) -> None:
        self.mark("outputs")
        row = self.row
        row["builds"] = self.backend.late_builds() - row["builds"]
        row["kind"] = plan.kind
        row["prefill"] = [{"seq": p.seq_id, "start": p.start, "tokens": len(p.tokens),
                           "strategy": p.strategy, "prefix": p.prefix_len, "home": p.home}
                          for p in [plan.prefill, *plan.local] if p is not None]
        row["decode"] = len(plan.decode.seq_ids) if plan.decode is not None else 0
        row["gc_ms"], row["gc"] = round(1e3 * self._gc_ms, 3), self._gc_gen
        self._gc_ms, self._gc_gen = 0.0, -1
        self.file.write(json.dumps(row) + "\n")
        self.ended = time.perf_counter()

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self.file.close()
