"""Decode steps of many sessions, batched on one stream between two workers.

A session opens, prefills and closes on its own SESSION stream (see ``worker.py``). Its
one-token decode steps, though, travel on a LINK stream that a worker keeps to each
next-stage peer it talks to: the steps of every session that became ready together
(the sessions of one batched forward pass) go down as one frame, and their tokens come
back as one frame. A libp2p frame costs Python on each side (0.1-0.3 ms on a worker's
cores even with p2pserve/net/fastio.py, ~0.5 ms before it), so sixteen sessions pay for one
frame per hop instead of sixteen.

Frames on a LINK stream:

    down  steps  {id, items: [{session, start}]} + tensor "x" [B, hidden], row i for item i
    up    tokens {id, results: [token | [token, logprob, top] | {code, message}]}, in item order
          (the list when the session asked for logprobs, engine/generate.py: Sampled)

A failed item (unknown session, a later stage's refusal) raises RemoteError for that
session only; a broken stream fails every step in flight on it with StreamClosed (a
missing reply with WireTimeout), as a session stream would, and the next step dials anew.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch
import trio

from p2pserve.engine.generate import check_sampled
from p2pserve.net.locks import QuickLock
from p2pserve.net.protocols import LINK
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


class Link:
    """This worker's end of the LINK stream to one next-stage peer."""

    def __init__(self, stream, nursery, on_close):
        self.stream = stream
        self._queue: list[_Pending] = []
        self._wake = trio.Event()
        self._in_flight: dict[int, list[_Pending]] = {}
        self._send_lock = QuickLock()  # one frame at a time on the stream
        self._ids = itertools.count()
        self._on_close = on_close
        self.closed = False
        self.frames_sent = 0
        self.steps_sent = 0
        nursery.start_soon(self._sender)
        nursery.start_soon(self._receiver)

    async def step(self, session: str, start: int, x: torch.Tensor, timeout: float, *, alone: bool = False) -> int:
        """Send one session's decode step (x: [1, hidden]) down the chain; its token.

        ``alone``: no other session's step is coming from the same forward pass, so the
        step goes in a frame of its own at once, from this task (no hop to the sender
        task); otherwise it is queued for the sender, which batches it with the others."""
        if self.closed:
            raise StreamClosed("the link to the next stage is closed")
        p = _Pending(session, start, x.reshape(-1))
        if alone and not self._queue and not self._send_lock.locked():
            # shielded: a session cancelled mid-write would reset the link under everyone
            # (the write has its own deadline)
            with trio.CancelScope(shield=True):
                await self._send([p])
        else:
            self._queue.append(p)
            self._wake.set()
        with trio.move_on_after(timeout) as scope:
            await p.done.wait()
        if scope.cancelled_caught:
            raise WireTimeout(f"no token from the next stage within {timeout:g} s")
        if p.error is not None:
            raise p.error
        return p.token

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
        self._in_flight[fid] = items  # from here on, a failure of the link answers them
        try:
            async with self._send_lock:
                if self.closed:  # failed while this frame waited for the lock
                    return
                x = torch.stack([p.x for p in items])
                await send_message(self.stream, {"type": "steps", "id": fid,
                                                 "items": [{"session": p.session, "start": p.start}
                                                           for p in items]}, {"x": x})
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
        for items in [self._queue, *self._in_flight.values()]:
            for p in items:
                if not p.done.is_set():
                    p.error = StreamClosed(why)
                    p.done.set()
        self._queue, self._in_flight = [], {}
        self._wake.set()

    async def aclose(self) -> None:
        self._fail("the link was closed")
        await reset_stream(self.stream)


class Links:
    """A worker's links to next-stage peers, opened on first use, one per peer."""

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

    async def get(self, key: str, connect) -> Link:
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
                    stream = await self.host.new_stream(peer, [LINK])
                except Exception as e:
                    raise StreamClosed(f"cannot open a link to {key}: {e}") from e
                await self._started.wait()
                link = Link(stream, self._nursery, lambda lk, key=key: self._forget(key, lk))
                self._links[key] = link
            return link

    def _forget(self, key: str, link: Link) -> None:
        if self._links.get(key) is link:
            del self._links[key]

    def stats(self) -> dict:
        links = list(self._links.values())
        return {"links": len(links), "frames": sum(lk.frames_sent for lk in links),
                "steps": sum(lk.steps_sent for lk in links)}


async def serve_link(stream, run_steps, alone=lambda items: False, *, hidden_size: int | None = None,
                     max_items: int = MAX_ITEMS, idle_timeout: float = LINK_IDLE_TIMEOUT) -> None:
    """Stream handler body for LINK: answer each 'steps' frame with one 'tokens' frame.

    ``run_steps(items, x)`` runs the batch through this stage and the rest of the chain
    and returns one result per item (a token, or {code, message}); it must not raise.
    Frames are served concurrently, each replied to as soon as its batch is done; except
    that a frame for which ``alone(items)`` says that ``run_steps`` will not wait (the
    last stage computing a lone step on the spot) is served by this reading task itself,
    a scheduler turn sooner. A malformed frame, or none for ``idle_timeout`` seconds, ends
    the link (the sender fails its steps and dials anew); no frame is buffered beyond
    ``max_items`` rows of ``hidden_size``."""
    write_lock = QuickLock()  # replies rarely overlap: no scheduler turn when free
    max_message = max_items * (hidden_size or MAX_HIDDEN) * 4  # fp32 rows, the widest dtype

    async def one(msg, x, cancel_scope):
        results = await run_steps(msg["items"], x)
        try:
            async with write_lock:
                await write_frame(stream, {"type": "tokens", "id": msg["id"], "results": results})
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
