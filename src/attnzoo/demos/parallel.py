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

import ctypes
import ctypes.util
import multiprocessing
import os
import pickle
import queue as queue_module
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch

__all__ = ["ProgressSink", "WorkerDied", "plan_workers", "refuse_worker_bootstrap", "run_jobs"]

Result = TypeVar("Result")


class ProgressSink(Protocol):
    def update(self, label: str, *, advance: bool = True) -> None: ...


class WorkerDied(RuntimeError):
    """A worker process ended before handing back its runs (killed, out of memory, a crash)."""


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
        self.channel.put(("progress", label, advance))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the parent process ends, however it ends (SIGKILL, out of memory).

    Linux: the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere a
    daemon thread polls the parent's pid. Either way a parent that already died is noticed here.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="attnzoo-parent-watch", daemon=True).start()


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _worker_main(
    fn: Callable[..., Any],
    threads: int,
    shared: Any,
    tasks: Any,
    results: Any,
    release: Any,
    parent_pid: int,
) -> None:
    """A worker: run jobs from ``tasks`` until the None sentinel, send each result or error back."""
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: it is the parent's to handle (it stops the workers),
    # so that no worker prints a KeyboardInterrupt traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    progress = _QueueProgress(results)
    while (task := tasks.get()) is not None:
        index, job = task
        try:
            results.put(("done", index, fn(*job, shared, progress)))
        except Exception as error:
            results.put(("error", index, _picklable(error)))
    # tensors in the results are shared through this process: stay alive until the parent has them
    release.wait()


def refuse_worker_bootstrap() -> None:
    """Stop a spawned worker that is re-importing a script which starts workers at import time.

    Spawned workers import the parent's ``__main__`` script again. A script that calls the demos
    without an ``if __name__ == "__main__":`` guard would start workers from every worker, which
    multiprocessing refuses with a traceback in each; say what to do in one line instead.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        sys.stderr.write(
            "attnzoo: error: this script starts worker processes when it is imported, and each "
            'worker imports it again: put the calls under `if __name__ == "__main__":`\n'
        )
        sys.stderr.flush()
        os._exit(3)


def _start(processes: Sequence[Any]) -> None:
    """Start the workers with SIGINT ignored, so that they inherit it from their first instruction
    (a Ctrl-C while they import torch would otherwise print their tracebacks)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to change
        previous = None
    try:
        for process in processes:
            process.start()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _stop(processes: Sequence[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 5
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _died(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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

    The workers never outlive this process (they die with it even when it is killed), ignore
    Ctrl-C (this process stops them at once), and a worker that dies (killed, out of memory)
    raises :class:`WorkerDied` here instead of leaving the run waiting.

    Raises:
        WorkerDied: a worker ended before handing back its runs.
        Exception: the first error a job raised in a worker, re-raised here.
    """
    if workers <= 1:
        return [fn(*job, shared, progress) for job in jobs]
    refuse_worker_bootstrap()
    # spawn, not fork: a forked child of a process whose OpenMP pool has run can deadlock
    context = torch.multiprocessing.get_context("spawn")
    tasks, results, release = context.SimpleQueue(), context.Queue(), context.Event()
    for index, job in enumerate(jobs):
        tasks.put((index, tuple(job)))
    for _ in range(workers):
        tasks.put(None)
    processes = [
        context.Process(
            target=_worker_main,
            args=(fn, threads, shared, tasks, results, release, os.getpid()),
            name=f"attnzoo-worker-{i}",
            daemon=True,
        )
        for i in range(workers)
    ]
    done: dict[int, Any] = {}
    try:
        _start(processes)
        while len(done) < len(jobs):
            try:
                message = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [p for p in processes if p.exitcode is not None]
                if dead:
                    # a worker ends only after the parent's release: any exit now is a death
                    time.sleep(0.2)  # let an error message it sent arrive first
                    if results.empty():
                        raise WorkerDied(
                            f"worker process {dead[0].pid} ended ({_died(dead[0])}) with "
                            f"{len(jobs) - len(done)} of {len(jobs)} runs unfinished"
                        ) from None
                continue
            kind, *payload = message
            if kind == "progress":
                progress.update(payload[0], advance=payload[1])
            elif kind == "error":
                raise payload[1]
            else:
                done[payload[0]] = payload[1]
        release.set()
        for process in processes:
            process.join(5)
    finally:
        _stop(processes)
    return [done[i] for i in range(len(jobs))]
