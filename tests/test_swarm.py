"""A real swarm on 127.0.0.1, started through the CLI: bootstrap, workers, queries."""

from __future__ import annotations

import time

import pytest
import torch
import trio

from p2pserve.net.host import connect
from p2pserve.net.protocols import LINK, SESSION
from p2pserve.engine.generate import SamplingParams
from p2pserve.net.wire import RemoteError, read_frame, send_message, write_frame

from p2pserve.testing.reference import chat_references
from p2pserve.testing.swarm import Swarm, client
from .tiny import make_tiny_llama

N = 24
PROMPTS = ["What is the capital of France?", "Name three colours."]


@pytest.fixture(scope="module")
def references():
    return chat_references(PROMPTS, N)


GREEDY = SamplingParams(max_new_tokens=N)


async def test_two_workers_answer_token_for_token_like_transformers(swarm2, references):
    async with client(swarm2.addr) as c:
        await c.wait_chains(1)
        ids, ref = references[PROMPTS[0]]
        answer = await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)
    assert answer.tokens == ref


async def test_query_cli_prints_what_run_cli_prints(swarm2):
    async with client(swarm2.addr) as c:
        await c.wait_chains(1)
    flags = ["--max-new-tokens", "16"]
    q = swarm2.cli("query", "--peer", swarm2.addr, PROMPTS[0], *flags)
    r = swarm2.cli("run", "--pp-partition", "15", "15", PROMPTS[0], *flags)
    assert q.returncode == 0, q.stderr
    assert r.returncode == 0, r.stderr
    assert "Paris" in q.stdout
    assert q.stdout == r.stdout


async def test_two_queries_at_once_are_both_answered_correctly(swarm2, references):
    results = {}
    async with client(swarm2.addr) as c:
        await c.wait_chains(1)

        async def one(prompt):
            ids, _ = references[prompt]
            results[prompt] = (await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)).tokens

        async with trio.open_nursery() as n:
            for p in PROMPTS:
                n.start_soon(one, p)
    for p in PROMPTS:
        assert results[p] == references[p][1], p


async def test_unknown_model_is_refused_by_name(swarm2):
    from p2pserve.net.client import QueryError

    async with client(swarm2.addr) as c:
        with pytest.raises(QueryError, match="unknown model 'llama-9000'.*serves 'smollm2-135m-instruct'"):
            await c.ask(prompt="hi", model="llama-9000")
        # HexGen's NAME_N pins a pipeline; there is only pipeline 0 here
        ok = await c.ask(prompt="hi", model="smollm2-135m-instruct_0", params=SamplingParams(max_new_tokens=2))
        assert len(ok.tokens) == 2
        with pytest.raises(QueryError, match="pipeline 3"):
            await c.ask(prompt="hi", model="smollm2-135m-instruct_3")


async def test_bad_frames_get_clear_errors_and_the_worker_keeps_serving(swarm2, references):
    from libp2p.peer.id import ID

    async with client(swarm2.addr) as c:
        st = await c.wait_chains(1)
        last = next(w for w in st["workers"] if w["start"] == 15)
        first = next(w for w in st["workers"] if w["start"] == 0)
        peer = ID.from_base58(last["peer_id"])
        addr = last["addrs"][0]
        await connect(c.host, addr if "/p2p/" in addr else f"{addr}/p2p/{last['peer_id']}")

        async def session_stream():
            return await c.host.new_stream(peer, [SESSION])

        # a frame that is not 'open': there is no session to speak of
        s = await session_stream()
        await write_frame(s, {"type": "step", "start": 0, "want": True})
        with pytest.raises(RemoteError) as e:
            await read_frame(s)
        assert e.value.code == "unknown_session"

        # an oversized frame: the worker resets the stream without reading the body
        s = await session_stream()
        await s.write((64 * 2**20).to_bytes(4, "big") + b"x" * 100)
        with pytest.raises(Exception):
            await read_frame(s, timeout=10)

        # a well-formed session, then hidden states of the wrong width
        chain = [{"peer_id": w["peer_id"], "addrs": w["addrs"], "start": w["start"], "end": w["end"]}
                 for w in (first, last)]
        s = await session_stream()
        await write_frame(s, {"type": "open", "session": "t1", "chain": chain, "index": 1,
                              "params": GREEDY.to_dict(), "max_len": 64, "ticket": swarm2.ticket("t1", chain)})
        assert (await read_frame(s))["type"] == "ready"
        await send_message(s, {"type": "step", "start": 0, "want": True}, {"x": torch.zeros(3, 100)})
        with pytest.raises(RemoteError) as e:
            await read_frame(s)
        assert e.value.code == "shape" and "576" in e.value.message

        # on the LINK stream: a step of a session this peer did not open is refused by
        # item, and a tensor of the wrong shape closes the link
        s = await c.host.new_stream(peer, [LINK])
        await send_message(s, {"type": "steps", "id": 7, "items": [{"session": "nope", "start": 0}]},
                           {"x": torch.zeros(1, 576)})
        reply = await read_frame(s)
        assert reply["id"] == 7 and reply["results"][0]["code"] == "unknown_session"
        await send_message(s, {"type": "steps", "id": 8, "items": [{"session": "nope", "start": 0}]},
                           {"x": torch.zeros(2, 576)})
        with pytest.raises(Exception):
            await read_frame(s, timeout=10)

        # an 'open' for layers this worker does not hold
        s = await session_stream()
        await write_frame(s, {"type": "open", "session": "t2", "chain": chain, "index": 0,
                              "params": GREEDY.to_dict(), "ticket": swarm2.ticket("t2", chain)})
        with pytest.raises(RemoteError, match="holds layers 15-30"):
            await read_frame(s)

        # stage 0 asked to hold tokens back for longer than it allows
        first_peer = ID.from_base58(first["peer_id"])
        await connect(c.host, first["addrs"][0] if "/p2p/" in first["addrs"][0]
                      else f"{first['addrs'][0]}/p2p/{first['peer_id']}")
        s = await c.host.new_stream(first_peer, [SESSION])
        await write_frame(s, {"type": "open", "session": "t3", "chain": chain, "index": 0,
                              "prompt": references[PROMPTS[1]][0], "params": GREEDY.to_dict(),
                              "stream_interval": 30, "ticket": swarm2.ticket("t3", chain)})
        with pytest.raises(RemoteError, match="stream_interval must be 0-1 seconds, got 30") as e:
            await read_frame(s)
        assert e.value.code == "bad_request"

        # and everyone else is still served, exactly
        ids, ref = references[PROMPTS[1]]
        assert (await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)).tokens == ref


async def test_out_of_range_parameters_are_refused(swarm2):
    from p2pserve.net.client import QueryError

    async with client(swarm2.addr) as c:
        await c.wait_chains(1)
        with pytest.raises(QueryError, match="top-p must be a number in"):
            await _ask_raw(c, {"top_p": 1.5})
        with pytest.raises(QueryError, match="token ids must be in"):
            await c.ask(tokens=[1, 10**9])


async def _ask_raw(c, params: dict):
    """Send parameters the client library would refuse, as a foreign client might."""
    from p2pserve.net.client import QueryError
    from p2pserve.net.protocols import QUERY

    s = await c.host.new_stream(c.bootstrap_id, [QUERY])
    await write_frame(s, {"type": "query", "prompt": "hi", "params": params})
    try:
        await read_frame(s)
    except RemoteError as e:
        raise QueryError(e.code, e.message) from None


async def test_forged_and_expired_records_are_ignored(swarm2):
    import dataclasses

    from p2pserve.net.protocols import ANNOUNCE
    from p2pserve.net.records import WorkerRecord, sign_record

    async with client(swarm2.addr) as c:
        st = await c.wait_chains(1)
        real = st["workers"][0]
        me = c.host.get_id().to_base58()
        plain = [a.split("/p2p/")[0] for a in real["addrs"]]  # as ours: its name in them is refused
        mine = WorkerRecord(**{**real, "peer_id": me, "addrs": plain, "expires_at": time.time() + 20})
        forged = dataclasses.replace(mine, peer_id=real["peer_id"])  # someone else's id, our key
        expired = dataclasses.replace(mine, expires_at=time.time() - 1)
        s = await c.host.new_stream(c.bootstrap_id, [ANNOUNCE])
        for record, reason in ((forged, "claims peer .* but its key is peer"), (expired, "expired")):
            await write_frame(s, {"type": "announce", "record": sign_record(record, c.key_pair)})
            with pytest.raises(RemoteError, match=reason):
                await read_frame(s)
        st = await c.status()
        assert me not in [w["peer_id"] for w in st["workers"]]
        assert len(st["workers"]) == 2 and len(st["chains"]) == 1


def test_unreachable_peer_is_one_clear_line(tmp_path):
    swarm = Swarm(tmp_path)
    r = swarm.cli("query", "--peer", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWGq76WbvTkXVp1zYNGGtJqEHfTJenJ4TdivL1eCMhKgor",
                  "hi", timeout=60)
    assert r.returncode == 2
    assert "cannot reach /ip4/127.0.0.1/tcp/1" in r.stderr
    assert "Traceback" not in r.stderr


async def test_a_late_worker_is_picked_up_and_missing_layers_are_named(tmp_path):
    from p2pserve.net.client import QueryError

    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap("--pp-partition", "15", "15")
        swarm.start_worker("--stage", "0")
        async with client(swarm.addr) as c:
            with pytest.raises(QueryError, match="layers 15-30 of smollm2-135m-instruct have no worker"):
                await c.ask(prompt="hi")
            swarm.start_worker("--stage", "1")
            t0 = time.monotonic()
            await c.wait_chains(1, timeout=10)
            picked_up = time.monotonic() - t0
            answer = await c.ask(prompt="What is the capital of France?", params=SamplingParams(max_new_tokens=12))
        print(f"late worker picked up {picked_up:.2f} s after it said it was serving")
        assert "Paris" in answer.text


async def test_worker_with_other_weights_refuses_to_join(tmp_path):
    tiny = make_tiny_llama(tmp_path / "tiny")
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        r = swarm.cli("worker", "--peer", swarm.addr, "--model", str(tiny), "--listen", "/ip4/127.0.0.1/tcp/0",
                      timeout=120)
    assert r.returncode == 2
    assert "refusing to join" in r.stderr and "smollm2-135m-instruct" in r.stderr
    assert "Traceback" not in r.stderr


async def test_a_tp2_stage_in_a_three_worker_swarm(tmp_path, references):
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap("--hetero-config", "1", "2", "1", "--pp-partition", "7", "11", "12")
        for i in range(3):
            swarm.start_worker("--stage", str(i))
        async with client(swarm.addr) as c:
            st = await c.wait_chains(1)
            assert sorted(w["tp"] for w in st["workers"]) == [1, 1, 2]
            ids, ref = references[PROMPTS[0]]
            answer = await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)
    assert answer.tokens == ref


async def test_one_worker_holds_two_consecutive_stages(tmp_path, references):
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap("--hetero-config", "1", "2", "1", "--pp-partition", "7", "11", "12")
        a = swarm.start_worker("--stage", "0,1", wait=False)  # TP 1 then TP 2, one torch.distributed world
        b = swarm.start_worker("--stage", "2", wait=False)
        for p in (a, b):
            swarm.wait_serving(p)
        async with client(swarm.addr) as c:
            st = await c.wait_chains(1)
            assert sorted((w["start"], w["end"]) for w in st["workers"]) == [(0, 18), (18, 30)]
            ids, ref = references[PROMPTS[0]]
            answer = await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)
    assert answer.tokens == ref
