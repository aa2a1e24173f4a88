"""The bootstrap's OpenAI-compatible API, driven by the official OpenAI client."""

from __future__ import annotations

import httpx
import openai
import pytest

from p2pserve.testing.swarm import client


@pytest.fixture
async def api(swarm2):
    async with client(swarm2.addr) as c:
        await c.wait_chains(1)
    return openai.OpenAI(base_url=swarm2.http_url, api_key="unused", timeout=120)


async def test_models_lists_the_swarm_model(api):
    assert [m.id for m in api.models.list().data] == ["smollm2-135m-instruct"]


async def test_chat_completion_answers_and_counts_tokens(api):
    r = api.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=16,
                                    messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 10


async def test_streamed_chat_equals_the_whole_answer(api):
    kw = dict(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
              messages=[{"role": "user", "content": "Name three colours."}])
    whole = api.chat.completions.create(**kw).choices[0].message.content
    chunks = list(api.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_text_completion_without_chat_template(api):
    r = api.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                               temperature=0, max_tokens=4)
    assert "Paris" in r.choices[0].text and r.choices[0].finish_reason == "length"


async def test_api_errors_are_openai_shaped(api, swarm2):
    with pytest.raises(openai.NotFoundError, match="unknown model 'gpt-4'"):
        api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="top-p must be a number in"):
        api.chat.completions.create(model="smollm2-135m-instruct", top_p=3,
                                    messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(f"{swarm2.http_url}/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
