"""p2pserve.net.locks.QuickLock: a free lock is taken without a scheduler turn; a held one
queues its waiters in order, as trio.Lock does; a cancelled task does not take it."""

import trio
import trio.testing

from p2pserve.net.locks import QuickLock


async def test_quick_lock_takes_a_free_lock_without_a_turn_and_queues_like_trio_lock():
    lock = QuickLock()
    ran = []

    async def other():
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        async with lock:  # free: no scheduler turn, so `other` has not run yet
            assert ran == [] and lock.locked()
        await trio.testing.wait_all_tasks_blocked()
        assert ran == ["other"]

        order = []

        async def waiter(name):
            async with lock:
                order.append(name)
                await trio.sleep(0.01)

        await lock.acquire()
        for name in "abc":
            nursery.start_soon(waiter, name)
            await trio.testing.wait_all_tasks_blocked()
        assert order == [] and lock.statistics().tasks_waiting == 3
        lock.release()
    assert order == ["a", "b", "c"]

    with trio.CancelScope() as scope:  # a cancelled task does not take it
        scope.cancel()
        await lock.acquire()
    assert scope.cancelled_caught and not lock.locked()
