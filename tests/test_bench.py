"""`tr-bench` against a real `tr-serve` (the embedded model on one CPU rank): `serve` prints
its table and writes its JSON, with the counts the run must have (every prompt completed,
exactly prompts x output length tokens with ignore_eos), `latency` times its requests; and
the pure parts (data sets, arrival process, statistics) against direct computations.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import httpx
import numpy as np
import pytest
from checkpoints import make_tokenizer
from test_server import running_server

from tr_engine.bench.client import RequestResult
from tr_engine.bench.datasets import random_samples, sharegpt_samples
from tr_engine.bench.metrics import summarize
from tr_engine.bench.serve import arrival_gaps

MODEL = "bench-test"


@pytest.fixture(scope="module")
def server():
    with running_server("--world-size", "1", "--served-model-name", MODEL,
                        "--max-model-len", "512", "--kv-cache-tokens", "2048") as s:
        yield s


def tr_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "tr-bench")
    cmd = [script] if os.path.exists(script) else [
        sys.executable, "-c", "import sys; from tr_engine.cli import bench_main; "
        "sys.exit(bench_main())"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_serve_completions_prints_the_table_and_writes_json(server, tmp_path):
    out = tmp_path / "result.json"
    p = tr_bench("serve", "--base-url", server.base, "--model", MODEL, "--num-prompts", "6",
                 "--random-input-len", "12", "--random-output-len", "5", "--ignore-eos",
                 "--max-concurrency", "3", "--result-file", str(out))
    assert p.returncode == 0, p.stderr + p.stdout
    for line in ("Serving Benchmark Result", "Successful requests:", "Mean TTFT (ms):",
                 "Median TPOT (ms):", "P99 ITL (ms):", "Output token throughput (tok/s):"):
        assert line in p.stdout, p.stdout
    assert [x.split()[-1] for x in p.stdout.splitlines()
            if x.startswith("Successful requests:")] == ["6"]
    r = json.loads(out.read_text())
    assert r["completed"] == 6 and r["failed"] == 0 and r["errors"] == []
    assert r["output_tokens_exact"]
    assert r["output_lens"] == [5] * 6 and r["total_output_tokens"] == 30
    # token-id prompts: the server counts exactly the drawn tokens
    assert r["input_lens"] == [12] * 6 and r["total_input_tokens"] == 72
    assert r["request_throughput"] == pytest.approx(6 / r["duration"])
    assert r["output_throughput"] == pytest.approx(30 / r["duration"])
    assert r["total_token_throughput"] == pytest.approx(102 / r["duration"])
    assert len(r["ttfts"]) == 6 and all(0 < t < r["duration"] for t in r["ttfts"])
    assert r["median_ttft_ms"] == pytest.approx(1000 * statistics.median(r["ttfts"]))
    gaps = [g for gs in r["itls"] for g in gs]
    assert all(len(gs) <= 4 for gs in r["itls"]) and gaps
    assert r["mean_itl_ms"] == pytest.approx(1000 * statistics.mean(gaps))
    assert r["p99_itl_ms"] == pytest.approx(1000 * float(np.percentile(gaps, 99)))
    assert r["mean_tpot_ms"] > 0 and r["mean_ttft_ms"] < r["mean_e2el_ms"]
    assert r["max_concurrency"] == 3 and r["model_id"] == MODEL


def test_serve_chat_at_a_request_rate(server, tmp_path):
    out = tmp_path / "chat.json"
    p = tr_bench("serve", "--base-url", server.base, "--endpoint", "/v1/chat/completions",
                 "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "3",
                 "--ignore-eos", "--request-rate", "20", "--seed", "3", "--save-result",
                 "--result-dir", str(tmp_path), "--result-filename", out.name,
                 "--temperature", "0.5", "--top-p", "0.9")
    assert p.returncode == 0, p.stderr + p.stdout
    r = json.loads(out.read_text())
    assert r["completed"] == 4 and r["total_output_tokens"] == 12
    assert r["model_id"] == MODEL  # from /v1/models
    # the arrivals were paced: the run lasts at least as long as its gaps add up to
    assert r["duration"] >= sum(arrival_gaps(4, 20.0, 1.0, 3))
    assert r["request_rate"] == 20.0


def test_serve_reports_a_refused_first_request(server):
    p = tr_bench("serve", "--base-url", server.base, "--model", "no-such-model",
                 "--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "2")
    assert p.returncode == 1
    assert "test request failed: HTTP 404" in p.stderr and "no-such-model" in p.stderr


def test_latency(server, tmp_path):
    out = tmp_path / "latency.json"
    p = tr_bench("latency", "--base-url", server.base, "--input-len", "8", "--output-len",
                 "4", "--num-iters", "2", "--num-iters-warmup", "1", "--output-json", str(out))
    assert p.returncode == 0, p.stderr + p.stdout
    assert "Avg latency:" in p.stdout and "99% percentile latency:" in p.stdout
    r = json.loads(out.read_text())
    assert len(r["latencies"]) == 2 and r["output_tokens"] == [4, 4]
    assert r["avg_latency"] == pytest.approx(statistics.mean(r["latencies"]))
    assert 0 < r["avg_ttft"] < r["avg_latency"]


def test_cors_is_off_by_default(server):
    r = httpx.get(server.base + "/v1/models", headers={"Origin": "http://ui.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ---- the pure parts -------------------------------------------------------------------------


def test_random_samples_have_the_lengths_asked():
    tok = make_tokenizer()  # byte-level: text and token counts can be checked directly
    ids = random_samples(tok, 5, 10, 3, prefix_len=4, seed=1, as_text=False)
    assert [s.prompt_len for s in ids] == [14] * 5 and [s.output_len for s in ids] == [3] * 5
    assert len({tuple(s.prompt[:4]) for s in ids}) == 1  # the shared prefix
    assert all(t not in tok.all_special_ids for s in ids for t in s.prompt)
    texts = random_samples(tok, 5, 10, 3, range_ratio=0.5, seed=2)
    for s in texts:
        assert s.prompt_len == len(tok.encode(s.prompt, add_special_tokens=False))
        assert 5 <= s.prompt_len <= 15
    assert random_samples(tok, 3, 10, 3, seed=7) == random_samples(tok, 3, 10, 3, seed=7)


def test_sharegpt_samples(tmp_path):
    tok = make_tokenizer()
    rows = [{"conversations": [{"from": "human", "value": "q" * (5 + i)},
                               {"from": "gpt", "value": "a" * (4 + i)}]} for i in range(6)]
    rows += [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt",
                                                                   "value": "short"}]},
             {"conversations": [{"from": "human", "value": "alone"}]},
             {"prompt": "plain prompt", "output_len": 7}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = sharegpt_samples(path, tok, 7, seed=0)
    # the "hi" pair (under 4 tokens) and the lone turn are skipped
    assert sorted((s.prompt_len, s.output_len) for s in samples) == sorted(
        [(5 + i, 4 + i) for i in range(6)] + [(12, 7)])
    (tmp_path / "data.json").write_text(json.dumps(rows))
    assert sharegpt_samples(tmp_path / "data.json", tok, 7, seed=0) == samples
    fixed = sharegpt_samples(path, tok, 3, output_len=2, seed=0)
    assert [s.output_len for s in fixed] == [2, 2, 2]
    with pytest.raises(ValueError, match="7 usable prompts; 8 were asked"):
        sharegpt_samples(path, tok, 8)


def test_arrival_gaps_are_poisson_at_the_rate():
    gaps = np.array(arrival_gaps(20000, 4.0, 1.0, 0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std = mean
    bursty = np.array(arrival_gaps(20000, 4.0, 0.25, 0))  # gamma shape 0.25
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() == pytest.approx(0.5, rel=0.08)  # std = mean / sqrt(shape)
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


def test_summary_statistics():
    results = [RequestResult(success=True, prompt_len=10, prompt_tokens=11, output_tokens=n,
                             exact_count=True, ttft=t, latency=t + 0.01 * (n - 1),
                             itl=[0.01] * (n - 1)) for n, t in ((3, 0.1), (5, 0.2), (1, 0.4))]
    results.append(RequestResult(error="HTTP 503: full"))
    s = summarize(results, 2.0, (50.0, 90.0))
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["HTTP 503: full"])
    assert s["total_input_tokens"] == 33 and s["total_output_tokens"] == 9
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 4.5
    assert s["total_token_throughput"] == 21.0
    assert s["mean_ttft_ms"] == pytest.approx(1000 * (0.1 + 0.2 + 0.4) / 3)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p90_ttft_ms"] == pytest.approx(1000 * float(np.percentile([.1, .2, .4], 90)))
    assert s["mean_tpot_ms"] == pytest.approx(10.0)  # the 1-token request has no TPOT
    assert s["mean_itl_ms"] == pytest.approx(10.0) and len(s["itls"]) == 3
