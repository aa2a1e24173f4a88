"""One pipeline hop on loopback: p2pserve frames over libp2p vs. over a raw TCP socket.

    python bench/hop.py [--steps 2000] [--prefills 30] [--hidden 576] [--prefill-len 512]

Starts a server in a second process that echoes messages over two transports: a libp2p
host (TCP + Noise + Yamux, as every peer runs it) and a plain trio TCP listener
(the baseline). Both use the same wire format (p2pserve.net.wire: length-prefixed msgpack,
raw tensor bytes), so the ratio is what libp2p costs per hop.

  decode step  a [1, 1, hidden] float32 hidden state plus a small header, echoed back,
               over one persistent stream: median / p90 round trip
  prefill      a [1, prefill_len, hidden] float32 activation sent, a small ack back:
               median time per message and throughput
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch
import trio

from p2pserve.net.wire import protocol_id, recv_message, send_message

ECHO = protocol_id("bench-echo")


class TcpStream:
    """A trio TCP stream with the read(n)/write/reset interface p2pserve.net.wire expects."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream

    async def read(self, n: int) -> bytes:
        # receive_some allocates its whole max size per call: cap it for big frames.
        data = await self.stream.receive_some(min(n, 256 * 1024))
        if not data:
            raise EOFError
        return data

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reset(self) -> None:
        await self.stream.aclose()

    async def close(self) -> None:
        await self.stream.aclose()


async def serve_echo(stream) -> None:
    """Echo step messages whole; answer prefill messages with a small ack."""
    try:
        while True:
            msg, tensors = await recv_message(stream)
            if msg["type"] == "prefill":
                await send_message(stream, {"type": "ack", "n": tensors["hidden"].numel()}, {})
            else:
                await send_message(stream, msg, tensors)
    except Exception:
        pass  # client gone


# --- server process ---------------------------------------------------------------------


async def server_main() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.net.host import host_multiaddrs, quiet_libp2p_logs, running_host

    quiet_libp2p_logs()
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as host:
        host.set_stream_handler(ECHO, serve_echo)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, host="127.0.0.1"), lambda s: serve_echo(TcpStream(s)), 0
            )
            port = listeners[0].socket.getsockname()[1]
            print(host_multiaddrs(host)[0], port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the client closes stdin
            nursery.cancel_scope.cancel()


# --- client -----------------------------------------------------------------------------


async def step_round_trips(stream, n: int, hidden: int) -> list[float]:
    state = torch.randn(1, 1, hidden)
    rtts = []
    for pos in range(n):
        started = time.perf_counter()
        await send_message(stream, {"type": "step", "session": "bench", "pos": pos}, {"hidden": state})
        msg, back = await recv_message(stream)
        rtts.append(time.perf_counter() - started)
    assert msg["pos"] == n - 1 and torch.equal(back["hidden"], state)
    return rtts


async def prefill_send(stream, activation: torch.Tensor) -> float:
    started = time.perf_counter()
    await send_message(stream, {"type": "prefill", "session": "bench"}, {"hidden": activation})
    ack, _ = await recv_message(stream)
    assert ack["n"] == activation.numel()
    return time.perf_counter() - started


async def client_main(args, libp2p_addr: str, tcp_port: int) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.net.host import connect, quiet_libp2p_logs, running_host

    quiet_libp2p_logs()
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as host:
        started = time.perf_counter()
        peer = await connect(host, libp2p_addr, timeout=10)
        connect_ms = 1e3 * (time.perf_counter() - started)
        started = time.perf_counter()
        p2p_stream = await host.new_stream(peer, [ECHO])
        stream_ms = 1e3 * (time.perf_counter() - started)
        raw_stream = TcpStream(await trio.open_tcp_stream("127.0.0.1", tcp_port))
        streams = {"libp2p": p2p_stream, "raw": raw_stream}

        # Interleave the two transports in rounds so that load from other processes on
        # the machine falls on both alike.
        rtts = {name: [] for name in streams}
        for name, stream in streams.items():
            await step_round_trips(stream, 50, args.hidden)  # warm up
        rounds = 20
        for _ in range(rounds):
            for name, stream in streams.items():
                rtts[name] += await step_round_trips(stream, args.steps // rounds, args.hidden)
        activation = torch.randn(1, args.prefill_len, args.hidden)
        prefill = {name: [] for name in streams}
        for i in range(args.prefills + 3):
            for name, stream in streams.items():
                took = await prefill_send(stream, activation)
                if i >= 3:
                    prefill[name].append(took)
        await p2p_stream.close()
        await raw_stream.close()

    nbytes = activation.numel() * activation.element_size()
    figures = {}
    for name in streams:
        steps = sorted(rtts[name])
        figures[name] = {
            "median": 1e3 * statistics.median(steps),
            "p90": 1e3 * steps[int(0.9 * len(steps))],
            "prefill": 1e3 * statistics.median(prefill[name]),
            "throughput": nbytes / statistics.median(prefill[name]) / 1e6,
        }

    load = os.getloadavg()[0]
    print(f"loopback, two processes, {len(rtts['raw'])} decode steps and {args.prefills} prefills "
          f"per transport, interleaved; load average {load:.1f} on {os.cpu_count()} cores")
    print(f"libp2p connect {connect_ms:.1f} ms, new stream {stream_ms:.1f} ms")
    rows = [
        (f"decode step [1,1,{args.hidden}] f32 round trip, median", "median", "ms"),
        (f"decode step [1,1,{args.hidden}] f32 round trip, p90", "p90", "ms"),
        (f"prefill [1,{args.prefill_len},{args.hidden}] f32 ({nbytes / 1e6:.2f} MB) + ack", "prefill", "ms"),
        ("prefill throughput", "throughput", "MB/s"),
    ]
    print(f"{'':56s} {'libp2p':>11s} {'raw TCP':>11s} {'libp2p/raw':>11s}")
    for label, key, unit in rows:
        p2p, raw = figures["libp2p"][key], figures["raw"][key]
        print(f"{label:56s} {p2p:7.2f} {unit:<4s}{raw:7.2f} {unit:<4s} {p2p / raw:9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--prefills", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(server_main)
        return

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from p2pserve.testing.swarm import end_child

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = server.stdout.readline().split()
        if len(line) != 2:
            sys.exit("bench server did not start")
        trio.run(client_main, args, line[0], int(line[1]))
    finally:
        end_child(server)


if __name__ == "__main__":
    main()
