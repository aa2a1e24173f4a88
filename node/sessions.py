"""The session server of a worker: opens, steps, relays and closes sessions through its stage.

A session is one stream from upstream (the bootstrap for stage 0, the previous stage
otherwise). Its first frame, 'open', carries the head's signed ticket (net/tickets.py)
naming the whole chain; a stage that is not last
opens the next hop itself, so activations go worker to worker and never through the
bootstrap. Frames on a session stream:

    down   open  {session, ticket, chain, index, params, prompt, generated, stop_on_eos, max_len,
                  stream_interval, ring}    (generated: the answer's tokens so far, for the penalties;
                                           ring: tokens go straight to stage 0, see below)
           step  {start, want} + tensor "x" ([T] token ids to stage 0 are not sent:
                 stage 0 drives the loop itself, node/driver.py; [T, hidden] states elsewhere)
           close {}
    up     ready {}            the whole rest of the chain is open
           token {token, pos}  the last stage's sample, relayed back to stage 0 (with
                               logprobs asked for, [token, logprob, top]); not in a ring session
           (stage 0 to the bootstrap instead: tokens {tokens: [..]} …, done {n_tokens};
           tokens at most one frame per stream_interval seconds, see node/driver.py)
           error {code, message}

Decode steps (one token, a token wanted) do not use the session stream: they go on the
LINK stream between the two workers, batched with every other session's (``link.py``).

In a *ring* session (stage 0's ``--token-path ring``, the default) no stage waits for
the next one's token: the last stage sends every token it samples straight to stage 0 on
the RING stream stage 0 opened to it when the session opened (``link.py``), so a step
crosses each of the chain's k links once (k one-way delays, not 2(k-1)). The session
stream upwards then carries only 'ready' and errors: each stage watches the stream to
its next stage, and an error or a break there fails the session here, whose error frame
goes on up, so every stage's error reaches stage 0 and the head.

Steps on the session stream (prefill chunks) are written by a task of the session's own,
so a stage computes chunk n+1 while chunk n is on its way down and the next stage
computes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import trio

from p2pserve.engine import generate
from p2pserve.engine.generate import check_generated, check_prompt, check_sampled
from p2pserve.errors import Busy, ConfigError, NetworkError, P2PServeError
from p2pserve.net.host import dial
from p2pserve.net.tickets import TicketError, verify_ticket
from p2pserve.net.protocols import MAX_STREAM_INTERVAL, SESSION, TOKEN_PATHS, Hop
from p2pserve.engine.generate import SamplingParams
from p2pserve.net.wire import (
    RemoteError,
    StreamClosed,
    WireError,
    WireTimeout,
    check_tensor,
    error_frame,
    read_frame,
    recv_message,
    reset_stream,
    send_message,
    write_frame,
)

from p2pserve.node.executor import BatchingExecutor, SlotPool, StepRequest
from p2pserve.node.driver import drive
from p2pserve.node.link import Links, Rings, RingOut, serve_link, serve_ring

log = logging.getLogger("p2pserve.worker")

IDLE_TIMEOUT = 120.0  # seconds a session may wait for its next frame before it is freed
STEP_TIMEOUT = 60.0  # seconds a stage waits for the rest of the chain to answer one step


@dataclass
class Session:
    id: str
    slot: int
    chain: list[Hop]
    index: int
    params: SamplingParams
    open_msg: dict
    down: object = None  # stream to the next stage, None on the last
    stream_interval: float = 0.0  # stage 0: seconds between token frames to the bootstrap
    prompt: list[int] = field(default_factory=list)  # stage 0: checked token ids
    history: list[int] = field(default_factory=list)  # last stage: tokens generated so far (penalties)
    last_active: float = field(default_factory=time.monotonic)  # for the idle timeout
    ring: bool = False  # the last stage sends tokens straight to stage 0 ('open' frame's 'ring')
    awaited: "_Awaited | None" = None  # stage 0 of a ring session: the step whose token is due
    outbox: object = None  # steps for the stream down, written by the session's writer task
    down_dirty: bool = False  # a write to ``down`` was cut off: reset it, write nothing more
    scope: trio.CancelScope | None = None  # the session's tasks, cancelled by ``fail``
    error: BaseException | None = None  # why ``fail`` ended it

    @property
    def is_last(self) -> bool:
        return self.index == len(self.chain) - 1

    def fail(self, error: BaseException) -> None:
        """End this session with ``error`` (a failure noticed outside its own tasks: on a
        link, on the ring, on the stream down)."""
        if self.error is None:
            self.error = error
        if self.scope is not None:
            self.scope.cancel()


@dataclass
class _Awaited:
    start: int
    done: trio.Event = field(default_factory=trio.Event)
    token: object = None


class StageServer:
    """One worker's stage: its sessions, their KV slots, and the batcher in front of the model."""

    def __init__(self, host, runner, *, model_name: str, fingerprint: str, start: int, end: int,
                 max_sessions: int, max_len: int, max_waiting: int | None = None, compute=None,
                 heads: frozenset[str] | None = None, token_path: str = "ring", threads=None):
        """``runner``'s KV cache must already hold ``max_sessions`` x ``max_len`` positions:
        a worker allocates it where it computes (``compute``, see node/compute.py).
        ``heads``: the peer ids whose session tickets this stage honours (net/tickets.py);
        None serves any 'open' frame, for a stage tested on its own. ``token_path``: how
        the tokens of the sessions this worker drives as stage 0 come back (TOKEN_PATHS).
        ``threads``: a ``ranks.cores.ThreadFollower`` for a worker sharing the machine's cores."""
        if token_path not in TOKEN_PATHS:
            raise ConfigError(f"token path {token_path!r}: expected one of {', '.join(TOKEN_PATHS)}")
        self.token_path = token_path
        self.heads = heads
        self.host = host
        self.runner = runner
        self.model_name, self.fingerprint = model_name, fingerprint
        self.start, self.end = start, end
        self.config = runner.config
        self.max_len = max_len
        self.slots = SlotPool(max_sessions, max_waiting if max_waiting is not None else 4 * max_sessions)
        self.executor = BatchingExecutor(runner, sessions=lambda: len(self.sessions), compute=compute,
                                         threads=threads)
        self.sessions: dict[str, Session] = {}
        self.links = Links(host)
        self.rings = Rings(host, self._ring_tokens, self._ring_lost)  # stage 0: to last stages
        self.ring_outs: dict[str, RingOut] = {}  # the last stage: to each stage 0, by peer id
        self.link_replies = 0  # 'tokens' frames written back up links (relay sessions only)
        self.ring_tokens = 0  # tokens sent straight to stage 0s, as a last stage
        self.draining = False

    @property
    def is_first(self) -> bool:
        return self.runner.is_first

    def load(self) -> dict:
        links = self.links.stats()
        return {"sessions": len(self.sessions), "queue": self.slots.waiting,
                "max_sessions": self.slots.n_slots,
                "link_frames": links["frames"], "link_steps": links["steps"],
                "link_replies": self.link_replies, "ring_tokens": self.ring_tokens,
                "forwards": self.executor.steps, "forward_steps": self.executor.batched_requests}

    async def serve(self) -> None:
        """Run the batcher and the links; the stream handlers are installed by the caller."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.links.run)
            nursery.start_soon(self.rings.run)
            await self.executor.run()

    # ---- one session ------------------------------------------------------------------

    async def handle(self, stream) -> None:
        """Stream handler for SESSION: one session, from 'open' to close. Whatever goes
        wrong in it ends this session only, with an error frame where the stream allows."""
        session = None
        try:
            try:
                session = await self._open(stream)
                async with trio.open_nursery() as nursery:
                    session.scope = nursery.cancel_scope
                    if session.down is not None:
                        session.outbox, inbox = trio.open_memory_channel(0)
                        nursery.start_soon(self._write_down, session, inbox)
                        if session.ring:
                            nursery.start_soon(self._watch_down, session)
                    if session.error is None:
                        if self.is_first:
                            await drive(self, stream, session)
                        else:
                            await self._relay(stream, session)
                    nursery.cancel_scope.cancel()
                if session.error is not None:
                    raise session.error
            except BaseExceptionGroup as group:  # from the session's nurseries: report the first cause
                raise _first_cause(group) from None
        except (WireError, EOFError) as e:
            log.info("session %s ended: %s", session and session.id, e)
            await reset_stream(stream)
        except P2PServeError as e:  # this stage's refusal, or a later stage's passed upstream
            await self._send_error(stream, e.code, e.message)
        except trio.Cancelled:
            raise
        except Exception as e:  # a bug must not take the worker (and everyone's sessions) down
            log.exception("session %s failed", session and session.id)
            await self._send_error(stream, "internal", f"{type(e).__name__}: {e}")
        finally:
            if session is not None:
                await self._close(session)

    async def _send_error(self, stream, code: str, message: str) -> None:
        try:
            await write_frame(stream, error_frame(code, message), timeout=5)
            await stream.close()
        except Exception:
            await reset_stream(stream)

    async def _open(self, stream) -> Session:
        msg = await read_frame(stream, timeout=30)
        if msg.get("type") != "open":
            raise P2PServeError(f"no session is open on this stream: it must start with "
                                                  f"an 'open' frame, got {msg.get('type')!r}", code="unknown_session")
        if self.draining:
            raise Busy("this worker is leaving the swarm; choose another")
        try:
            sid = msg["session"]
            if not isinstance(sid, str) or not 0 < len(sid) <= 64:
                raise ValueError("the session id must be a text of 1-64 characters")
            chain = (verify_ticket(msg.get("ticket"), self.heads, sid) if self.heads is not None
                     else [Hop.from_dict(h) for h in msg["chain"]])
            index = msg["index"]
            if type(index) is not int or not 0 <= index < len(chain):
                raise ValueError(f"index {str(index)[:20]} is not a stage of the {len(chain)}-stage chain")
            params = SamplingParams.from_dict(msg["params"])
            me = chain[index]
            interval = _stream_interval(msg.get("stream_interval", 0.0))
            history = check_generated(msg.get("generated", []), self.config.vocab_size, self.max_len)
        except TicketError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, P2PServeError) as e:
            raise P2PServeError(f"malformed 'open' frame: {e}", code="bad_request") from None
        if (me.start, me.end) != (self.start, self.end) or me.peer_id != self.host.get_id().to_base58():
            raise P2PServeError(f"this worker holds layers {self.start}-{self.end}, "
                                              f"not {me.start}-{me.end} of peer {me.peer_id}", code="bad_request")
        if sid in self.sessions:
            raise P2PServeError(f"session {sid} is already open here", code="bad_request")
        prompt = msg.get("prompt") or []
        if self.is_first:
            try:
                check_prompt(prompt, self.config.vocab_size)
            except ConfigError as e:
                raise P2PServeError(str(e), code="bad_request") from None
        need = len(prompt) + params.max_new_tokens if self.is_first else msg.get("max_len", 0)
        if type(need) is not int or need > self.max_len:
            raise P2PServeError(f"the session needs {need} positions; this worker holds "
                                              f"at most {self.max_len} per session", code="bad_request")
        slot = await self.slots.acquire()
        ring = self.token_path == "ring" if self.is_first else msg.get("ring") is True
        session = Session(sid, slot, chain, index, params, msg, stream_interval=interval, prompt=list(prompt),
                          history=list(history), ring=ring and len(chain) > 1)
        self.sessions[sid] = session
        try:
            if not session.is_last:
                async with trio.open_nursery() as nursery:
                    if self.is_first and session.ring:  # beside the chain's opening: no time added
                        nursery.start_soon(self._open_ring, session)
                    session.down = await self._open_next(msg, session)
            await write_frame(stream, {"type": "ready"})
        except BaseException:
            await self._close(session)
            raise
        return session

    async def _open_next(self, msg: dict, session: Session):
        nxt = session.chain[session.index + 1]
        peer = await self._connect(nxt)
        try:
            down = await self.host.new_stream(peer, [SESSION])
        except Exception as e:
            raise P2PServeError(f"cannot open a session on {nxt.peer_id} "
                                               f"(layers {nxt.start}-{nxt.end}): {e}", code="stage_failed") from None
        fwd = {k: v for k, v in msg.items() if k != "prompt"}
        fwd["index"] = session.index + 1
        fwd["ring"] = session.ring
        fwd["max_len"] = len(msg.get("prompt") or []) + session.params.max_new_tokens \
            if self.is_first else msg.get("max_len", 0)
        await write_frame(down, fwd)
        reply = await read_frame(down, timeout=STEP_TIMEOUT)  # raises RemoteError on refusal
        if reply.get("type") != "ready":
            raise P2PServeError(f"next stage answered {reply.get('type')!r} to 'open'", code="bad_request")
        return down

    async def _open_ring(self, session: Session) -> None:
        last = session.chain[-1]
        try:
            await self.rings.get(last.peer_id, lambda: self._connect(last))
        except (WireError, EOFError) as e:
            raise P2PServeError(f"cannot open the ring to the last stage ({last.peer_id}, layers "
                                f"{last.start}-{last.end}): {e}", code="stage_failed") from None

    async def _connect(self, hop: Hop):
        try:
            return await dial(self.host, hop.peer_id, hop.addrs)
        except NetworkError as e:
            raise P2PServeError(f"layers {hop.start}-{hop.end}: {e}", code="stage_failed") from None

    async def _close(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.links.forget(session.id)
        if session.down is not None and session.down_dirty:
            await reset_stream(session.down)
        elif session.down is not None:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                try:
                    await write_frame(session.down, {"type": "close"}, timeout=2)
                    await session.down.close()
                except Exception:
                    await reset_stream(session.down)
        with trio.CancelScope(shield=True):
            await self.slots.release(session.slot)

    async def step(self, session: Session, x: torch.Tensor, start: int, want: bool) -> int | None:
        """Run x at positions start… through this stage and send it on down the chain; the
        token, where one is wanted and comes back here (stage 0, or any stage of a
        relay session), else None."""
        session.last_active = time.monotonic()
        out = await self.executor.step(StepRequest(session.slot, start, x, want, session.params, session.history))
        if session.is_last:
            return out
        nxt = session.chain[session.index + 1]
        if want and session.ring and self.is_first:
            session.awaited = _Awaited(start)  # before the send: the token may beat its return
        try:
            if want and x.shape[0] == 1:  # a decode step: batched with the others on the link
                link = await self.links.get(nxt.peer_id, lambda: self._connect(nxt))
                lost = (lambda e: session.fail(self._failed(session, e))) if session.ring else None
                token = await link.step(session.id, start, out, timeout=STEP_TIMEOUT, alone=self.executor.alone(),
                                        lost=lost)
            else:  # a prefill chunk: its send does not hold up this stage's next one
                await session.outbox.send(({"type": "step", "start": start, "want": want}, {"x": out}))
                token = None
                if want and not session.ring:
                    token = self._relayed(session, await read_frame(session.down, timeout=STEP_TIMEOUT))
        except (WireError, EOFError) as e:
            raise self._failed(session, e) from None
        if session.awaited is not None:
            return await self._ring_token(session)
        return token

    def _failed(self, session: Session, e: Exception) -> P2PServeError:
        nxt = session.chain[session.index + 1]
        return P2PServeError(f"stage {session.index + 1} ({nxt.peer_id}, layers {nxt.start}-{nxt.end}) "
                             f"failed: {e}", code="stage_failed")

    def _relayed(self, session: Session, reply: dict):
        """A relay session's token from the next stage's 'token' frame, checked."""
        if reply.get("type") != "token":
            raise P2PServeError(f"expected a token from the next stage, got {reply.get('type')!r}", code="internal")
        try:
            return check_sampled(reply.get("token"), self.config.vocab_size)
        except ValueError as e:
            raise self._failed(session, e) from None

    async def _write_down(self, session: Session, inbox) -> None:
        """The session's writer task: its steps down the session stream, in order."""
        async for msg, tensors in inbox:
            try:
                await send_message(session.down, msg, tensors, timeout=STEP_TIMEOUT)
            except (WireError, EOFError) as e:
                session.down_dirty = True
                raise self._failed(session, e) from None
            except BaseException:  # cut off mid-frame: the stream can carry no more
                session.down_dirty = True
                raise

    async def _watch_down(self, session: Session) -> None:
        """A ring session: the stream down carries only errors upwards; one, or its
        break, ends the session here (and so travels on up)."""
        try:
            msg = await read_frame(session.down, timeout=float("inf"))
        except RemoteError:
            raise  # a later stage's error, passed up as it is
        except (WireError, EOFError) as e:
            raise self._failed(session, e) from None
        raise P2PServeError(f"unexpected {msg.get('type')!r} frame from the next stage", code="internal")

    async def _ring_token(self, session: Session):
        """Stage 0 of a ring session: the token of the step just sent, from the last stage."""
        awaited = session.awaited
        with trio.move_on_after(STEP_TIMEOUT) as scope:
            await awaited.done.wait()
        session.awaited = None
        if scope.cancelled_caught:
            last = session.chain[-1]
            raise P2PServeError(f"no token from the last stage ({last.peer_id}, layers {last.start}-{last.end}) "
                                f"within {STEP_TIMEOUT:g} s", code="stage_failed")
        return awaited.token

    def _ring_tokens(self, peer: str, results: list) -> None:
        """Stage 0: tokens from the last stage ``peer`` on its ring stream."""
        for r in results:
            if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)):
                raise WireError(f"malformed ring result {str(r)[:100]}")
            sid, start, token = r
            session = self.sessions.get(sid)
            awaited = session and session.awaited
            if not awaited or session.chain[-1].peer_id != peer or awaited.start != start or awaited.done.is_set():
                continue  # a late token of a session that ended here, or not one of this peer's
            try:
                awaited.token = check_sampled(token, self.config.vocab_size)
            except ValueError as e:
                session.fail(P2PServeError(f"the last stage ({peer}): {e}", code="stage_failed"))
                continue
            awaited.done.set()

    def _ring_lost(self, peer: str) -> None:
        """Stage 0: the ring from ``peer`` closed; the sessions whose tokens it carried fail."""
        for session in list(self.sessions.values()):
            if session.ring and session.chain[-1].peer_id == peer:
                session.fail(P2PServeError(f"the ring from the last stage ({peer}) closed", code="stage_failed"))

    async def _send_ring(self, sent: list[tuple[Session, int, object]]) -> None:
        """The last stage: tokens of ring sessions to their stage 0s, one frame per peer."""
        by_peer: dict[str, list] = {}
        for item in sent:
            by_peer.setdefault(item[0].chain[0].peer_id, []).append(item)
        for peer, items in by_peer.items():
            out = self.ring_outs.get(peer)
            try:
                if out is None:
                    raise StreamClosed("stage 0 has no ring open to this worker")
                await out.send([[s.id, start, token] for s, start, token in items], timeout=STEP_TIMEOUT)
                self.ring_tokens += len(items)
            except WireError as e:
                for s, _, _ in items:
                    s.fail(P2PServeError(f"cannot send tokens to stage 0 ({peer}): {e}", code="stage_failed"))

    async def handle_ring(self, stream) -> None:
        """Stream handler for RING (on a last stage)."""
        await serve_ring(stream, stream.muxed_conn.peer_id.to_base58(), self.ring_outs)

    # ---- the link: decode steps of many sessions from one upstream peer ----------------

    async def handle_link(self, stream) -> None:
        """Stream handler for LINK."""
        upstream = stream.muxed_conn.peer_id.to_base58()
        await serve_link(stream, lambda items, x: self._link_steps(upstream, items, x), self._alone,
                         hidden_size=self.config.hidden_size, max_items=max(1, self.slots.n_slots),
                         replied=self._replied)

    def _replied(self) -> None:
        self.link_replies += 1

    def _alone(self, items: list) -> bool:
        """Is this link frame the lone step of a session that ends here, which the executor
        computes on the spot (``BatchingExecutor.alone``)?"""
        if len(items) != 1 or not isinstance(items[0], dict):
            return False
        session = self.sessions.get(str(items[0].get("session")))
        return session is not None and session.is_last and self.executor.alone()

    async def _link_steps(self, upstream: str, items: list, x: torch.Tensor) -> list:
        results: list = [None] * len(items)
        ring: list[tuple[Session, int, object]] = []  # tokens for stage 0s, sent together

        async def one(i: int, item) -> None:
            try:
                sid, start = str(item["session"]), int(item["start"])
            except (KeyError, TypeError, ValueError) as e:
                results[i] = {"code": "bad_request", "message": f"malformed step: {e}"}
                return
            session = self.sessions.get(sid)
            if session is None or session.index == 0 or session.chain[session.index - 1].peer_id != upstream:
                results[i] = {"code": "unknown_session", "message": f"no session {sid} from this peer here"}
                return
            if start < 0 or start + 1 > self.max_len:
                results[i] = {"code": "bad_request", "message": f"position {start} is outside this "
                                                                f"session's {self.max_len}"}
                return
            try:
                result = await self.step(session, x[i : i + 1], start, True)
            except P2PServeError as e:
                result = {"code": e.code, "message": e.message}
            except Exception as e:  # a bug fails this step, not the link
                log.exception("link step of session %s failed", sid)
                result = {"code": "internal", "message": f"{type(e).__name__}: {e}"}
            if not session.ring:
                results[i] = result
            elif isinstance(result, dict):  # its error goes up the session streams
                session.fail(P2PServeError(result["message"], code=result["code"]))
            elif session.is_last:
                ring.append((session, start, result))

        if len(items) == 1:  # one session decoding: no task to spawn
            await one(0, items[0])
        else:
            async with trio.open_nursery() as nursery:
                for i, item in enumerate(items):
                    nursery.start_soon(one, i, item)
        if ring:
            await self._send_ring(ring)
        return results

    async def _relay(self, stream, session: Session) -> None:
        """A later stage: serve steps from upstream until it closes the session."""
        hidden = self.config.hidden_size
        max_message = generate.PREFILL_CHUNK * hidden * 4  # one prefill chunk of fp32 states
        while True:
            try:
                msg, tensors = await recv_message(stream, timeout=IDLE_TIMEOUT, max_message=max_message)
            except StreamClosed:
                return
            except WireTimeout:
                if time.monotonic() - session.last_active < IDLE_TIMEOUT:
                    continue  # quiet here, busy on the link
                raise
            kind = msg.get("type")
            if kind == "close":
                return
            if kind != "step":
                raise P2PServeError(f"unexpected {kind!r} frame in session {session.id}", code="bad_request")
            try:
                start, want = int(msg["start"]), bool(msg["want"])
                x = check_tensor(tensors["x"], shape=[None, hidden])
            except (KeyError, TypeError, ValueError) as e:
                raise P2PServeError(f"malformed 'step' frame: {e}", code="bad_request") from None
            except WireError as e:
                raise P2PServeError(str(e), code="shape") from None
            if not x.is_floating_point():
                raise P2PServeError(f"hidden states must be floating point, got {x.dtype}", code="shape")
            if start < 0 or start + x.shape[0] > self.max_len:
                raise P2PServeError(f"positions {start}-{start + x.shape[0]} are outside "
                                                  f"this session's {self.max_len}", code="bad_request")
            token = await self.step(session, x, start, want)
            if want and session.ring and session.is_last:
                await self._send_ring([(session, start, token)])
            elif want and not session.ring:
                await write_frame(stream, {"type": "token", "token": token, "pos": start + x.shape[0]})


def _stream_interval(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_STREAM_INTERVAL:
        raise ValueError(f"stream_interval must be 0-{MAX_STREAM_INTERVAL:g} seconds, got {value!r}")
    return float(value)


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    """The first non-cancellation leaf of a (nested) exception group."""
    leaves = []

    def walk(e):
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(group)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
