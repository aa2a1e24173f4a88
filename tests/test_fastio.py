"""p2pserve.net.fastio: the fast paths through py-libp2p's stream stack carry every frame intact,
take no scheduler turn on an uncontended lock, interoperate with a peer that runs plain
py-libp2p, and fail like py-libp2p when the other side goes away."""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pserve.net import fastio
from p2pserve.net.host import connect, host_multiaddrs, quiet_libp2p_logs, running_host
from p2pserve.net.wire import WireError, protocol_id, read_frame, recv_message, send_message, write_frame

from .swarm import end_child

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ECHO = protocol_id("test-fastio-echo")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    before = dict(fastio.stats)
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
    # the fast paths carried the small frames (both peers run in this process)
    for key in ("fast_writes", "fast_reads", "demuxed"):
        assert fastio.stats[key] - before[key] >= 4 * 3 * 6, key


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


SERVER = textwrap.dedent("""
    import sys, trio
    sys.path.insert(0, {root!r})
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.network.stream.net_stream import NetStream
    from p2pserve.net.host import host_multiaddrs, quiet_libp2p_logs, running_host
    from tests.test_fastio import ECHO, echo

    async def main():
        quiet_libp2p_logs()
        async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as host:
            host.set_stream_handler(ECHO, echo)
            print(host_multiaddrs(host)[0], NetStream.write.__module__, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)

    trio.run(main)
""")


async def test_a_peer_running_plain_py_libp2p_understands_every_frame():
    env = {**os.environ, "P2PSERVE_FASTIO": "0"}
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(root=ROOT)], env=env, cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(60):
            line = await trio.to_thread.run_sync(server.stdout.readline)
            addr, module = line.split()
            assert module.startswith("libp2p."), "the server was meant to run without the fast paths"
            async with running_host(create_new_key_pair(), LOOPBACK) as client:
                peer = await connect(client, addr, timeout=5)
                stream = await client.new_stream(peer, [ECHO])
                await round_trips(stream, 0, 2)
                await stream.close()
    finally:
        end_child(server)


def test_a_reader_holds_back_at_most_64_kib_of_window_however_large_it_grew():
    """Half the window was the limit once, and a window grown to 4 MiB then let a reader
    sit on 2 MiB while the sender polled for credit every 10 ms."""
    def stream(target, uncredited, buffered=0):
        conn = SimpleNamespace(stream_buffers={1: bytearray(buffered)})
        return SimpleNamespace(conn=conn, stream_id=1, target_recv_window=target,
                               recv_window=target - uncredited - buffered,
                               _grow_threshold=lambda: target // 2)

    limit = fastio.MAX_DEFERRED_CREDIT
    assert fastio._defer_credit(stream(4 << 20, limit - 1))
    assert not fastio._defer_credit(stream(4 << 20, limit))
    assert fastio._defer_credit(stream(4 << 20, limit - 1, buffered=1 << 20))  # unread bytes are not owed
    assert not fastio._defer_credit(stream(64 << 10, 32 << 10))  # a small window: half of it


async def test_quick_lock_takes_a_free_lock_without_a_turn_and_queues_like_trio_lock():
    lock = fastio.QuickLock()
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
