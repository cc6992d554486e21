"""A world of gloo ranks started once and reused for many cases.

`World(size)` spawns `size` processes that join one gloo process group and wait for work.
`world.run(fn, args, ranks=p)` runs `fn(ctx, *args)` on ranks 0..p-1, where `ctx.group` is
a process group of exactly those ranks (made once at start for every p), and returns the
per-rank results. Worker exceptions come back with their traceback.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import traceback
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankContext:
    rank: int
    size: int  # ranks taking part in this case
    group: object  # torch.distributed group of ranks 0..size-1


def _worker(rank: int, world: int, port: int, conn) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    groups = {p: dist.new_group(list(range(p))) for p in range(1, world + 1)}
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, size = msg
        try:
            result = fn(RankContext(rank, size, groups[size]), *args)
            conn.send(("ok", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class World:
    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self.size = size
        self.conns, self.procs = [], []
        for rank in range(size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(rank, size, port, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            if not c.poll(180):
                self.close()
                raise RuntimeError("a gloo rank did not start within 180 s")
            assert c.recv() == "ready"

    def run(self, fn, args=(), ranks: int | None = None) -> list:
        size = ranks or self.size
        for c in self.conns[:size]:
            c.send((fn, args, size))
        replies = [c.recv() for c in self.conns[:size]]
        errors = [r[1] for r in replies if r[0] == "error"]
        if errors:
            raise RuntimeError("rank failed:\n" + "\n".join(errors))
        return [r[1] for r in replies]

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                c.send(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
