"""Ranks and their processes.

`Cluster` is rank 0's handle on the world: it starts the other ranks (or, under torchrun,
joins the ones torchrun started), sets up the two process groups — the device group
(hccl / nccl / gloo) for tensors and a gloo group on the host for step plans — and each step
broadcasts the plan and runs rank 0's share. The other ranks run `worker_loop`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import envs
from ..backends import SOLO, Backend, get_backend
from ..config import EngineConfig
from ..distributed.tensor_parallel import Mesh
from ..plan import SHUTDOWN, StepPlan

log = logging.getLogger("tr_engine")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: have the kernel end this process when the process that spawned it ends."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _init_groups(backend: Backend, mesh: Mesh, init_method: str) -> Groups:
    """The device groups (the sequence ring's and the tensor-parallel group's, hccl / nccl
    / gloo) and the host group for plans."""
    timeout = timedelta(seconds=envs.dist_timeout_s())
    if mesh.world == 1:
        return Groups(SOLO, SOLO, SOLO)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process (another "
                           "engine of several ranks?); close it before starting this one")
    dist.init_process_group(backend.dist_backend, init_method=init_method, rank=mesh.rank,
                            world_size=mesh.world, timeout=timeout)
    # every rank creates every group, in the same order; the default group where one
    # spans the world, SOLO where one is this rank alone
    sp = tp = None
    if 1 < mesh.tp < mesh.world:
        for ranks in mesh.sp_groups():
            group = dist.new_group(ranks, timeout=timeout)
            if mesh.rank in ranks:
                sp = group
        for ranks in mesh.tp_groups():
            group = dist.new_group(ranks, timeout=timeout)
            if mesh.rank in ranks:
                tp = group
    elif mesh.tp == 1:
        tp = SOLO
    else:
        sp = SOLO
    host = None if backend.dist_backend == "gloo" else dist.new_group(backend="gloo",
                                                                     timeout=timeout)
    return Groups(sp, tp, host)


@dataclass(frozen=True)
class Groups:
    """A rank's process groups (None: the default group; SOLO: this rank alone)."""

    sp: object  # the ranks its sequence is sharded over
    tp: object  # the ranks it splits the weights with
    host: object  # gloo on the host, for plans


class PlanChannel:
    """Step plans from rank 0 to the other ranks over the host (gloo) group, every step.

    A plan is pickled into a fixed buffer and goes out in one broadcast (torch's
    broadcast_object_list takes two: the size, then the bytes); a plan larger than the
    buffer sends the rest in a second. Every rank holds one channel and calls `send`
    (rank 0) or `recv` (the others) in step order."""

    SIZE = 8192

    def __init__(self, group) -> None:
        self.group = group
        self.buf = torch.zeros(self.SIZE, dtype=torch.uint8)

    def send(self, plan: StepPlan) -> None:
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        first = len(data).to_bytes(8, "little") + data[: self.SIZE - 8]
        self.buf[: len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        dist.broadcast(self.buf, src=0, group=self.group)
        if len(data) > self.SIZE - 8:
            rest = torch.frombuffer(bytearray(data[self.SIZE - 8 :]), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)

    def recv(self) -> StepPlan:
        dist.broadcast(self.buf, src=0, group=self.group)
        raw = self.buf.numpy().tobytes()
        n = int.from_bytes(raw[:8], "little")
        data = raw[8 : 8 + n]
        if n > self.SIZE - 8:
            rest = torch.empty(n - (self.SIZE - 8), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)


def _set_threads(local_world: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def _make_runner(config, model_path, backend, mesh, local_rank, groups):
    from .model_runner import ModelRunner  # imports the model code only where it runs

    if not config.skip_kernel_self_check:  # on this rank's card, before any kernel serves
        backend.self_check(backend.set_device(local_rank))
    return ModelRunner(config, model_path, backend, mesh, local_rank, groups.sp, groups.tp)


def worker_loop(config: EngineConfig, model_path: str, rank: int, world: int, local_rank: int,
                init_method: str, local_world: int) -> None:
    """A rank other than 0: build its runner, then run every plan rank 0 broadcasts."""
    backend = get_backend(config.device)
    if backend.device_type == "cpu":
        _set_threads(local_world)
    mesh = Mesh(rank, world, config.tensor_parallel_size)
    groups = _init_groups(backend, mesh, init_method)
    runner = _make_runner(config, model_path, backend, mesh, local_rank, groups)
    channel = PlanChannel(groups.host)
    while True:
        plan = channel.recv()
        if plan.kind == "shutdown":
            break
        runner.run(plan)
    runner.close()
    dist.destroy_process_group()


def _beat(heartbeat, period: float = 0.5) -> threading.Event:
    """Write the time into `heartbeat` (shared with rank 0) every `period` seconds, from a
    thread of its own: a rank busy in a long step still beats; a stopped or hung one
    does not. Set the returned event to stop it (before the process exits: a thread
    still running at interpreter exit can abort it)."""
    stop = threading.Event()

    def run() -> None:
        while True:
            heartbeat.value = time.monotonic()
            if stop.wait(period):
                return

    threading.Thread(target=run, name="tr-heartbeat", daemon=True).start()
    return stop


def _spawned_worker(config, model_path, rank, world, init_method, log_level,
                    heartbeat=None) -> None:
    _die_with_parent()
    # Ctrl-C in a terminal reaches every process of the foreground group, these ranks too:
    # rank 0 alone handles it and tells them to stop (the SIGTERM of a dead parent still
    # ends them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    beating = _beat(heartbeat) if heartbeat is not None else threading.Event()
    logging.basicConfig(level=log_level, format=f"%(asctime)s rank{rank} %(message)s")
    try:
        worker_loop(config, model_path, rank, world, rank, init_method, world)
    except Exception:
        log.error("rank %d failed:\n%s", rank, traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    finally:
        beating.set()
    # Its work is done and its process group destroyed: leave without the interpreter's
    # teardown, where a native thread of the gloo or torch runtime still being destroyed
    # can abort the process (std::terminate, exit status -6), on a loaded machine now and
    # then.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_worker(config: EngineConfig) -> None:
    """Entry for a rank other than 0 under torchrun (blocks until rank 0 shuts down)."""
    env = envs.torchrun()
    if env is None:
        raise RuntimeError("run_worker needs torchrun's RANK/WORLD_SIZE/MASTER_ADDR")
    rank, world, local_rank = env
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    _check_nodes(config, world, local_world)
    from ..models.loader import resolve_model_path

    model_path = resolve_model_path(config.model)
    worker_loop(config.replace(world_size=world), model_path, rank, world, local_rank,
                "env://", local_world)


def _check_nodes(config: EngineConfig, world: int, local_world: int) -> None:
    """Under torchrun: a tensor-parallel group must lie inside one node (its all-reduces
    run twice per layer), and the ranks must split into whole groups."""
    tp = config.tensor_parallel_size
    if world % tp or local_world % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the ranks per node "
                         f"({local_world}) and in all ({world}): a tensor-parallel group "
                         "lies within one node")


class Cluster:
    """Rank 0's view of all ranks."""

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        if config.load_format == "auto":  # missing weights: one error here, not one per rank
            from ..models.loader import safetensors_files

            safetensors_files(model_path)
        if config.tensor_parallel_size > 1:  # a model it cannot split: refused here, once
            from ..distributed.tensor_parallel import check
            from ..models.loader import read_config

            check(read_config(model_path), config.tensor_parallel_size)
        t = time.perf_counter()
        self.backend = get_backend(config.device)
        # a KV cache dtype this device cannot store: refused here, before any rank starts
        self.backend.check_kv_cache_dtype(config.kv_cache_dtype)
        log.info("backend %s (%s) ready in %.1f s", self.backend.name,
                 self.backend.dist_backend, time.perf_counter() - t)
        self.procs: list[mp.Process] = []
        self.heartbeats: list = []  # per spawned rank: time.monotonic() of its last beat
        env = envs.torchrun()
        if env is not None:
            rank, world, local_rank = env
            if rank != 0:
                raise RuntimeError("under torchrun only rank 0 builds the engine")
            init_method, local_world = "env://", int(os.environ.get("LOCAL_WORLD_SIZE", world))
            _check_nodes(config, world, local_world)
        else:
            rank, world, local_rank = 0, config.world_size, 0
            local_world = world
            if self.backend.device_type != "cpu" and world > self.backend.device_count():
                raise ValueError(f"world_size {world} needs {world} {self.backend.name} "
                                 f"devices; {self.backend.device_count()} are visible")
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            self._spawn(config, model_path, world, init_method)
        self.world = world
        self.config = config.replace(world_size=world)
        try:
            if self.backend.device_type == "cpu":
                _set_threads(local_world)
            mesh = Mesh(0, world, config.tensor_parallel_size)
            self.groups = self._meet(mesh, init_method)
            self.channel = PlanChannel(self.groups.host)
            self.runner = _make_runner(self.config, model_path, self.backend, mesh,
                                       local_rank, self.groups)
            self.info = self.runner.info()
            self.model_config = self.runner.model_config
            self.device = self.runner.device
        except BaseException:
            self._kill()
            raise

    def _meet(self, mesh: Mesh, init_method: str) -> Groups:
        """The process groups (the rendezvous of every rank), watching the spawned ranks
        meanwhile: one that exits first (it failed to start: an import error, a script
        without its `if __name__ == "__main__":` guard, a device that would not open) is
        an error here at once, not a wait of the collectives' timeout."""
        if not self.procs:
            return _init_groups(self.backend, mesh, init_method)
        done: dict = {}

        def meet() -> None:
            try:
                done["groups"] = _init_groups(self.backend, mesh, init_method)
            except BaseException as e:  # re-raised below
                done["error"] = e

        # (a thread: the rendezvous cannot be interrupted; if a rank dies, the thread
        # stays blocked until the rendezvous times out, and is a daemon)
        thread = threading.Thread(target=meet, name="tr-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            dead = [(i + 1, p.exitcode) for i, p in enumerate(self.procs)
                    if p.exitcode is not None]
            if dead and thread.is_alive():
                raise RuntimeError(
                    "rank(s) " + ", ".join(f"{r} (exit code {c})" for r, c in dead)
                    + " exited while the ranks were starting; see the error logged above "
                    "(spawned ranks re-import the main module: a script that starts the "
                    "engine needs an `if __name__ == \"__main__\":` guard)")
        if "error" in done:
            raise done["error"]
        return done["groups"]

    def _spawn(self, config, model_path, world, init_method) -> None:
        ctx = mp.get_context("spawn")
        level = logging.getLogger("tr_engine").getEffectiveLevel()
        for rank in range(1, world):
            beat = ctx.Value("d", time.monotonic(), lock=False)
            p = ctx.Process(target=_spawned_worker, daemon=True,
                            args=(config, model_path, rank, world, init_method, level, beat))
            p.start()
            self.procs.append(p)
            self.heartbeats.append(beat)

    def dead_workers(self) -> list[int]:
        return [i + 1 for i, p in enumerate(self.procs) if not p.is_alive()]

    def quiet_workers(self, timeout: float) -> list[int]:
        """Spawned ranks whose heartbeat is older than `timeout` seconds (stopped, hung).
        Ranks started by torchrun have no heartbeat here."""
        now = time.monotonic()
        return [i + 1 for i, b in enumerate(self.heartbeats) if now - b.value > timeout]

    def prepare_thread(self) -> None:
        """Rank 0's thread-local kernel state built for the calling thread (the other ranks
        step on the threads that started them)."""
        self.backend.prepare_thread()

    def run(self, plan: StepPlan):
        self.runner.past_collectives = False
        if self.world > 1:
            self.channel.send(plan)
        return self.runner.run(plan)

    def failed_alone(self) -> bool:
        """After `run` raised: whether the other ranks are still in step with rank 0, so the
        engine may go on (one rank; or rank 0 failed past the step's last collective, see
        ModelRunner._head). Else a rank may sit in a collective rank 0 never joins."""
        return self.world == 1 or self.runner.past_collectives

    def shutdown(self, timeout: float = 10.0) -> None:
        """Tell the other ranks to stop (the caller must be the only thread running plans)
        and wait up to `timeout` seconds for them; kill those still running."""
        self.runner.close()
        told = False
        if self.world > 1 and dist.is_initialized():
            try:
                if not self.dead_workers():
                    self.channel.send(SHUTDOWN)
                    told = True
            except Exception:  # a dead rank: nothing more to tell it
                pass
        if told:
            # NCCL takes a communicator down on all its ranks together: each rank's
            # destroy_process_group waits for the others', so rank 0 must not wait for the
            # workers to exit first (they would sit in theirs until killed).
            dist.destroy_process_group()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        self._kill()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def kill(self) -> None:
        """Kill the spawned ranks' processes, with no collective: safe while another thread
        is inside a step."""
        self._kill()

    def _kill(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if p.is_alive():
                log.warning("rank %d is still running; killing it", rank)
                p.kill()
                p.join(5)
        self.procs = []
