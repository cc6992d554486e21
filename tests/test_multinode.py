"""A real two-node launch on one machine: two torchrun agents (`--nnodes 2
--nproc-per-node 2`) joined over localhost, each starting two `tr-serve` ranks. Tensor
parallelism (T = 2) runs inside each "node", the sequence ring across them. Global rank 0
serves HTTP; its greedy completion, asked for with the openai client, gives transformers'
tokens with their logprobs; SIGTERM to rank 0 stops every rank, and both agents exit 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest
import torch
from checkpoints import (
    byte_ids,
    greedy_reference,
    make_checkpoint,
    make_tokenizer,
    reference_logprobs,
)
from test_server import _command, _free_port, _group_members

NEW_TOKENS = 12


def _rank_zero(agent: subprocess.Popen) -> int | None:
    """The pid of the process the agent started as global rank 0 (RANK=0 in its
    environment), if it has started it yet."""
    try:
        with open(f"/proc/{agent.pid}/task/{agent.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return None
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if b"RANK=0" in env:
            return pid
    return None


def _log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-4000:]


def test_two_torchrun_nodes_serve_exactly(tmp_path):
    path = str(make_checkpoint("qwen3", tmp_path))
    greedy = greedy_reference(path)
    rdzv, http = _free_port(), _free_port()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents, logs = [], []
    try:
        for node in (0, 1):
            fd, log = tempfile.mkstemp(prefix=f"node{node}-", suffix=".log")
            cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "2", "--node-rank",
                   str(node), "--master-addr", "127.0.0.1", "--master-port", str(rdzv),
                   "--no-python", *_command(), "--device", "cpu", "--model", path,
                   "--tensor-parallel-size", "2", "--dtype", "float32",
                   "--kv-cache-tokens", "1024", "--prefill-chunk", "32",
                   "--shard-min-tokens", "0", "--host", "127.0.0.1", "--port", str(http)]
            agents.append(subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env,
                                           start_new_session=True))
            os.close(fd)
            logs.append(log)
        base = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 300
        while True:
            for a, log in zip(agents, logs):
                if a.poll() is not None:
                    pytest.fail(f"an agent exited with {a.returncode}:\n{_log(log)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, _log(logs[0])
            time.sleep(0.5)

        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        prompt = byte_ids(70, seed=11)  # several chunks of 32, over both nodes
        out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                        max_tokens=NEW_TOKENS, temperature=0, logprobs=0,
                                        extra_body={"ignore_eos": True})
        tokens = greedy(tuple(prompt), NEW_TOKENS)
        assert out.choices[0].text == make_tokenizer().decode(tokens)
        ref = reference_logprobs(greedy.model, prompt, tokens)
        got = torch.tensor(out.choices[0].logprobs.token_logprobs, dtype=torch.float64)
        assert (got - ref).abs().max() < 1e-4

        rank0 = _rank_zero(agents[0])
        assert rank0 is not None
        os.kill(rank0, signal.SIGTERM)
        codes = [a.wait(timeout=60) for a in agents]
        assert codes == [0, 0], "\n".join(_log(log) for log in logs)
    finally:
        for a in agents:
            if a.poll() is None or _group_members(a.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(a.pid, signal.SIGKILL)
                a.wait(timeout=10)
        for log in logs:
            os.unlink(log)
