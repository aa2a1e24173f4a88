"""Round-trip times from this worker to the peers it is connected to, for its record.

The head routes on them (``bootstrap/registry.py``: the cost of the hop between two
consecutive stages of a chain). A worker is connected to the workers it links to (the
next stage of its chains), to the heads and to its DHT neighbours; each round pings up
to ``MAX_RTTS`` of them over libp2p's ping protocol (``/ipfs/ping/1.0.0``, which every
py-libp2p host serves) and keeps, per peer, the fastest of a few round trips: the
slower ones measure this process's scheduling, not the link.
"""

from __future__ import annotations

import logging
import secrets
import time

import trio
from libp2p.host.ping import ID as PING, PING_LENGTH

from p2pserve.net.records import MAX_RTT, MAX_RTTS
from p2pserve.net.wire import reset_stream

log = logging.getLogger("p2pserve.worker")

PING_INTERVAL = 5.0  # seconds between rounds
PING_TIMEOUT = 2.0  # seconds for one peer's round trips; a peer slower than that is left out
PINGS_PER_PEER = 3


class Pings:
    """The latest round trip to each peer, as the record announces it: ``rtts()``."""

    def __init__(self, host, max_peers: int = MAX_RTTS):
        self.host = host
        self.max_peers = max_peers
        self._rtts: dict[str, float] = {}

    def rtts(self) -> dict[str, float]:
        return dict(self._rtts)

    async def run(self) -> None:
        """Ping every ``PING_INTERVAL`` seconds; never returns."""
        while True:
            await self.round()
            await trio.sleep(PING_INTERVAL)

    async def round(self) -> None:
        me = self.host.get_id()
        # peers measured before first, so the announced map changes little between rounds
        peers = sorted((p for p in self.host.get_connected_peers() if p != me),
                       key=lambda p: (p.to_base58() not in self._rtts, p.to_base58()))[:self.max_peers]
        fresh: dict[str, float] = {}

        async def one(peer):
            with trio.move_on_after(PING_TIMEOUT):
                try:
                    rtt = await ping(self.host, peer)
                except Exception as e:  # a peer without ping, or gone: no figure for it
                    log.debug("ping %s failed: %s", peer, e)
                    return
                if rtt <= MAX_RTT:
                    fresh[peer.to_base58()] = rtt

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
        self._rtts = fresh


async def ping(host, peer, count: int = PINGS_PER_PEER) -> float:
    """The fastest of ``count`` round trips to ``peer``, in seconds, on one ping stream.

    libp2p's own ping client reports whole milliseconds; a loopback or LAN hop is less."""
    stream = await host.new_stream(peer, [PING])
    try:
        best = float("inf")
        for _ in range(count):
            payload = secrets.token_bytes(PING_LENGTH)
            t0 = time.perf_counter()
            await stream.write(payload)
            echo = b""
            while len(echo) < PING_LENGTH:
                echo += await stream.read(PING_LENGTH - len(echo))
            best = min(best, time.perf_counter() - t0)
            if echo != payload:
                raise ValueError("the ping came back changed")
        await stream.close()
        return best
    except BaseException:
        await reset_stream(stream)
        raise
