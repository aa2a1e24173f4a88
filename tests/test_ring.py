"""The token path: the last stage sends each token straight to stage 0 (the ring), no
stage relays it back; an error below a stage still travels up; and a prefill chunk's
send does not hold up the stage's next chunk."""

from __future__ import annotations

import signal

import pytest
import torch
import trio
import trio.testing
from libp2p.peer.id import ID

from p2pserve.engine.build import load_stage
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.weights import open_weights
from p2pserve.net.host import connect
from p2pserve.net.protocols import HEARTBEAT, SESSION, Hop
from p2pserve.net.wire import RemoteError, read_frame, write_frame
from p2pserve.node.compute import InlineCompute
from p2pserve.node.sessions import Session, StageServer

from p2pserve.testing.reference import chat_references
from p2pserve.testing.swarm import Swarm, client
from .tiny import make_tiny_llama

N = 16
PROMPT = "What is the capital of France?"
LONG = "Tell me about this: " + "The quick brown fox jumps over the lazy dog near the river bank. " * 45


@pytest.fixture(scope="module")
def swarm3(tmp_path_factory):
    """Three one-stage workers; stage 0 on the default --token-path (ring)."""
    with Swarm(tmp_path_factory.mktemp("ring")) as swarm:
        swarm.start_bootstrap("--pp-partition", "10", "10", "10")
        procs = [swarm.start_worker("--stage", str(i), wait=False) for i in range(3)]
        swarm.peer_ids = [swarm.wait_serving(p) for p in procs]
        swarm.workers = procs
        yield swarm


async def test_a_three_stage_ring_answers_as_p2pserve_run_does(swarm3):
    async with client(swarm3.addr) as c:
        await c.wait_chains(1)
        ids, ref = chat_references([PROMPT], N)[PROMPT]
        answer = await c.ask(tokens=ids, params=SamplingParams(max_new_tokens=N), stop_on_eos=False)
    assert answer.tokens == ref
    # a prompt of several prefill chunks, which go down the chain pipelined
    flags = ["--max-new-tokens", "8"]
    q = swarm3.cli("query", "--peer", swarm3.addr, LONG, *flags)
    r = swarm3.cli("run", "--pp-partition", "10", "10", "10", LONG, *flags)
    assert q.returncode == 0, q.stderr
    assert r.returncode == 0, r.stderr
    assert q.stdout == r.stdout


async def test_the_middle_stage_relays_no_token_the_last_sends_them_to_stage_0(swarm3):
    """With the reverse relay each decode step's token would come back up every link as a
    'tokens' reply (link_replies); on the ring the middle stage forwards the steps and
    writes nothing back, and the last stage's tokens go to stage 0 (ring_tokens)."""
    async with client(swarm3.addr) as c:
        await c.wait_chains(1)
        ids, _ = chat_references([PROMPT], N)[PROMPT]
        await c.ask(tokens=ids, params=SamplingParams(max_new_tokens=N), stop_on_eos=False)
        with trio.fail_after(10 * HEARTBEAT):
            while True:  # the records carry the counters, refreshed every heartbeat
                loads = {w["start"]: w["load"] for w in (await c.status())["workers"]}
                if loads[10]["link_steps"] >= N - 1 and loads[20]["ring_tokens"] >= N:
                    break
                await trio.sleep(0.5)
    assert [loads[s]["link_replies"] for s in (0, 10, 20)] == [0, 0, 0], loads
    assert loads[0]["ring_tokens"] == loads[10]["ring_tokens"] == 0


async def test_a_failure_below_a_ring_stage_travels_up_the_session_streams(swarm3):
    """No token passes a middle stage of a ring, so it cannot learn of a failure below it
    from a reply: it watches its stream down. Here the test is stage 0, holding a session
    on the middle stage; the last stage is killed; the middle stage says so at once.
    (Runs last: the swarm has lost its last stage.)"""
    async with client(swarm3.addr) as c:
        st = await c.wait_chains(1)
        workers = sorted(st["workers"], key=lambda w: w["start"])
        me = c.host.get_id().to_base58()
        chain = [{"peer_id": me, "addrs": [], "start": 0, "end": 10}] + [
            {"peer_id": w["peer_id"], "addrs": w["addrs"], "start": w["start"], "end": w["end"]} for w in workers[1:]]
        middle = workers[1]
        addr = middle["addrs"][0]
        await connect(c.host, addr if "/p2p/" in addr else f"{addr}/p2p/{middle['peer_id']}")
        s = await c.host.new_stream(ID.from_base58(middle["peer_id"]), [SESSION])
        await write_frame(s, {"type": "open", "session": "r1", "chain": chain, "index": 1, "ring": True,
                              "params": SamplingParams().to_dict(), "max_len": 64,
                              "ticket": swarm3.ticket("r1", chain)})
        assert (await read_frame(s))["type"] == "ready"
        swarm3.signal(swarm3.proc_of(workers[2]["peer_id"]), signal.SIGKILL)
        with pytest.raises(RemoteError) as e:
            await read_frame(s, timeout=15)
    assert e.value.code == "stage_failed" and workers[2]["peer_id"] in e.value.message


class _GatedDown:
    """A stream down whose writes wait for ``gate``."""

    def __init__(self):
        self.gate = trio.Event()
        self.writes = 0

    async def write(self, data: bytes) -> None:
        await self.gate.wait()
        self.writes += 1

    async def reset(self) -> None:
        pass


async def test_stage_0_computes_the_next_prefill_chunk_while_one_is_on_its_way(tmp_path):
    source = open_weights(make_tiny_llama(tmp_path, n_layers=2))
    runner = load_stage(source, 0, 1)
    runner.allocate(1, 64)
    server = StageServer(None, runner, model_name="tiny", fingerprint="f", start=0, end=1,
                         max_sessions=1, max_len=64, compute=InlineCompute())
    session = Session("s1", 0, [Hop("me", (), 0, 1), Hop("next", (), 1, 2)], 0, SamplingParams(), {})
    session.down = _GatedDown()
    session.outbox, inbox = trio.open_memory_channel(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.executor.run)
        nursery.start_soon(server._write_down, session, inbox)
        with trio.fail_after(10):
            await server.step(session, torch.arange(8), 0, False)  # returns with its frame unsent
            assert session.down.writes == 0
            nursery.start_soon(server.step, session, torch.arange(8), 8, False)
            await trio.testing.wait_all_tasks_blocked()
            assert server.executor.steps == 2  # the second chunk computed while the first waits
            session.down.gate.set()
            while session.down.writes < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
