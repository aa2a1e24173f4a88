"""Serving under failure and load: workers die, leave, or all ask at once; answers stay exact."""

from __future__ import annotations

import signal

import pytest
import trio

from p2pserve.net.protocols import HEARTBEAT

from p2pserve.net.client import QueryError, ask
from p2pserve.engine.generate import SamplingParams

from p2pserve.testing.reference import chat_references
from p2pserve.testing.swarm import Swarm, client

N = 40
GREEDY = SamplingParams(max_new_tokens=N)
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
           "What is 2 + 2?"]


@pytest.fixture(scope="module")
def references():
    return chat_references(PROMPTS, N)


def replicated_swarm(root, stage1_replicas: int = 2, *bootstrap_args: str) -> Swarm:
    """Stage 0 once, stage 1 ``stage1_replicas`` times."""
    swarm = Swarm(root)
    swarm.start_bootstrap("--pp-partition", "15", "15", *bootstrap_args)
    procs = [swarm.start_worker("--stage", s, wait=False) for s in ["0"] + ["1"] * stage1_replicas]
    for p in procs:
        swarm.wait_serving(p)
    return swarm


async def stream_answer(c, ids, on_token=None, params=GREEDY):
    """(tokens, routes, done frame) of one query; ``on_token(n_tokens, routes)`` after each."""
    tokens, routes, done = [], [], None
    async for frame in ask(c.host, c.bootstrap_id, tokens=ids, params=params, stop_on_eos=False):
        if frame["type"] == "route":
            routes.append(frame["chain"])
        elif frame["type"] == "token":
            tokens.append(frame["token"])
            if on_token is not None:
                on_token(len(tokens), routes)
        else:
            done = frame
    return tokens, routes, done


async def test_worker_killed_mid_answer_is_replaced_without_loss(tmp_path, references):
    from p2pserve.ranks.pipeline import LocalPipeline

    ids, ref = references[PROMPTS[0]]
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=2024, max_new_tokens=N)
    with LocalPipeline(None) as pipe:  # the uninterrupted seeded answer
        seeded_ref = pipe.generate(ids, seeded, stop_on_eos=False).tokens
    with replicated_swarm(tmp_path, stage1_replicas=3) as swarm:
        async with client(swarm.addr) as c:
            await c.wait_chains(3)
            for params, expected in ((GREEDY, ref), (seeded, seeded_ref)):
                killed = []

                def kill_stage1_of_route(n, routes):
                    if n == 8 and not killed:
                        victim = routes[-1][1]
                        swarm.signal(swarm.proc_of(victim), signal.SIGKILL)
                        killed.append(victim)

                tokens, routes, done = await stream_answer(c, ids, kill_stage1_of_route, params)
                assert tokens == expected
                assert len(routes) == 2 and killed[0] in routes[0] and killed[0] not in routes[1]
                print(f"recovered in {done['recovery_s']} s after kill -9 of {killed[0][-8:]} "
                      f"({'greedy' if params.greedy else 'seeded sampling'})")


async def test_no_replacement_means_a_clear_error_after_the_tokens_already_sent(tmp_path, references):
    ids, ref = references[PROMPTS[1]]
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap("--pp-partition", "15", "15")
        swarm.start_worker("--stage", "0")
        w1 = swarm.start_worker("--stage", "1")
        async with client(swarm.addr) as c:
            await c.wait_chains(1)
            got = []

            def kill_after_five(n, routes):
                got.append(n)
                if n == 5:
                    swarm.signal(w1, signal.SIGKILL)

            with pytest.raises(QueryError, match="layers 15-30 of smollm2-135m-instruct have no worker"):
                await stream_answer(c, ids, kill_after_five)
    assert max(got) >= 5


async def test_sigterm_is_a_graceful_leave(tmp_path, references):
    ids, ref = references[PROMPTS[2]]
    with replicated_swarm(tmp_path) as swarm:
        async with client(swarm.addr) as c:
            await c.wait_chains(2)
            leaving = []

            def term_stage1_of_route(n, routes):
                if n == 5 and not leaving:
                    leaving.append(routes[-1][1])
                    swarm.signal(swarm.proc_of(leaving[0]), signal.SIGTERM)

            tokens, routes, _ = await stream_answer(c, ids, term_stage1_of_route)
            assert tokens == ref
            assert len(routes) == 1  # it finished its session: no failover was needed
            proc = swarm.proc_of(leaving[0])
            with trio.fail_after(40):
                while proc.poll() is None:
                    await trio.sleep(0.2)
            assert proc.returncode == 0
            st = await c.status()
            assert leaving[0] not in [w["peer_id"] for w in st["workers"]]
            assert len(st["chains"]) == 1
            assert (await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)).tokens == ref


async def test_bootstrap_restart_does_not_take_workers_down(tmp_path, references):
    ids, ref = references[PROMPTS[3]]
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap("--pp-partition", "15", "15")
        swarm.start_worker("--stage", "0")
        swarm.start_worker("--stage", "1")
        swarm.signal(swarm.bootstrap_proc, signal.SIGKILL)
        swarm.bootstrap_proc.wait(timeout=10)
        addr = swarm.addr
        assert swarm.start_bootstrap(*swarm.bootstrap_args, port=swarm.bootstrap_port) == addr  # same identity
        async with client(swarm.addr) as c:
            await c.wait_chains(1, timeout=30)
            assert (await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)).tokens == ref


async def test_32_concurrent_queries_all_complete_exactly_once(tmp_path, references):
    # spot checks off: their replays are steps on the same links, which this test counts
    with replicated_swarm(tmp_path, 2, "--spot-check", "0") as swarm:
        async with client(swarm.addr) as c:
            await c.wait_chains(2)
            await trio.sleep(2 * HEARTBEAT)  # for records that count the admission probe's steps
            before = next(w["load"] for w in (await c.status())["workers"] if w["start"] == 0)
            results: dict[int, tuple] = {}

            async def one(i):
                prompt = PROMPTS[i % len(PROMPTS)]
                tokens, routes, done = await stream_answer(c, references[prompt][0])
                results[i] = (prompt, tokens, routes)

            with trio.fail_after(600):
                async with trio.open_nursery() as n:
                    for i in range(32):
                        n.start_soon(one, i)
            # Every decode step crossed stage 0's links exactly once, sessions batched into
            # shared frames (the worker's record carries its link counters).
            decode_steps = sum(len(tokens) - 1 for _, tokens, _ in results.values())
            with trio.fail_after(30):
                while True:
                    st = await c.status()
                    load = next(w["load"] for w in st["workers"] if w["start"] == 0)
                    load = {k: v - before.get(k, 0) for k, v in load.items()}
                    if load["link_steps"] >= decode_steps:
                        break
                    await trio.sleep(0.5)
    assert sorted(results) == list(range(32))
    for i, (prompt, tokens, routes) in results.items():
        assert tokens == references[prompt][1], f"query {i}"
    used = {routes[0][1] for _, _, routes in results.values()}
    assert len(used) == 2, "the burst should spread over both stage-1 replicas"
    assert load["link_steps"] == decode_steps
    assert load["link_frames"] * 2 < load["link_steps"], f"decode steps were not batched on the link: {load}"
    # and stage 0 ran each decode step and each query's one prefill chunk once, batched
    assert load["forward_steps"] == decode_steps + 32
    assert load["forwards"] < load["forward_steps"]


async def test_a_full_worker_refuses_with_busy_and_loses_nothing(tmp_path, references):
    ids, ref = references[PROMPTS[0]]
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap("--pp-partition", "15", "15")
        swarm.start_worker("--stage", "0")
        swarm.start_worker("--stage", "1", "--max-sessions", "1", "--max-queue", "0")
        async with client(swarm.addr) as c:
            await c.wait_chains(1)
            outcomes = []

            async def first(task_status):  # holds stage 1's only slot from its first token on
                tokens = []
                async for frame in ask(c.host, c.bootstrap_id, tokens=ids, params=GREEDY, stop_on_eos=False):
                    if frame["type"] == "token":
                        tokens.append(int(frame["token"]))
                        if len(tokens) == 1:
                            task_status.started()
                outcomes.append(tokens)

            async def second():
                try:
                    outcomes.append((await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)).tokens)
                except QueryError as e:
                    outcomes.append(e)

            async with trio.open_nursery() as n:
                # The second query starts once the first is surely generating (N - 1 tokens,
                # ~0.8 s, still to go): starting both at once left it to timing whether they
                # overlapped at stage 1 (once, in CI, both were served).
                await n.start(first)
                n.start_soon(second)
            answers = [o for o in outcomes if isinstance(o, list)]
            refusals = [o for o in outcomes if isinstance(o, QueryError)]
            assert answers == [ref]
            assert len(refusals) == 1 and refusals[0].code == "busy" and "retry" in str(refusals[0])
            # the slot came back: the next query is served
            assert (await c.ask(tokens=ids, params=GREEDY, stop_on_eos=False)).tokens == ref
