"""Locks for the network layer's own objects."""

from __future__ import annotations

import trio


class QuickLock:
    """A trio.Lock whose ``async with`` takes it without a scheduler turn when it is free.

    ``trio.Lock.acquire`` always yields once, even uncontended (it is a checkpoint). A
    lock taken on every frame written therefore costs a turn per frame, and on a busy
    worker a turn is where other tasks run first. Taken while free, this one does not
    yield; taken while held, it waits in line as trio.Lock does (it is one, inside).
    trio.Lock cannot be subclassed, hence the wrapper."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    async def acquire(self) -> None:
        if self._lock.locked():
            await self._lock.acquire()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def statistics(self):
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc) -> None:
        self._lock.release()
