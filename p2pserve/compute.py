"""One OS thread for all of a process's torch work, awaited from trio.

libgomp (torch's OpenMP on Linux) gives every OS thread that starts a parallel region a
team of its own, and the teams' threads live as long as that OS thread does. When a
process has more such threads than the machine has CPUs, libgomp *throttles* spinning:
a team's threads then sleep between parallel regions instead of spinning (100 spins
instead of GOMP_SPINCOUNT), and each of a decode step's hundreds of small regions pays
a futex wake-up. A worker used to allocate its KV cache on the trio thread and load
its model and run its passes in trio's worker threads: on 2 cores a 15-layer SmolLM2
decode step took 1.5-1.7x as long while a second team merely existed, and recovered when
its thread exited (``python bench/omp_teams.py``).

So a worker loads, measures, allocates and runs every forward pass on the one thread
this module keeps, and its trio thread never starts a parallel region.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, TypeVar

import outcome
import trio

T = TypeVar("T")


class ComputeThread:
    """A long-lived daemon thread that runs submitted functions one at a time, in order."""

    def __init__(self, name: str = "p2pserve-compute"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, deliver = job
            deliver(outcome.capture(fn))

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the compute thread and return (or raise) what it did. Once
        started it runs to completion: a cancellation takes effect when it returns."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the caller's trio run is over: nobody to tell
                pass

        self._jobs.put((fn, deliver))
        result = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        await trio.lowlevel.checkpoint_if_cancelled()
        return result

    def call(self, fn: Callable[[], T]) -> T:
        """``run`` for code outside trio: block until ``fn()`` has run on the compute thread."""
        if threading.get_ident() == self._thread.ident:
            return fn()
        done = threading.Event()
        box: list[outcome.Outcome] = []
        self._jobs.put((fn, lambda result: (box.append(result), done.set())))
        done.wait()
        return box[0].unwrap()

    def close(self) -> None:
        self._jobs.put(None)


_shared: ComputeThread | None = None
_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """This process's compute thread, started on first use."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = ComputeThread()
        return _shared
