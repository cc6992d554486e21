"""tr-serve stops within --graceful-shutdown-s + 10 s of SIGTERM or SIGINT, leaving no
process behind, whatever the engine is doing: starting, idle, prefilling a long prompt (one
step of many seconds, in collectives of both ranks), decoding; and a rank that stops
answering turns /health to 503 within the heartbeat timeout.

Each case starts its own `tr-serve --device cpu --world-size 2` (it ends with the signal)
on a small random checkpoint whose context is raised so that a 16K-token prefill takes
tens of seconds on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
from checkpoints import make_checkpoint
from test_server import Server, _command, _free_port, _group_members, scrape

GRACE_S = 1.0
BOUND_S = GRACE_S + 10
LONG_PROMPT = 16_000


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = make_checkpoint("qwen2", tmp_path_factory.mktemp("ckpt"))
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 32768
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _spawn(model: str, env: dict | None = None, grace_s: float = GRACE_S) -> Server:
    port = _free_port()
    log_fd, log_path = tempfile.mkstemp(prefix="tr-serve-", suffix=".log")
    cmd = [*_command(), "--model", model, "--device", "cpu", "--world-size", "2",
           "--dtype", "float32", "--port", str(port), "--kv-cache-tokens", "9000",
           "--max-model-len", "20000", "--graceful-shutdown-s", str(grace_s)]
    proc = subprocess.Popen(cmd, stdout=log_fd, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **(env or {})})
    os.close(log_fd)
    return Server(proc, f"http://127.0.0.1:{port}", None, log_path)


def _wait_for(what, timeout: float, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            _end(server)
            pytest.fail(f"gave up waiting after {timeout} s:\n{server.log()[-3000:]}")
        time.sleep(0.1)


def _healthy(server: Server) -> bool:
    try:
        return httpx.get(server.base + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _end(server: Server) -> None:
    """Kill what is left of the server's process group (a failed case)."""
    if _group_members(server.proc.pid):
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)


def _stop_and_time(server: Server, sig: int, again_after: float | None = None,
                   code_expected: int = 0, bound_s: float = BOUND_S,
                   whole_group: bool = False) -> None:
    """Send `sig` (twice if `again_after`; to every process of the server's group if
    `whole_group`, as a terminal's Ctrl-C does); the server must exit with `code_expected`
    within `bound_s` with no process of its group left."""
    t = time.monotonic()
    if whole_group:
        os.killpg(server.proc.pid, sig)
    else:
        server.proc.send_signal(sig)
    if again_after is not None:
        time.sleep(again_after)
        server.proc.send_signal(sig)
    try:
        code = server.proc.wait(bound_s + 5)
    except subprocess.TimeoutExpired:
        code = None
    while _group_members(server.proc.pid) and time.monotonic() - t < bound_s:
        time.sleep(0.1)
    took, left, log = time.monotonic() - t, _group_members(server.proc.pid), server.log()
    if code is None or left:
        _end(server)
    os.unlink(server.log_path)
    assert code == code_expected, f"exit {code} after {took:.1f} s:\n{log[-4000:]}"
    assert not left, f"left behind: {left}\n{log[-4000:]}"
    assert took <= bound_s, f"took {took:.1f} s:\n{log[-4000:]}"
    assert "Traceback" not in log, log[-4000:]


def _post_in_background(server: Server, body: dict) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", server.base + "/v1/completions", json=body,
                              timeout=120) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            pass  # the server went away: that is the point

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


SIGNALS = [signal.SIGTERM, signal.SIGINT]
IDS = ["SIGTERM", "SIGINT"]


@pytest.mark.parametrize("sig", SIGNALS, ids=IDS)
def test_during_start_up(model, sig):
    server = _spawn(model)
    # the other rank is up (its process exists) and the engine is not ready yet
    _wait_for(lambda: len(_group_members(server.proc.pid)) >= 2, 120, server)
    assert not _healthy(server)
    _stop_and_time(server, sig)


# Once the server runs, SIGTERM and SIGINT take one path (uvicorn's handler, then the
# engine's shutdown), so idle and decode take one signal each; start-up (where SIGTERM is
# turned into the KeyboardInterrupt that SIGINT raises) and the long prefill take both.
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_when_idle(model, sig):
    server = _spawn(model)
    _wait_for(lambda: _healthy(server), 300, server)
    _stop_and_time(server, sig)


@pytest.mark.parametrize("sig", SIGNALS, ids=IDS)
def test_during_a_long_prefill(model, sig):
    # Issue 14: rank 0's main thread broadcast the stop on the group on which the engine
    # thread sat in the prefill's collectives; both waited for gloo's 600 s timeout.
    server = _spawn(model)
    _wait_for(lambda: _healthy(server), 300, server)
    _post_in_background(server, {"prompt": [5] * LONG_PROMPT, "max_tokens": 1,
                                 "stream": True})
    _wait_for(lambda: scrape(server)["tr_engine:num_requests_running"] == 1, 60, server)
    time.sleep(3)  # well inside the prefill step
    assert scrape(server)["tr_engine:prompt_tokens_total"] == 0  # it has not ended
    _stop_and_time(server, sig)


@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["SIGINT"])
def test_while_decoding(model, sig):
    server = _spawn(model)
    _wait_for(lambda: _healthy(server), 300, server)
    _post_in_background(server, {"prompt": [5, 6, 7], "max_tokens": 5000, "ignore_eos": True,
                                 "stream": True})
    _wait_for(lambda: scrape(server)["tr_engine:generation_tokens_total"] >= 5, 60, server)
    _stop_and_time(server, sig)


def test_a_ctrl_c_in_a_terminal_reaches_every_rank(model):
    # The terminal signals the whole foreground group: the other rank, waiting for the next
    # plan, must leave that to rank 0 (it used to raise KeyboardInterrupt in the broadcast,
    # print a traceback and be killed 5 s later).
    server = _spawn(model)
    _wait_for(lambda: _healthy(server), 300, server)
    _post_in_background(server, {"prompt": [5, 6, 7], "max_tokens": 5000, "ignore_eos": True,
                                 "stream": True})
    _wait_for(lambda: scrape(server)["tr_engine:generation_tokens_total"] >= 5, 60, server)
    _stop_and_time(server, signal.SIGINT, whole_group=True, bound_s=GRACE_S + 4)


def test_a_second_ctrl_c_stops_at_once(model):
    # The first Ctrl-C lets the open stream finish for up to 60 s; the second one means now.
    server = _spawn(model, grace_s=60)
    _wait_for(lambda: _healthy(server), 300, server)
    _post_in_background(server, {"prompt": [5, 6, 7], "max_tokens": 5000, "ignore_eos": True,
                                 "stream": True})
    _wait_for(lambda: scrape(server)["tr_engine:generation_tokens_total"] >= 5, 60, server)
    _stop_and_time(server, signal.SIGINT, again_after=0.5, code_expected=128 + signal.SIGINT,
                   bound_s=5)


def _workers(server: Server) -> list[int]:
    return [p for p in _group_members(server.proc.pid) if p != server.proc.pid
            and b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]


def test_a_stopped_rank_turns_health_to_503(model):
    server = _spawn(model, env={"TR_ENGINE_HEARTBEAT_TIMEOUT": "3"})
    _wait_for(lambda: _healthy(server), 300, server)
    (worker,) = _workers(server)
    _post_in_background(server, {"prompt": [5, 6, 7], "max_tokens": 5000, "ignore_eos": True,
                                 "stream": True})
    _wait_for(lambda: scrape(server)["tr_engine:num_requests_running"] == 1, 60, server)
    os.kill(worker, signal.SIGSTOP)  # alive, but answers nothing: every step stalls
    t = time.monotonic()
    _wait_for(lambda: not _healthy(server), 3 + 5, server)
    assert time.monotonic() - t <= 3 + 3
    r = httpx.get(server.base + "/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    m = scrape(server)
    assert m["tr_engine:engine_healthy"] == 0
    assert m["tr_engine:num_requests_running"] == 0
    assert all(v == 0 for k, v in m.items() if k.startswith("tr_engine:kv_cache_used_tokens"))
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 503
    _stop_and_time(server, signal.SIGTERM)  # the stopped rank is killed, not waited for


def test_a_rank_that_dies_while_starting_is_an_error_at_once(model, tmp_path):
    """A script that starts a 2-rank engine without the `__main__` guard: the spawned rank
    re-imports it and dies while bootstrapping. Rank 0 raises at once, naming the rank and
    the guard, instead of waiting out the rendezvous' timeout."""
    script = tmp_path / "unguarded.py"
    script.write_text("from tr_engine import LLM\n"
                      f"LLM({str(model)!r}, device='cpu', world_size=2, dtype='float32')\n"
                      "print('started')\n")
    t = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, start_new_session=True)
    took = time.monotonic() - t
    assert done.returncode != 0 and "started" not in done.stdout
    assert "rank(s) 1 (exit code 1) exited while the ranks were starting" in done.stderr
    assert "__main__" in done.stderr
    assert took < 120, took  # the rendezvous' own timeout is 600 s
