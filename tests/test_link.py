"""The LINK stream between two workers: a lone session's decode step goes down at once from
its own task; the steps of sessions from one forward pass share a frame."""

from __future__ import annotations

import torch
import trio
import trio.testing

from p2pserve.node.link import Link, serve_link

from .test_wire import Pipe


class _WriterNoted(Pipe):
    """A Pipe that notes which task wrote each frame."""

    def __init__(self):
        super().__init__()
        self.writers: list[str] = []

    async def write(self, data: bytes) -> None:
        self.writers.append(trio.lowlevel.current_task().name)
        await super().write(data)


class _End:
    """One end of an in-memory duplex stream."""

    def __init__(self, inbox: Pipe, outbox: Pipe):
        self.inbox, self.outbox = inbox, outbox

    async def read(self, n: int) -> bytes:
        return await self.inbox.read(n)

    async def write(self, data: bytes) -> None:
        await self.outbox.write(data)

    async def reset(self) -> None:
        await self.inbox.reset()
        await self.outbox.reset()


async def _next_token(items, x):
    """The next stage: each step's token is its position + 100 + its state's sum."""
    return [int(item["start"]) + 100 + int(row.sum()) for item, row in zip(items, x)]


async def _link(nursery, at_once=lambda items: False):
    down, up = _WriterNoted(), _WriterNoted()
    nursery.start_soon(serve_link, _End(down, up), _next_token, at_once)
    link = Link(_End(up, down), nursery, on_close=lambda link: None)
    link.replies = up
    return link, down


async def test_a_lone_sessions_step_goes_down_from_its_own_task():
    async with trio.open_nursery() as nursery:
        link, down = await _link(nursery)
        with trio.fail_after(5):
            token = await link.step("a", 7, torch.ones(1, 4), timeout=5, alone=True)
        assert token == 7 + 100 + 4
        assert down.writers == [trio.lowlevel.current_task().name]  # not the sender task's
        assert (link.frames_sent, link.steps_sent) == (1, 1)
        nursery.cancel_scope.cancel()


async def test_steps_of_one_forward_pass_share_a_frame_sent_by_the_sender_task():
    tokens = {}

    async def step(name, pos):
        tokens[name] = await link.step(name, pos, torch.full((1, 4), 2.0), timeout=5)

    async with trio.open_nursery() as nursery:
        link, down = await _link(nursery)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            async with trio.open_nursery() as sessions:  # woken by one pass: queued together
                for i, name in enumerate("abc"):
                    sessions.start_soon(step, name, i)
        assert tokens == {"a": 108, "b": 109, "c": 110}
        assert (link.frames_sent, link.steps_sent) == (1, 3)
        assert len(down.writers) == 1 and "_sender" in down.writers[0]
        nursery.cancel_scope.cancel()


class _Gated(_WriterNoted):
    """Writes wait for ``gate``; a reset stream refuses them then."""

    def __init__(self):
        super().__init__()
        self.gate = trio.Event()

    async def write(self, data: bytes) -> None:
        await self.gate.wait()
        if self.was_reset:
            raise ConnectionResetError("stream reset")
        await super().write(data)


async def test_a_frame_waiting_to_be_sent_fails_with_the_link_instead_of_hanging():
    errors = {}

    async def step(name, alone=False):
        try:
            await link.step(name, 0, torch.ones(1, 4), timeout=30, alone=alone)
        except Exception as e:
            errors[name] = e

    async with trio.open_nursery() as nursery:
        down, up = _Gated(), Pipe()
        nursery.start_soon(serve_link, _End(down, up), _next_token)
        link = Link(_End(up, down), nursery, on_close=lambda link: None)
        with trio.fail_after(5):
            async with trio.open_nursery() as sessions:
                sessions.start_soon(step, "a", True)  # writing (held at the gate), holds the send lock
                await trio.testing.wait_all_tasks_blocked()
                sessions.start_soon(step, "b")  # queued; the sender task waits for the lock
                await trio.testing.wait_all_tasks_blocked()
                await link.aclose()  # the link goes away
                down.gate.set()
        assert set(errors) == {"a", "b"}  # both failed at once, neither waited 30 s for a token
        nursery.cancel_scope.cancel()


async def test_a_frame_the_stage_answers_on_the_spot_is_served_by_the_reading_task():
    """The last stage computing a lone step at once: no task is spawned for it, the link's
    reading task replies itself; otherwise each frame gets a task of its own."""
    for at_once in (True, False):
        async with trio.open_nursery() as nursery:
            link, down = await _link(nursery, at_once=lambda items, v=at_once: v and len(items) == 1)
            with trio.fail_after(5):
                for pos in range(3):
                    assert await link.step("a", pos, torch.ones(1, 4), timeout=5, alone=True) == pos + 104
            writers = set(link.replies.writers)
            assert len(writers) == 1 and next(iter(writers)).endswith("serve_link") == at_once, writers
            nursery.cancel_scope.cancel()


async def _no_token(items, x):
    """A middle stage of a ring: its steps go on down, no token comes back here."""
    return [None] * len(items)


async def test_a_ring_step_returns_once_sent_and_its_frame_gets_no_reply():
    """The token of a ring step goes from the last stage straight to stage 0: a stage
    waits for nothing from the next one, which writes nothing back."""
    async with trio.open_nursery() as nursery:
        down, up = _WriterNoted(), _WriterNoted()
        served = []

        async def run_steps(items, x):
            served.extend(items)
            return [None] * len(items)

        nursery.start_soon(serve_link, _End(down, up), run_steps)
        link = Link(_End(up, down), nursery, on_close=lambda link: None)
        with trio.fail_after(5):
            for pos in range(3):
                assert await link.step("a", pos, torch.ones(1, 4), timeout=5, alone=True, lost=print) is None
            while len(served) < 3:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted((i["start"], i["ring"]) for i in served) == [(0, True), (1, True), (2, True)]
        assert up.writers == []  # not one frame back up the link
        nursery.cancel_scope.cancel()


async def test_a_ring_step_lost_with_its_link_is_reported_not_forgotten():
    """A ring step has nobody waiting on the link: when the link dies under it, its
    ``lost`` callback says so (the stage then fails the session), once; a step of a
    closed session is no longer reported."""
    lost = []
    async with trio.open_nursery() as nursery:
        down, up = _WriterNoted(), _WriterNoted()
        nursery.start_soon(serve_link, _End(down, up), _no_token)
        link = Link(_End(up, down), nursery, on_close=lambda link: None)
        with trio.fail_after(5):
            for name in "abc":
                await link.step(name, 0, torch.ones(1, 4), timeout=5, alone=True, lost=lambda e, n=name: lost.append(n))
            link.forget("c")
            await link.aclose()
        assert sorted(lost) == ["a", "b"]
        nursery.cancel_scope.cancel()


async def test_a_frame_with_a_relayed_step_is_replied_to_and_ring_results_are_ignored():
    """Sessions of both paths in one frame (stage 0s with different --token-path): the
    relayed step gets its token, the ring step's None in the reply is skipped."""
    async def mixed(items, x):
        return [None if item["ring"] else int(item["start"]) + 100 for item in items]

    tokens = {}
    async with trio.open_nursery() as nursery:
        down, up = _WriterNoted(), _WriterNoted()
        nursery.start_soon(serve_link, _End(down, up), mixed)
        link = Link(_End(up, down), nursery, on_close=lambda link: None)

        async def step(name, pos, ring):
            tokens[name] = await link.step(name, pos, torch.ones(1, 4), timeout=5,
                                           lost=(lambda e: None) if ring else None)

        with trio.fail_after(5):
            async with trio.open_nursery() as sessions:
                sessions.start_soon(step, "ring", 1, True)
                sessions.start_soon(step, "relay", 2, False)
        assert tokens == {"ring": None, "relay": 102}
        assert (link.frames_sent, link.steps_sent) == (1, 2)
        nursery.cancel_scope.cancel()
