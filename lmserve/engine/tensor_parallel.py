"""Runs the model split over `tensor_parallel_size` processes (`lmserve.parallel`), on PyTorch's
distributed runtime: a TCP store on 127.0.0.1 and a gloo process group (NCCL on GPUs), with
the collectives of ranks on one CPU through shared memory (`parallel.shm`).

The engine's own process is rank 0: it schedules, samples and prepares every step
(`ModelRunner.prepare`). It starts the other ranks as processes of their own (multiprocessing
spawn), each with cores / N threads by default, which load the same checkpoint as their part of
the model and a KV cache for their heads with the same number of blocks. Each step rank 0
broadcasts the step's inputs (pickled, as one byte tensor) and every rank runs it
(`ModelRunner.run`); the layers' all-reduces and the LM head's all-gather join them, and rank 0
keeps the logits. A rank that exits, or a collective that does not complete within
`TIMEOUT_SECONDS`, ends the engine with `TensorParallelError` naming the rank; the engine
refuses every later step.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import pickle

import torch
import torch.distributed as dist

from lmserve import parallel
from lmserve.parallel import shm
from lmserve.config import EngineConfig
from lmserve.errors import EngineDeadError

logger = logging.getLogger("lmserve")

TIMEOUT_SECONDS = 30  # the longest a collective may wait for a rank
_STOP = None  # broadcast to end the workers


class TensorParallelError(EngineDeadError):
    """A tensor-parallel rank died or stopped answering."""


def _process_group(store, rank: int, size: int, device: torch.device):
    timeout = datetime.timedelta(seconds=TIMEOUT_SECONDS)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, size)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _broadcast(group: parallel.TPGroup, item) -> object:
    """Rank 0's `item` on every rank: through shared memory when it fits, else its pickle's length
    and then its bytes through the process group (an empty shared-memory message says which)."""
    if group.shm is not None:
        if group.rank == 0:
            payload = pickle.dumps(item)
            if group.shm.send(payload):
                return item
            group.shm.send(b"")
        else:
            payload = group.shm.receive()
            if payload:
                return pickle.loads(payload)
    if group.rank == 0:
        payload = torch.frombuffer(bytearray(pickle.dumps(item)), dtype=torch.uint8)
        length = torch.tensor([payload.numel()])
    else:
        length = torch.zeros(1, dtype=torch.long)
    group.group.broadcast(length, 0).wait()
    if group.rank != 0:
        payload = torch.empty(int(length), dtype=torch.uint8)
    group.group.broadcast(payload, 0).wait()
    return item if group.rank == 0 else pickle.loads(payload.numpy().tobytes())


def threads_per_rank(size: int) -> int:
    return max(1, torch.get_num_threads() // size)


class Workers:
    """Ranks 1..N-1 of a tensor-parallel engine, started and joined from rank 0."""

    def __init__(self, checkpoint_path: str, engine_config: EngineConfig, num_blocks: int, num_swap_blocks: int,
                 max_model_len: int):
        size = engine_config.tensor_parallel_size
        threads = threads_per_rank(size)
        torch.set_num_threads(threads)
        self.store = dist.TCPStore("127.0.0.1", 0, size, True, datetime.timedelta(seconds=TIMEOUT_SECONDS * 4),
                                   wait_for_workers=False)
        on_cpu = engine_config.torch_device.type == "cpu" and shm.supported()
        self.shm = shm.SharedMemoryGroup(f"lmserve-tp-{os.getpid()}-{self.store.port}", 0, size, True,
                                         TIMEOUT_SECONDS, self._all_alive) if on_cpu else None
        context = multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=_worker_main, name=f"lmserve-tp-rank{rank}", daemon=True,
                                          args=(rank, size, self.store.port, self.shm and self.shm.segment.name,
                                                checkpoint_path, engine_config, num_blocks, num_swap_blocks,
                                                max_model_len, threads))
                          for rank in range(1, size)]
        for process in self.processes:
            process.start()
        self.group = parallel.TPGroup(0, size, _process_group(self.store, 0, size, engine_config.torch_device),
                                      self.shm)
        self.failure: TensorParallelError | None = None
        logger.info("tensor parallel: %d ranks (rank 0 here, workers %s), %d threads each", size,
                    ", ".join(str(p.pid) for p in self.processes), threads)

    def wait_ready(self) -> None:
        """Return once every rank has loaded its part of the model."""
        self.guard(lambda: self.group.group.barrier().wait())

    def broadcast(self, inputs) -> None:
        _broadcast(self.group, inputs)

    def guard(self, work):
        """Run `work` (collectives with the workers); a dead or silent rank becomes a `TensorParallelError`."""
        if self.failure is not None:
            raise self.failure
        self._check_alive()
        try:
            return work()
        except RuntimeError as exc:  # gloo: a peer closed its connection, or a collective timed out
            self._check_alive()
            self._fail(f"a collective between the ranks failed ({exc}); workers "
                       + ", ".join(f"rank {rank} (pid {p.pid})" for rank, p in enumerate(self.processes, 1))
                       + f" are alive but did not answer within {TIMEOUT_SECONDS} s")

    def _all_alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def _check_alive(self) -> None:
        for rank, process in enumerate(self.processes, 1):
            if not process.is_alive():
                self._fail(f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {process.exitcode}")

    def _fail(self, message: str):
        self.failure = TensorParallelError(f"{message}; the engine cannot run further steps")
        self.close()
        raise self.failure

    def close(self) -> None:
        """Stop the workers: told to, when they are healthy; terminated otherwise."""
        if self.failure is None and all(p.is_alive() for p in self.processes):
            try:
                _broadcast(self.group, _STOP)
            except RuntimeError:
                pass
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
        if self.shm is not None:
            self.shm.close(unlink=True)
            self.shm = None


class TensorParallelRunner:
    """Rank 0's runner: each step prepared here, broadcast, then run here and on every worker."""

    def __init__(self, runner, workers: Workers):
        self.runner = runner
        self.workers = workers

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def execute(self, output):
        inputs = self.runner.prepare(output)
        return self.workers.guard(lambda: (self.workers.broadcast(inputs), self.runner.run(inputs))[1])


def _worker_main(rank: int, size: int, port: int, shm_name: str | None, checkpoint_path: str,
                 engine_config: EngineConfig, num_blocks: int, num_swap_blocks: int, max_model_len: int,
                 threads: int) -> None:
    from lmserve.engine.model_builder import build_model
    from lmserve.engine.model_runner import ModelRunner
    from lmserve.loader import open_checkpoint

    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, size, False, datetime.timedelta(seconds=TIMEOUT_SECONDS * 4))
    memory = None
    if shm_name is not None:
        parent = os.getppid()
        # (the segment is registered with the resource tracker rank 0 shares with its workers; rank 0 unlinks it)
        memory = shm.SharedMemoryGroup(shm_name, rank, size, False, TIMEOUT_SECONDS, lambda: os.getppid() == parent)
    group = parallel.TPGroup(rank, size, _process_group(store, rank, size, engine_config.torch_device), memory)
    checkpoint = open_checkpoint(checkpoint_path)
    with parallel.building(group):
        model = build_model(checkpoint, engine_config, max_model_len)
    runner = ModelRunner(model, checkpoint.config, engine_config, num_blocks)
    if num_swap_blocks:
        runner.allocate_swap_space(num_swap_blocks)
    group.group.barrier().wait()
    while True:
        try:
            inputs = _broadcast(group, None)
        except RuntimeError:  # rank 0 is gone
            return
        if inputs is _STOP:
            return
        runner.run(inputs)
