"""The OpenAI surface of the bootstrap's HTTP API, parameter by parameter, through the
official ``openai`` client against a real two-worker swarm with API keys and a rate limit."""

from __future__ import annotations

import collections
import math
import time

import httpx
import openai
import pytest
import trio

from p2pserve.net.records import RECORD_TTL
from p2pserve.ranks.world import free_port

from p2pserve.testing.swarm import Swarm, client

MODEL = "smollm2-135m-instruct"
KEY = "sk-test-main"  # --api-key
FILE_KEY = "sk-test-from-file"  # --api-key-file
ENV_KEY = "sk-test-from-env"  # $P2PSERVE_API_KEYS, the key the rate-limit test spends
RATE_LIMIT = 60  # requests per minute per key: above what the other tests send with KEY
ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    keys = root / "keys.txt"
    keys.write_text(f"# one key a line\n{FILE_KEY}\n")
    with Swarm(root) as swarm, pytest.MonkeyPatch.context() as mp:
        mp.setenv("P2PSERVE_API_KEYS", f"{ENV_KEY}")
        http = f"127.0.0.1:{free_port()}"
        # spot checks off: a checked answer (5% of greedy and seeded ones by default) has a
        # witness session on stage 0 and the other stage-1 replica beside it, which the
        # session counts and the choice of replica to kill below would take for the answer's
        swarm.start_bootstrap("--hetero-config", "1", "1", "--pp-partition", "15", "15", "--http", http,
                              "--api-key", KEY, "--api-key-file", str(keys), "--rate-limit", str(RATE_LIMIT),
                              "--spot-check", "0")
        mp.delenv("P2PSERVE_API_KEYS")
        swarm.url = f"http://{http}"
        workers = [swarm.start_worker("--stage", stage, wait=False) for stage in ("0", "1", "1")]  # a replica
        for proc in workers:
            swarm.wait_serving(proc)
        # both chains: the replica that joined last is admitted only once its admission probe
        # (a session on stage 0 and on it) has answered, which must not overlap a test's answer
        status(swarm, lambda st: len(st["chains"]) == 2)
        yield swarm


def status(swarm, until=lambda st: True, timeout: float = 60.0) -> dict:
    """The bootstrap's status (over libp2p: no HTTP request spent), once ``until`` holds."""
    async def poll():
        async with client(swarm.addr) as c:
            with trio.fail_after(timeout):
                while not until(st := await c.status()):
                    await trio.sleep(0.2)
                return st

    return trio.run(poll)


@pytest.fixture(scope="module")
def api(swarm):
    return openai.OpenAI(base_url=f"{swarm.url}/v1", api_key=KEY, timeout=120, max_retries=0)


def test_a_stop_string_across_tokens_ends_a_stream_before_it(api):
    kw = dict(model=MODEL, temperature=0, max_tokens=24, messages=ASK)
    whole = api.chat.completions.create(logprobs=True, **kw).choices[0]
    tokens = [t.token for t in whole.logprobs.content]
    i = next(i for i in range(2, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2)
    stop = tokens[i][-2:] + tokens[i + 1][:2]  # spans the boundary of two tokens
    text = whole.message.content
    expected = text[: text.find(stop)]
    chunks = list(api.chat.completions.create(stream=True, stop=[stop, "never-seen"], **kw))
    streamed = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(streamed) == expected and not any(stop[:2] in s for s in streamed[-1:] if s)
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = api.chat.completions.create(stop=stop, **kw).choices[0]
    assert (r.message.content, r.finish_reason) == (expected, "stop")


def test_n_choices_with_a_seed_are_each_reproducible(api):
    kw = dict(model=MODEL, temperature=1.0, max_tokens=10, n=3, seed=1234, messages=ASK)
    first, again = api.chat.completions.create(**kw), api.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice its own seed
    assert first.usage.completion_tokens == again.usage.completion_tokens <= 30
    # choice 0 is the answer to the same request with n=1
    assert api.chat.completions.create(**{**kw, "n": 1}).choices[0].message.content == texts[0]
    unseeded = api.chat.completions.create(**{**kw, "seed": None, "n": 2}).choices  # each its own noise
    assert unseeded[0].message.content != unseeded[1].message.content


def test_logprobs_are_those_of_the_sampled_tokens(api):
    r = api.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=ASK, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        top = [x.logprob for x in t.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and sum(math.exp(x) for x in top) <= 1.0001
        assert t.top_logprobs[0].token == t.token and t.logprob == top[0] <= 0  # greedy: the most likely
    streamed = list(api.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=ASK,
                                                logprobs=True, top_logprobs=3, stream=True))
    again = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in again] == [t.token for t in content]
    # the same up to rounding: another replica, or another cut of the prompt into prefill passes
    assert [t.logprob for t in again] == pytest.approx([t.logprob for t in content], abs=1e-3)

    c = api.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4,
                               logprobs=2).choices[0]
    assert "".join(c.logprobs.tokens) == c.text and len(c.logprobs.token_logprobs) == 4
    assert all(len(top) == 2 and max(top.values()) == lp for top, lp in
               zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs))
    assert c.logprobs.text_offset == [sum(map(len, c.logprobs.tokens[:i])) for i in range(4)]


def test_include_usage_adds_a_last_chunk_with_the_usage(api):
    kw = dict(model=MODEL, temperature=0, max_tokens=12, messages=ASK)
    whole = api.chat.completions.create(**kw)
    chunks = list(api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(api.chat.completions.create(stream=True, **kw))
    assert all(c.usage is None for c in plain)


def test_penalties_change_a_repetitive_answer_and_replay_exactly(api):
    kw = dict(model=MODEL, temperature=0, max_tokens=24, logprobs=True,
              messages=[{"role": "user", "content": "Say 'hello' ten times."}])

    def tokens(**extra):
        r = api.chat.completions.create(**kw, **extra).choices[0]
        return [t.token for t in r.logprobs.content]

    plain = tokens()
    penalized = tokens(frequency_penalty=2.0, presence_penalty=1.0)
    assert penalized != plain
    most = collections.Counter(plain).most_common(1)[0][0]
    assert collections.Counter(penalized)[most] < collections.Counter(plain)[most]
    assert tokens(frequency_penalty=2.0, presence_penalty=1.0) == penalized
    assert tokens(presence_penalty=-2.0) != tokens(presence_penalty=2.0)


def test_content_as_a_list_of_text_parts_is_the_joined_text(api):
    kw = dict(model=MODEL, temperature=0, max_tokens=12)
    parts = [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colours."}]
    a = api.chat.completions.create(messages=[{"role": "user", "content": parts}], **kw)
    b = api.chat.completions.create(messages=ASK, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_models_and_one_model(api):
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert api.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")


@pytest.mark.parametrize("path, body, param, status", [
    ("chat/completions", {"max_tokens": "five"}, "max_tokens", 400),
    ("chat/completions", {"max_tokens": 0}, "max_tokens", 400),
    ("chat/completions", {"messages": ["hello"]}, "messages", 400),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", 400),
    ("chat/completions", {"temperature": "hot"}, "temperature", 400),
    ("chat/completions", {"top_p": 3}, "top_p", 400),
    ("chat/completions", {"n": 0}, "n", 400),
    ("chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ("chat/completions", {"presence_penalty": 3}, "presence_penalty", 400),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", 400),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", 400),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format", 400),
    ("chat/completions", {"stream_options": {"include_usage": True}}, "stream_options", 400),
    ("chat/completions", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options", 400),
    ("chat/completions", {"model": "gpt-4"}, "model", 404),
    ("completions", {"prompt": 5}, "prompt", 400),
    ("completions", {"prompt": "hi", "logprobs": 6}, "logprobs", 400),
])
def test_a_bad_request_gets_openais_error_schema_naming_the_parameter(swarm, path, body, param, status):
    base = {"model": MODEL, "messages": ASK} if path.startswith("chat") else {"model": MODEL}
    r = httpx.post(f"{swarm.url}/v1/{path}", json={**base, **body}, timeout=30,
                   headers={"Authorization": f"Bearer {ENV_KEY}"})
    error = r.json()["error"]
    assert (r.status_code, error["param"], set(error)) == (status, param, {"message", "type", "param", "code"})
    assert "Traceback" not in error["message"] and "instances of" not in error["message"]


def test_the_openai_client_sees_bad_requests_as_such(api, swarm):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="'tools' is not supported"):
        api.chat.completions.create(model=MODEL, messages=ASK, tools=[{"type": "function",
                                                                     "function": {"name": "f"}}])
    for bad in (b"{not json", b"[1, 2]"):
        r = httpx.post(f"{swarm.url}/v1/chat/completions", content=bad, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{swarm.url}/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_keys_are_required_and_checked(swarm):
    for key in ("sk-wrong", KEY[:-1], KEY + "x"):
        client = openai.OpenAI(base_url=f"{swarm.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            client.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):  # none, or not Bearer
        r = httpx.post(f"{swarm.url}/v1/chat/completions", json={"model": MODEL, "messages": ASK}, timeout=30,
                       headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{swarm.url}/health", timeout=30).status_code == 200  # only /v1/ is guarded
    for key in (KEY, FILE_KEY, ENV_KEY):  # --api-key, --api-key-file, $P2PSERVE_API_KEYS
        client = openai.OpenAI(base_url=f"{swarm.url}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]


def test_a_key_past_its_rate_limit_gets_429(swarm):
    client = openai.OpenAI(base_url=f"{swarm.url}/v1", api_key=FILE_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(RATE_LIMIT + 1):
            client.models.list()
    assert e.value.body["code"] == "rate_limit_exceeded" and int(e.value.response.headers["Retry-After"]) >= 1
    openai.OpenAI(base_url=f"{swarm.url}/v1", api_key=KEY, max_retries=0).models.list()  # others unaffected


def beat_since(st: dict, since: float) -> bool:
    """Has each of the three workers heartbeated after ``since`` (unix time)?"""
    return len(st["workers"]) == 3 and all(w["expires_at"] - RECORD_TTL >= since for w in st["workers"])


def sessions_after(swarm, since: float, timeout: float = 10.0) -> list[int]:
    """The workers' open sessions, fewest first, from the first heartbeat of each signed
    after ``since`` (unix time)."""
    return sorted(w["load"]["sessions"] for w in status(swarm, lambda st: beat_since(st, since), timeout)["workers"])


LONG = [{"role": "user", "content": "Write a long essay on the history of Rome, in many paragraphs."}]


def test_a_client_that_disconnects_stops_its_generation_within_a_second(swarm):
    body = {"model": MODEL, "temperature": 0, "max_tokens": 1500, "messages": LONG}
    headers = {"Authorization": f"Bearer {KEY}"}
    # the earlier tests' sessions closed first: under a full suite's load one may still be
    # open, and the counts below would be off by it. By heartbeats signed from now on: an
    # older one may predate a session that is open now
    since = time.time()
    idle = status(swarm, lambda st: beat_since(st, since)
                  and not any(w["load"]["sessions"] for w in st["workers"]), 30)
    queries = idle["stats"]["queries"]
    with httpx.stream("POST", f"{swarm.url}/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(8)) if line.startswith("data: {")) == 4
        assert sessions_after(swarm, time.time()) == [0, 1, 1]  # still answering (stage 0, a stage 1)
    gone = time.time()
    assert sessions_after(swarm, gone + 1.0) == [0, 0, 0]

    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
        httpx.post(f"{swarm.url}/v1/chat/completions", json=body, headers=headers, timeout=3)
    gone = time.time()
    assert sessions_after(swarm, gone + 1.0) == [0, 0, 0]
    assert status(swarm)["stats"]["queries"] == queries + 2  # HTTP queries are counted


async def test_a_penalized_answer_replayed_from_its_tokens_continues_exactly(tmp_path):
    """What a failover does at the last stage: a new session whose prompt ends with the
    tokens generated so far, named as such (the open frame's 'generated'), samples on as
    the first one would have."""
    from dataclasses import replace

    import torch

    from p2pserve.engine.build import load_stage
    from p2pserve.engine.generate import SamplingParams
    from p2pserve.engine.weights import open_weights
    from p2pserve.node.executor import BatchingExecutor, StepRequest

    from .tiny import make_tiny_llama

    source = open_weights(make_tiny_llama(tmp_path / "tiny"))
    runner = load_stage(source, 0, source.config.n_layers)
    runner.allocate(2, 64)
    executor = BatchingExecutor(runner)
    prompt = [5, 17, 42, 99, 7]
    penalized = SamplingParams(temperature=0.8, seed=3, presence_penalty=1.5, frequency_penalty=1.0)

    async def answer(slot, params, generated, n):
        history = list(generated)  # the session's, as node/sessions.py keeps it
        tokens = [await executor.step(StepRequest(slot, 0, torch.tensor(prompt + generated), True, params,
                                                  history))]
        while len(tokens) < n:
            pos = len(prompt) + len(generated) + len(tokens) - 1
            tokens.append(await executor.step(StepRequest(slot, pos, torch.tensor(tokens[-1:]), True, params,
                                                          history)))
        return tokens

    async with trio.open_nursery() as nursery:
        nursery.start_soon(executor.run)
        for params in (penalized, replace(penalized, temperature=0.0)):
            whole = await answer(0, params, [], 16)
            assert await answer(1, params, whole[:6], 10) == whole[6:]
        plain = await answer(1, replace(params, presence_penalty=0.0, frequency_penalty=0.0), [], 16)
        assert plain != whole and len(set(plain)) < len(set(whole))  # greedy repeats itself, less so penalized
        nursery.cancel_scope.cancel()


def test_http_on_a_bare_port_listens_on_this_machine_only(tmp_path):
    from p2pserve.cli.options import parse_bind

    assert parse_bind("8000", "--http") == ("127.0.0.1", 8000)
    assert parse_bind("0.0.0.0:8000", "--http") == ("0.0.0.0", 8000)
    r = Swarm(tmp_path).cli("bootstrap", "--api-key", "sk-x", timeout=60)  # keys for no HTTP API
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --api-key protects the HTTP API: "
                                                                   "give --http too"]


def test_a_penalized_answer_is_the_same_after_its_last_stage_is_killed(swarm, api):
    """The failover replays prompt + the tokens so far on the other stage-1 replica, naming
    them as generated: the penalties count them, and the seeded answer goes on unchanged.
    Last in this module: it leaves the swarm one replica short."""
    # 256 tokens: the answer must outlast a heartbeat (HEARTBEAT, 2 s) for the test to see
    # which replica serves it; 64 took less than that on a fast CPU
    kw = dict(model=MODEL, temperature=0.7, seed=11, max_tokens=256, frequency_penalty=1.0, presence_penalty=0.5,
              messages=LONG)
    reference = api.chat.completions.create(**kw)
    assert reference.choices[0].finish_reason == "length"  # long enough to be killed in the middle
    stage1 = {w["peer_id"] for w in status(swarm)["workers"] if w["start"] > 0}
    text, after_kill, asked = "", 0, time.time()

    def serving(w):  # the stage-1 replica of this answer, by a heartbeat signed since it was asked
        return w["peer_id"] in stage1 and w["load"]["sessions"] and w["expires_at"] - RECORD_TTL >= asked

    for chunk in api.chat.completions.create(stream=True, **kw):
        text += chunk.choices[0].delta.content or ""
        if after_kill:
            after_kill += 1
        elif len(text) > 20:
            busy = status(swarm, lambda st: any(serving(w) for w in st["workers"]))
            victim = next(w["peer_id"] for w in busy["workers"] if serving(w))
            swarm.signal(swarm.proc_of(victim))
            after_kill = 1
    assert after_kill > 2 and text == reference.choices[0].message.content
    assert status(swarm)["stats"]["failovers"] >= 1
