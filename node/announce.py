"""A worker announcing itself: a heartbeat stream to each head of the swarm and a signed record
in the DHT, carrying the round-trip times it measures to the peers it is connected to
(node/pings.py)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import trio
from libp2p.peer.id import ID

from p2pserve import __version__
from p2pserve.net.host import connect, parse_peer
from p2pserve.net.protocols import ANNOUNCE, HEARTBEAT
from p2pserve.net.records import EPOCH, RECORD_TTL, WorkerRecord, announce, provide_worker, sign_record
from p2pserve.net.wire import WireError, read_frame, reset_stream, write_frame
from p2pserve.node.pings import Pings

log = logging.getLogger("p2pserve.worker")

MAX_OTHER_HEADS = 8  # heads a worker heartbeats besides the one it joined through


def make_record(host, server, *, stage: int, tp: int, devices: list[dict],
                group_id: str, addrs: list[str]) -> WorkerRecord:
    return WorkerRecord(
        peer_id=host.get_id().to_base58(), addrs=addrs, model=server.model_name,
        fingerprint=server.fingerprint, stage=stage, start=server.start, end=server.end, tp=tp,
        devices=devices, group_id=group_id, version=__version__, load=server.load(),
        expires_at=time.time() + RECORD_TTL,
    )


async def announce_forever(host, key_pair, bootstrap_peer, record_fn, dht=None, addrs_changed=None,
                           other_heads=None) -> None:
    """Heartbeat the bootstrap on one stream (re-dialing if it restarts) and keep the DHT
    record fresh, with the round-trip times of the latest pings; at once, too, whenever
    ``addrs_changed()`` returns (a relay slot lost or made: heads that hear of this worker
    only through the DHT must not dial a dead relay for long). ``other_heads()``, where
    given, names the swarm's other heads (multiaddrs); each gets a heartbeat stream too, so
    that every head drops this worker the moment it dies or leaves, not when its DHT record
    expires. Never returns; cancel it to leave."""
    pings = Pings(host)

    def with_rtts():
        return dataclasses.replace(record_fn(), rtts=pings.rtts())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pings.run)
        if dht is not None:  # a slow DHT put must never delay a heartbeat
            nursery.start_soon(_refresh_dht, dht, key_pair, with_rtts, addrs_changed)
        if other_heads is not None:
            nursery.start_soon(_heartbeat_other_heads, host, key_pair, bootstrap_peer, with_rtts, other_heads)
        await _heartbeat(host, key_pair, bootstrap_peer, with_rtts)


class _Refusals:
    """What a head last said when it refused this worker's records: each reason is logged
    once, where the operator looks, not once a heartbeat or a redial."""

    def __init__(self):
        self.last: tuple[str, str] | None = None

    def heard(self, head: ID, msg: dict) -> None:
        reason = (str(msg.get("code", "")), str(msg.get("message", "")))
        if reason != self.last:
            self.last = reason
            code, message = (_printable(text, 300) for text in reason)
            log.warning("head %s refused this worker's record (%s): %s", head, code, message)


def _printable(text: str, limit: int) -> str:
    """A peer's text as one log line: no control characters, at most ``limit`` of them."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


async def _heartbeat(host, key_pair, bootstrap_peer, record_fn) -> None:
    refusals = _Refusals()
    while True:
        try:
            await _beat(host, key_pair, await connect(host, bootstrap_peer, timeout=10), record_fn, refusals)
        except Exception as e:  # the bootstrap is gone or restarting: dial again
            log.info("announce to bootstrap failed (%s); retrying", e)
            await trio.sleep(1.0)


async def _heartbeat_other_heads(host, key_pair, bootstrap_peer, record_fn, other_heads) -> None:
    """One heartbeat stream per head ``other_heads()`` names (at most ``MAX_OTHER_HEADS``),
    asked every ``EPOCH``. A head whose stream fails is dropped until it is named again: a
    head that left must not be redialed forever, and one that restarts is named again."""
    own = parse_peer(bootstrap_peer).peer_id
    beating: set[ID] = set()

    async def beat(peer: ID, addr: str) -> None:
        try:
            await _beat(host, key_pair, await connect(host, addr, timeout=10), record_fn, _Refusals())
        except Exception as e:
            log.info("announce to head %s failed (%s)", peer, e)
        finally:
            beating.discard(peer)

    async with trio.open_nursery() as nursery:
        while True:
            with trio.move_on_after(15):
                try:
                    for addr in await other_heads():
                        peer = parse_peer(addr).peer_id
                        if peer not in beating and peer not in (own, host.get_id()) \
                                and len(beating) < MAX_OTHER_HEADS:
                            beating.add(peer)
                            nursery.start_soon(beat, peer, addr)
                except Exception as e:  # the joined head is gone or restarting: ask again later
                    log.info("could not learn the swarm's other heads (%s)", e)
            await trio.sleep(EPOCH)


async def _beat(host, key_pair, peer: ID, record_fn, refusals: _Refusals) -> None:
    """Write a freshly signed record every ``HEARTBEAT`` seconds on one ``announce`` stream to
    ``peer`` until writing fails (raised) or this is cancelled (a leaving worker: the stream
    is reset, so the head drops it at once rather than after its missed heartbeats). The
    head answers only a record it refuses (another model, layers out of range, a dtype it
    does not take, a peer it does not admit): ``refusals`` logs why."""
    stream = await host.new_stream(peer, [ANNOUNCE])
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_refusals, stream, peer, refusals)
            while True:
                blob = sign_record(record_fn(), key_pair)
                await write_frame(stream, {"type": "announce", "record": blob}, timeout=10)
                await trio.sleep(HEARTBEAT)
    finally:
        await reset_stream(stream)


async def _read_refusals(stream, head: ID, refusals: _Refusals) -> None:
    while True:
        try:
            msg = await read_frame(stream, timeout=math.inf, raise_remote=False)
        except WireError:  # closed, reset or garbled: the writes fail next, and the worker redials
            return
        if msg.get("type") == "error":
            refusals.heard(head, msg)


async def _refresh_dht(dht, key_pair, record_fn, addrs_changed=None) -> None:
    while True:
        with trio.move_on_after(10):
            try:
                record = record_fn()
                await announce(dht, sign_record(record, key_pair))
                await provide_worker(dht, record.fingerprint)
            except Exception as e:
                log.info("DHT announce failed: %s", e)
        with trio.move_on_after(EPOCH):
            await (addrs_changed() if addrs_changed else trio.sleep_forever())
