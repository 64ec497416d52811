"""Tensor parallelism: which part of each layer this rank holds, and the collectives between ranks.

A model is split Megatron-style across the `size` ranks of a `TPGroup`: q/k/v and gate/up are
column-parallel (each rank keeps some output rows: its attention heads, its slice of the MLP's
intermediate dim), o and down are row-parallel (the matching input columns; their partial
outputs are summed by one all-reduce), the token embedding and the LM head are split along the
vocabulary (lookups all-reduced, logits all-gathered). Parts need not be equal: heads are
shared out by whole KV groups and an intermediate dim by whole quantization groups, as evenly
as they go, so a model with 9 heads in 3 KV groups splits 6 + 3 over two ranks. With fewer KV
heads than ranks, each rank keeps the one KV head its query heads read (replicated).

The collectives go through shared memory between ranks of one machine (`shm`), through the
process group (gloo, NCCL) otherwise. Layers read the group they belong to from `current()` when they are built (`building(group)`
sets it for the model's construction); with the default group of size 1 every helper here is
the identity and no collective runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmserve.errors import InvalidParameterError


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None  # the torch.distributed ProcessGroup of the ranks (size > 1)
    shm: object | None = None  # a shm.SharedMemoryGroup of the same ranks, when they share a machine

    def parts(self, n: int, unit: int = 1) -> list[slice]:
        """Every rank's share of `n` items, in whole `unit`s (single items where `unit` does not
        divide `n`), the first ranks taking one unit more where they do not divide evenly."""
        if n % unit:
            unit = 1
        base, extra = divmod(n // unit, self.size)
        starts = [rank * base + min(rank, extra) for rank in range(self.size + 1)]
        return [slice(starts[rank] * unit, starts[rank + 1] * unit) for rank in range(self.size)]

    def part(self, n: int, unit: int = 1) -> slice:
        """This rank's share of `n` items (`parts`)."""
        return self.parts(n, unit)[self.rank]

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[slice, slice]:
        """(query heads, KV heads) this rank holds."""
        if self.size == 1:
            return slice(0, num_heads), slice(0, num_kv_heads)
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.size:
            kv = self.part(num_kv_heads)
            return slice(kv.start * group, kv.stop * group), kv
        q = self.part(num_heads)
        kv_head = q.start // group
        return q, slice(kv_head, kv_head + 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (in place)."""
        if self.size == 1 or x.numel() == 0:  # every rank has the same shapes: all skip alike
            return x
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_reduce(x)
        self.group.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's `x` [..., sizes[rank]] joined along the last dim (ranks in order)."""
        if self.size == 1:
            return x
        if x.numel() == 0:
            return x.new_empty(*x.shape[:-1], sum(sizes))
        width = max(sizes)
        padded = x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        if self.shm is not None and self.shm.fits(padded):
            parts = self.shm.all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.size)]
            self.group.allgather([parts], [padded.contiguous()]).wait()
        return torch.cat([part[..., :size] for part, size in zip(parts, sizes)], dim=-1)


SINGLE = TPGroup()
_current = SINGLE


def current() -> TPGroup:
    """The tensor-parallel group of the model being built."""
    return _current


@contextmanager
def building(group: TPGroup):
    """Build a model's layers as `group`'s rank holds them."""
    global _current
    previous, _current = _current, group
    try:
        yield
    finally:
        _current = previous


def check_split(num_heads: int, num_kv_heads: int, size: int) -> None:
    """Refuse, with the numbers, a world size the attention heads cannot be shared out over."""
    if size == 1:
        return
    if size > num_heads:
        raise InvalidParameterError("tensor_parallel_size", f"{size} ranks exceed the model's {num_heads} "
                                                            f"attention heads")
    if num_kv_heads < size and (size % num_kv_heads or num_heads % size):
        raise InvalidParameterError(
            "tensor_parallel_size", f"{size} ranks cannot share {num_heads} attention heads with {num_kv_heads} KV "
                                    f"heads: with fewer KV heads than ranks, the ranks must be a multiple of the KV "
                                    f"heads and divide the attention heads")
