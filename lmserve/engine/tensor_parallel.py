"""Runs the model split over `tensor_parallel_size` processes (`lmserve.parallel`), on PyTorch's
distributed runtime: a TCP store on 127.0.0.1 and a gloo process group (NCCL on GPUs), with
the collectives of ranks on one CPU through shared memory (`parallel.shm`).

The engine's own process is rank 0: it schedules, samples and prepares every step
(`ModelRunner.prepare`). It starts the other ranks as processes of their own (multiprocessing
spawn), each with cores / N threads by default, or, when `torchrun` started N processes (on one
machine or several: `--nnodes`, `--master-addr`, `--master-port`), uses those: rank 0 posts what
to load in torchrun's rendezvous store and the others (`run_torchrun_worker`) read it. Every
worker loads the same checkpoint as its part of the model and a KV cache for its heads with the
same number of blocks. Each step rank 0
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
import weakref

import torch
import torch.distributed as dist

from lmserve import parallel
from lmserve.parallel import shm
from lmserve.config import EngineConfig
from lmserve.errors import EngineDeadError, InvalidParameterError

logger = logging.getLogger("lmserve")

TIMEOUT_SECONDS = 30  # the longest a collective may wait for a rank
_STOP = None  # broadcast to end the workers


class TensorParallelError(EngineDeadError):
    """A tensor-parallel rank died or stopped answering."""


def _store_timeout() -> datetime.timedelta:
    """How long ranks wait for each other to join (loading a model included)."""
    return datetime.timedelta(seconds=TIMEOUT_SECONDS * 4)


def _process_group(store, rank: int, size: int, device: torch.device):
    timeout = datetime.timedelta(seconds=TIMEOUT_SECONDS)
    if device.type == "cuda":
        # One GPU per rank on each machine (never run here: no GPU has been lent to this project).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
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


def torchrun_rank() -> int | None:
    """This process's rank when `torchrun` started it (its environment says so), else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ else None


def _torchrun_store(size: int):
    """The rendezvous store of a `torchrun` launch (the ranks' own namespace in it)."""
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise InvalidParameterError("tensor_parallel_size", f"{size}, but torchrun started {world} processes; "
                                                            f"they must be equal")
    store, _, _ = next(dist.rendezvous("env://", timeout=_store_timeout()))
    return dist.PrefixStore("lmserve", store)


_LIVE: "weakref.WeakSet[Workers]" = weakref.WeakSet()


def close_all() -> None:
    """Stop every tensor-parallel engine's workers (for a process about to end without its
    interpreter's teardown)."""
    for workers in list(_LIVE):
        workers.close()


class Workers:
    """Ranks 1..N-1 of a tensor-parallel engine, seen from rank 0: processes it starts itself, or
    the other processes of a `torchrun` launch (on this machine or others), which it tells what to
    load through the rendezvous store."""

    def __init__(self, checkpoint_path: str, engine_config: EngineConfig, num_blocks: int, num_swap_blocks: int,
                 max_model_len: int):
        size = engine_config.tensor_parallel_size
        launched = torchrun_rank() is not None
        threads = torch.get_num_threads() if launched else threads_per_rank(size)
        torch.set_num_threads(threads)
        self.store = _torchrun_store(size) if launched else dist.TCPStore(
            "127.0.0.1", 0, size, True, _store_timeout(), wait_for_workers=False)
        one_machine = not launched or int(os.environ.get("LOCAL_WORLD_SIZE", 0)) == size
        use_shm = one_machine and engine_config.torch_device.type == "cpu" and shm.supported()
        self.shm = shm.SharedMemoryGroup(f"lmserve-tp-{os.getpid()}-{id(self)}", 0, size, True, TIMEOUT_SECONDS,
                                         self._all_alive) if use_shm else None
        job = (self.shm and self.shm.segment.name, checkpoint_path, engine_config, num_blocks, num_swap_blocks,
               max_model_len, threads)
        self.processes = []
        if launched:
            self.store.set("job", pickle.dumps(job))
        else:
            context = multiprocessing.get_context("spawn")
            self.processes = [context.Process(target=_spawned_worker, name=f"lmserve-tp-rank{rank}", daemon=True,
                                              args=(rank, size, self.store.port, *job)) for rank in range(1, size)]
            for process in self.processes:
                process.start()
        self.group = parallel.TPGroup(0, size, _process_group(self.store, 0, size, engine_config.torch_device),
                                      self.shm)
        self.failure: TensorParallelError | None = None
        self.closed = False
        _LIVE.add(self)
        logger.info("tensor parallel: %d ranks (rank 0 here; workers %s), %d threads each", size,
                    "started by torchrun" if launched else ", ".join(str(p.pid) for p in self.processes), threads)

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
        except RuntimeError as exc:  # a peer closed its connection, or a collective timed out
            self._check_alive()
            late = getattr(exc, "ranks", None) or range(1, self.group.size)  # shm.PeerTimeout knows which
            ranks = ", ".join(f"rank {rank}" + (f" (pid {self.processes[rank - 1].pid})" if self.processes else "")
                              for rank in late)
            self._fail(f"tensor-parallel {ranks} stopped answering: a collective between the ranks failed "
                       f"or waited more than {TIMEOUT_SECONDS} s ({exc})")

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
        """Stop the workers: told to, when they are healthy; terminated otherwise (those this
        process started). Once only."""
        if self.closed:
            return
        self.closed = True
        if self.failure is None and self._all_alive():
            try:
                _broadcast(self.group, _STOP)
            except RuntimeError:
                pass
        for process in self.processes:
            process.join(5)
            if process.is_alive():  # hung, or stopped (which a SIGTERM would not end)
                process.kill()
                process.join(5)
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


def _spawned_worker(rank: int, size: int, port: int, *job) -> None:
    """A worker process this engine started: its store is rank 0's, its parent rank 0 (whose
    resource tracker it shares, and which unlinks the shared-memory segment)."""
    store = dist.TCPStore("127.0.0.1", port, size, False, _store_timeout())
    parent = os.getppid()
    _run_worker(rank, size, store, lambda: os.getppid() == parent, False, *job)


def run_torchrun_worker() -> None:
    """A rank > 0 of a `torchrun` launch: load what rank 0 posts in the store, then run steps
    until rank 0 stops (or goes away)."""
    store = _torchrun_store(int(os.environ["WORLD_SIZE"]))
    job = pickle.loads(store.get("job"))
    _run_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), store, lambda: True, True, *job)


def _run_worker(rank: int, size: int, store, parent_alive, own_tracker: bool, shm_name: str | None,
                checkpoint_path: str, engine_config: EngineConfig, num_blocks: int, num_swap_blocks: int,
                max_model_len: int, threads: int) -> None:
    from lmserve.engine.model_builder import build_model, fused_decoder_for
    from lmserve.engine.model_runner import ModelRunner
    from lmserve.loader import open_checkpoint

    torch.set_num_threads(threads)
    memory = shm.SharedMemoryGroup(shm_name, rank, size, False, TIMEOUT_SECONDS, parent_alive) if shm_name else None
    if memory is not None and own_tracker:  # rank 0 owns and unlinks the segment, not this process's tracker
        from multiprocessing import resource_tracker

        resource_tracker.unregister(memory.segment._name, "shared_memory")
    group = parallel.TPGroup(rank, size, _process_group(store, rank, size, engine_config.torch_device), memory)
    checkpoint = open_checkpoint(checkpoint_path)
    with parallel.building(group):
        model = build_model(checkpoint, engine_config, max_model_len)
    runner = ModelRunner(model, checkpoint.config, engine_config, num_blocks, fused_decoder_for(checkpoint.config))
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
