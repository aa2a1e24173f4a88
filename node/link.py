"""Decode steps of many sessions, batched on one stream between two workers.

A session opens, prefills and closes on its own SESSION stream (see ``worker.py``). Its
one-token decode steps, though, travel on a LINK stream that a worker keeps to each
next-stage peer it talks to: the steps of every session that became ready together
(the sessions of one batched forward pass) go down as one frame, and their tokens come
back as one frame. A libp2p frame costs Python on each side (0.1-0.3 ms on a worker's
cores even with p2pserve/net/fastio.py, ~0.5 ms before it), so sixteen sessions pay for one
frame per hop instead of sixteen.

Frames on a LINK stream:

    down  steps  {id, items: [{session, start, ring}]} + tensor "x" [B, hidden], row i for item i
    up    tokens {id, results: [token | [token, logprob, top] | {code, message} | None]}, in item
          order (the list when the session asked for logprobs, engine/generate.py: Sampled)

A *ring* item's token does not come back on the link: the last stage sends it straight to
stage 0 on the RING stream that stage 0 opened to it (``Ring``, ``serve_ring``), so a
decode step crosses each link once. Its result in a reply is None, and a frame of ring
items only gets no reply at all; a stage that fails a ring step fails its session, whose
error then travels up the session streams (node/sessions.py). Frames on a RING stream:

    down  ring   {}                          once, when stage 0 opens it
    up    ready  {}
          tokens {results: [[session, start, token]]}   (token as on the link)

A failed relay item (unknown session, a later stage's refusal) raises RemoteError for
that session only; a broken stream fails every step in flight on it with StreamClosed (a
missing reply with WireTimeout), as a session stream would, and the next step dials anew;
a ring step lost with the link calls its ``lost`` callback instead.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import trio

from p2pserve.engine.generate import check_sampled
from p2pserve.net.locks import QuickLock
from p2pserve.net.protocols import LINK, RING
from p2pserve.net.wire import (
    RemoteError,
    StreamClosed,
    WireError,
    WireTimeout,
    read_frame,
    recv_message,
    reset_stream,
    send_message,
    write_frame,
)

log = logging.getLogger("p2pserve.link")

LINK_IDLE_TIMEOUT = 120.0  # seconds without a frame before a link is closed
MAX_HIDDEN = 65536  # rows' width when the stage's hidden size is not given

MAX_ITEMS = 256  # steps per frame (above any worker's slot count); more wait for the next frame


@dataclass
class _Pending:
    session: str
    start: int
    x: torch.Tensor  # [hidden]
    done: trio.Event = field(default_factory=trio.Event)
    token: int | None = None
    error: Exception | None = None  # RemoteError for this item, StreamClosed/WireTimeout for the link
    lost: Callable[[Exception], None] | None = None  # a ring step: told if the link fails under it

    @property
    def ring(self) -> bool:
        return self.lost is not None


class Link:
    """This worker's end of the LINK stream to one next-stage peer."""

    def __init__(self, stream, nursery, on_close):
        self.stream = stream
        self._queue: list[_Pending] = []
        self._wake = trio.Event()
        self._in_flight: dict[int, list[_Pending]] = {}  # frames awaiting a reply
        self._ring_sent: dict[str, _Pending] = {}  # each ring session's last step sent (no reply comes)
        self._send_lock = QuickLock()  # one frame at a time on the stream
        self._ids = itertools.count()
        self._on_close = on_close
        self.closed = False
        self.frames_sent = 0
        self.steps_sent = 0
        nursery.start_soon(self._sender)
        nursery.start_soon(self._receiver)

    async def step(self, session: str, start: int, x: torch.Tensor, timeout: float, *, alone: bool = False,
                   lost: Callable[[Exception], None] | None = None) -> int | None:
        """Send one session's decode step (x: [1, hidden]) down the chain; its token, or
        None for a ring step (``lost`` given), whose token reaches stage 0 on the ring:
        this returns once the step is queued, and ``lost(error)`` is called if the link
        fails before the step is known to have arrived.

        ``alone``: no other session's step is coming from the same forward pass, so the
        step goes in a frame of its own at once, from this task (no hop to the sender
        task); otherwise it is queued for the sender, which batches it with the others."""
        if self.closed:
            raise StreamClosed("the link to the next stage is closed")
        p = _Pending(session, start, x.reshape(-1), lost=lost)
        if alone and not self._queue and not self._send_lock.locked():
            # shielded: a session cancelled mid-write would reset the link under everyone
            # (the write has its own deadline)
            with trio.CancelScope(shield=True):
                await self._send([p])
        else:
            self._queue.append(p)
            self._wake.set()
        if p.ring:
            return None
        with trio.move_on_after(timeout) as scope:
            await p.done.wait()
        if scope.cancelled_caught:
            raise WireTimeout(f"no token from the next stage within {timeout:g} s")
        if p.error is not None:
            raise p.error
        return p.token

    def forget(self, session: str) -> None:
        """The session is closed: a failure of this link no longer concerns it."""
        self._ring_sent.pop(session, None)

    async def _sender(self) -> None:
        while not self.closed:
            await self._wake.wait()
            # No extra checkpoint needed: the sessions woken by one forward pass all run
            # in the scheduler batch that woke this task, so their steps are queued.
            self._wake = trio.Event()
            while self._queue and not self.closed:
                items, self._queue = self._queue[:MAX_ITEMS], self._queue[MAX_ITEMS:]
                await self._send(items)

    async def _send(self, items: list[_Pending]) -> None:
        """One 'steps' frame; a failure fails the link (and every step on it)."""
        fid = next(self._ids)
        # from here on, a failure of the link answers them; a reply comes only for a
        # frame with a relayed token in it
        if not all(p.ring for p in items):
            self._in_flight[fid] = items
        for p in items:
            if p.ring:
                self._ring_sent[p.session] = p
        try:
            async with self._send_lock:
                if self.closed:  # failed while this frame waited for the lock
                    return
                x = torch.stack([p.x for p in items])
                await send_message(self.stream, {"type": "steps", "id": fid,
                                                 "items": [{"session": p.session, "start": p.start,
                                                            "ring": p.ring} for p in items]}, {"x": x})
                self.frames_sent += 1
                self.steps_sent += len(items)
        except Exception as e:
            self._fail(f"sending to the next stage failed: {e}")

    async def _receiver(self) -> None:
        try:
            while True:
                msg = await read_frame(self.stream, timeout=float("inf"))
                items = self._in_flight.pop(msg.get("id"), None)
                results = msg.get("results")
                if msg.get("type") != "tokens" or items is None or not isinstance(results, list) \
                        or len(results) != len(items):
                    raise WireError(f"unexpected reply on the link: {str(msg)[:200]}")
                for p, r in zip(items, results):
                    if p.ring:  # its token went round the ring; an error, through its session
                        continue
                    if isinstance(r, dict):
                        p.error = RemoteError(str(r.get("code", "internal")), str(r.get("message", r)))
                    else:
                        p.token = check_sampled(r)  # a token id, or one with its logprobs
                    p.done.set()
        except Exception as e:
            self._fail(f"the next stage's link failed: {e}")

    def _fail(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        ring = {id(p): p for p in [*self._ring_sent.values(), *self._queue] if p.ring}
        for items in [self._queue, *self._in_flight.values()]:
            for p in items:
                if not p.done.is_set() and not p.ring:
                    p.error = StreamClosed(why)
                    p.done.set()
        self._queue, self._in_flight, self._ring_sent = [], {}, {}
        for p in ring.values():
            p.lost(StreamClosed(why))
        self._wake.set()

    async def aclose(self) -> None:
        self._fail("the link was closed")
        await reset_stream(self.stream)


class Links:
    """A worker's links to next-stage peers, opened on first use, one per peer."""

    PROTOCOL = LINK

    def __init__(self, host):
        self.host = host
        self._links: dict[str, Link] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._nursery = None
        self._started = trio.Event()

    async def run(self) -> None:
        """Own the links' tasks; lives in the worker's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started.set()
            await trio.sleep_forever()

    async def get(self, key: str, connect):
        """The link to the peer whose base58 id is ``key``, dialing it with ``connect()``
        (which returns its libp2p ID) if needed. Once open, no await: a decode step asks
        for its link every token."""
        link = self._links.get(key)
        if link is not None and not link.closed:
            return link
        lock = self._opening.setdefault(key, trio.Lock())
        async with lock:
            link = self._links.get(key)
            if link is None or link.closed:
                peer = await connect()
                try:
                    stream = await self.host.new_stream(peer, [self.PROTOCOL])
                except Exception as e:
                    raise StreamClosed(f"cannot open a {self.PROTOCOL} stream to {key}: {e}") from e
                await self._started.wait()
                link = await self._make(stream, key)
                self._links[key] = link
            return link

    async def _make(self, stream, key: str):
        return Link(stream, self._nursery, lambda lk, key=key: self._forget(key, lk))

    def _forget(self, key: str, link) -> None:
        if self._links.get(key) is link:
            del self._links[key]

    def forget(self, session: str) -> None:
        for link in self._links.values():
            link.forget(session)

    def stats(self) -> dict:
        links = list(self._links.values())
        return {"links": len(links), "frames": sum(lk.frames_sent for lk in links),
                "steps": sum(lk.steps_sent for lk in links)}


class Ring:
    """Stage 0's end of the RING stream to one last-stage peer: it reads the tokens that
    peer samples for this worker's sessions and hands them to ``deliver(peer, results)``;
    ``on_close(ring)`` when the stream ends (the sessions whose tokens it carried fail)."""

    def __init__(self, stream, peer: str, nursery, deliver, on_close):
        self.stream, self.peer = stream, peer
        self.closed = False
        self._deliver, self._on_close = deliver, on_close
        nursery.start_soon(self._receiver)

    async def _receiver(self) -> None:
        try:
            while True:
                msg = await read_frame(self.stream, timeout=float("inf"))
                results = msg.get("results")
                if msg.get("type") != "tokens" or not isinstance(results, list):
                    raise WireError(f"unexpected frame on the ring: {str(msg)[:200]}")
                self._deliver(self.peer, results)
        except Exception as e:
            log.info("the ring from %s closed: %s", self.peer, e)
        self.closed = True
        self._on_close(self)
        await reset_stream(self.stream)

    # a Links entry: no frames or steps of its own to count
    frames_sent = steps_sent = 0

    def forget(self, session: str) -> None:
        pass


class Rings(Links):
    """Stage 0's ring streams, one per last-stage peer, opened when a session's chain is
    (stage 0 dials; nothing needs to dial stage 0, which may be behind a NAT)."""

    PROTOCOL = RING

    def __init__(self, host, deliver, lost, timeout: float = 30.0):
        super().__init__(host)
        self._deliver, self._lost, self._timeout = deliver, lost, timeout

    async def _make(self, stream, key: str) -> Ring:
        try:
            await write_frame(stream, {"type": "ring"}, timeout=self._timeout)
            reply = await read_frame(stream, timeout=self._timeout)
            if reply.get("type") != "ready":
                raise WireError(f"the last stage answered {reply.get('type')!r} to 'ring'")
        except BaseException:
            await reset_stream(stream)
            raise

        def closed(ring):
            self._forget(key, ring)
            self._lost(key)

        return Ring(stream, key, self._nursery, self._deliver, closed)


class RingOut:
    """The last stage's end of a RING stream: tokens for the sessions of the peer that
    opened it."""

    def __init__(self, stream):
        self.stream = stream
        self.closed = False
        self._lock = QuickLock()

    async def send(self, results: list, timeout: float) -> None:
        if self.closed:
            raise StreamClosed("the ring to stage 0 is closed")
        try:
            async with self._lock:
                await write_frame(self.stream, {"type": "tokens", "results": results}, timeout=timeout)
        except WireError:
            self.closed = True
            raise


async def serve_ring(stream, peer: str, outs: dict[str, RingOut], timeout: float = 30.0) -> None:
    """Stream handler body for RING on the last stage: register the stream as the way to
    ``peer`` (stage 0 of its sessions) in ``outs`` until it closes."""
    out = None
    try:
        msg = await read_frame(stream, timeout=timeout)
        if msg.get("type") != "ring":
            raise WireError(f"expected a 'ring' frame, got {str(msg)[:200]}")
        out = RingOut(stream)
        outs[peer] = out
        await write_frame(stream, {"type": "ready"}, timeout=timeout)
        await read_frame(stream, timeout=float("inf"))  # stage 0 sends nothing more: this ends with it
    except (WireError, EOFError) as e:
        log.info("ring from %s closed: %s", peer, e)
    finally:
        if out is not None:
            out.closed = True
            if outs.get(peer) is out:
                del outs[peer]
    await reset_stream(stream)


async def serve_link(stream, run_steps, alone=lambda items: False, *, hidden_size: int | None = None,
                     max_items: int = MAX_ITEMS, idle_timeout: float = LINK_IDLE_TIMEOUT,
                     replied=lambda: None) -> None:
    """Stream handler body for LINK: answer each 'steps' frame with one 'tokens' frame.

    ``run_steps(items, x)`` runs the batch through this stage and the rest of the chain
    and returns one result per item (a token, {code, message}, or None for a ring step);
    it must not raise. A frame of ring steps only is not replied to.
    Frames are served concurrently, each replied to as soon as its batch is done; except
    that a frame for which ``alone(items)`` says that ``run_steps`` will not wait (the
    last stage computing a lone step on the spot) is served by this reading task itself,
    a scheduler turn sooner. A malformed frame, or none for ``idle_timeout`` seconds, ends
    the link (the sender fails its steps and dials anew); no frame is buffered beyond
    ``max_items`` rows of ``hidden_size``. ``replied()`` after each reply written (the
    worker counts them: a stage of a ring chain writes none)."""
    write_lock = QuickLock()  # replies rarely overlap: no scheduler turn when free
    max_message = max_items * (hidden_size or MAX_HIDDEN) * 4  # fp32 rows, the widest dtype

    async def one(msg, x, cancel_scope):
        results = await run_steps(msg["items"], x)
        if all(isinstance(it, dict) and it.get("ring") is True for it in msg["items"]):
            return  # ring steps: their tokens (or their sessions' errors) go another way
        try:
            async with write_lock:
                await write_frame(stream, {"type": "tokens", "id": msg["id"], "results": results})
            replied()
        except WireError as e:
            log.info("link closed while replying: %s", e)
            cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        try:
            while True:
                msg, tensors = await recv_message(stream, timeout=idle_timeout, max_message=max_message)
                items, x = msg.get("items"), tensors.get("x")
                if (msg.get("type") != "steps" or not isinstance(items, list) or not 1 <= len(items) <= max_items
                        or type(msg.get("id")) is not int or x is None):
                    raise WireError(f"expected a 'steps' frame with an int id, 1-{max_items} items and tensor x, "
                                    f"got {str(msg)[:200]}")
                if (x.dim() != 2 or x.shape[0] != len(items) or not x.is_floating_point()
                        or (hidden_size is not None and x.shape[1] != hidden_size)):
                    raise WireError(f"'steps' tensor x is {x.dtype} {list(x.shape)} for {len(items)} items; "
                                    f"expected floating point [{len(items)}, {hidden_size or 'hidden'}]")
                if alone(items):
                    await one(msg, x, nursery.cancel_scope)
                else:
                    nursery.start_soon(one, msg, x, nursery.cancel_scope)
        except (WireError, EOFError) as e:
            log.info("link closed: %s", e)
        except Exception:  # nothing a peer sends may take the worker down
            log.exception("link failed")
        nursery.cancel_scope.cancel()
    await reset_stream(stream)
