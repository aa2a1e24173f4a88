"""A later stage frees a session whose stream goes quiet, unless its steps come on the link;
and it answers a lone session's link frame on the spot only when that session ends here."""

from __future__ import annotations

import time

import pytest
import torch
import trio
import trio.testing

from p2pserve.node import sessions as worker
from p2pserve.node.sessions import Session, StageServer
from p2pserve.node.compute import InlineCompute
from p2pserve.engine.build import load_stage
from p2pserve.net.protocols import Hop
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.weights import open_weights
from p2pserve.net.wire import WireTimeout

from .tiny import make_tiny_llama

IDLE = 0.3  # seconds, this test's idle timeout


class _QuietStream:
    """A session stream on which upstream never sends another frame."""

    async def read(self, n=None):
        await trio.sleep_forever()

    async def reset(self):
        pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), n_layers=2)


def _last_stage(tiny, compute=None):
    source = open_weights(tiny)
    n = source.config.n_layers
    runner = load_stage(source, 1, n)
    runner.allocate(2, 64)
    server = StageServer(None, runner, model_name="tiny", fingerprint="f", start=1, end=n,
                         max_sessions=2, max_len=64, compute=compute)
    chain = [Hop("upstream-peer", (), 0, 1), Hop("me", (), 1, n)]
    session = Session("s1", 0, chain, 1, SamplingParams(), {})
    server.sessions[session.id] = session
    return server, session


@pytest.mark.parametrize("busy_for", [0.0, 1.2])
async def test_relay_idle_timeout_counts_link_steps_as_activity(tiny, monkeypatch, busy_for):
    monkeypatch.setattr(worker, "IDLE_TIMEOUT", IDLE)
    server, session = _last_stage(tiny)
    hidden = server.config.hidden_size
    tokens = []

    async def link_steps():  # decode steps of this session arriving on the LINK stream
        pos, t_end = 0, trio.current_time() + busy_for
        while trio.current_time() < t_end:
            results = await server._link_steps("upstream-peer", [{"session": session.id, "start": pos}],
                                               torch.randn(1, hidden))
            tokens.append(results[0])
            pos += 1
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.executor.run)
        nursery.start_soon(link_steps)
        t0 = time.monotonic()
        with pytest.raises(WireTimeout):
            await server._relay(_QuietStream(), session)  # the session stream itself stays silent
        quiet_for = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    assert all(isinstance(t, int) for t in tokens) and len(tokens) >= busy_for / 0.1
    # freed one to two idle periods after the last activity, never while steps still came
    assert busy_for + IDLE * 0.9 <= quiet_for <= busy_for + 2 * IDLE + 0.5, quiet_for


async def test_only_a_lone_step_of_a_session_that_ends_here_is_answered_by_the_reading_task(tiny):
    """``StageServer._alone`` (serve_link's rule): one item, of a known session whose
    last stage this is, with the executor idle and computing inline."""
    server, session = _last_stage(tiny, compute=InlineCompute())
    lone = [{"session": session.id, "start": 0}]
    assert not server._alone(lone)  # the batcher is not waiting yet
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.executor.run)
        await trio.testing.wait_all_tasks_blocked()
        assert server._alone(lone)
        assert not server._alone(lone * 2)  # two steps: the batcher batches them
        assert not server._alone([{"session": "unknown", "start": 0}])
        assert not server._alone(["not an item"])
        n = server.config.n_layers
        middle = Session("s2", 1, [Hop("a", (), 0, 1), Hop("me", (), 1, n - 1), Hop("b", (), n - 1, n)], 1,
                         SamplingParams(), {})
        server.sessions = {middle.id: middle}
        assert not server._alone([{"session": middle.id, "start": 0}])  # its step goes on down the chain
        server.sessions = {session.id: session, middle.id: middle}
        assert not server._alone(lone)  # a second open session may have a step to batch with
        nursery.cancel_scope.cancel()
