"""Iteration-level batching: many sessions in one forward pass, each answer exactly its own."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
import trio

from p2pserve.net.wire import write_frame
from p2pserve.node.executor import BatchingExecutor, SlotPool, StepRequest
from p2pserve.node.compute import ComputeThread, InlineCompute, compute_for
from p2pserve.errors import Busy
from p2pserve.engine.build import load_stage
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.weights import open_weights

from p2pserve.testing.reference import hf_greedy, hf_model
from .tiny import make_tiny_llama
from p2pserve.testing.tolerance import rounding_tolerance, stack_reduction_length


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), n_heads=6, n_kv_heads=3, hidden=96)


async def test_batched_sessions_of_different_lengths_equal_unbatched_answers(tiny):
    source = open_weights(tiny)
    runner = load_stage(source, 0, source.config.n_layers)
    runner.allocate(8, 96)
    executor = BatchingExecutor(runner)
    slots = SlotPool(8, 32)
    rng = random.Random(0)
    sessions = [([rng.randrange(3, 250) for _ in range(rng.randrange(2, 30))], rng.randrange(4, 20))
                for _ in range(12)]
    ref = hf_model(tiny)
    expected = [hf_greedy(ref, prompt, n)[0] for prompt, n in sessions]
    got: dict[int, list[int]] = {}
    greedy = SamplingParams()

    async def session(i, prompt, n):
        await trio.sleep(rng.random() * 0.05)  # join at different moments
        slot = await slots.acquire()
        try:
            token = await executor.step(StepRequest(slot, 0, torch.tensor(prompt), True, greedy))
            out, pos = [token], len(prompt)
            while len(out) < n:
                token = await executor.step(StepRequest(slot, pos, torch.tensor([token]), True, greedy))
                out.append(token)
                pos += 1
                if rng.random() < 0.2:
                    await trio.sleep(0.01)  # miss a batch now and then
            got[i] = out
        finally:
            await slots.release(slot)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(executor.run)
        async with trio.open_nursery() as clients:
            for i, (prompt, n) in enumerate(sessions):
                clients.start_soon(session, i, prompt, n)
        nursery.cancel_scope.cancel()
    for i in range(len(sessions)):
        assert got[i] == expected[i], f"session {i}"
    print(f"{executor.batched_requests} steps ran in {executor.steps} forward passes")
    assert executor.batched_requests > 1.5 * executor.steps  # sessions really shared passes


async def test_slots_queue_then_refuse_when_the_queue_is_full():
    pool = SlotPool(n_slots=1, max_waiting=1)
    first = await pool.acquire()
    got = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _take(pool, got))
        await trio.sleep(0.05)
        assert pool.waiting == 1
        with pytest.raises(Busy, match="1 sessions and 1 queue places are taken"):
            await pool.acquire()
        await pool.release(first)
    assert got == [first]


async def _take(pool, got):
    got.append(await pool.acquire())


class _ThreadRecorder:
    """A runner whose forward notes the thread it ran on."""

    def __init__(self):
        self.is_last = False
        self.threads: list[int] = []

    def forward(self, batch, x):
        self.threads.append(threading.get_ident())
        return x


async def test_every_pass_runs_on_the_one_compute_thread_never_the_loops():
    """A second OpenMP team in the process makes libgomp stop spinning (compute.py)."""
    runner = _ThreadRecorder()
    compute = ComputeThread()
    executor = BatchingExecutor(runner, compute=compute)

    async def step(n_tokens):
        await executor.step(StepRequest(0, 0, torch.zeros(n_tokens), False, None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(executor.run)
        for n in (5, 1, 1, 3, 1):  # prefill chunks and decode steps alike
            await step(n)
        nursery.cancel_scope.cancel()
    compute.close()
    assert runner.threads == [compute.ident] * 5
    assert compute.ident != threading.get_ident()


async def test_compute_thread_returns_raises_and_finishes_a_job_before_a_cancel_lands():
    compute = ComputeThread()
    assert await compute.run(lambda: 6 * 7) == 42
    with pytest.raises(ZeroDivisionError):
        await compute.run(lambda: 1 / 0)
    finished = []

    def slow():
        time.sleep(0.3)
        finished.append(True)
        return "done"

    with trio.move_on_after(0.05) as scope:
        await compute.run(slow)
    assert scope.cancelled_caught and finished == [True]  # not abandoned mid-computation
    assert await compute.run(lambda: "next") == "next"  # and the thread goes on serving
    compute.close()


async def _serve(executor, *sessions):
    """Run the batcher while ``sessions`` (async callables) run to completion."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(executor.run)
        async with trio.open_nursery() as clients:
            for session in sessions:
                clients.start_soon(session)
        nursery.cancel_scope.cancel()


def _cut_prefills_into(executor, tokens: int) -> None:
    """A machine so slow that any prefill piece lasts longer than MAX_PASS: pieces of
    MIN_PIECE tokens, whatever the passes measure."""
    executor.MIN_PIECE = tokens
    executor.MAX_PASS = 0.0
    executor.prefill_seconds_per_token = executor.prefill_seconds_per_token or 1.0


async def test_a_long_prefill_is_cut_into_passes_and_answers_as_one_pass_would(tiny):
    source = open_weights(tiny)
    n = source.config.n_layers
    prompt = [random.Random(1).randrange(3, 250) for _ in range(30)]
    # the last stage (samples) and a middle stage (returns every position's hidden state)
    last = BatchingExecutor(load_stage(source, 0, n), compute=InlineCompute())
    middle = BatchingExecutor(load_stage(source, 0, n - 1), compute=InlineCompute())
    whole = load_stage(source, 0, n - 1)
    for runner in (last.runner, middle.runner, whole):
        runner.allocate(2, 64)
    last.warm_up()
    middle.warm_up()  # measured the time per prefill token, then left the counters alone
    assert last.prefill_seconds_per_token > 0 and last.steps == 0
    _cut_prefills_into(last, 8)
    _cut_prefills_into(middle, 8)
    answer, hidden = [], []

    async def generate():
        token = await last.step(StepRequest(0, 0, torch.tensor(prompt), True, SamplingParams()))
        answer.append(token)
        for pos in range(len(prompt), len(prompt) + 5):
            answer.append(await last.step(StepRequest(0, pos, torch.tensor([answer[-1]]), True, SamplingParams())))

    async def middle_prefill():
        hidden.append(await middle.step(StepRequest(1, 0, torch.tensor(prompt), False, None)))

    await _serve(last, generate)
    await _serve(middle, middle_prefill)
    assert answer == hf_greedy(hf_model(tiny), prompt, 6)[0]
    assert last.steps == 4 + 5 and middle.steps == 4  # 8 + 8 + 8 + 6 tokens, then 5 decodes
    from p2pserve.engine.model import Batch

    expected = whole.forward(Batch((1,), (0,), len(prompt)), torch.tensor([prompt]))[0]
    assert hidden[0].shape == expected.shape
    reductions = stack_reduction_length(source.config, n - 1)
    torch.testing.assert_close(hidden[0], expected, **rounding_tolerance(expected, reductions))


async def test_other_sessions_decode_between_the_pieces_of_a_long_prefill(tiny):
    """Chunked prefill: a long prompt does not stall the answers already streaming."""
    source = open_weights(tiny)
    runner = load_stage(source, 0, source.config.n_layers)
    runner.allocate(2, 96)
    executor = BatchingExecutor(runner, compute=InlineCompute(), sessions=lambda: 2)  # as a worker with 2 open
    _cut_prefills_into(executor, 8)
    events = []
    greedy = SamplingParams()
    streaming = trio.Event()

    async def decoding():
        token = await executor.step(StepRequest(0, 0, torch.tensor([5, 6]), True, greedy))
        streaming.set()
        for pos in range(2, 12):
            token = await executor.step(StepRequest(0, pos, torch.tensor([token]), True, greedy))
            events.append("decode")

    async def long_prompt():
        await streaming.wait()
        await executor.step(StepRequest(1, 0, torch.arange(3, 67), True, greedy))  # 8 pieces
        events.append("prefill done")

    await _serve(executor, decoding, long_prompt)
    assert events.index("prefill done") >= 5, events  # decodes kept coming meanwhile


async def test_a_cpu_worker_computes_on_the_loops_thread_a_cuda_worker_on_the_compute_thread():
    runner = _ThreadRecorder()
    executor = BatchingExecutor(runner, compute=compute_for(["cpu"]))

    async def steps():
        for n in (5, 1, 3):
            await executor.step(StepRequest(0, 0, torch.zeros(n), False, None))

    await _serve(executor, steps)
    assert runner.threads == [threading.get_ident()] * 3
    assert isinstance(compute_for(["cpu", "cpu"]), InlineCompute)
    assert isinstance(compute_for(["cuda:0"]), ComputeThread)


async def test_an_inline_job_first_lets_runnable_tasks_reach_their_next_wait():
    """A libp2p write takes several scheduler turns: a pass must not cut into one."""
    order = []

    class _Stream:  # a libp2p stream's write: five scheduler turns
        async def write(self, data):
            for i in range(5):
                order.append(i)
                await trio.lowlevel.checkpoint()

    async def writer():
        await write_frame(_Stream(), {"type": "x"})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await InlineCompute().run(lambda: order.append("pass"))
    assert order == [0, 1, 2, 3, 4, "pass"]


class _Tasks(_ThreadRecorder):
    """A runner whose forward notes the trio task it ran in."""

    def __init__(self):
        super().__init__()
        self.tasks: list[str] = []

    def forward(self, batch, x):
        self.tasks.append(trio.lowlevel.current_task().name)
        return super().forward(batch, x)


@pytest.mark.parametrize("open_sessions", [1, 2])
async def test_the_only_sessions_decode_step_runs_in_its_own_task(open_sessions):
    """On a CPU worker with one session, a decode step does not hop to the batcher task and
    back (two scheduler turns per stage per token); its prefill does, and so does every
    step once a second session is open (it may have a step to batch with)."""
    runner = _Tasks()
    executor = BatchingExecutor(runner, compute=InlineCompute(), sessions=lambda: open_sessions)

    async def session():
        await executor.step(StepRequest(0, 0, torch.zeros(4, 8), False, None))  # a prefill
        for pos in range(4, 7):
            out = await executor.step(StepRequest(0, pos, torch.full((1, 8), float(pos)), False, None))
            assert torch.equal(out, torch.full((1, 8), float(pos)))  # its own result
            assert executor.last_decodes == 1

    await _serve(executor, session)
    batcher = next(t for t in runner.tasks if t.endswith(".run"))
    in_session = [t.endswith("session") for t in runner.tasks]
    if open_sessions == 1:
        assert runner.tasks[0] == batcher and in_session == [False, True, True, True], runner.tasks
    else:
        assert runner.tasks == [batcher] * 4
    assert executor.steps == 4 and executor.batched_requests == 4
