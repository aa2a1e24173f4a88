"""A head reads the swarm's workers from the DHT, not only from its own announce streams.

Every worker lists itself under its model's provider key (``records.workers_key``) and
keeps its signed record under its own key; a head looks the key up every ``EPOCH``
seconds and reads the record of each worker it does not already hear from. So a head
finds workers that joined through another head (or through a worker), and a swarm keeps
its memory when a head dies. The announce stream stays the fast signal: a worker heard
on one is not read from the DHT, and one whose stream closed is not brought back by its
own older records (``Registry.update_from_dht``).
"""

from __future__ import annotations

import logging

import trio

from p2pserve.net.records import EPOCH, fetch_record, find_workers

log = logging.getLogger("p2pserve.bootstrap")

LOOKUP_TIMEOUT = 10.0  # seconds for one provider lookup or record read


async def discover_forever(node, dht) -> None:
    """Keep ``node``'s registry filled from the DHT (never returns)."""
    while True:
        with trio.move_on_after(LOOKUP_TIMEOUT):
            try:
                await discover_once(node, dht)
            except Exception as e:  # a DHT that is down or lies must not stop the head
                log.info("DHT discovery failed: %s", e)
        await trio.sleep(EPOCH / 2)


async def discover_once(node, dht) -> int:
    """One lookup; the number of workers it added to the view."""
    registry = node.registry
    added = 0
    for peer_id in await find_workers(dht, node.config.fingerprint()):
        entry = registry.entries.get(peer_id)
        if entry is not None and entry.via_stream:
            continue
        if node.allowed_peers is not None and peer_id not in node.allowed_peers:
            continue
        with trio.move_on_after(LOOKUP_TIMEOUT):
            record = await fetch_record(dht, peer_id)  # checked: signed by its peer, fresh, in bounds
            if record is None or node.record_problem(record) is not None:
                continue
            if registry.update_from_dht(record):
                added += 1
                log.info("worker %s found in the DHT: layers %d-%d", peer_id, record.start, record.end)
    return added
