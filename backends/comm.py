"""The communicator: one object over a torch.distributed group, the same on hccl/nccl/gloo.

It owns the peers and the asynchronous lifecycle: `exchange()` posts a batch of sends and
receives and returns a `Handle`; the caller computes, then `wait()`s right before it needs
the received data. NCCL and HCCL run the batch on their own communication stream (after
the work already queued on the current stream) and `wait()` makes the current stream wait
for it; gloo runs it on its own threads. Point-to-point goes through `batch_isend_irecv`
because plain simultaneous isends in both directions have been seen to hang on NPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# Renamed in newer torch; both take the output concatenated along dim 0.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Handle:
    """Outstanding communication; `wait()` before touching its buffers."""

    def __init__(self, works: Sequence = ()) -> None:
        self._works = list(works)

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works.clear()


class _Solo:
    """A group of one: this process alone, whatever torch.distributed holds (an engine of
    one rank may share its process with a multi-rank one)."""

    def __repr__(self) -> str:
        return "SOLO"


SOLO = _Solo()


class Communicator:
    """Collectives and point-to-point over `group` (None = the default group; SOLO = this
    process alone)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        if group is SOLO:
            self.rank, self.world_size = 0, 1
        elif dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        else:  # a single process without torch.distributed: every collective is the identity
            self.rank, self.world_size = 0, 1
        self._global = [self._to_global(r) for r in range(self.world_size)]

    def _to_global(self, r: int) -> int:
        if self.group is None or self.world_size == 1:
            return r
        return dist.get_global_rank(self.group, r)

    def peer(self, offset: int) -> int:
        """The group rank `offset` places after this one on the ring."""
        return (self.rank + offset) % self.world_size

    def exchange(
        self,
        sends: Sequence[tuple[torch.Tensor, int]] = (),
        recvs: Sequence[tuple[torch.Tensor, int]] = (),
    ) -> Handle:
        """Post sends of (tensor, group rank) and receives into (buffer, group rank).

        Messages between one pair of ranks match in the order they are posted, so every
        rank must post its kinds of message in the same order. Tensors must be contiguous
        and stay untouched until the handle is waited on.
        """
        ops = [
            dist.P2POp(dist.isend, t, self._global[peer], self.group, tag)
            for tag, (t, peer) in enumerate(sends)
        ]
        ops += [
            dist.P2POp(dist.irecv, t, self._global[peer], self.group, tag)
            for tag, (t, peer) in enumerate(recvs)
        ]
        if not ops:
            return Handle()
        return Handle(dist.batch_isend_irecv(ops))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack every rank's `tensor` (same shape everywhere) into `[world_size, ...]`."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        flat = tensor.reshape(1, -1) if tensor.dim() == 0 else tensor
        out = torch.empty(
            (self.world_size * flat.shape[0], *flat.shape[1:]),
            dtype=tensor.dtype,
            device=tensor.device,
        )
        _all_gather_into(out, flat.contiguous(), group=self.group)
        return out.view(self.world_size, *tensor.shape)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast in place from group rank `src`; returns `tensor`."""
        if self.world_size > 1:
            dist.broadcast(tensor, self._global[src], group=self.group)
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; returns `tensor`."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)
