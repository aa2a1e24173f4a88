"""Streams of p2pserve's libp2p hosts carry frames of every size intact on concurrent
streams of one connection, and a waiting read ends when the other side goes away."""

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pserve.net.host import connect, host_multiaddrs, quiet_libp2p_logs, running_host
from p2pserve.net.wire import WireError, protocol_id, read_frame, recv_message, send_message, write_frame

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ECHO = protocol_id("test-streams-echo")

quiet_libp2p_logs()


async def echo(stream):
    """Send every message back as it came; end when the client leaves."""
    try:
        while True:
            msg, tensors = await recv_message(stream, timeout=10)
            await send_message(stream, msg, tensors)
    except (WireError, EOFError):
        pass
    await stream.close()


SIZES = [1, 1, 37, 1, 512, 1, 1, 2048, 3, 1]  # rows of 576 floats: 2.3 KB up to 4.7 MB


async def round_trips(stream, tag: int, rounds: int) -> None:
    for r in range(rounds):
        for i, rows in enumerate(SIZES):
            x = torch.randn(rows, 576)
            await send_message(stream, {"tag": tag, "r": r, "i": i}, {"x": x}, timeout=20)
            msg, back = await recv_message(stream, timeout=20)
            assert msg == {"tag": tag, "r": r, "i": i}
            assert torch.equal(back["x"], x)


async def test_frames_of_every_size_on_concurrent_streams_of_one_connection_arrive_intact():
    async with running_host(create_new_key_pair(), LOOPBACK) as server:
        server.set_stream_handler(ECHO, echo)
        async with running_host(create_new_key_pair(), LOOPBACK) as client:
            with trio.fail_after(120):
                peer = await connect(client, host_multiaddrs(server)[0], timeout=5)
                streams = [await client.new_stream(peer, [ECHO]) for _ in range(4)]
                async with trio.open_nursery() as nursery:  # four streams writing at once
                    for tag, stream in enumerate(streams):
                        nursery.start_soon(round_trips, stream, tag, 3)
                for stream in streams:
                    await stream.close()


async def test_a_read_waiting_on_a_stream_ends_when_the_peer_resets_it_or_goes_away():
    async def reset_after_one(stream):
        try:
            await read_frame(stream, timeout=5)
        except WireError:  # the second stream: its host goes away first
            pass
        await stream.reset()

    async def serve(leave: trio.Event, task_status):
        async with running_host(create_new_key_pair(), LOOPBACK) as server:
            server.set_stream_handler(ECHO, reset_after_one)
            task_status.started(host_multiaddrs(server)[0])
            await leave.wait()

    async def read_until_gone(stream):
        with pytest.raises((WireError, EOFError)):
            await read_frame(stream, timeout=10)

    leave = trio.Event()
    async with running_host(create_new_key_pair(), LOOPBACK) as client:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(serve, leave)
                peer = await connect(client, addr, timeout=5)
                stream = await client.new_stream(peer, [ECHO])
                await write_frame(stream, {"n": 1})
                await read_until_gone(stream)  # reset by the handler
                stream = await client.new_stream(peer, [ECHO])
                nursery.start_soon(read_until_gone, stream)
                await trio.sleep(0.2)
                leave.set()  # the whole peer goes away while the read waits

