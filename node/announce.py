"""A worker announcing itself: a heartbeat stream to the head and a signed record in the DHT,
carrying the round-trip times it measures to the peers it is connected to (node/pings.py)."""

from __future__ import annotations

import dataclasses
import logging
import time

import trio

from p2pserve import __version__
from p2pserve.net.host import connect
from p2pserve.net.protocols import ANNOUNCE, HEARTBEAT
from p2pserve.net.records import EPOCH, RECORD_TTL, WorkerRecord, announce, provide_worker, sign_record
from p2pserve.net.wire import write_frame
from p2pserve.node.pings import Pings

log = logging.getLogger("p2pserve.worker")


def make_record(host, server, *, stage: int, tp: int, devices: list[dict],
                group_id: str, addrs: list[str]) -> WorkerRecord:
    return WorkerRecord(
        peer_id=host.get_id().to_base58(), addrs=addrs, model=server.model_name,
        fingerprint=server.fingerprint, stage=stage, start=server.start, end=server.end, tp=tp,
        devices=devices, group_id=group_id, version=__version__, load=server.load(),
        expires_at=time.time() + RECORD_TTL,
    )


async def announce_forever(host, key_pair, bootstrap_peer, record_fn, dht=None, addrs_changed=None) -> None:
    """Heartbeat the bootstrap on one stream (re-dialing if it restarts) and keep the DHT
    record fresh, with the round-trip times of the latest pings; at once, too, whenever
    ``addrs_changed()`` returns (a relay slot lost or made: heads that hear of this worker
    only through the DHT must not dial a dead relay for long). Never returns; cancel it to
    leave."""
    pings = Pings(host)

    def with_rtts():
        return dataclasses.replace(record_fn(), rtts=pings.rtts())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pings.run)
        if dht is not None:  # a slow DHT put must never delay a heartbeat
            nursery.start_soon(_refresh_dht, dht, key_pair, with_rtts, addrs_changed)
        await _heartbeat(host, key_pair, bootstrap_peer, with_rtts)


async def _heartbeat(host, key_pair, bootstrap_peer, record_fn) -> None:
    while True:
        try:
            peer = await connect(host, bootstrap_peer, timeout=10)
            stream = await host.new_stream(peer, [ANNOUNCE])
            while True:
                blob = sign_record(record_fn(), key_pair)
                await write_frame(stream, {"type": "announce", "record": blob}, timeout=10)
                await trio.sleep(HEARTBEAT)
        except Exception as e:  # the bootstrap is gone or restarting: dial again
            log.info("announce to bootstrap failed (%s); retrying", e)
            await trio.sleep(1.0)


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
