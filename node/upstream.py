"""Stage 0's writer of tokens to the head, at most one frame per stream interval."""

from __future__ import annotations

import trio

from p2pserve.net.wire import write_frames


class UpstreamWriter:
    """Stage 0's tokens to the bootstrap, as 'tokens' frames, then the final frame.

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
        self._final: dict | None = None
        self._last_write = float("-inf")
        self._due = trio.Event()
        self._wrote = trio.Event()  # set (and replaced) after each write
        self.wakeups = 0  # times the writer task woke (for tests)

    def push(self, token: int) -> None:
        """Queue a token; no scheduler turn. A due write happens at this task's next
        wait: after the next forward pass and its send down the chain, while the next
        stage computes (the bootstrap's and the client's Python then delay that pass
        less than this stage's own, traced: +1.1 ms a write instead of +4.0 ms)."""
        self._held.append(token)
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
            frames = ([{"type": "tokens", "tokens": self._held}] if self._held else []) + ([final] if final else [])
            self._held = []
            if frames:
                await write_frames(self.stream, frames)
                self._last_write = trio.current_time()
                self._wrote.set()
                self._wrote = trio.Event()
            if final:
                return
