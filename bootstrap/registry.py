"""The bootstrap's live view of the swarm: which workers hold which layers, right now.

A worker is in the view while its announce stream is open and its last signed record
is fresh; it leaves the view when the stream dies (a killed process closes it within
milliseconds), when it misses heartbeats (a frozen one), or when its record expires.
From the view come *chains*: sequences of workers whose layer ranges join up to cover
the model, the unit a query is routed to.

Every peer may lie or break, so the view also keeps each peer's *standing*: a strike for
each failed chain it was part of, cleared by an answer it helped complete; a peer with
``STRIKES_TO_BAN`` strikes in a row, or caught returning wrong results, is banned (out of
every chain) for ``BAN_BASE`` seconds, doubled on each repeat, as Petals does.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from p2pserve.net.protocols import HEARTBEAT, MISSED_HEARTBEATS
from p2pserve.net.records import WorkerRecord

log = logging.getLogger("p2pserve.bootstrap")

MAX_CHAINS = 256  # enough for any sensible swarm; bounds the enumeration
STRIKES_TO_BAN = 2  # failed chains in a row, with no completed answer between them
BAN_BASE = 15.0  # seconds of a first ban; each later ban of the same peer doubles it
AVOID_COST = 1e3  # seconds added per peer of an earlier failed chain: route around it where possible


@dataclass
class Standing:
    strikes: int = 0
    bans: int = 0
    banned_until: float = 0.0  # monotonic
    reason: str = ""


@dataclass
class Entry:
    record: WorkerRecord
    last_seen: float  # monotonic
    via_stream: bool = True  # heard on its announce stream; else only read from the DHT


@dataclass
class Registry:
    model: str
    fingerprint: str
    n_layers: int
    entries: dict[str, Entry] = field(default_factory=dict)
    # sessions this bootstrap routed to each peer and that are still running: fresher
    # than the load in records, so a burst of queries spreads over replicas at once
    inflight: Counter = field(default_factory=Counter)
    standing: dict[str, Standing] = field(default_factory=dict)
    departed: dict[str, float] = field(default_factory=dict)  # peer -> expiry of its last record
    # With admission on, a worker carries user traffic only once admitted (bootstrap/integrity.py)
    admission: bool = False
    admitted: set[str] = field(default_factory=set)
    _rr: itertools.count = field(default_factory=itertools.count)

    def banned(self, peer_id: str) -> bool:
        s = self.standing.get(peer_id)
        return s is not None and s.banned_until > time.monotonic()

    def ban(self, peer_id: str, reason: str) -> float:
        """Keep ``peer_id`` out of every chain for a cooldown that doubles on each ban; its seconds."""
        s = self.standing.setdefault(peer_id, Standing())
        s.bans += 1
        s.strikes = 0
        seconds = BAN_BASE * 2 ** min(s.bans - 1, 10)
        s.banned_until, s.reason = time.monotonic() + seconds, reason
        log.warning("banned worker %s for %.0f s: %s", peer_id, seconds, reason)
        return seconds

    def bans(self) -> dict[str, dict]:
        """The peers banned now: seconds left and why."""
        now = time.monotonic()
        return {p: {"seconds_left": round(s.banned_until - now, 1), "reason": s.reason}
                for p, s in self.standing.items() if s.banned_until > now}

    def failed(self, peers, reason: str) -> None:
        """A chain of ``peers`` failed: a strike each, a ban at ``STRIKES_TO_BAN`` in a row."""
        for p in peers:
            s = self.standing.setdefault(p, Standing())
            s.strikes += 1
            if s.strikes >= STRIKES_TO_BAN:
                self.ban(p, f"{s.strikes} failed chains in a row, the last: {reason}")

    def succeeded(self, peers) -> None:
        for p in peers:
            if p in self.standing:
                self.standing[p].strikes = 0

    def update(self, record: WorkerRecord, now: float | None = None) -> None:
        """A record from the worker's own announce stream."""
        self.entries[record.peer_id] = Entry(record, time.monotonic() if now is None else now)

    def update_from_dht(self, record: WorkerRecord) -> bool:
        """A record read from the DHT: kept until it expires, unless the worker has a stream
        here (fresher) or its stream closed after this record was signed (it left)."""
        entry = self.entries.get(record.peer_id)
        if (entry is not None and entry.via_stream) or record.expires_at <= self.departed.get(record.peer_id, 0):
            return False
        self.entries[record.peer_id] = Entry(record, time.monotonic(), via_stream=False)
        return entry is None

    def remove(self, peer_id: str) -> None:
        entry = self.entries.pop(peer_id, None)
        if entry is not None:  # its DHT copies, signed before it left, must not bring it back
            self.departed[peer_id] = entry.record.expires_at
        self.admitted.discard(peer_id)  # a worker that comes back is checked again

    def routable(self) -> list[WorkerRecord]:
        """The live workers user traffic may go to: admitted ones, where admission is on."""
        return [r for r in self.live() if not self.admission or r.peer_id in self.admitted]

    def on_probation(self) -> list[WorkerRecord]:
        return [r for r in self.live() if self.admission and r.peer_id not in self.admitted]

    def live(self, now: float | None = None) -> list[WorkerRecord]:
        """Records of this model that are fresh, sorted by (start, peer id) for determinism."""
        now_mono = time.monotonic() if now is None else now
        wall = time.time()
        stale = [p for p, e in self.entries.items()
                 if (e.via_stream and now_mono - e.last_seen > HEARTBEAT * MISSED_HEARTBEATS)
                 or e.record.expires_at < wall]
        for p in stale:
            self.remove(p)
        for p in [p for p, expiry in self.departed.items() if expiry < wall]:
            del self.departed[p]
        recs = [e.record for e in self.entries.values()
                if e.record.model == self.model and e.record.fingerprint == self.fingerprint
                and not self.banned(e.record.peer_id)]
        return sorted(recs, key=lambda r: (r.start, r.end, r.peer_id))

    def chains(self, exclude: frozenset[str] = frozenset()) -> list[list[WorkerRecord]]:
        """Chains of live workers covering layers 0..n_layers (up to MAX_CHAINS), in a
        fixed order. Depth-first with an explicit stack: peers' input never drives recursion,
        and every record's range is non-empty (checked on acceptance), so it always ends."""
        by_start: dict[int, list[WorkerRecord]] = {}
        for r in self.routable():
            if r.peer_id not in exclude:
                by_start.setdefault(r.start, []).append(r)
        out: list[list[WorkerRecord]] = []
        stack: list[tuple[int, tuple[WorkerRecord, ...]]] = [(0, ())]
        while stack and len(out) < MAX_CHAINS:
            pos, chain = stack.pop()
            if pos == self.n_layers:
                out.append(list(chain))
                continue
            for r in reversed(by_start.get(pos, [])):
                if r.end <= self.n_layers:
                    stack.append((r.end, chain + (r,)))
        return out

    def best_chain(self, exclude: frozenset[str] = frozenset(), avoid: frozenset[str] = frozenset(),
                   records: list[WorkerRecord] | None = None, start: int = 0,
                   end: int | None = None) -> list[WorkerRecord] | None:
        """The cheapest chain by ``stage_cost``: a shortest path over layer boundaries
        (Dijkstra, as Petals' client routes), so its cost does not grow with the number of
        chains. Peers in ``avoid`` (of a chain that failed this answer) cost ``AVOID_COST``
        more: used only where no chain goes around them. ``records`` (default: the routable
        ones), ``start`` and ``end`` search among other workers or over part of the model."""
        end = self.n_layers if end is None else end
        by_start: dict[int, list[WorkerRecord]] = {}
        for r in self.routable() if records is None else records:
            if r.peer_id not in exclude and r.end <= end:
                by_start.setdefault(r.start, []).append(r)
        best = {start: 0.0}
        came: dict[int, tuple[int, WorkerRecord]] = {}
        heap = [(0.0, start)]
        while heap:
            cost, pos = heapq.heappop(heap)
            if pos == end:
                chain = []
                while pos != start:
                    pos, r = came[pos]
                    chain.append(r)
                return chain[::-1]
            if cost > best.get(pos, float("inf")):
                continue
            for r in by_start.get(pos, []):
                c = cost + self.stage_cost(r) + (AVOID_COST if r.peer_id in avoid else 0.0)
                if c < best.get(r.end, float("inf")):
                    best[r.end], came[r.end] = c, (pos, r)
                    heapq.heappush(heap, (c, r.end))
        return None

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
            bans = self.bans()
            banned = [e.record for p, e in self.entries.items() if p in bans
                      and any(e.record.start < b and a < e.record.end for a, b in gaps)]
            if banned:  # there is a worker, but it failed: say so, and why
                r = banned[0]
                return (f"layers {ranges} of {self.model} have no worker in good standing: {r.peer_id} "
                        f"(layers {r.start}-{r.end}) is banned for {bans[r.peer_id]['seconds_left']:.0f} s "
                        f"({bans[r.peer_id]['reason']})")
            return f"layers {ranges} of {self.model} have no worker"
        if self.on_probation():
            return (f"workers of {self.model} are being checked before they carry queries "
                    f"({len(self.on_probation())} on probation); retry in a few seconds")
        return (f"the workers of {self.model} cover every layer, but their layer ranges do not join "
                f"up into a chain ({', '.join(f'{a}-{b}' for a, b in covered)})")

    def pick(self, pipeline: int | None = None, exclude: frozenset[str] = frozenset(),
             policy: str = "round-robin", avoid: frozenset[str] = frozenset()) -> list[WorkerRecord] | None:
        if policy == "least-loaded" and pipeline is None:
            return self.best_chain(exclude, avoid)
        chains = self.chains(exclude)
        if not chains:
            return None
        if pipeline is not None:
            return chains[pipeline] if pipeline < len(chains) else None
        fewest = min(sum(r.peer_id in avoid for r in c) for c in chains)
        chains = [c for c in chains if sum(r.peer_id in avoid for r in c) == fewest]
        return chains[next(self._rr) % len(chains)]

    def stage_cost(self, r: WorkerRecord) -> float:
        """Expected seconds one stage adds to a decode step: its layers at its measured
        speed, slowed by the sessions it serves, plus one hop.

        A batched decode step costs little more than a single one (weights are read once),
        so each extra session adds a fraction of a step; queued sessions add whole ones."""
        per_layer = (r.devices[0] if r.devices else {}).get("layer_time")
        if not isinstance(per_layer, (int, float)):  # records bound numbers, not which fields hold them
            per_layer = 1e-3
        sessions = max(int(r.load.get("sessions", 0)), self.inflight[r.peer_id])
        queued = int(r.load.get("queue", 0))
        return (r.end - r.start) * per_layer * (1 + 0.25 * sessions + queued) + HOP_COST


HOP_COST = 1e-3  # seconds per stage-to-stage hop on a LAN (bench/hop.py measures ~1 ms on loopback)
