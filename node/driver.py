"""Stage 0's driver: runs an answer's generation loop through the chain and streams its
tokens upstream (to the head) as they come."""

from __future__ import annotations

import torch
import trio

from p2pserve.engine.generate import GenerationLoop
from p2pserve.net.wire import read_frame
from p2pserve.node.upstream import UpstreamWriter


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
            token = await server.step(session, torch.tensor(step.tokens), step.start, step.want)
            if not step.want:
                continue
            loop.take(token)
            upstream.push(token)
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
