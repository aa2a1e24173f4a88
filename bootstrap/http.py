"""An OpenAI-compatible HTTP API on the bootstrap: any OpenAI client can ask the swarm.

    GET  /v1/models
    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p",
                                 "top_k", "seed", "stream"}
    POST /v1/completions        the same with "prompt" instead of "messages"
    GET  /health                the bootstrap's live view (workers, complete chains)

Each request goes through the same path as a libp2p query (Bootstrap.prepare and
Bootstrap.answer), so failover, routing and limits are the same. Served by Hypercorn on
the bootstrap's own trio loop; Starlette runs on trio through anyio.
"""

from __future__ import annotations

import json
import time
import uuid

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from p2pserve.bootstrap.server import Bootstrap
from p2pserve.errors import P2PServeError
from p2pserve.metrics import metrics_route

STATUS = {"bad_request": 400, "unknown_model": 404, "busy": 503, "no_pipeline": 503, "internal": 500}
DEFAULT_MAX_TOKENS = 256


def _error(code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": code}},
                        status_code=STATUS.get(code, 500))


def _query_from_openai(body: dict, chat: bool) -> dict:
    """The OpenAI request body as a p2pserve query message."""
    if not isinstance(body, dict):
        raise P2PServeError("the request body must be a JSON object", code="bad_request")
    params = {"max_new_tokens": body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS,
              "temperature": body.get("temperature", 1.0),  # OpenAI's default
              "top_p": body.get("top_p", 1.0), "top_k": body.get("top_k", 0), "seed": body.get("seed")}
    msg = {"model": body.get("model"), "params": params, "stop_on_eos": True}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise P2PServeError("'messages' must be a non-empty list of {role, content}", code="bad_request")
        msg["messages"] = [{"role": str(m.get("role")), "content": str(m.get("content", ""))} for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            msg["tokens"] = prompt
        elif isinstance(prompt, str):
            msg["prompt"], msg["chat"] = prompt, False
        else:
            raise P2PServeError("'prompt' must be a string or a list of token ids", code="bad_request")
    return msg


def make_app(node: Bootstrap) -> Starlette:
    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": node.config.name, "object": "model", "created": 0, "owned_by": "p2pserve"}]})

    async def health(request: Request):
        st = node.status()
        return JSONResponse(st, status_code=200 if st["chains"] else 503)

    async def completions(request: Request, chat: bool):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error("bad_request", "the request body is not valid JSON")
        try:
            prompt, params, pipeline, stop_on_eos = node.prepare(_query_from_openai(body, chat))
        except P2PServeError as e:
            return _error(e.code, e.message)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        model = body.get("model") or node.config.name
        send, recv = trio.open_memory_channel(float("inf"))

        async def emit(frames):
            for frame in frames:
                await send.send(frame)

        async def run():
            async with send:
                try:
                    await node.answer(emit, prompt, params, pipeline, stop_on_eos)
                except P2PServeError as e:
                    await send.send({"type": "error", "code": e.code, "message": e.message})

        def chunk(text: str, finish: str | None) -> dict:
            if chat:
                choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish}]}

        if body.get("stream"):
            async def events():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run)
                    if chat:
                        yield _sse({**chunk("", None), "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                                   "finish_reason": None}]})
                    async with recv:
                        async for frame in recv:
                            if frame["type"] == "token" and frame["text"]:
                                yield _sse(chunk(frame["text"], None))
                            elif frame["type"] == "done":
                                if frame["text"]:
                                    yield _sse(chunk(frame["text"], None))
                                yield _sse(chunk("", frame["finish_reason"]))
                            elif frame["type"] == "error":
                                yield _sse({"error": {"message": frame["message"], "type": frame["code"],
                                                      "code": frame["code"]}})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        text, done, error = "", None, None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            async with recv:
                async for frame in recv:
                    if frame["type"] in ("token", "done"):
                        text += frame["text"]
                    if frame["type"] == "done":
                        done = frame
                    elif frame["type"] == "error":
                        error = frame
        if error is not None:
            return _error(error["code"], error["message"])
        usage = {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["n_tokens"],
                 "total_tokens": done["prompt_tokens"] + done["n_tokens"]}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": done["finish_reason"]}
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [choice], "usage": usage})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [{"index": 0, "text": text, "finish_reason": done["finish_reason"]}],
                             "usage": usage})

    async def chat_completions(request: Request):
        return await completions(request, chat=True)

    async def text_completions(request: Request):
        return await completions(request, chat=False)

    return Starlette(routes=[
        Route("/v1/models", models),
        Route("/health", health),
        metrics_route(node),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
    ])


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def serve_http(node: Bootstrap, bind: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = None
    await serve(make_app(node), config, task_status=task_status)
