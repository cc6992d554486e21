"""Copy Hugging Face-named tensors into a model whose projections are fused.

The models keep Hugging Face's module names except where they fuse projections (q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`): each checkpoint tensor of a fused projection fills a
block of rows of the fused parameter. Every parameter must be filled exactly once; anything
missing, unexpected, misshapen or repeated is reported by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

# Checkpoint module name -> (model module name, first row, rows).
Fused = Mapping[str, tuple[str, int, int]]


class WeightsMismatch(ValueError):
    """The checkpoint's tensors do not match the model's parameters."""


def load_fused(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], fused: Fused,
               skip: Callable[[str], bool] = lambda name: False) -> None:
    """Fill `model`'s parameters from `weights`, converting to each parameter's dtype and
    device. `skip(name)` drops checkpoint tensors the model derives itself."""
    expected = _expected(model, fused)  # checkpoint name -> (parameter, rows or None)
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in weights:
            if skip(name):
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            if name in seen:
                raise WeightsMismatch(f"checkpoint tensor {name} appears twice")
            seen.add(name)
            param, rows = expected[name]
            dest = param if rows is None else param[rows[0] : rows[0] + rows[1]]
            if dest.shape != tensor.shape:
                raise WeightsMismatch(f"checkpoint tensor {name} has shape "
                                      f"{tuple(tensor.shape)}; the model expects "
                                      f"{tuple(dest.shape)}")
            dest.copy_(tensor)
    missing = [name for name in expected if name not in seen]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_names(missing)}")
        if unexpected:
            parts.append(f"not used by the model: {_names(unexpected)}")
        raise WeightsMismatch("checkpoint does not match the model; " + "; ".join(parts))


def _expected(model: nn.Module, fused: Fused
              ) -> dict[str, tuple[torch.Tensor, tuple[int, int] | None]]:
    """Checkpoint names the model needs, each with its parameter and block of rows."""
    shards: dict[str, list[tuple[str, int, int]]] = {}
    for source, (module, first, rows) in fused.items():
        shards.setdefault(module, []).append((source, first, rows))
    expected = {}
    for name, param in model.named_parameters():  # tied parameters are listed once
        *prefix, module, kind = name.split(".")
        if module not in shards:
            expected[name] = (param, None)
            continue
        if sum(rows for _, _, rows in shards[module]) != param.shape[0]:
            raise ValueError(f"the fused blocks of {name} do not cover its {param.shape[0]} rows")
        for source, first, rows in shards[module]:
            expected[".".join([*prefix, source, kind])] = (param, (first, rows))
    return expected


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
