"""A run's results as numbers (the keys `vllm bench serve` writes) and as a table."""

from __future__ import annotations

import numpy as np

from .client import RequestResult

METRICS = {  # key -> (title of its table section, what the row says)
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def summarize(results: list[RequestResult], duration_s: float,
              percentiles: tuple[float, ...] = (99.0,)) -> dict:
    """Totals, throughputs and, for each of METRICS, mean / median / std / percentiles in
    ms over the successful requests (ITL over all their gaps, TPOT over requests of two
    tokens or more)."""
    ok = [r for r in results if r.success]
    inputs = [r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok]
    outputs = [r.output_tokens for r in ok]
    total_in, total_out = sum(inputs), sum(outputs)
    duration_s = max(duration_s, 1e-9)
    out = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "output_tokens_exact": all(r.exact_count for r in ok),
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for key, values in series.items():
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        have = ms.size > 0
        out[f"mean_{key}_ms"] = float(ms.mean()) if have else 0.0
        out[f"median_{key}_ms"] = float(np.median(ms)) if have else 0.0
        out[f"std_{key}_ms"] = float(ms.std()) if have else 0.0
        for p in percentiles:
            out[f"p{_label(p)}_{key}_ms"] = float(np.percentile(ms, p)) if have else 0.0
    out["input_lens"] = inputs
    out["output_lens"] = outputs
    out["ttfts"] = series["ttft"]
    out["itls"] = [r.itl for r in ok]
    out["errors"] = [r.error for r in results if not r.success]
    return out


def _label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def table(summary: dict, percentiles: tuple[float, ...] = (99.0,),
          metrics: tuple[str, ...] = ("ttft", "tpot", "itl"),
          title: str = "Serving Benchmark Result") -> str:
    """The summary as `vllm bench serve` prints it: totals, then a section per metric."""
    width = 50

    def rule(text: str = "", fill: str = "=") -> str:
        return f" {text} ".center(width, fill) if text else fill * width

    def row(name: str, value) -> str:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{name:<40}{shown:<10}"

    lines = [rule(title),
             row("Successful requests:", summary["completed"]),
             row("Failed requests:", summary["failed"]),
             row("Benchmark duration (s):", summary["duration"]),
             row("Total input tokens:", summary["total_input_tokens"]),
             row("Total generated tokens:", summary["total_output_tokens"]),
             row("Request throughput (req/s):", summary["request_throughput"]),
             row("Output token throughput (tok/s):", summary["output_throughput"]),
             row("Total token throughput (tok/s):", summary["total_token_throughput"])]
    for key in metrics:
        section, name = METRICS[key]
        lines.append(rule(section, "-"))
        lines.append(row(f"Mean {name} (ms):", summary[f"mean_{key}_ms"]))
        lines.append(row(f"Median {name} (ms):", summary[f"median_{key}_ms"]))
        for p in percentiles:
            lines.append(row(f"P{_label(p)} {name} (ms):", summary[f"p{_label(p)}_{key}_ms"]))
    lines.append(rule())
    return "\n".join(lines)
