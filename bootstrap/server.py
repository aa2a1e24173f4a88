"""The bootstrap (head) peer: registry of workers, router, and the query protocol.

A query arrives from a client; the bootstrap tokenizes it, picks a chain, opens a
session on the chain's stage 0 (which opens the rest of the chain itself), and streams
the tokens stage 0 reports back to the client as text. It keeps the session's tokens,
so that when a stage dies mid-answer it replays prompt + generated tokens through
another chain and the client sees one unbroken answer.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.exceptions import BaseLibp2pError

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import REQUEST_CODES, ConfigError, P2PServeError
from p2pserve.net.host import dial
from p2pserve.plan import Plan
from p2pserve.net.protocols import HEARTBEAT, MISSED_HEARTBEATS, SESSION, STREAM_INTERVAL, Hop
from p2pserve.net.records import RecordError, WorkerRecord, verify_record
from p2pserve.net.tickets import sign_head_cert, sign_ticket
from p2pserve.engine.generate import Sampled, SamplingParams, check_sampled
from p2pserve.net.wire import (
    RemoteError,
    WireError,
    error_frame,
    read_frame,
    reset_stream,
    write_frame,
    write_frames,
)

from p2pserve.bootstrap.registry import Registry

log = logging.getLogger("p2pserve.bootstrap")

FIRST_TOKEN_TIMEOUT = 120.0  # seconds for a session to open and prefill
# A chain that stops producing tokens for 20x its recent token interval (at least
# MIN_TOKEN_TIMEOUT, at most TOKEN_TIMEOUT) counts as failed: a frozen peer or a cut link.
TOKEN_TIMEOUT = 30.0
MIN_TOKEN_TIMEOUT = 10.0
MAX_ATTEMPTS = 4  # chains tried for one answer before giving up
MAX_OTHER_HEADS = 8  # heads a head names to its workers (relays for those behind NATs)


class Bootstrap:
    def __init__(self, host, config: ModelConfig, tokenizer, plans: list[Plan], *, policy: str = "round-robin",
                 stream_interval: float = STREAM_INTERVAL, allowed_peers: frozenset[str] | None = None,
                 worker_dtypes: frozenset[str] | None = None):
        self.host = host
        self.key_pair = KeyPair(host.get_private_key(), host.get_public_key())  # signs session tickets
        self.allowed_peers = allowed_peers  # --allow-peers: the only peer ids admitted as workers
        self.worker_dtypes = worker_dtypes  # --worker-dtype: the only weights' dtypes workers may run
        self._announcers: dict[str, object] = {}  # peer id -> its open announce stream
        self.head_cert: bytes | None = None  # from the head this one joined through, if any
        self.certified_by: str | None = None  # that head
        self.certify_heads = False  # may other heads join through this one (a private swarm)?
        self.other_heads: dict[str, str] = {}  # peer id -> a multiaddr of another head of the swarm
        self.stream_interval = stream_interval
        self.config = config
        self.tokenizer = tokenizer
        self.plans = plans
        self.policy = policy
        self.registry = Registry(config.name, config.fingerprint(), config.n_layers)
        self.stats = {"queries": 0, "failovers": 0}
        from p2pserve.metrics import BootstrapMetrics
        self.metrics = BootstrapMetrics(self)  # /metrics on the HTTP port

    # ---- workers ---------------------------------------------------------------------

    planning = None  # bootstrap.planning.Planning (set by serve): published plans, --stage auto
    spot_checks = None  # bootstrap.integrity.SpotChecks (set by serve): answers checked on a second chain

    def plan_info(self) -> dict:
        if self.planning is not None:
            self.plans = self.planning.plans()
        heads = [self.host.get_id().to_base58()] + ([self.certified_by] if self.certified_by else [])
        return {"type": "plan", "model": self.config.name, "fingerprint": self.config.fingerprint(), "heads": heads,
                "other_heads": list(self.other_heads.values()),
                "config": self.config.to_dict(), "plans": [p.to_dict() for p in self.plans]}

    def note_head(self, peer: str, addrs) -> None:
        """Remember another head of the swarm at the first of ``addrs`` that names it: plan
        replies pass it on, and a worker behind a NAT reserves a second relay slot there."""
        for a in addrs if isinstance(addrs, list) else []:
            if isinstance(a, str) and len(a) <= 512 and a.endswith(f"/p2p/{peer}") and "/p2p-circuit" not in a:
                self.other_heads.pop(peer, None)
                self.other_heads[peer] = a  # the latest joiner last; the oldest is forgotten first
                while len(self.other_heads) > MAX_OTHER_HEADS:
                    del self.other_heads[next(iter(self.other_heads))]
                return

    async def handle_plan(self, stream) -> None:
        try:
            request = await read_frame(stream, timeout=10)
            reply = self.plan_info()
            peer = stream.muxed_conn.peer_id.to_base58()
            if self.planning is not None and "auto" in request:  # a --stage auto worker: where to serve
                reply = self.planning.answer(reply, peer, request["auto"])
            if request.get("head") is True:  # another head joining the swarm through this one
                if not (self.certify_heads or (self.allowed_peers is not None and peer in self.allowed_peers)):
                    raise P2PServeError("this head certifies no other heads: in an open swarm anyone could "
                                        "then issue session tickets; start the heads with --swarm-key, or list "
                                        f"{peer} in this head's --allow-peers", code="forbidden")
                reply["head_cert"] = sign_head_cert(self.key_pair, peer)
                self.note_head(peer, request.get("addrs"))
                log.info("head %s joined the swarm", peer)
            await write_frame(stream, reply)
            await stream.close()
        except (WireError, EOFError):
            await reset_stream(stream)
        except P2PServeError as e:
            await _try_send(stream, error_frame(e.code, e.message))

    def status(self) -> dict:
        chains = self.registry.chains()
        return {"type": "status", "head": self.host.get_id().to_base58(), "model": self.config.name,
                "plans": [p.to_dict() for p in self.plans],
                "workers": [dataclasses.asdict(r) for r in self.registry.live()],
                "chains": [[r.peer_id for r in c] for c in chains],
                "missing": "" if chains else self.registry.missing(), "stats": dict(self.stats),
                "spot_checks": dict(self.spot_checks.stats) if self.spot_checks else None,
                "banned": self.registry.bans()}

    async def handle_status(self, stream) -> None:
        try:
            await read_frame(stream, timeout=10)
            await write_frame(stream, self.status())
            await stream.close()
        except (WireError, EOFError):
            await reset_stream(stream)

    def record_problem(self, record) -> tuple[str, str] | None:
        """(code, message) if a valid record is not one of this swarm's workers."""
        if record.fingerprint != self.config.fingerprint() or record.model != self.config.name:
            return ("unknown_model", f"this swarm serves {self.config.name} (fingerprint "
                                     f"{self.config.fingerprint()}), not {record.model} ({record.fingerprint})")
        if record.end > self.config.n_layers:
            return ("bad_request", f"layers {record.start}-{record.end} are outside {self.config.name}'s "
                                   f"{self.config.n_layers} layers")
        dtype = record.precision[0]
        if self.worker_dtypes is not None and dtype not in self.worker_dtypes:
            # what a worker runs is its own claim: the operator's pin keeps honest ones to the
            # precisions the swarm's checks compare, and a liar is a liar about any dtype
            return ("forbidden", f"this swarm's head takes workers running {', '.join(sorted(self.worker_dtypes))} "
                                 f"(its --worker-dtype), not {dtype or 'an unnamed dtype'}")
        return None

    async def handle_announce(self, stream) -> None:
        """One worker's heartbeat stream: every frame a freshly signed record."""
        peer = stream.muxed_conn.peer_id.to_base58()
        if self.allowed_peers is not None and peer not in self.allowed_peers:
            log.warning("refused worker %s: not in --allow-peers", peer)
            await _try_send(stream, error_frame("forbidden", f"peer {peer} is not admitted to this swarm "
                                                             f"(the head's --allow-peers list)"))
            return
        mine = False  # does this stream speak for the peer in the registry?
        try:
            while True:
                msg = await read_frame(stream, timeout=HEARTBEAT * MISSED_HEARTBEATS)
                try:
                    record = verify_record(msg.get("record", b""))
                except RecordError as e:
                    await write_frame(stream, error_frame("bad_request", str(e)))
                    continue
                if record.peer_id != peer:
                    await write_frame(stream, error_frame("bad_request", "a record must be announced by its own peer"))
                    continue
                problem = self.record_problem(record)
                if problem is not None:
                    await write_frame(stream, error_frame(*problem))
                    continue
                other = self._announcers.get(peer)
                entry = self.registry.entries.get(peer)
                if other is not None and other is not stream and entry is not None \
                        and (entry.record.start, entry.record.end) != (record.start, record.end):
                    log.warning("refused a second worker claiming peer id %s", peer)
                    await write_frame(stream, error_frame(
                        "identity_in_use", f"peer id {peer} is already live serving layers "
                                           f"{entry.record.start}-{entry.record.end}: two processes share one "
                                           f"identity; give each its own (--group-id or --identity)"))
                    return
                if not mine:
                    log.info("worker %s joined: layers %d-%d", peer, record.start, record.end)
                    self._announcers[peer], mine = stream, True
                self.registry.update(record)
        except (WireError, EOFError) as e:
            log.info("worker %s left: %s", peer, e)
        finally:
            if mine and self._announcers.get(peer) is stream:
                del self._announcers[peer]
                self.registry.remove(peer)
            await reset_stream(stream)

    # ---- queries ---------------------------------------------------------------------

    def resolve_model(self, name: str | None) -> int | None:
        """The pipeline a model name pins (HexGen's ``name_N``), None for any."""
        if not name or name == self.config.name:
            return None
        m = re.fullmatch(rf"{re.escape(self.config.name)}_(\d+)", name)
        if m:
            return int(m.group(1))
        raise P2PServeError(f"unknown model {name!r}: this swarm serves {self.config.name!r}", code="unknown_model")

    def encode(self, msg: dict) -> list[int]:
        """The prompt's token ids: from exactly one of tokens, messages or prompt, each of
        its own type (checked here, at the edge, for every way in)."""
        given = [k for k in ("tokens", "messages", "prompt") if msg.get(k) is not None]
        if len(given) != 1:
            raise P2PServeError("a query needs exactly one of prompt (text), messages or tokens", code="bad_request")
        if "tokens" in given:
            ids = msg["tokens"]
            if not isinstance(ids, list) or any(type(t) is not int for t in ids):
                raise P2PServeError("tokens must be a list of token ids", code="bad_request")
        elif "messages" in given:
            messages = msg["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise P2PServeError("messages must be a list of {role, content} texts", code="bad_request")
            ids = self.tokenizer.encode_chat([{"role": m["role"], "content": m["content"]} for m in messages])
        elif not isinstance(msg["prompt"], str):
            raise P2PServeError("prompt must be a text", code="bad_request")
        elif msg.get("chat", True):
            ids = self.tokenizer.encode_chat([{"role": "user", "content": msg["prompt"]}])
        else:
            ids = self.tokenizer.encode(msg["prompt"])
        if not ids:
            raise P2PServeError("the prompt is empty", code="bad_request")
        if any(not 0 <= t < self.config.vocab_size for t in ids):
            raise P2PServeError(f"token ids must be in [0, {self.config.vocab_size})", code="bad_request")
        return ids

    def resume_of(self, msg: dict, params: SamplingParams) -> list[int]:
        """The tokens of this answer a client already received from a head that died."""
        resume = msg.get("resume", [])
        if not isinstance(resume, list) or len(resume) >= params.max_new_tokens or any(
                type(t) is not int or not 0 <= t < self.config.vocab_size for t in resume):
            raise P2PServeError(f"resume must be fewer than max_new_tokens ({params.max_new_tokens}) token ids",
                                code="bad_request")
        return resume

    def prepare(self, msg: dict) -> tuple[list[int], SamplingParams, int | None, bool]:
        """Check a query once, at the edge: (prompt ids, params, pinned pipeline, stop_on_eos)."""
        if not isinstance(msg.get("model"), (str, type(None))) or not isinstance(msg.get("stop_on_eos", True), bool):
            raise P2PServeError("model must be a name and stop_on_eos true or false", code="bad_request")
        try:
            pipeline = self.resolve_model(msg.get("model"))
            params = SamplingParams.from_dict(msg.get("params") or {})
            prompt = self.encode(msg)
        except (ConfigError, TypeError, ValueError) as e:
            raise P2PServeError(str(e), code="bad_request") from None
        need = len(prompt) + params.max_new_tokens
        if need > self.config.max_position_embeddings:
            raise P2PServeError(f"prompt ({len(prompt)} tokens) + max_new_tokens "
                                             f"({params.max_new_tokens}) is above {self.config.name}'s "
                                             f"context of {self.config.max_position_embeddings}", code="bad_request")
        return prompt, params, pipeline, bool(msg.get("stop_on_eos", True))

    async def handle_query(self, stream) -> None:
        try:
            msg = await read_frame(stream, timeout=30)
            if msg.get("type") != "query":
                raise P2PServeError(f"expected a 'query' frame, got {str(msg.get('type'))[:64]!r}", code="bad_request")
            self.stats["queries"] += 1
            prompt, params, pipeline, stop_on_eos = self.prepare(msg)
            resume = self.resume_of(msg, params)

            async def emit(frames):  # the frames of one chunk of tokens go in one write
                await write_frames(stream, frames)

            await self.answer(emit, prompt, params, pipeline, stop_on_eos, resume)
            await stream.close()
        except (WireError, EOFError) as e:
            log.info("query stream failed: %s", e)
            await reset_stream(stream)
        except P2PServeError as e:
            await _try_send(stream, error_frame(e.code, e.message))
        except trio.Cancelled:
            raise
        except Exception as e:  # one query's bug must not take the bootstrap down
            log.exception("query failed")
            await _try_send(stream, error_frame("internal", f"{type(e).__name__}: {e}"))

    async def answer(self, emit, prompt: list[int], *args, **kwargs) -> None:
        """``_answer``, observed by the metrics (p2pserve/metrics.py) and logged in one line."""
        seen: dict = {}

        async def noted(frames):
            for f in frames:
                if f.get("type") in ("route", "done"):
                    seen[f["type"]] = f
            await emit(frames)

        try:
            await self.metrics.observe(self._answer, noted, prompt, *args, **kwargs)
        except P2PServeError as e:
            log.info("query of %d tokens not answered (%s): %s", len(prompt), e.code, e.message)
            raise
        done, chain = seen.get("done", {}), seen.get("route", {}).get("chain", [])
        log.info("answered %d prompt tokens with %d in %.2f s through %s (%d failovers)", len(prompt),
                 done.get("n_tokens", 0), done.get("time_s", 0.0), " -> ".join(p[-8:] for p in chain),
                 done.get("failovers", 0))

    async def _answer(self, emit, prompt: list[int], params: SamplingParams, pipeline: int | None,
                      stop_on_eos: bool, resume: list[int] = ()) -> None:
        """Generate on some chain, failing over to another until the answer is complete.

        ``emit(frames)`` delivers a list of frames to the client: route, token…, done;
        the tokens that arrived together come in one list. ``resume``: the answer's first
        tokens, delivered by another head that died; the answer goes on after them, its
        text continuing theirs (the decoder has seen them)."""
        decoder = self.tokenizer.stream()
        eos = set(self.config.eos_token_ids)
        generated: list[int] = list(resume)
        for token in resume:
            decoder.push(token)
        failed: set[str] = set()  # peers gone from the view: never again in this answer
        avoid: set[str] = set()  # peers of any chain that failed: only where no chain goes around them
        busy: set[str] = set()
        busy_reason = ""
        t0 = time.monotonic()
        recoveries: list[float] = []  # seconds from each failure to the next token
        t_fail = None
        for attempt in range(MAX_ATTEMPTS):
            if busy and self.registry.pick(pipeline, frozenset(failed | busy), self.policy) is None:
                raise P2PServeError(f"every pipeline of {self.config.name} is full ({busy_reason}); "
                                          f"retry in a moment", code="busy")
            chain = await self._choose(pipeline, frozenset(failed | busy), first=attempt == 0 or not failed,
                                       avoid=frozenset(avoid))
            chain_peers = frozenset(h.peer_id for h in chain)
            remaining = params.max_new_tokens - len(generated)
            sub = SamplingParams(**{**params.to_dict(), "max_new_tokens": remaining})
            await emit([{"type": "route", "chain": [h.peer_id for h in chain],
                         "layers": [[h.start, h.end] for h in chain], "attempt": attempt}])
            source = self._run_chain(chain, prompt + generated, sub, stop_on_eos, generated)
            if self.spot_checks is not None and attempt == 0 and not resume:
                witness = self.spot_checks.witness(chain_peers, prompt, sub)
                if witness is not None:  # checked as it streams: only tokens a second chain agrees with go out
                    source = self.spot_checks.checked(chain_peers, source, witness, prompt, sub)
            try:
                async for tokens in source:
                    if t_fail is not None:
                        recoveries.append(round(time.monotonic() - t_fail, 3))
                        t_fail = None
                    frames = []
                    for token in tokens:
                        sampled = token if isinstance(token, Sampled) else None
                        token = sampled.token if sampled else token
                        generated.append(token)
                        text = "" if token in eos else decoder.push(token)
                        frames.append({"type": "token", "token": token, "text": text,
                                       **({"logprob": sampled.logprob, "top": sampled.top} if sampled else {})})
                    await emit(frames)
                await emit([{"type": "done", "n_tokens": len(generated), "prompt_tokens": len(prompt),
                            "text": decoder.flush(), "failovers": attempt, "recovery_s": recoveries,
                            "time_s": time.monotonic() - t0,
                            "finish_reason": "stop" if generated and generated[-1] in eos and stop_on_eos
                            else "length"}])
                self.registry.succeeded(chain_peers)
                return
            except _ChainFailed as e:
                if e.busy:
                    busy |= e.peers
                    busy_reason = str(e)
                    continue
                log.warning("chain failed after %d tokens: %s", len(generated), e)
                self.stats["failovers"] += 1
                # the peers that died are to blame; if none did, everyone on the chain is suspect
                self.registry.failed(e.peers or chain_peers, str(e))
                failed |= e.peers
                avoid |= chain_peers
                t_fail = t_fail or time.monotonic()
                continue
        raise P2PServeError(f"gave up after {MAX_ATTEMPTS} failed chains", code="no_pipeline")

    async def _choose(self, pipeline, exclude: frozenset[str], first: bool,
                      avoid: frozenset[str] = frozenset()) -> list[Hop]:
        """A chain for the next attempt; after a failure, wait (bounded) for the registry
        to drop the dead worker or for a replacement to appear."""
        deadline = trio.current_time() + (0 if first else HEARTBEAT * MISSED_HEARTBEATS + 1)
        while True:
            chain = self.registry.pick(pipeline, exclude, self.policy, avoid)
            if chain is not None:
                return hops(chain)
            if trio.current_time() >= deadline:
                if pipeline is not None and self.registry.chains():
                    raise P2PServeError(f"pipeline {pipeline} of {self.config.name} does not exist "
                                                     f"(there are {len(self.registry.chains())})", code="no_pipeline")
                raise P2PServeError(f"no complete pipeline: {self.registry.missing()}", code="no_pipeline")
            await trio.sleep(0.2)

    async def _run_chain(self, chain: list[Hop], prompt: list[int], params: SamplingParams, stop_on_eos: bool,
                         generated: list[int] = ()):
        """``prompt`` ends with the ``generated`` tokens of the answer so far (a replay),
        which the last stage's penalties count."""
        first = chain[0]
        all_peers = frozenset(h.peer_id for h in chain)
        stream = None
        self.registry.inflight.update(all_peers)
        try:
            peer = await dial(self.host, first.peer_id, first.addrs)
            stream = await self.host.new_stream(peer, [SESSION])
            session = uuid.uuid4().hex
            await write_frame(stream, {
                "type": "open", "session": session, "ticket": sign_ticket(self.key_pair, session, chain, cert=self.head_cert),
                "chain": [h.to_dict() for h in chain],
                "index": 0, "params": params.to_dict(), "prompt": prompt, "generated": list(generated),
                "eos": list(self.config.eos_token_ids), "stop_on_eos": stop_on_eos,
                "stream_interval": self.stream_interval,
            })
            reply = await read_frame(stream, timeout=FIRST_TOKEN_TIMEOUT)
            if reply.get("type") != "ready":
                raise _ChainFailed(all_peers, f"stage 0 answered {reply.get('type')!r} to 'open'")
            timeout, interval, last = FIRST_TOKEN_TIMEOUT, None, None
            pace = _Pace()
            while True:
                msg = await read_frame(stream, timeout=timeout)
                now = time.monotonic()
                if last is not None:
                    interval = now - last if interval is None else 0.8 * interval + 0.2 * (now - last)
                    timeout = min(TOKEN_TIMEOUT, max(MIN_TOKEN_TIMEOUT, 20 * interval))
                last = now
                if msg.get("type") == "tokens":
                    try:
                        tokens = tokens_of(msg, self.config.vocab_size)
                    except ValueError as e:
                        raise _ChainFailed(all_peers, str(e)) from None
                    pace.arrived(len(tokens), now)
                    yield tokens
                elif msg.get("type") == "done":
                    await stream.close()
                    if pace.per_token() is not None:  # what routing goes on (Registry.observe)
                        self.registry.observe(chain, pace.per_token())
                    return
                else:
                    raise _ChainFailed(all_peers, f"unexpected frame {msg.get('type')!r}")
        except RemoteError as e:
            if e.code in REQUEST_CODES:
                raise P2PServeError(e.message, code=e.code) from None
            if e.code == "busy":
                raise _ChainFailed(all_peers, e.message, busy=True) from None
            raise _ChainFailed(await self._suspects(chain), e.message) from None
        except (WireError, EOFError, P2PServeError, OSError, BaseLibp2pError) as e:  # a peer's failure
            # A WireError's code is what a server answers a peer that sent it a bad frame
            # (bad_request); here the stream that broke is stage 0's, so it blames the chain.
            if isinstance(e, P2PServeError) and not isinstance(e, WireError) and e.code in REQUEST_CODES:
                raise
            raise _ChainFailed(await self._suspects(chain), str(e)) from None
        finally:
            self.registry.inflight.subtract(all_peers)
            if stream is not None:
                await reset_stream(stream)

    async def _suspects(self, chain: list[Hop]) -> frozenset[str]:
        """Peers of a failed chain to avoid next: those that leave the live view within a
        heartbeat window (a killed worker's announce stream closes within milliseconds, a
        frozen one misses its heartbeats). If none leaves, the chain was slow or hit a
        passing error, not dead: it stays eligible, and the replay may use it again."""
        peers = {h.peer_id for h in chain}
        with trio.move_on_after(HEARTBEAT * MISSED_HEARTBEATS + 1):
            while True:
                gone = peers - {r.peer_id for r in self.registry.live()}
                if gone:
                    return frozenset(gone)
                await trio.sleep(0.05)
        return frozenset()


def hops(chain: list[WorkerRecord]) -> list[Hop]:
    """A chain of records as the hops a session ticket names."""
    return [Hop(r.peer_id, tuple(r.addrs), r.start, r.end) for r in chain]


def tokens_of(msg: dict, vocab_size: int) -> list[int | Sampled]:
    """The token ids of stage 0's 'tokens' frame, each a Sampled if it carries logprobs;
    ValueError if there are none or one is not an id of the vocabulary."""
    tokens = msg.get("tokens")
    if not isinstance(tokens, list) or not tokens or any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in tokens):
        raise ValueError(f"stage 0 sent invalid tokens {str(tokens)[:200]!r}")
    logprobs = msg.get("logprobs")
    if logprobs is None:
        return tokens
    if not isinstance(logprobs, list) or len(logprobs) != len(tokens) or not all(
            isinstance(e, list) and len(e) == 2 for e in logprobs):
        raise ValueError(f"stage 0 sent invalid logprobs {str(logprobs)[:200]!r}")
    return [check_sampled([t, *e], vocab_size) for t, e in zip(tokens, logprobs)]


class _Pace:
    """The decode pace of one answer as the head sees it: tokens after the first over the
    time since the first arrived (the first also waited for the prefill). Tokens come in
    frames of up to a stream interval, the last frame at the end of the answer, so the
    pace over a whole answer is exact however they were grouped."""

    MIN_TOKENS = 4  # decode steps: fewer say too little to route on

    def __init__(self):
        self.first: float | None = None
        self.last = 0.0
        self.steps = 0

    def arrived(self, n_tokens: int, now: float) -> None:
        if self.first is None:
            self.first, n_tokens = now, n_tokens - 1
        self.last, self.steps = now, self.steps + n_tokens

    def per_token(self) -> float | None:
        return (self.last - self.first) / self.steps if self.steps >= self.MIN_TOKENS else None


class _ChainFailed(Exception):
    def __init__(self, peers: frozenset[str], message: str, busy: bool = False):
        super().__init__(message)
        self.peers = peers
        self.busy = busy  # the chain is healthy but has no room now


async def _try_send(stream, frame: dict) -> None:
    try:
        await write_frame(stream, frame, timeout=5)
        await stream.close()
    except Exception:
        await reset_stream(stream)
