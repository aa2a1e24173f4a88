"""Asking a swarm: the client side of the query protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from p2pserve.net.protocols import QUERY, STATUS
from p2pserve.engine.generate import SamplingParams
from p2pserve.net.wire import RemoteError, StreamClosed, read_frame, reset_stream, write_frame
from p2pserve.errors import P2PServeError


class QueryError(P2PServeError):
    """The head refused or could not answer a query."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


@dataclass
class Answer:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stats: dict = field(default_factory=dict)
    routes: list[list[str]] = field(default_factory=list)  # the chain of each attempt (peer ids)


async def ask(host, bootstrap_id, *, prompt: str | None = None, tokens: list[int] | None = None,
              model: str | None = None, chat: bool = True, params: SamplingParams = SamplingParams(),
              stop_on_eos: bool = True, timeout: float = 120.0, resume: list[int] = ()) -> AsyncIterator[dict]:
    """Yield the bootstrap's frames for one query: {"type": "token", "token", "text"}…, then
    {"type": "done", …}. A refusal or failure raises QueryError with the bootstrap's reason.
    ``resume``: the answer's tokens already received (from a head that died): the head
    goes on after them, and its text continues theirs.

    A stream that closes before its first frame is opened again, once: nothing of the
    answer was delivered, and the head saw no query (seen in a test of 32 queries at once:
    py-libp2p's muxer closed one new stream at both ends before its first frame)."""
    msg = {"type": "query", "model": model, "chat": chat, "params": params.to_dict(), "stop_on_eos": stop_on_eos}
    if resume:
        msg["resume"] = list(resume)
    if tokens is not None:
        msg["tokens"] = list(tokens)
    else:
        msg["prompt"] = prompt or ""
    for retry in (False, True):
        stream = await host.new_stream(bootstrap_id, [QUERY])
        try:
            try:
                await write_frame(stream, msg)
                frame = await read_frame(stream, timeout=timeout)
            except StreamClosed:
                if retry:
                    raise
                continue
            yield frame
            while frame.get("type") != "done":
                frame = await read_frame(stream, timeout=timeout)
                yield frame
            return
        except RemoteError as e:
            raise QueryError(e.code, e.message) from None
        finally:
            await reset_stream(stream)


async def ask_heads(host, heads: list, **kw) -> AsyncIterator[dict]:
    """``ask`` through the first of ``heads`` (peer ids) that answers; when that head fails
    mid-answer, the answer goes on through the next, after the tokens already yielded, so
    the frames read as one uninterrupted answer. A refusal (QueryError) is not retried."""
    generated: list[int] = []
    failures = []
    for head in heads:
        try:
            async for frame in ask(host, head, resume=generated, **kw):
                if frame.get("type") == "token":
                    generated.append(int(frame["token"]))
                yield frame
                if frame.get("type") == "done":
                    return
        except QueryError:
            raise
        except Exception as e:  # the head died or the link to it broke: the next head goes on
            failures.append(f"{head}: {e}")
    raise QueryError("no_pipeline", "every head failed: " + "; ".join(failures))


async def ask_all(host, bootstrap_id, **kw) -> Answer:
    answer = Answer()
    async for frame in ask(host, bootstrap_id, **kw):
        if frame["type"] == "token":
            answer.tokens.append(int(frame["token"]))
            answer.text += frame.get("text", "")
        elif frame["type"] == "route":
            answer.routes.append(frame["chain"])
        elif frame["type"] == "done":
            answer.text += frame.get("text", "")
            answer.stats = frame
    return answer


async def status(host, bootstrap_id, timeout: float = 10.0) -> dict:
    """The bootstrap's live view: {"workers": [...], "chains": [[peer id, ...]], "missing": str}."""
    stream = await host.new_stream(bootstrap_id, [STATUS])
    try:
        await write_frame(stream, {"type": "status"})
        return await read_frame(stream, timeout=timeout)
    finally:
        await reset_stream(stream)
