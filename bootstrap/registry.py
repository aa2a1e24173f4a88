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

Routing (``best_chain``) is a shortest path over layer boundaries on measured figures: a
stage costs its layers at the peer's per-layer time, which is what the head *saw* it take
once there are observations (``observe``: each answer's per-token time, shared among its
chain's peers) and never less than the peer claims; a hop between two consecutive stages
costs the round-trip time the two peers announce (``WorkerRecord.rtts``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from p2pserve.net.protocols import HEARTBEAT, MISSED_HEARTBEATS
from p2pserve.net.records import RECORD_TTL, WorkerRecord

log = logging.getLogger("p2pserve.bootstrap")

MAX_CHAINS = 256  # enough for any sensible swarm; bounds the enumeration
STRIKES_TO_BAN = 2  # failed chains in a row, with no completed answer between them
BAN_BASE = 15.0  # seconds of a first ban; each later ban of the same peer doubles it
AVOID_COST = 1e3  # seconds added per peer of an earlier failed chain: route around it where possible
HOP_COST = 1e-3  # seconds per stage-to-stage hop of a pair of peers that announced no round-trip time
DEFAULT_LAYER_TIME = 1e-3  # seconds per layer of a peer whose record states none
MIN_LAYER_TIME = 1e-7  # seconds: no estimate goes below it (or below the peer's own claim)
# An observation's excess over the peer's claim halves every HALF_LIFE seconds, so a peer
# that was slow (overloaded, or a passing fault) is tried again and, if it recovered, seen so
OBSERVED_HALF_LIFE = 300.0
OBSERVED_RELAX = 0.5  # share of a residual applied per observation once every peer was observed
OBSERVED_WEIGHT = 0.25  # an observed peer's share of a residual, against 1 for a peer never observed


@dataclass
class Standing:
    strikes: int = 0
    bans: int = 0
    banned_until: float = 0.0  # monotonic
    reason: str = ""


@dataclass
class Observed:
    layer_time: float  # seconds per layer of one session's decode step, as last estimated
    at: float  # monotonic


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
    observed: dict[str, Observed] = field(default_factory=dict)
    # peer -> {peer: round-trip seconds}, symmetric, from both peers' records (_note_rtts)
    rtt: dict[str, dict[str, float]] = field(default_factory=dict)
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
        old = self.entries.get(record.peer_id)
        self.entries[record.peer_id] = Entry(record, time.monotonic() if now is None else now)
        self._note_rtts(record, old.record.rtts if old else {})

    def update_from_dht(self, record: WorkerRecord) -> bool:
        """A record read from the DHT: kept until it expires, unless the worker has a stream
        here (fresher) or its stream closed after this record was signed (it left)."""
        entry = self.entries.get(record.peer_id)
        if (entry is not None and entry.via_stream) or record.expires_at <= self.departed.get(record.peer_id, 0):
            return False
        self.entries[record.peer_id] = Entry(record, time.monotonic(), via_stream=False)
        self._note_rtts(record, entry.record.rtts if entry else {})
        return entry is None

    def remove(self, peer_id: str) -> None:
        entry = self.entries.pop(peer_id, None)
        if entry is not None:  # its DHT copies, signed before it left, must not bring it back:
            # not only the last record its stream carried, but any it put in the DHT since
            # (a refresh between two heartbeats expires later than the last heartbeat)
            self.departed[peer_id] = max(entry.record.expires_at, time.time() + RECORD_TTL)
            self._note_rtts(dataclasses.replace(entry.record, rtts={}), entry.record.rtts)
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
        banned = {p for p, s in self.standing.items() if s.banned_until > now_mono}
        recs = [e.record for e in self.entries.values()
                if e.record.model == self.model and e.record.fingerprint == self.fingerprint
                and e.record.peer_id not in banned]
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
        """The cheapest chain: a shortest path over layer boundaries, as Petals' client routes.

        A chain's cost is its stages' ``stage_cost`` plus a ``hop_cost`` between each two
        consecutive peers. The hop depends on the pair, so the search runs over workers
        (the cheapest chain prefix ending with each), not over boundaries; every range
        moves forward (start < end, checked on acceptance), so the graph is acyclic and
        workers taken in order of their first layer is a topological order: one pass, no
        heap. A worker's cheapest predecessor is found among the few peers it has a
        round-trip time with, and else the cheapest of the rest (at ``HOP_COST``). Peers in
        ``avoid`` (of a chain that failed this answer) cost ``AVOID_COST`` more: used only
        where no chain goes around them. ``records`` (default: the routable ones), ``start``
        and ``end`` search among other workers or over part of the model."""
        end = self.n_layers if end is None else end
        now = time.monotonic()
        workers = sorted((r for r in (self.routable() if records is None else records)
                          if r.peer_id not in exclude and start <= r.start and r.end <= end),
                         key=lambda r: r.start)
        # ending[pos]: peer -> cost of the cheapest chain prefix from start that ends with it at pos
        ending: dict[int, dict[str, float]] = {start: {}}
        ranked: dict[int, list[tuple[float, str]]] = {}  # ending[pos] cheapest first, once complete
        came: dict[str, str | None] = {}
        by_id: dict[str, WorkerRecord] = {}
        observed, inflight, inf = self.observed, self.inflight, float("inf")
        for r in workers:  # stage_cost, inlined: this loop is the routing time
            before = ending.get(r.start)
            if r.start == start:
                prefix, prev = 0.0, None
            elif not before:
                continue  # no chain from start reaches this worker's first layer
            else:
                prefix, prev = self._cheapest_before(r.peer_id, before, ranked, r.start)
            peer = r.peer_id
            claim = _claim(r)
            per_layer = claim if peer not in observed else max(claim, self._estimate(peer, claim, now))
            sessions = max(r.load.get("sessions", 0), inflight[peer])
            cost = prefix + (r.end - r.start) * per_layer * (1 + 0.25 * sessions + r.load.get("queue", 0))
            if peer in avoid:
                cost += AVOID_COST
            at_end = ending.get(r.end)
            if at_end is None:
                at_end = ending[r.end] = {}
            if cost < at_end.get(peer, inf):
                at_end[peer], came[peer], by_id[peer] = cost, prev, r
        last = ending.get(end)
        if not last or end == start:
            return None
        peer = min(last, key=lambda p: (last[p], p))
        chain = []
        while peer is not None:
            chain.append(by_id[peer])
            peer = came[peer]
        return chain[::-1]

    def _cheapest_before(self, peer: str, before: dict[str, float], ranked: dict, pos: int):
        """(cost, peer) of the cheapest chain prefix ending at ``pos`` that ``peer`` can
        follow, the hop to it included."""
        known = self.rtt.get(peer, {})
        best, prev = float("inf"), None
        if len(before) < len(known):  # walk the shorter of the two maps
            for q, cost in before.items():
                rtt = known.get(q)
                if rtt is not None and cost + rtt < best:
                    best, prev = cost + rtt, q
        else:
            for q, rtt in known.items():
                cost = before.get(q)
                if cost is not None and cost + rtt < best:
                    best, prev = cost + rtt, q
        order = ranked.get(pos)
        if order is None:  # every worker ending at pos came earlier in the pass: it is complete
            order = ranked[pos] = sorted((c, q) for q, c in before.items())
        for c, q in order:  # the cheapest peer without a measured hop to this one
            if q not in known:
                if c + HOP_COST < best:
                    best, prev = c + HOP_COST, q
                break
        return best, prev

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

    def stage_cost(self, r: WorkerRecord, now: float | None = None) -> float:
        """Expected seconds one stage adds to a decode step: its layers at ``layer_time``,
        slowed by the sessions it serves.

        A batched decode step costs little more than a single one (weights are read once),
        so each extra session adds a fraction of a step; queued sessions add whole ones."""
        claim = _claim(r)
        return (r.end - r.start) * max(claim, self._estimate(r.peer_id, claim, now)) * self.load_factor(r)

    def load_factor(self, r: WorkerRecord) -> float:  # (best_chain has it inlined)
        sessions = max(r.load.get("sessions", 0), self.inflight[r.peer_id])
        return 1 + 0.25 * sessions + r.load.get("queue", 0)

    def claimed(self, peer: str) -> float:
        """Seconds per layer the peer's record states (the worker's own benchmark)."""
        entry = self.entries.get(peer)
        return _claim(entry.record) if entry is not None else DEFAULT_LAYER_TIME

    def estimate(self, peer: str, now: float | None = None) -> float:
        """Seconds per layer as observed, the excess over the claim decaying with age; the
        claim while there is no observation."""
        return self._estimate(peer, self.claimed(peer), now)

    def _estimate(self, peer: str, claim: float, now: float | None) -> float:
        seen = self.observed.get(peer)
        if seen is None:
            return claim
        age = (time.monotonic() if now is None else now) - seen.at
        return claim + (seen.layer_time - claim) * 0.5 ** (age / OBSERVED_HALF_LIFE)

    def layer_time(self, peer: str, now: float | None = None) -> float:
        """Seconds per layer that routing assumes: never less than claimed (a claim is a
        promise, not a measurement), nor than the head saw the peer take."""
        return max(self.claimed(peer), self.estimate(peer, now))

    def hop_cost(self, a: str, b: str) -> float:
        return self.rtt.get(a, {}).get(b, HOP_COST)

    def _note_rtts(self, record: WorkerRecord, old: dict) -> None:
        """Keep ``rtt`` in step with the round trips ``record`` announces (``old``: what
        its previous record announced).

        A round trip is reported by each of its two ends, and either may lie to look close
        to the other: a pair's figure is the larger of the two where both reported, the one
        figure where only one did. Two colluding ends can still claim a fast hop; the time
        observed through chains (``observe``) catches what that hides."""
        if record.rtts == old:
            return
        me = record.peer_id
        for q in set(old) | set(record.rtts):
            theirs = self.entries[q].record.rtts.get(me) if q in self.entries else None
            figures = [x for x in (record.rtts.get(q), theirs) if x is not None]
            if figures:
                self.rtt.setdefault(me, {})[q] = self.rtt.setdefault(q, {})[me] = max(figures)
            else:
                self.rtt.get(me, {}).pop(q, None)
                self.rtt.get(q, {}).pop(me, None)
        for p in [p for p in (me, *record.rtts, *old) if p in self.rtt and not self.rtt[p]]:
            del self.rtt[p]

    def observe(self, chain, seconds_per_token: float, now: float | None = None) -> None:
        """An answer's decode steps through ``chain`` (records or hops: peer_id, start,
        end) took ``seconds_per_token`` each, as the head saw them arrive.

        The time less the chain's hops is shared among its peers as a projection (one
        Kaczmarz step on "the sum of the stages' layers x per-layer time = what was seen"):
        in proportion to each stage's layers and load, not to its current estimate, or a
        peer claiming near-zero time would pass its slowness to the honest peers of its
        chains. Peers never observed take the larger share (their claim is no evidence),
        no estimate drops below the peer's claim, and over many chains the estimates
        converge on the figures that explain what was seen."""
        now = time.monotonic() if now is None else now
        peers = [h.peer_id for h in chain]
        hops = sum(self.hop_cost(a, b) for a, b in zip(peers, peers[1:]))
        scale = {h.peer_id: (h.end - h.start) * (self.load_factor(self.entries[h.peer_id].record)
                                                 if h.peer_id in self.entries else 1.0) for h in chain}
        x = {p: self.estimate(p, now) for p in peers}
        floor = {p: self.claimed(p) for p in peers}
        weight = {p: OBSERVED_WEIGHT if p in self.observed else 1.0 for p in peers}
        predicted = sum(scale[p] * x[p] for p in peers)
        relax = OBSERVED_RELAX if all(p in self.observed for p in peers) else 1.0
        goal = predicted + relax * (seconds_per_token - hops - predicted)
        free = set(peers)
        while free:  # a peer pushed below its claim stays there; the rest is shared again
            residual = goal - sum(scale[p] * x[p] for p in peers)
            norm = sum(weight[p] * scale[p] ** 2 for p in free)
            if norm <= 0:
                break
            for p in free:
                x[p] += residual * weight[p] * scale[p] / norm
            clamped = {p for p in free if x[p] < floor[p]}
            if not clamped:
                break
            for p in clamped:
                x[p] = floor[p]
            free -= clamped
        for p in peers:
            self.observed[p] = Observed(x[p], now)
        if len(self.observed) > 2 * len(self.entries) + 64:  # forget peers gone long enough to decay
            for p in [p for p, seen in self.observed.items() if now - seen.at > 10 * OBSERVED_HALF_LIFE]:
                del self.observed[p]


def _claim(r: WorkerRecord) -> float:
    per_layer = r.devices[0].get("layer_time")  # a record has 1 to 64 devices (checked on acceptance)
    if not isinstance(per_layer, (int, float)):  # records bound numbers, not which fields hold them
        return DEFAULT_LAYER_TIME
    return max(float(per_layer), MIN_LAYER_TIME)
