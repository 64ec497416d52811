"""Collectives between the ranks of one machine through a shared-memory segment.

Gloo's all-reduce over loopback TCP costs about a millisecond on a small VM, and a decode step
makes two per layer. Here each rank copies its tensor into its own slot of a segment all ranks
map, publishes a sequence number, waits until every rank has published the same one, and then
reads the slots, summing them in rank order, so that every rank computes bit-identical results.
Slots are double-buffered: a rank can only start collective k + 2 (which reuses the buffers of
collective k) after every rank has published k + 1, by which time every rank has read k.

The step broadcast (rank 0's pickled step inputs) uses a region of its own with
acknowledgements: rank 0 writes message k + 1 only once every worker has read message k - 1.

Waiting spins for a short while, then sleeps in growing intervals (an idle engine's workers
sleep rather than spin); it checks `alive()` and a deadline as it goes and raises RuntimeError
when a peer is gone or silent. Tensors larger than a slot, and CPUs whose memory order is not
x86's (stores seen in program order, which the flags rely on), use the gloo group instead.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np
import torch

SLOT_BYTES = 8 << 20  # per rank and buffer; larger collectives go through gloo
MESSAGE_BYTES = 16 << 20  # per broadcast buffer
_SPINS = 2000  # polls before the first sleep
_HEADER = 4096  # flags at the start of the segment, before the slots


class PeerTimeout(RuntimeError):
    """Ranks that did not reach a collective in time."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


def supported() -> bool:
    """Whether this CPU's memory order lets the flags publish data written before them."""
    return platform.machine().lower() in ("x86_64", "amd64")


class SharedMemoryGroup:
    """All-reduce, all-gather and broadcast among `size` ranks of one machine."""

    def __init__(self, name: str, rank: int, size: int, create: bool, timeout: float,
                 alive: Callable[[], bool] = lambda: True):
        self.rank, self.size, self.timeout, self.alive = rank, size, timeout, alive
        total = _HEADER + 2 * size * SLOT_BYTES + 2 * MESSAGE_BYTES
        self.segment = shared_memory.SharedMemory(name=name, create=create, size=total)
        buffer = self.segment.buf
        # flags: [0, size) collective sequence per rank, [size, 2 size) broadcast acknowledgements,
        # [2 size] broadcast sequence, [2 size + 1, + 2) message lengths of the two buffers
        self.flags = np.ndarray((2 * size + 3,), dtype=np.int64, buffer=buffer)
        if create:
            self.flags[:] = 0
        self.slots = [[np.ndarray((SLOT_BYTES,), np.uint8, buffer, _HEADER + (b * size + r) * SLOT_BYTES)
                       for r in range(size)] for b in range(2)]
        start = _HEADER + 2 * size * SLOT_BYTES
        self.messages = [np.ndarray((MESSAGE_BYTES,), np.uint8, buffer, start + b * MESSAGE_BYTES) for b in range(2)]
        self.seq = 0
        self.messages_sent = 0

    def close(self, unlink: bool = False) -> None:
        del self.flags, self.slots, self.messages
        self.segment.close()
        if unlink:
            self.segment.unlink()

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= SLOT_BYTES

    def _wait(self, ready: Callable[[], bool], what: str, laggards: Callable[[], list[int]]) -> None:
        """Until `ready()`; `laggards()` names the ranks being waited for when it times out."""
        spins = 0
        deadline = None
        pause = 1e-5
        while not ready():
            spins += 1
            if spins < _SPINS:
                continue
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.timeout
            elif now > deadline:
                late = laggards()
                raise PeerTimeout(f"rank(s) {', '.join(map(str, late))} did not reach a shared-memory {what} "
                                  f"within {self.timeout:g} s", late)
            if not self.alive():
                raise RuntimeError(f"a rank exited during a shared-memory {what}")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Publish `x` and return every rank's tensor (views of the shared slots), ranks in order."""
        self.seq += 1
        buffers = self.slots[self.seq % 2]
        nbytes = x.numel() * x.element_size()
        flat = x.contiguous().view(-1)
        torch.frombuffer(buffers[self.rank], dtype=torch.uint8, count=nbytes).copy_(flat.view(torch.uint8))
        self.flags[self.rank] = self.seq
        seq, flags, size = self.seq, self.flags, self.size
        self._wait(lambda: int(flags[:size].min()) >= seq, "collective",
                   lambda: [rank for rank in range(size) if flags[rank] < seq])
        return [torch.frombuffer(b, dtype=x.dtype, count=x.numel()).view(x.shape) for b in buffers]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return x.copy_(total)

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [part.clone() for part in self._exchange(x)]

    def send(self, payload: bytes) -> bool:
        """Rank 0: post a message for the others; False (nothing sent) when it is too large."""
        if len(payload) > MESSAGE_BYTES:
            return False
        sent, size, flags = self.messages_sent, self.size, self.flags
        # the buffer this message uses held message sent - 2, which every worker must have read
        self._wait(lambda: int(flags[size + 1: 2 * size].min(initial=sent)) >= sent - 1, "broadcast",
                   lambda: [rank for rank in range(1, size) if flags[size + rank] < sent - 1])
        buffer = sent % 2
        self.messages[buffer][:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        flags[2 * size + 1 + buffer] = len(payload)
        self.messages_sent = sent + 1
        flags[2 * size] = self.messages_sent
        return True

    def receive(self) -> bytes:
        """A worker: the next message rank 0 posts (waiting for it)."""
        expected, size, flags = self.messages_sent + 1, self.size, self.flags
        self._wait(lambda: int(flags[2 * size]) >= expected, "broadcast", lambda: [0])
        buffer = self.messages_sent % 2
        payload = self.messages[buffer][:int(flags[2 * size + 1 + buffer])].tobytes()
        self.messages_sent = expected
        flags[size + self.rank] = expected
        return payload
