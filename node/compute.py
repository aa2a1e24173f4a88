"""One OS thread for all of a process's torch work, awaited from trio.

libgomp (torch's OpenMP on Linux) gives every OS thread that starts a parallel region a
team of its own, and once a process has more team threads than the machine has CPUs it
stops spinning between regions, so each of a decode step's many small regions pays a
futex wake-up (``python bench/omp_teams.py`` measures it). So a worker loads, measures,
allocates and runs every forward pass on one thread, and no other thread of it starts a
parallel region. Which thread depends on the device:

- CUDA: this module's compute thread. The GPU computes while the loop keeps serving
  frames and heartbeats, and the loop's thread never touches torch's CPU threads.
- CPU: the trio loop's own thread (``InlineCompute``). A CPU pass occupies every core the
  worker was given, so a loop running beside it only competes for them, and handing each
  pass to another thread costs two cross-thread wake-ups per stage per token, slow on VMs
  whose idle vCPUs halt (``python bench/wakeup.py``). The price is that the loop is deaf
  while a pass runs; the batcher bounds that by cutting long prefills into passes of at
  most ``MAX_PASS`` seconds (node/executor.py).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, TypeVar

import outcome
import trio

from p2pserve.net import wire

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


class InlineCompute:
    """``ComputeThread.run``, running each job on the calling thread."""

    IDLE_WAIT = 0.005  # seconds at most that a job waits for the loop to go idle

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()``, blocking the trio loop until it returns: but first let the tasks
        that can run now take a step (two turns: trio may run them before or after this
        one), and let every frame write under way finish. A libp2p write takes several
        scheduler turns, and a pass started in the middle of one delays that frame by the
        whole pass. Afterwards it does not yield: the caller decides when the loop gets
        its turn."""
        with trio.move_on_after(self.IDLE_WAIT):
            await trio.sleep(0)
            await trio.sleep(0)
            while wire.writes_in_flight:
                await trio.sleep(0)
        return fn()


def compute_for(devices: list[str]) -> ComputeThread | InlineCompute:
    """Where a worker with these devices runs its torch work (see the module's docstring)."""
    if devices and all(d.strip() == "cpu" for d in devices):
        return InlineCompute()
    return compute_thread()


_shared: ComputeThread | None = None
_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """This process's compute thread, started on first use."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = ComputeThread()
        return _shared
