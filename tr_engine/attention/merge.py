"""Merging partial attention results.

Attention of one query over a key set K = A ∪ B splits exactly: with
lse_X = log Σ_{k∈X} exp(s_k) and out_X = Σ_{k∈X} exp(s_k - lse_X) v_k,

    lse = log(exp(lse_A) + exp(lse_B)) = logaddexp(lse_A, lse_B)
    out = exp(lse_A - lse) · out_A + exp(lse_B - lse) · out_B

because exp(s_k - lse) = exp(lse_X - lse) · exp(s_k - lse_X) for k ∈ X. The weights are
in (0, 1], so nothing overflows. A side that saw no key has lse = -inf and weight 0; when
both did, the result stays (0, -inf). The merge is associative and commutative up to
rounding, which is why partial results may arrive in any order.
"""

from __future__ import annotations

import torch


def _weights(lse_a: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    lse = torch.logaddexp(lse_a, lse_b)
    # -inf - -inf is nan; where both sides are empty any finite reference gives weight 0.
    ref = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    return lse, w_a, w_b


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results. out `[..., D]`, lse `[...]`; returns float32 (out, lse)."""
    lse, w_a, w_b = _weights(lse_a.float(), lse_b.float())
    return w_a * out_a.float() + w_b * out_b.float(), lse


def merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """In-place merge of (out_b, lse_b) into the float32 accumulator (out, lse)."""
    new_lse, w_a, w_b = _weights(lse, lse_b.float())
    out.mul_(w_a).add_(w_b * out_b.float())
    lse.copy_(new_lse)


def merge_all(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial results stacked on dim 0: outs `[N, ..., D]`, lses `[N, ...]`.

    The N-way form of the same identity: lse = logsumexp_n(lse_n),
    out = Σ_n exp(lse_n - lse) · out_n. Every rank that runs it on the same stack gets
    the same bits, which decode relies on to keep replicated hidden states identical.
    """
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    ref = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    w = torch.exp(lses - ref.unsqueeze(0)).unsqueeze(-1)
    return (w * outs.float()).sum(dim=0), lse
