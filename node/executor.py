"""Iteration-level batching of one stage's work (Orca / vLLM style).

Every session's step (a prefill chunk or a one-token decode) is a request. The batcher
takes everything that is ready, runs all decode steps as one forward pass and at most
one prefill chunk beside them, and hands each session its own result.

Every forward pass runs on the process's one compute thread (``p2pserve/compute.py``:
a second OpenMP team in the process made libgomp stop spinning, ~1.7x slower decode
steps), so the trio loop keeps serving frames and heartbeats meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import trio

from p2pserve.compute import compute_thread
from p2pserve.errors import Busy
from p2pserve.model import Batch
from p2pserve.sampling import SamplingParams, sample
from p2pserve.stage import StageRunner


@dataclass
class StepRequest:
    slot: int
    start: int
    x: torch.Tensor  # [T] token ids on stage 0, [T, hidden] elsewhere
    want: bool  # sample a token (last stage only)
    params: SamplingParams | None
    done: trio.Event = field(default_factory=trio.Event)
    result: object = None
    error: BaseException | None = None

    @property
    def n_tokens(self) -> int:
        return self.x.shape[0]


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
    the rest, which are usually in flight a hop away, so that they share one pass."""

    GATHER_FRACTION = 0.15  # of the last forward pass's time
    MAX_GATHER = 0.005  # seconds

    def __init__(self, runner: StageRunner, max_batch: int = 64, sessions=lambda: 0, compute=None):
        self.runner = runner
        self.compute = compute or compute_thread()
        self.max_batch = max_batch
        self.sessions = sessions
        self._last_forward = 0.0
        self._send, self._recv = trio.open_memory_channel(float("inf"))
        self.steps = 0  # forward passes run (for stats and tests)
        self.batched_requests = 0

    async def step(self, req: StepRequest):
        """Queue one session's step and wait for its result (hidden states, logits or token)."""
        await self._send.send(req)
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    async def run(self) -> None:
        """The batcher task: lives in the worker's nursery for the worker's life."""
        pending: list[StepRequest] = []
        while True:
            if not pending:
                pending.append(await self._recv.receive())
            self._drain(pending)
            if len(pending) < self.sessions():
                await trio.sleep(min(self.MAX_GATHER, self.GATHER_FRACTION * self._last_forward))
                self._drain(pending)
            decodes = [r for r in pending if r.n_tokens == 1][: self.max_batch]
            prefill = next((r for r in pending if r.n_tokens > 1), None)
            groups = ([decodes] if decodes else []) + ([[prefill]] if prefill is not None else [])
            taken = {id(r) for g in groups for r in g}
            pending = [r for r in pending if id(r) not in taken]
            t0 = trio.current_time()
            await self.compute.run(partial(self._compute, groups))
            self._last_forward = trio.current_time() - t0
            for group in groups:
                for r in group:
                    r.done.set()

    def _drain(self, pending: list[StepRequest]) -> None:
        """Take everything that is ready now."""
        while True:
            try:
                pending.append(self._recv.receive_nowait())
            except trio.WouldBlock:
                return

    def _compute(self, groups: list[list[StepRequest]]) -> None:
        for group in groups:
            try:
                self._forward(group)
            except BaseException as e:  # every request of the group learns of it
                for r in group:
                    r.error = e

    def _forward(self, group: list[StepRequest]) -> None:
        group.sort(key=lambda r: r.slot)  # consecutive slots attend to a view of the cache
        batch = Batch(tuple(r.slot for r in group), tuple(r.start for r in group), group[0].n_tokens)
        x = torch.stack([r.x for r in group])
        out = self.runner.forward(batch, x)
        self.steps += 1
        self.batched_requests += len(group)
        if self.runner.model.is_last:
            for r, logits in zip(group, out):
                r.result = sample(logits, r.params, r.start + r.n_tokens) if r.want else None
        else:
            for r, h in zip(group, out):
                r.result = h
