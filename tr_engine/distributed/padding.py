"""How long a sequence (or a prefill chunk) is once padded for the zigzag layout, and how
many of its real tokens each rank holds. Pure Python: the scheduler plans chunks with it
and the ranks shard them with it, so both agree on every length.

The rule encodes two constraints:
- the layout's: 2P equal chunks, each (in the engine) a whole number of KV blocks;
- the CUDA backend's: from 256 steps on, a rank's shard is 512·align queries or more (8192
  with blocks of 16), where attention moves from flash to cuDNN, and cuDNN builds an
  execution graph for every new shape. Such lengths are rounded up to one of 16 buckets per
  doubling, so long chunks meet a bounded set of shapes and padding wastes at most 1/16.
"""

from __future__ import annotations


def padded_len(total: int, world_size: int, align: int = 1) -> int:
    """The padded length of `total` tokens: the smallest multiple of 2P (align 1) that holds
    them, at least 2P; with align > 1 a multiple of step = 2P·align, and from 256 steps on
    a multiple of step·2^e for the e that keeps 16 buckets per doubling."""
    step = 2 * world_size * align
    steps = max(1, -(-total // step))
    if align > 1 and steps >= 256:
        step <<= steps.bit_length() - 5
    return max(step, -(-total // step) * step)


def chunk_len(total: int, world_size: int, align: int = 1) -> int:
    """The length L of each of the 2P zigzag chunks."""
    return padded_len(total, world_size, align) // (2 * world_size)


def local_len(total: int, world_size: int, rank: int, align: int = 1) -> int:
    """How many real (non-pad) tokens `rank` holds (chunks r and 2P-1-r); they come first in
    its shard."""
    n = chunk_len(total, world_size, align)
    first, second = rank * n, (2 * world_size - 1 - rank) * n
    return min(max(total - first, 0), n) + min(max(total - second, 0), n)
