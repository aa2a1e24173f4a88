"""An OpenAI-compatible HTTP API on the bootstrap: any OpenAI client can ask the swarm.

    GET  /v1/models, /v1/models/{id}
    POST /v1/chat/completions   {"model", "messages", "max_tokens" | "max_completion_tokens",
                                 "temperature", "top_p", "top_k", "seed", "n", "stop", "stream",
                                 "stream_options": {"include_usage"}, "logprobs", "top_logprobs",
                                 "presence_penalty", "frequency_penalty"}
    POST /v1/completions        the same with "prompt" instead of "messages" and
                                "logprobs": N instead of "logprobs" + "top_logprobs"
    GET  /health                the bootstrap's live view (workers, complete chains)

Each choice goes through the same path as a libp2p query (Bootstrap.prepare and
Bootstrap.answer), so failover, routing and limits are the same; ``n`` choices are ``n``
sessions in parallel. A parameter p2pserve does not implement (``tools``,
``response_format``, ...) is refused by name, never ignored. Every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}``. With API keys (``--api-key``) every
request needs ``Authorization: Bearer KEY``; ``--rate-limit`` caps each key's requests per
minute. A client that disconnects cancels its generation, streamed or not.

Served by Hypercorn on the bootstrap's own trio loop; Starlette runs on trio through anyio.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p2pserve.bootstrap.server import Bootstrap
from p2pserve.engine.generate import SamplingParams
from p2pserve.errors import ConfigError, P2PServeError
from p2pserve.bootstrap.dashboard import dashboard_routes
from p2pserve.metrics import metrics_route

log = logging.getLogger("p2pserve.http")

# OpenAI's status and error type for each p2pserve error code
STATUS = {"bad_request": (400, "invalid_request_error"), "invalid_api_key": (401, "invalid_request_error"),
          "unknown_model": (404, "invalid_request_error"), "model_not_found": (404, "invalid_request_error"),
          "not_found": (404, "invalid_request_error"), "method_not_allowed": (405, "invalid_request_error"),
          "rate_limit_exceeded": (429, "rate_limit_error"), "busy": (503, "server_error"),
          "no_pipeline": (503, "server_error")}
DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 16  # n: each choice holds a session (a KV slot) on every stage of its chain
MAX_STOPS = 4  # OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
MAX_BUCKETS = 10_000  # rate-limit buckets kept before the full ones are dropped
# OpenAI parameters p2pserve does not implement: refused by name rather than ignored
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
               "suffix", "echo", "best_of", "audio", "modalities", "prediction")


class RequestError(P2PServeError):
    """A bad request, naming the parameter at fault (OpenAI's ``param``)."""

    code = "bad_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_response(code: str, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    status, kind = STATUS.get(code, (500, "server_error"))
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ---- the request ----------------------------------------------------------------------


@dataclass
class Ask:
    """One checked OpenAI request: the query for Bootstrap.prepare, and what the HTTP
    side does itself (choices, stop strings, streaming, the shape of logprobs)."""
    chat: bool
    query: dict
    n: int = 1
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, name: str, check, what: str, default=None):
    """``body[name]`` if present and not null, checked; ``default`` if absent."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise RequestError(f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def parse_request(body, chat: bool) -> Ask:
    """The OpenAI request body, checked: every parameter of the right type and range, or a
    RequestError naming it."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in UNSUPPORTED:
        value = body.get(name)
        if value not in (None, [], {}, False) and not (name == "response_format" and value == {"type": "text"}):
            raise RequestError(f"'{name}' is not supported by p2pserve; send the request without it", name)
    model = _get(body, "model", lambda v: isinstance(v, str), "a model name")
    max_tokens = _get(body, "max_completion_tokens", _is_int, "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", _is_int, "an integer", DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise RequestError(f"'{param}' must be at least 1, got {max_tokens}", param)
    temperature = _get(body, "temperature", _is_number, "a number", 1.0)  # OpenAI's default
    if not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    params = {"max_new_tokens": max_tokens, "temperature": temperature,
              "top_p": _get(body, "top_p", _is_number, "a number", 1.0),
              "top_k": _get(body, "top_k", _is_int, "an integer", 0),
              "seed": _get(body, "seed", _is_int, "an integer"),
              "presence_penalty": _get(body, "presence_penalty", _is_number, "a number", 0.0),
              "frequency_penalty": _get(body, "frequency_penalty", _is_number, "a number", 0.0)}
    n = _get(body, "n", _is_int, "an integer", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise RequestError(f"'n' must be in [1, {MAX_CHOICES}], got {n}", "n")
    stop = _get(body, "stop", lambda v: isinstance(v, (str, list)), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be at most {MAX_STOPS} non-empty strings", "stop")
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    if options and not stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
    include_usage = options.get("include_usage")
    include_usage = False if include_usage is None else include_usage
    if not isinstance(include_usage, bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options")
    if chat:
        logprobs = None
        if _get(body, "logprobs", lambda v: isinstance(v, bool), "true or false", False):
            logprobs = _get(body, "top_logprobs", _is_int, "an integer", 0)
        elif body.get("top_logprobs") is not None:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        query = {"messages": _messages(body.get("messages"))}
    else:
        logprobs = _get(body, "logprobs", _is_int, "an integer")
        if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise RequestError(f"'logprobs' must be in [0, {MAX_COMPLETION_LOGPROBS}], got {logprobs}", "logprobs")
        query = _prompt(body.get("prompt"))
    params["logprobs"] = logprobs
    try:
        SamplingParams.from_dict(params)  # the ranges of top_p, top_k, the penalties, logprobs
    except P2PServeError as e:  # its messages start with the field's name
        field_name = next((k for k in params if e.message.startswith((k, k.replace("_", "-")))), None)
        param = {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs" if chat else "logprobs"}.get(
            field_name, field_name)
        raise RequestError(e.message, param) from None
    query.update(model=model, params=params, stop_on_eos=True)
    return Ask(chat, query, n, tuple(stop), stream, include_usage, logprobs)


def _messages(messages) -> list[dict]:
    """Chat messages as {role, content} texts; content given as a list of parts is joined."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role' and a 'content'", "messages")
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": "
                                   f"...}}) are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(prompt) -> dict:
    """A completion prompt: a string or token ids, or a list holding one of them."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt, "chat": False}
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return {"tokens": prompt}
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("several prompts in one request are not supported: send one request each "
                           "(or use 'n' for several answers to one prompt)", "prompt")
    raise RequestError("'prompt' must be a string or a list of token ids", "prompt")


# ---- stop strings -----------------------------------------------------------------------


class StopText:
    """One choice's text as it streams: cut before the first stop string, and text that
    could still become the start of one held back, token by token, until it cannot. A
    stop string spanning several tokens is found too: it lies within the held text."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held: list[tuple[str, object]] = []  # (text, logprob entry) of tokens not yet released
        self.stopped = False

    def push(self, text: str, entry=None) -> list[tuple[str, object]]:
        """Add a token's text; the tokens that may go to the client now."""
        if self.stopped:
            return []
        self.held.append((text, entry))
        if not self.stops:
            return self._release(len(self.held))
        joined = "".join(t for t, _ in self.held)
        cut = min((i for i in (joined.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, offset = [], 0
            for t, e in self.held:  # the tokens that begin before the stop string
                if offset >= cut:
                    break
                out.append((t[: max(0, cut - offset)], e))
                offset += len(t)
            self.held = []
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if joined.endswith(s[:k])), default=0)
        n, end = 0, 0
        for t, _ in self.held:  # whole tokens that end before the held-back tail
            if end + len(t) > len(joined) - keep:
                break
            end += len(t)
            n += 1
        return self._release(n)

    def finish(self) -> list[tuple[str, object]]:
        """The answer ended without a stop string: what was held back goes too."""
        return self._release(len(self.held))

    def _release(self, n: int) -> list[tuple[str, object]]:
        out, self.held = self.held[:n], self.held[n:]
        return out


# ---- generation ---------------------------------------------------------------------------


@dataclass
class Choice:
    index: int
    params: SamplingParams
    stop: StopText
    text: str = ""  # released so far
    entries: list = field(default_factory=list)  # logprob entries released so far
    tokens: int = 0  # completion tokens generated
    finish_reason: str | None = None


class Generation:
    """The choices of one request, generated in parallel; ``on_release(choice, pieces)`` is
    called with the text (and logprob entries) each may show, and once more at its end."""

    def __init__(self, node: Bootstrap, ask: Ask, prompt: list[int], params: SamplingParams, pipeline):
        self.node, self.ask, self.prompt, self.pipeline = node, ask, prompt, pipeline
        if params.seed is None:  # else the choices, sampled with one noise, would be equal
            seeds = [secrets.randbits(63) for _ in range(ask.n)]
            self.choices = [Choice(i, replace(params, seed=s), StopText(ask.stop)) for i, s in enumerate(seeds)]
        else:
            self.choices = [Choice(i, params.for_choice(i), StopText(ask.stop)) for i in range(ask.n)]
        self.eos = frozenset(node.config.eos_token_ids)
        self.error: P2PServeError | None = None

    async def run(self, on_release) -> None:
        async with trio.open_nursery() as nursery:
            for c in self.choices:
                nursery.start_soon(self._one, c, on_release, nursery.cancel_scope)

    async def _one(self, c: Choice, on_release, all_scope) -> None:
        with trio.CancelScope() as scope:
            async def emit(frames):
                for frame in frames:
                    if frame["type"] == "token":
                        c.tokens += 1
                        entry = None
                        if "logprob" in frame and frame["token"] not in self.eos:
                            entry = (frame["token"], frame["logprob"], frame["top"])
                        pieces = c.stop.push(frame["text"], entry)
                    elif frame["type"] == "done":
                        pieces = c.stop.push(frame["text"]) + ([] if c.stop.stopped else c.stop.finish())
                        c.finish_reason = frame["finish_reason"]
                    else:
                        continue
                    if c.stop.stopped:
                        c.finish_reason = "stop"
                    for text, entry in pieces:
                        c.text += text
                        if entry is not None:
                            c.entries.append(entry)
                    await on_release(c, pieces)
                    if c.finish_reason:
                        scope.cancel()  # done, or a stop string came: the rest is not wanted
                        return

            try:
                await self.node.answer(emit, self.prompt, c.params, self.pipeline, True)
            except P2PServeError as e:
                self.error = self.error or e
                all_scope.cancel()


# ---- the shapes of OpenAI's answers ---------------------------------------------------------


class Shapes:
    """Chunks and whole answers in OpenAI's format, for chat or for completions."""

    def __init__(self, node: Bootstrap, ask: Ask, model: str):
        self.node, self.ask, self.model = node, ask, model
        self.id = f"{'chatcmpl' if ask.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _token(self, token_id: int) -> str:
        return self.node.tokenizer.decode([token_id])

    def logprobs(self, entries: list, text_start: int = 0) -> dict | None:
        if self.ask.logprobs is None:
            return None
        if self.ask.chat:
            def one(token_id, lp):
                s = self._token(token_id)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]}
                                for t, lp, top in entries]}
        tokens = [self._token(t) for t, _, _ in entries]
        offsets, at = [], text_start
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self._token(i): v for i, v in top} for _, _, top in entries],
                "text_offset": offsets}

    def chunk(self, choices: list[dict], usage=None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.ask.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if self.ask.include_usage:
            out["usage"] = usage
        return out

    def delta(self, c: Choice, text: str, entries: list, text_start: int, finish: str | None,
              first: bool = False) -> dict:
        if self.ask.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": c.index, "delta": delta, "logprobs": self.logprobs(entries) if entries else None,
                    "finish_reason": finish}
        return {"index": c.index, "text": text, "logprobs": self.logprobs(entries, text_start) if entries else None,
                "finish_reason": finish}

    def whole(self, choices: list[Choice], prompt_tokens: int) -> dict:
        if self.ask.chat:
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(c.entries), "finish_reason": c.finish_reason} for c in choices]
        else:
            out = [{"index": c.index, "text": c.text, "logprobs": self.logprobs(c.entries),
                    "finish_reason": c.finish_reason} for c in choices]
        return {"id": self.id, "object": "chat.completion" if self.ask.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": out,
                "usage": usage(choices, prompt_tokens)}


def usage(choices: list[Choice], prompt_tokens: int) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


# ---- access: API keys and rate limits ------------------------------------------------------


def read_api_keys(flags=(), path: str | None = None, http_bind: str | None = None) -> tuple[str, ...]:
    """The API keys of --api-key, --api-key-file (one a line, # comments) and
    $P2PSERVE_API_KEYS (comma- or space-separated); ConfigError for a key an HTTP header
    cannot carry, or for key flags without --http."""
    keys = list(flags)
    if path:
        keys += [line.strip() for line in Path(path).read_text().splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    keys += [k for k in re.split(r"[,\s]+", os.environ.get("P2PSERVE_API_KEYS", "")) if k]
    for k in keys:
        if not (k.isascii() and k.isprintable()) or any(c.isspace() for c in k):
            raise ConfigError("an API key must be printable ASCII without spaces")
    if (flags or path) and not http_bind:
        raise ConfigError("--api-key protects the HTTP API: give --http too")
    return tuple(dict.fromkeys(keys))


class Access:
    """ASGI middleware for the API (``/v1/...``): with API keys, a request needs
    ``Authorization: Bearer KEY`` with one of them (compared in constant time); with a rate
    limit, each key (each client address when there are no keys) may make ``rate_limit``
    requests a minute, in bursts of as many. The other pages (health, metrics, dashboard)
    stay open: they show what the status protocol shows anyone who reaches the libp2p port."""

    def __init__(self, app, api_keys=(), rate_limit: int | None = None):
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.rate_limit = rate_limit
        self.buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, at)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        who = None
        if self.keys:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            token = token.strip() if scheme.lower() == b"bearer" else b""
            # every key compared, each in constant time: the answer's timing says nothing
            matches = [k for k in self.keys if hmac.compare_digest(token, k)]
            if not matches:
                response = error_response("invalid_api_key", "Incorrect API key provided" if token else
                                          "No API key provided: send the header 'Authorization: Bearer KEY'",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
            who = matches[0]
        if self.rate_limit:
            who = who or (scope.get("client") or ("?",))[0].encode()
            wait = self._take(who)
            if wait > 0:
                response = error_response("rate_limit_exceeded", f"Rate limit reached: {self.rate_limit} requests per "
                                                          f"minute; retry in {wait:.1f} s",
                                          headers={"Retry-After": str(int(wait) + 1)})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _take(self, who: bytes) -> float:
        """Take one request from ``who``'s bucket: 0, or the seconds until one is allowed."""
        now = time.monotonic()
        if len(self.buckets) > MAX_BUCKETS:  # many client addresses: forget those with a full bucket
            full = now - 60
            self.buckets = {k: (n, t) for k, (n, t) in self.buckets.items() if t > full}
        tokens, at = self.buckets.get(who, (float(self.rate_limit), now))
        tokens = min(float(self.rate_limit), tokens + (now - at) * self.rate_limit / 60)
        if tokens < 1:
            self.buckets[who] = (tokens, now)
            return (1 - tokens) * 60 / self.rate_limit
        self.buckets[who] = (tokens - 1, now)
        return 0.0


# ---- the app ----------------------------------------------------------------------------------


async def _cancel_on_disconnect(receive, scope: trio.CancelScope, seen: list | None = None) -> None:
    """Wait for the client to go away (the request body is already read), then cancel."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if seen is not None:
        seen.append(True)
    scope.cancel()


class EventStream:
    """A server-sent event stream whose producer is cancelled as soon as the client leaves."""

    def __init__(self, produce):
        self.produce = produce  # async (write(obj)) -> None

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})

        async def write(obj: dict) -> None:
            await send({"type": "http.response.body", "body": f"data: {json.dumps(obj)}\n\n".encode(),
                        "more_body": True})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await self.produce(write)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            nursery.cancel_scope.cancel()


def make_app(node: Bootstrap, api_keys=(), rate_limit: int | None = None):
    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "p2pserve"}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card(node.config.name)]})

    async def model(request: Request):
        name = request.path_params["model"]
        try:
            node.resolve_model(name)
        except P2PServeError:
            return error_response("model_not_found", f"The model '{name}' does not exist: this swarm serves "
                                                     f"'{node.config.name}'", "model")
        return JSONResponse(model_card(name))

    async def health(request: Request):
        st = node.status()
        return JSONResponse(st, status_code=200 if st["chains"] else 503)

    async def completions(request: Request, chat: bool):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response("bad_request", "the request body is not valid JSON")
        try:
            ask = parse_request(body, chat)
            prompt, params, pipeline, _ = node.prepare(ask.query)
        except RequestError as e:
            return error_response(e.code, e.message, e.param)
        except P2PServeError as e:
            return error_response(e.code, e.message, "model" if e.code == "unknown_model" else None)
        node.stats["queries"] += 1
        generation = Generation(node, ask, prompt, params, pipeline)
        shapes = Shapes(node, ask, ask.query["model"] or node.config.name)
        if ask.stream:
            return EventStream(lambda write: _stream(generation, shapes, write))

        gone: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, request.receive, nursery.cancel_scope, gone)
            await generation.run(_ignore)
            nursery.cancel_scope.cancel()
        if gone:
            return Response(status_code=499)  # nobody is listening
        if generation.error is not None:
            return error_response(generation.error.code, generation.error.message)
        return JSONResponse(shapes.whole(generation.choices, len(prompt)))

    async def chat_completions(request: Request):
        return await completions(request, chat=True)

    async def text_completions(request: Request):
        return await completions(request, chat=False)

    async def not_found(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error_response(code, f"{request.method} {request.url.path}: {exc.detail}")

    async def internal(request: Request, exc: Exception):
        log.error("HTTP request %s failed", request.url.path, exc_info=exc)
        return error_response("internal", "internal error in the p2pserve bootstrap (logged there)")

    app = Starlette(routes=[
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", model),
        Route("/health", health),
        metrics_route(node),
        *dashboard_routes(node),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
    ], exception_handlers={HTTPException: not_found, Exception: internal})
    return Access(app, api_keys, rate_limit)


async def _ignore(choice, pieces) -> None:
    pass


async def _stream(generation: Generation, shapes: Shapes, write) -> None:
    """A request's events: each choice's text as its stop strings allow, its finish, then
    the usage if asked for (OpenAI's stream_options.include_usage)."""
    ask = generation.ask
    if ask.chat:
        await write(shapes.chunk([shapes.delta(c, "", [], 0, None, first=True) for c in generation.choices]))
    offsets = {c.index: 0 for c in generation.choices}

    async def on_release(c: Choice, pieces) -> None:
        text = "".join(t for t, _ in pieces)
        entries = [e for _, e in pieces if e is not None]
        if text or entries:
            await write(shapes.chunk([shapes.delta(c, text, entries, offsets[c.index], None)]))
            offsets[c.index] += len(text)
        if c.finish_reason:
            await write(shapes.chunk([shapes.delta(c, "", [], 0, c.finish_reason)]))

    await generation.run(on_release)
    if generation.error is not None:
        e = generation.error
        status, kind = STATUS.get(e.code, (500, "server_error"))
        await write({"error": {"message": e.message, "type": kind, "param": None, "code": e.code}})
        return
    if ask.include_usage:
        await write(shapes.chunk([], usage(generation.choices, len(generation.prompt))))


async def serve_http(node: Bootstrap, bind: str, api_keys=(), rate_limit: int | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [bind]
    config.accesslog = logging.getLogger("p2pserve.http.access")  # one line per request, in the operator's log
    config.access_log_format = '%(h)s "%(r)s" %(s)s %(b)s bytes %(L)s s'
    config.errorlog = None
    await serve(make_app(node, api_keys, rate_limit), config, task_status=task_status)
