"""The client side of the query protocol (``p2pserve.net.client.ask``) against a head
that misbehaves in the ways a transport can."""

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pserve.net.client import ask
from p2pserve.net.host import connect, host_multiaddrs, quiet_libp2p_logs, running_host
from p2pserve.net.protocols import QUERY
from p2pserve.net.wire import StreamClosed, read_frame, reset_stream, write_frame

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]

quiet_libp2p_logs()


async def answers(drops: int):
    """The frames ``ask`` yields from a head that drops the first ``drops`` query streams
    (reset before any frame, as py-libp2p's muxer once did to one of 32 new streams) and
    answers the next one; and the queries the head read."""
    queries = []

    async def head(stream):
        queries.append(await read_frame(stream, timeout=5))
        if len(queries) <= drops:
            await reset_stream(stream)
            return
        await write_frame(stream, {"type": "token", "token": 7, "text": "x"})
        await write_frame(stream, {"type": "done", "n_tokens": 1})
        await stream.close()

    async with running_host(create_new_key_pair(), LOOPBACK) as server:
        server.set_stream_handler(QUERY, head)
        async with running_host(create_new_key_pair(), LOOPBACK) as client:
            with trio.fail_after(60):
                peer = await connect(client, host_multiaddrs(server)[0], timeout=5)
                frames = []
                try:
                    async for frame in ask(client, peer, tokens=[1, 2, 3], timeout=10):
                        frames.append(frame)
                except StreamClosed as e:
                    return e, queries
                return frames, queries


async def test_a_query_stream_closed_before_its_first_frame_is_asked_again_once():
    frames, queries = await answers(drops=1)
    assert [f["type"] for f in frames] == ["token", "done"]
    assert len(queries) == 2 and queries[0] == queries[1] and queries[0]["tokens"] == [1, 2, 3]


async def test_a_second_close_before_any_frame_is_the_error():
    error, queries = await answers(drops=2)
    assert isinstance(error, StreamClosed) and len(queries) == 2


async def test_an_answered_query_is_asked_once():
    frames, queries = await answers(drops=0)
    assert [f["type"] for f in frames] == ["token", "done"] and len(queries) == 1
