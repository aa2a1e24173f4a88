"""The p2pserve protocols spoken between peers, and the plain data they carry.

    announce   worker -> bootstrap   a signed WorkerRecord every HEARTBEAT seconds on one
                                     long-lived stream; the stream dying drops the worker
    plan       worker -> bootstrap   which model, fingerprint and plan the swarm serves
    session    upstream -> stage     one inference session through a chain of stages:
                                     'open' travels down the chain, then 'step' frames
                                     (hidden states) go down and 'token' frames come back
    link       stage -> next stage  the decode steps of all sessions between two workers,
                                     batched: one 'steps' frame down, one 'tokens' frame back
                                     (none for ring steps)
    ring       stage 0 -> last stage the last stage's tokens for stage 0's sessions, straight
                                     back (opened by stage 0, which may not be dialable)
    query      client -> bootstrap   a prompt in, a stream of tokens and text out
    status     anyone -> bootstrap   the live view: workers, complete chains, what is missing
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from p2pserve.net.wire import protocol_id

ANNOUNCE = protocol_id("announce")
PLAN = protocol_id("plan")
SESSION = protocol_id("session")
LINK = protocol_id("link")
RING = protocol_id("ring")
QUERY = protocol_id("query")
STATUS = protocol_id("status")

HEARTBEAT = 2.0  # seconds between a worker's announcements on its stream
MISSED_HEARTBEATS = 3  # a worker silent this many heartbeats is dropped
DEFAULT_PORT = 31337  # the bootstrap's default TCP port
# Stage 0 sends an answer's tokens to the bootstrap at most once per this many seconds
# (the first at once): each libp2p write costs Python at stage 0, the bootstrap and the
# client, on cores that compute the next token. The bootstrap chooses it per session.
STREAM_INTERVAL = 0.1
MAX_STREAM_INTERVAL = 1.0
# How a decode step's token gets back to stage 0: straight from the last stage ("ring",
# k link crossings per step for k stages), or relayed back by every stage ("relay",
# 2(k-1)). Stage 0 chooses per session (worker --token-path); the chain follows.
TOKEN_PATHS = ("ring", "relay")


@dataclass(frozen=True)
class Hop:
    """One stage of a chosen chain, as the session 'open' message names it."""

    peer_id: str
    addrs: tuple[str, ...]
    start: int
    end: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["addrs"] = list(self.addrs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Hop":
        return cls(str(d["peer_id"]), tuple(d["addrs"]), int(d["start"]), int(d["end"]))
