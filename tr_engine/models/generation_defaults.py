"""The sampling defaults a model's generation_config.json recommends (vLLM's
`--generation-config`).

`auto` takes the model folder's file, a folder path takes that folder's, `vllm` takes none:
the plain defaults (temperature 1, top_p 1, no top_k or min_p, no repetition penalty). A
request's own values always win over these; they fill in only what a request leaves unset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field: the keys vLLM reads, and no others
KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
MODES = ("auto", "vllm")  # or the path of a folder holding a generation_config.json


def sampling_defaults(model_path: str | Path, mode: str = "auto") -> dict[str, float | int]:
    """SamplingParams fields and values from the generation config `mode` names ({} for
    `vllm`, for a folder without the file, or for a file that sets none of KEYS).

    Raises ValueError for a file that is not JSON or a value SamplingParams refuses, so a
    bad file stops start-up rather than every request."""
    if mode == "vllm":
        return {}
    folder = Path(model_path if mode == "auto" else mode)
    if mode != "auto" and not folder.is_dir():
        raise ValueError(f"generation_config must be auto, vllm or a folder; {mode!r} is "
                         "not a folder")
    file = folder / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object")
    out: dict[str, float | int] = {}
    for key, field in KEYS.items():
        value = raw.get(key)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (field in ("top_k", "max_tokens") and not isinstance(value, int)) \
                or not math.isfinite(value):
            raise ValueError(f"{file}: {key} must be a number; got {value!r}")
        out[field] = value
    try:
        SamplingParams(**out)
    except ValueError as e:
        raise ValueError(f"{file}: {e} (--generation-config vllm ignores the file)") from None
    return out


def describe(defaults: dict[str, float | int], mode: str) -> str:
    """The start-up log line's text."""
    if mode == "vllm":
        return "sampling defaults: the plain ones (--generation-config vllm)"
    if not defaults:
        return "sampling defaults: the plain ones (the model's generation config sets none)"
    values = ", ".join(f"{k}={v}" for k, v in defaults.items())
    return (f"sampling defaults from the model's generation config: {values} (requests' "
            f"own values win; --generation-config vllm for the plain defaults)")
