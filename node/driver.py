"""Stage 0's driver: runs an answer's generation loop through the chain and streams its
tokens upstream (to the head) as they come, at most one frame per stream interval."""

from __future__ import annotations

import torch
import trio

from p2pserve.engine.generate import GenerationLoop, Sampled
from p2pserve.net.wire import read_frame, write_frames


async def drive(server, stream, session) -> None:
    """Stage 0: run the whole generation, streaming tokens upstream as they come."""
    msg = session.open_msg
    loop = GenerationLoop(session.prompt, session.params.max_new_tokens,
                          {int(t) for t in msg.get("eos") or []}, bool(msg.get("stop_on_eos", True)))
    # Tokens go upstream from a task of their own: the next step is queued at once,
    # so the sessions woken by one forward pass make the next one together instead of
    # trickling in behind each other's frame writes.
    upstream = UpstreamWriter(stream, session.stream_interval)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_upstream, stream, nursery.cancel_scope)
        nursery.start_soon(upstream.run)
        while (step := loop.next_step()) is not None:
            result = await server.step(session, torch.tensor(step.tokens), step.start, step.want)
            if not step.want:
                continue
            sampled = result if isinstance(result, Sampled) else None
            loop.take(sampled.token if sampled else result)
            upstream.push(loop.tokens[-1], sampled and [sampled.logprob, sampled.top])
            if len(loop.tokens) == 1:
                await upstream.flush()
        await upstream.finish({"type": "done", "n_tokens": len(loop.tokens)})
        nursery.cancel_scope.cancel()


async def _watch_upstream(stream, scope) -> None:
    """The client or bootstrap may cancel (a frame) or vanish (EOF): stop generating."""
    try:
        await read_frame(stream, timeout=float("inf"))
    except Exception:
        pass
    scope.cancel()


class UpstreamWriter:
    """Stage 0's tokens to the bootstrap, as 'tokens' frames, then the final frame. When
    the session asked for logprobs, a frame's 'logprobs' has [logprob, [[id, logprob]...]]
    for each of its tokens.

    A token goes at once if the last write was ``interval`` seconds ago or more;
    otherwise it is held, and the held tokens go with the first token that comes once
    the interval has passed, or ``interval`` later still if none comes (a slow step).
    The first token is never held (time to first token is unchanged); the final frame
    goes at once, with the tokens before it.

    Writes thus happen when a token arrives, while this stage is awake anyway, not on a
    timer of their own: on a machine whose cores the stages share, a timer would wake
    this process in the middle of the next stage's forward pass. Every write costs
    Python (0.1-0.3 ms) at each of stage 0, the bootstrap and the client, beside the
    cores that compute the next token. ``push`` is synchronous and wakes the writer task
    only when a write is due: a held token costs no scheduler turn on stage 0's path
    from one forward pass to the next."""

    def __init__(self, stream, interval: float):
        self.stream, self.interval = stream, interval
        self._held: list[int] = []
        self._held_logprobs: list = []  # one entry per held token, when logprobs are asked
        self._final: dict | None = None
        self._last_write = float("-inf")
        self._due = trio.Event()
        self._wrote = trio.Event()  # set (and replaced) after each write
        self.wakeups = 0  # times the writer task woke (for tests)

    def push(self, token: int, logprobs: list | None = None) -> None:
        """Queue a token; no scheduler turn. A due write happens at this task's next
        wait: after the next forward pass and its send down the chain, while the next
        stage computes (the bootstrap's and the client's Python then delay that pass
        less than this stage's own, traced: +1.1 ms a write instead of +4.0 ms)."""
        self._held.append(token)
        if logprobs is not None:
            self._held_logprobs.append(logprobs)
        if trio.current_time() >= self._last_write + self.interval:
            self._due.set()

    async def flush(self) -> None:
        """Write every token pushed so far now, before this task goes on (the first
        token: time to first token does not wait for a forward pass)."""
        while self._held or self._final is not None:
            self._due.set()
            await self._wrote.wait()

    async def finish(self, frame: dict) -> None:
        """Send ``frame`` after every token pushed so far; return once it is written."""
        self._final = frame
        await self.flush()

    async def run(self) -> None:
        """The writer task: returns once the final frame is written."""
        while True:
            # a slow step: tokens held since the last write go at the latest one interval
            # late (push does not wake this task for a held token, so the deadline is set
            # now; it passes with nothing held only after a pause of two intervals)
            with trio.move_on_at(self._last_write + 2 * self.interval):
                await self._due.wait()
            if not (self._due.is_set() or self._held):
                await self._due.wait()
            self.wakeups += 1
            self._due = trio.Event()
            final, self._final = self._final, None
            tokens = {"type": "tokens", "tokens": self._held}
            if self._held_logprobs:
                tokens["logprobs"] = self._held_logprobs
            frames = ([tokens] if self._held else []) + ([final] if final else [])
            self._held, self._held_logprobs = [], []
            if frames:
                await write_frames(self.stream, frames)
                self._last_write = trio.current_time()
                self._wrote.set()
                self._wrote = trio.Event()
            if final:
                return
