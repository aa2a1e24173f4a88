"""The bootstrap's live view of the swarm: which workers hold which layers, right now.

A worker is in the view while its announce stream is open and its last signed record
is fresh; it leaves the view when the stream dies (a killed process closes it within
milliseconds), when it misses heartbeats (a frozen one), or when its record expires.
From the view come *chains*: sequences of workers whose layer ranges join up to cover
the model, the unit a query is routed to.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

from p2pserve.net.protocols import HEARTBEAT, MISSED_HEARTBEATS
from p2pserve.net.records import WorkerRecord

MAX_CHAINS = 256  # enough for any sensible swarm; bounds the enumeration


@dataclass
class Entry:
    record: WorkerRecord
    last_seen: float  # monotonic


@dataclass
class Registry:
    model: str
    fingerprint: str
    n_layers: int
    entries: dict[str, Entry] = field(default_factory=dict)
    # sessions this bootstrap routed to each peer and that are still running: fresher
    # than the load in records, so a burst of queries spreads over replicas at once
    inflight: Counter = field(default_factory=Counter)
    _rr: itertools.count = field(default_factory=itertools.count)

    def update(self, record: WorkerRecord, now: float | None = None) -> None:
        self.entries[record.peer_id] = Entry(record, time.monotonic() if now is None else now)

    def remove(self, peer_id: str) -> None:
        self.entries.pop(peer_id, None)

    def live(self, now: float | None = None) -> list[WorkerRecord]:
        """Records of this model that are fresh, sorted by (start, peer id) for determinism."""
        now_mono = time.monotonic() if now is None else now
        wall = time.time()
        stale = [p for p, e in self.entries.items()
                 if now_mono - e.last_seen > HEARTBEAT * MISSED_HEARTBEATS or e.record.expires_at < wall]
        for p in stale:
            del self.entries[p]
        recs = [e.record for e in self.entries.values()
                if e.record.model == self.model and e.record.fingerprint == self.fingerprint]
        return sorted(recs, key=lambda r: (r.start, r.end, r.peer_id))

    def chains(self, exclude: frozenset[str] = frozenset()) -> list[list[WorkerRecord]]:
        """Every chain of live workers covering layers 0..n_layers (up to MAX_CHAINS)."""
        by_start: dict[int, list[WorkerRecord]] = {}
        for r in self.live():
            if r.peer_id not in exclude:
                by_start.setdefault(r.start, []).append(r)
        out: list[list[WorkerRecord]] = []

        def extend(chain, pos):
            if len(out) >= MAX_CHAINS:
                return
            if pos == self.n_layers:
                out.append(list(chain))
                return
            for r in by_start.get(pos, []):
                chain.append(r)
                extend(chain, r.end)
                chain.pop()

        extend([], 0)
        return out

    def missing(self) -> str:
        """Why there is no complete chain, in words a user can act on."""
        covered = sorted((r.start, r.end) for r in self.live())
        gaps, pos = [], 0
        for start, end in covered:
            if start > pos:
                gaps.append((pos, start))
            pos = max(pos, end)
        if pos < self.n_layers:
            gaps.append((pos, self.n_layers))
        if gaps:
            ranges = ", ".join(f"{a}-{b}" for a, b in gaps)
            return f"layers {ranges} of {self.model} have no worker"
        return (f"the workers of {self.model} cover every layer, but their layer ranges do not join "
                f"up into a chain ({', '.join(f'{a}-{b}' for a, b in covered)})")

    def pick(self, pipeline: int | None = None, exclude: frozenset[str] = frozenset(),
             policy: str = "round-robin") -> list[WorkerRecord] | None:
        chains = self.chains(exclude)
        if not chains:
            return None
        if pipeline is not None:
            return chains[pipeline] if pipeline < len(chains) else None
        if policy == "least-loaded":
            return min(enumerate(chains), key=lambda ic: (self.chain_cost(ic[1]), ic[0]))[1]
        return chains[next(self._rr) % len(chains)]

    def chain_cost(self, chain: list[WorkerRecord]) -> float:
        """Expected seconds per decode step of a chain: each stage's layers at its
        measured speed, slowed by the sessions it serves, plus one hop per stage.

        A batched decode step costs little more than a single one (weights are read once),
        so each extra session adds a fraction of a step; queued sessions add whole ones."""
        total = 0.0
        for r in chain:
            per_layer = float((r.devices[0] if r.devices else {}).get("layer_time", 1e-3))
            sessions = max(int(r.load.get("sessions", 0)), self.inflight[r.peer_id])
            queued = int(r.load.get("queue", 0))
            total += (r.end - r.start) * per_layer * (1 + 0.25 * sessions + queued) + HOP_COST
        return total


HOP_COST = 1e-3  # seconds per stage-to-stage hop on a LAN (bench/hop.py measures ~1 ms on loopback)
