"""Iteration-level batching of one stage's work (Orca / vLLM style).

Every session's step (a prefill chunk or a one-token decode) is a request. The batcher
takes everything that is ready, runs all decode steps as one forward pass and at most
one prefill chunk beside them, and hands each session its own result.

Every forward pass runs where ``node/compute.py`` says: on a CPU worker the trio
loop's own thread, which hears nothing else while a pass runs; on CUDA a compute thread.
So no pass may last long: a prefill longer than ``MAX_PASS`` seconds' worth of tokens is
cut into pieces, one per pass, and the decode steps of other sessions ride along with
each piece instead of waiting for the whole prompt (chunked prefill, as in Sarathi and
vLLM). The time per prefill token is measured by a warm-up pass at startup and by every
pass after it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import trio

from p2pserve.node.compute import InlineCompute, compute_thread
from p2pserve.errors import Busy
from p2pserve.engine.model import Batch
from p2pserve.engine.generate import SamplingParams, next_token

log = logging.getLogger("p2pserve.cores")  # on without --verbose: an operator wants to see it


@dataclass
class StepRequest:
    slot: int
    start: int
    x: torch.Tensor  # [T] token ids on stage 0, [T, hidden] elsewhere
    want: bool  # sample a token (last stage only)
    params: SamplingParams | None
    history: list[int] | None = None  # last stage: the session's tokens so far, grown by each sample
    done: trio.Event = field(default_factory=trio.Event)
    result: object = None
    error: BaseException | None = None
    computed: int = 0  # tokens of x already through the stage (a prefill may take several passes)
    parts: list = field(default_factory=list)  # their hidden states, until the last piece

    @property
    def n_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def complete(self) -> bool:
        """Every piece computed, or failed."""
        return self.computed == self.n_tokens or self.error is not None


class SlotPool:
    """KV-cache slots: a session holds one while it lives; beyond them, a bounded wait."""

    def __init__(self, n_slots: int, max_waiting: int):
        self.free = list(range(n_slots - 1, -1, -1))
        self.n_slots = n_slots
        self.max_waiting = max_waiting
        self.waiting = 0
        self._freed = trio.Condition()

    @property
    def in_use(self) -> int:
        return self.n_slots - len(self.free)

    async def acquire(self) -> int:
        if not self.free and self.waiting >= self.max_waiting:
            raise Busy(f"all {self.n_slots} sessions and {self.max_waiting} queue places are taken; retry later")
        self.waiting += 1
        try:
            async with self._freed:
                while not self.free:
                    await self._freed.wait()
                return self.free.pop()
        finally:
            self.waiting -= 1

    async def release(self, slot: int) -> None:
        self.free.append(slot)
        async with self._freed:
            self._freed.notify()


class BatchingExecutor:
    """``sessions()`` says how many sessions are open on this stage: when fewer steps are
    ready than that, the batcher waits a moment (a small fraction of a forward pass) for
    the rest, which are usually in flight a hop away, so that they share one pass.

    ``runner`` steps the stage: a StageModel, or a runner of several ranks with its
    interface (``p2pserve.ranks.stages``: forward, allocate, max_len, config, is_first,
    is_last)."""

    GATHER_FRACTION = 0.15  # of the last forward pass's time
    MAX_GATHER = 0.005  # seconds
    MAX_PASS = 0.2  # seconds a pass may block (the loop's heartbeats are every 2 s)
    MIN_PIECE = 16  # tokens: a prefill piece is never cut smaller, and the shortest one timed

    def __init__(self, runner, max_batch: int = 64, sessions=lambda: 0, compute=None, threads=None):
        self.runner = runner
        self.threads = threads  # a ranks.cores.ThreadFollower, or None: the thread count stays
        self.compute = compute or compute_thread()
        self.max_batch = max_batch
        self.sessions = sessions
        self._last_forward = 0.0
        self.prefill_seconds_per_token: float | None = None  # measured; None: no limit yet
        self._send, self._recv = trio.open_memory_channel(float("inf"))
        self._idle = False  # the batcher waits for work, nothing pending
        self.last_decodes = 0  # decode steps in the last pass
        self.steps = 0  # forward passes run (for stats and tests)
        self.batched_requests = 0

    def warm_up(self) -> None:
        """One prefill of MIN_PIECE tokens into slot 0 (a session that takes the slot later
        overwrites it): the first query does not pay first-use costs, and the time per
        prefill token is known before a long prompt arrives. Run it through ``compute``."""
        n = self.MIN_PIECE
        x = torch.zeros(n, dtype=torch.long) if self.runner.is_first else \
            torch.zeros(n, self.runner.config.hidden_size)
        req = StepRequest(0, 0, x, False, None)
        self._compute([], req)
        self.steps = self.batched_requests = 0
        if req.error is not None:
            raise req.error

    async def step(self, req: StepRequest):
        """Queue one session's step and wait for its result (hidden states, logits or token)."""
        if req.n_tokens == 1 and self.alone():
            await trio.lowlevel.checkpoint_if_cancelled()
            self._run_pass([req], None)
        else:
            await self._send.send(req)
            await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def alone(self) -> bool:
        """Is this stage's one session stepping with nothing to batch it with? The one
        decision behind every lone-session path: its decode step then runs in its own task
        (``step``), goes down the link from that task (``Link.step``), and the last stage
        answers its link frame from the link's reading task (``serve_link``); each hand-off
        between tasks would cost a scheduler turn and batch nothing. Only on a CPU worker,
        where a pass blocks the loop and so cannot overlap the batcher's anyway.

        Unlike ``InlineCompute.run`` the lone step does not first let runnable tasks reach
        their next wait: they run after the pass. For stage 0's token writer that is the
        point: its write then goes while the next stage computes."""
        return (self._idle and isinstance(self.compute, InlineCompute) and self.sessions() <= 1
                and self._recv.statistics().current_buffer_used == 0)

    def _run_pass(self, decodes: list[StepRequest], prefill: StepRequest | None) -> None:
        """One forward pass, on whatever thread runs it, and its bookkeeping."""
        if self.threads is not None and (threads := self.threads.follow()):
            log.info("now %d torch thread(s) per rank: p2pserve workers came or went on this machine", threads)
        t0 = time.perf_counter()
        self._compute(decodes, prefill)
        self._last_forward = time.perf_counter() - t0
        self.last_decodes = len(decodes)

    async def run(self) -> None:
        """The batcher task: lives in the worker's nursery for the worker's life."""
        pending: list[StepRequest] = []
        while True:
            if not pending:
                self._idle = True
                try:
                    pending.append(await self._recv.receive())
                finally:
                    self._idle = False
            self._drain(pending)
            if len(pending) < self.sessions():
                await trio.sleep(min(self.MAX_GATHER, self.GATHER_FRACTION * self._last_forward))
                self._drain(pending)
            decodes = [r for r in pending if r.n_tokens == 1][: self.max_batch]
            prefill = next((r for r in pending if r.n_tokens > 1), None)
            await self.compute.run(partial(self._run_pass, decodes, prefill))
            finished = decodes + ([prefill] if prefill is not None and prefill.complete else [])
            for r in finished:
                r.done.set()
            taken = {id(r) for r in finished}
            pending = [r for r in pending if id(r) not in taken]
            self._idle = not pending  # already: the sessions just woken may run at once
            await trio.lowlevel.checkpoint()  # an inline pass did not yield: others' turn

    def _drain(self, pending: list[StepRequest]) -> None:
        """Take everything that is ready now."""
        while True:
            try:
                pending.append(self._recv.receive_nowait())
            except trio.WouldBlock:
                return

    def _compute(self, decodes: list[StepRequest], prefill: StepRequest | None) -> None:
        """One pass: every decode step, and the next piece of at most one prefill."""
        if decodes:
            _guarded(decodes, lambda: self._decode(decodes))
        if prefill is not None:
            _guarded([prefill], lambda: self._prefill_piece(prefill))

    def _piece_len(self, r: StepRequest) -> int:
        left = r.n_tokens - r.computed
        if self.prefill_seconds_per_token is None:
            return left
        return min(left, max(self.MIN_PIECE, int(self.MAX_PASS / self.prefill_seconds_per_token)))

    def _prefill_piece(self, r: StepRequest) -> None:
        a = r.computed
        b = a + self._piece_len(r)
        t0 = time.perf_counter()
        out = self.runner.forward(Batch((r.slot,), (r.start + a,), b - a), r.x[a:b].unsqueeze(0))[0]
        if b - a >= self.MIN_PIECE:  # a short piece's time is mostly fixed costs
            self.prefill_seconds_per_token = (time.perf_counter() - t0) / (b - a)
        self.steps += 1
        r.computed = b
        if b < r.n_tokens:
            if not self.runner.is_last:
                r.parts.append(out)
            return
        self.batched_requests += 1
        if self.runner.is_last:
            r.result = _answer(r, out, r.start + b) if r.want else None
        else:
            r.result = torch.cat([*r.parts, out]) if r.parts else out
            r.parts = []

    def _decode(self, group: list[StepRequest]) -> None:
        group.sort(key=lambda r: r.slot)  # consecutive slots attend to a view of the cache
        batch = Batch(tuple(r.slot for r in group), tuple(r.start for r in group), 1)
        out = self.runner.forward(batch, torch.stack([r.x for r in group]))
        self.steps += 1
        self.batched_requests += len(group)
        if self.runner.is_last:
            for r, logits in zip(group, out):  # one request's sampling error fails it alone
                _guarded([r], lambda: setattr(r, "result", _answer(r, logits, r.start + 1) if r.want else None))
        else:
            for r, h in zip(group, out):
                r.result = h


def _answer(r: StepRequest, logits: torch.Tensor, position: int):
    """The last stage's token (with its logprobs if asked) for a step that wants one; the
    session's history, which the penalties read, grows by it."""
    result = next_token(logits, r.params, position, r.history or ())
    if r.history is not None:
        r.history.append(result if isinstance(result, int) else result.token)
    return result


def _guarded(group: list[StepRequest], run) -> None:
    try:
        run()
    except BaseException as e:  # every request of the group learns of it
        for r in group:
            r.error = e
