"""Independent training runs side by side, one worker process per share of the cores.

The demos' networks are small: a training step of the `compare` ResNet is a few milliseconds of
convolutions on tiny channel counts, which do not spread well over threads. Two processes with one
thread each finish 1.3-1.4x more steps than one process with two threads (measured on the 2-core
development machine), so independent runs (mechanism x seed) go to a pool of spawned workers.
A run's result does not depend on which worker ran it or in what order: each run seeds itself and
every worker has the same number of threads.

Under ``torchrun`` the demos are data-parallel instead (:mod:`attnzoo.demos.distributed`) and run
their jobs one after another in every rank.
"""

from __future__ import annotations

import queue as queue_module
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch

__all__ = ["ProgressSink", "plan_workers", "run_jobs"]

Result = TypeVar("Result")


class ProgressSink(Protocol):
    def update(self, label: str, *, advance: bool = True) -> None: ...


def plan_workers(jobs: int, threads: int, workers: int | None) -> tuple[int, int]:
    """(worker processes, torch threads per worker) for ``jobs`` runs on ``threads`` threads in all.

    ``workers=None`` chooses one worker per thread, as many as there are jobs; 1 keeps everything
    in this process.

    Raises:
        ValueError: a non-positive ``workers`` or ``threads``.
    """
    if threads < 1:
        raise ValueError(f"threads: expected a positive count, got {threads}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers: expected a positive count, got {workers}")
    chosen = min(jobs, threads) if workers is None else min(jobs, workers)
    chosen = max(chosen, 1)
    return chosen, max(threads // chosen, 1)


class _QueueProgress:
    """Stands in for the progress bar inside a worker: forwards each update to the parent."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def update(self, label: str, *, advance: bool = True) -> None:
        self.channel.put((label, advance))


_WORKER: dict[str, Any] = {}


def _init_worker(threads: int, channel: Any, shared: Any) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(progress=_QueueProgress(channel), shared=shared)


def _run_in_worker(fn: Callable[..., Any], job: tuple[Any, ...]) -> Any:
    return fn(*job, _WORKER["shared"], _WORKER["progress"])


def _forward_updates(channel: Any, progress: ProgressSink, wait_s: float = 0.0) -> None:
    """Pass on every update queued so far (waiting up to ``wait_s`` for each further one)."""
    while True:
        try:
            label, advance = channel.get(timeout=wait_s) if wait_s else channel.get_nowait()
        except queue_module.Empty:
            return
        progress.update(label, advance=advance)


def run_jobs(
    fn: Callable[..., Result],
    jobs: Sequence[tuple[Any, ...]],
    *,
    shared: Any,
    workers: int,
    threads: int,
    progress: ProgressSink,
) -> list[Result]:
    """``fn(*job, shared, progress)`` for every job; the results in the order of ``jobs``.

    With ``workers > 1`` the jobs run in that many spawned processes with ``threads`` torch threads
    each (``fn`` must be a module-level function; ``shared`` is sent once to each worker, its
    tensors through shared memory), and their progress updates reach ``progress`` here. With one
    worker they run in this process, one after another, on the threads it already has.
    """
    if workers <= 1:
        return [fn(*job, shared, progress) for job in jobs]
    # spawn, not fork: a forked child of a process whose OpenMP pool has run can deadlock
    context = torch.multiprocessing.get_context("spawn")
    channel = context.Queue()
    # multiprocessing's Pool, not concurrent.futures: on an error or Ctrl-C, terminate() stops the
    # workers at once, where an executor would first finish the runs already queued to them
    pool = context.Pool(workers, initializer=_init_worker, initargs=(threads, channel, shared))
    try:
        pending = [pool.apply_async(_run_in_worker, (fn, tuple(job))) for job in jobs]
        while not all(result.ready() for result in pending):
            _forward_updates(channel, progress, wait_s=0.2)
            for result in pending:
                if result.ready() and not result.successful():
                    result.get()  # raises the worker's exception here
        # a worker's queue is flushed by a background thread, possibly after its result arrived
        _forward_updates(channel, progress, wait_s=0.1)
        results = [result.get() for result in pending]
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()
    return results
