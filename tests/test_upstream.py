"""Stage 0 streams an answer's tokens to the bootstrap at most once per stream interval,
and the bootstrap takes only token ids of the vocabulary from it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pserve.bootstrap.server import tokens_of
from p2pserve.node.driver import UpstreamWriter
from p2pserve.net.wire import StreamClosed, read_frame, write_frame

from .test_wire import Pipe


class _Recorder:
    """A stream that notes when each write came and which frames it carried."""

    def __init__(self):
        self.writes: list[tuple[float, list[dict]]] = []

    async def write(self, data: bytes) -> None:
        pipe = Pipe()
        await pipe.write(data)
        await pipe.close()
        frames = []
        while True:
            try:
                frames.append(await read_frame(pipe))
            except StreamClosed:
                break
        self.writes.append((trio.current_time(), frames))


async def _stream(interval: float, n_tokens: int, every: float, stall: float = 0.0) -> _Recorder:
    """Tokens every ``every`` seconds (the last one ``stall`` seconds late), then 'done'
    half a token later. The recorder's ``sent`` holds when each item was sent, and
    ``writer`` the UpstreamWriter."""
    stream = _Recorder()
    stream.sent = []
    stream.writer = writer = UpstreamWriter(stream, interval)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        t0 = trio.current_time()
        for t in range(n_tokens):
            await trio.sleep_until(t0 + t * every + (stall if t == n_tokens - 1 else 0.0))
            writer.push(t)
            stream.sent.append(trio.current_time())
        await trio.sleep(every / 2)
        stream.sent.append(trio.current_time())
        with trio.fail_after(1):
            await writer.finish({"type": "done", "n_tokens": n_tokens})
    return stream


def _tokens(writes) -> list[int]:
    return [t for _, frames in writes for f in frames if f["type"] == "tokens" for t in f["tokens"]]


async def test_tokens_within_an_interval_share_one_write_and_the_first_is_not_held(autojump_clock):
    stream = await _stream(interval=0.1, n_tokens=20, every=0.03)
    writes = stream.writes
    assert _tokens(writes) == list(range(20))  # every token once, in order
    assert writes[0][0] == pytest.approx(0.0) and writes[0][1] == [{"type": "tokens", "tokens": [0]}]
    gaps = [b[0] - a[0] for a, b in zip(writes, writes[1:-1])]
    assert all(g >= 0.1 - 1e-9 for g in gaps), gaps  # at most one write per interval
    assert writes[-1][1][-1] == {"type": "done", "n_tokens": 20}  # 'done' goes with the last tokens, not held
    assert writes[-1][0] == pytest.approx(stream.sent[-1])
    assert len(writes) <= 8  # 20 tokens over 0.6 s: ~7 writes instead of 21
    # every write goes when a token (or 'done') arrives, never on a timer of its own: a
    # timer would wake stage 0 in the middle of the next stage's forward pass
    assert all(any(w == pytest.approx(t) for t in stream.sent) for w, _ in writes)
    # and a held token does not even wake the writer task: stage 0 goes from one forward
    # pass to the next without a scheduler turn for it
    assert stream.writer.wakeups == len(writes)


async def test_held_tokens_go_at_most_one_interval_late_when_the_next_token_is_slow(autojump_clock):
    stream = await _stream(interval=0.1, n_tokens=5, every=0.03, stall=5.0)
    # token 0 goes at once; 1-3 (0.03-0.09 s) are held; token 4 comes 5 s late, so the
    # held ones go on their own at 0.2 s: one interval after they were due
    assert [(round(w, 3), frames) for w, frames in stream.writes[:2]] == [
        (0.0, [{"type": "tokens", "tokens": [0]}]), (0.2, [{"type": "tokens", "tokens": [1, 2, 3]}])]
    assert _tokens(stream.writes) == list(range(5))


async def test_interval_zero_sends_each_token_as_it_comes(autojump_clock):
    stream = await _stream(interval=0.0, n_tokens=5, every=0.03)
    assert [frames for _, frames in stream.writes] == (
        [[{"type": "tokens", "tokens": [t]}] for t in range(5)] + [[{"type": "done", "n_tokens": 5}]])


@pytest.mark.parametrize("msg", [{"type": "tokens"}, {"tokens": []}, {"tokens": "12"}, {"tokens": [1, "2"]},
                                 {"tokens": [1, -1]}, {"tokens": [100]}, {"tokens": [True]}])
def test_the_bootstrap_refuses_tokens_that_are_not_ids_of_the_vocabulary(msg):
    with pytest.raises(ValueError, match="stage 0 sent invalid tokens"):
        tokens_of(msg, vocab_size=100)


def test_the_bootstrap_takes_the_token_ids_of_a_tokens_frame():
    assert tokens_of({"type": "tokens", "tokens": [0, 5, 99]}, vocab_size=100) == [0, 5, 99]


async def test_a_flush_writes_the_first_token_before_its_session_goes_on(autojump_clock):
    """A due token is written at the session task's next wait, after its next forward
    pass: except the first, which ``flush`` writes at once (time to first token)."""
    stream = _Recorder()
    writer = UpstreamWriter(stream, 0.1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.testing.wait_all_tasks_blocked()
        writer.push(7)
        await writer.flush()
        assert stream.writes == [(0.0, [{"type": "tokens", "tokens": [7]}])]
        writer.push(8)  # held: the interval has not passed
        await writer.flush()
        assert stream.writes[1][1] == [{"type": "tokens", "tokens": [8]}]
        await writer.finish({"type": "done", "n_tokens": 2})
    assert _tokens(stream.writes) == [7, 8]


class _Stage0:
    """Stage 0's end of a session stream as the head sees it: the head's frames go to
    ``sent``, and the head reads what ``answer`` holds, then the end of the stream."""

    def __init__(self, frames: list[dict]):
        self.sent, self.answer = Pipe(), Pipe()
        self.frames = frames

    async def fill(self) -> None:
        for frame in self.frames:
            await write_frame(self.answer, frame)
        await self.answer.close()

    async def write(self, data: bytes) -> None:
        await self.sent.write(data)

    async def read(self, n: int) -> bytes:
        return await self.answer.read(n)

    async def close(self) -> None:
        await self.sent.close()

    async def reset(self) -> None:
        await self.sent.reset()


async def test_a_stage_0_stream_that_ends_mid_answer_fails_the_chain_not_the_request(monkeypatch):
    """A StreamClosed (or any WireError) carries bad_request, the code a server answers a
    peer's bad frame with; on the head's side it is stage 0's stream that broke, so the
    chain fails and the answer goes on through another (before, the head re-raised it as
    the request's fault and reset the client's stream with no error frame)."""
    from types import SimpleNamespace

    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.bootstrap import server
    from p2pserve.bootstrap.registry import Registry
    from p2pserve.engine.generate import SamplingParams
    from p2pserve.net.protocols import Hop

    stage0 = _Stage0([{"type": "ready"}, {"type": "tokens", "tokens": [5]}])
    await stage0.fill()

    async def dial(host, peer_id, addrs):
        return peer_id

    async def new_stream(peer, protocols):
        return stage0

    async def suspects(chain):
        return frozenset()

    monkeypatch.setattr(server, "dial", dial)
    head = SimpleNamespace(host=SimpleNamespace(new_stream=new_stream), registry=Registry("m", "f", 2),
                           key_pair=create_new_key_pair(), head_cert=None, stream_interval=0.0,
                           config=SimpleNamespace(vocab_size=10, eos_token_ids=[0]), _suspects=suspects)
    chain = [Hop("stage-0", (), 0, 2)]
    got = []
    with pytest.raises(server._ChainFailed, match="closed"):
        async for tokens in server.Bootstrap._run_chain(head, chain, [1, 2], SamplingParams(max_new_tokens=4), True):
            got += tokens
    assert got == [5]
    assert stage0.sent.was_reset
