"""The threads the CPU kernels' loops run on (``team.cpp``): any thread count gives the
same bits, callers at once and a forked child each get theirs, and an idle process spins
no core."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from p2pserve.engine import kernels, quant
from p2pserve.engine.build import load_stage
from p2pserve.engine.model import Batch
from p2pserve.engine.weights import open_weights

from .tiny import make_tiny_llama

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernels here: {kernels.why_not()}")

PROMPT = [3, 17, 42, 9, 100]


@pytest.fixture
def threads():
    """torch.set_num_threads for the test, the count before restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=128, intermediate=384, vocab=1000)


def decode_logits(path, steps: int = 4) -> list[torch.Tensor]:
    """Logits of a prefill and ``steps`` greedy decode steps of an int4 stage (fused steps)."""
    source = open_weights(path)
    stage = load_stage(source, 0, source.config.n_layers, quant="int4")
    stage.allocate(1, 64)
    with torch.inference_mode():
        out = [stage(Batch((0,), (0,), len(PROMPT)), torch.tensor([PROMPT]))[:, -1]]
        for pos in range(len(PROMPT), len(PROMPT) + steps):
            out.append(stage(Batch((0,), (pos,), 1), out[-1].argmax(-1, keepdim=True))[:, -1])
    return out


def test_any_thread_count_computes_the_same_bits(checkpoint, threads):
    torch.manual_seed(0)
    x = torch.randn(3, 576)
    w = torch.randn(1000, 576)
    int4 = quant.pack(w, "int4")
    results = {}
    for n in (1, 2, 3, 5):  # 5 threads on fewer cores: each waits its turn
        threads(n)
        results[n] = (kernels.gemv(x, w), int4(x), decode_logits(checkpoint))
    for n in (2, 3, 5):
        assert torch.equal(results[n][0], results[1][0])
        assert torch.equal(results[n][1], results[1][1])
        for a, b in zip(results[n][2], results[1][2]):
            assert torch.equal(a, b)


def test_two_callers_at_once_each_get_their_answer(checkpoint, threads):
    """A second caller while the team runs a loop of the first runs its loops on its own
    thread; both compute what either computes alone."""
    threads(2)
    alone = decode_logits(checkpoint, steps=8)
    answers, errors = [], []

    def call():
        try:
            for _ in range(3):
                answers.append(decode_logits(checkpoint, steps=8))
        except Exception as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in callers)
    assert len(answers) == 6
    for answer in answers:
        assert all(torch.equal(a, b) for a, b in zip(answer, alone))


def test_a_forked_child_runs_the_loops_on_threads_of_its_own(threads):
    """The parent's workers are not in the child: it starts its own rather than wait for
    them."""
    threads(2)
    x, w = torch.randn(2, 256), torch.randn(4096, 256)
    expected = kernels.gemv(x, w)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only with the right answer
        try:
            os._exit(0 if torch.equal(kernels.gemv(x, w), expected) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in its first loop")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_a_process_between_steps_spins_no_core(checkpoint, threads):
    """After a decode step the team sleeps (it is parked at the step's end), and after a
    bare loop it sleeps once its spin is over: an idle process uses no CPU time."""
    threads(2)
    decode_logits(checkpoint)
    kernels.gemv(torch.randn(1, 256), torch.randn(4096, 256))
    time.sleep(0.05)
    before = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - before < 0.03


def team_threads() -> list[str]:
    """This process's team threads (team.cpp names them), by task id."""
    tasks = Path("/proc/self/task")
    return [t.name for t in tasks.iterdir() if (t / "comm").read_text().strip() == "p2pserve team"]


def cpu_ns(tid: str) -> int:
    """Nanoseconds thread ``tid`` of this process has run on a CPU (the scheduler's count)."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="reads threads' CPU time from Linux's /proc")
def test_a_decode_steps_end_puts_its_threads_to_sleep_at_once(tmp_path, threads):
    """Parked as the step returns, not spinning on (team.cpp's SPIN) through the time
    another stage of the machine computes in."""
    threads(2)
    # steps of about a millisecond: a worker woken at a step's start is up before it ends
    source = open_weights(make_tiny_llama(tmp_path, hidden=512, intermediate=2048, vocab=1000))
    stage = load_stage(source, 0, source.config.n_layers, quant="int4")
    stage.allocate(1, 64)
    with torch.inference_mode():
        stage(Batch((0,), (0,), len(PROMPT)), torch.tensor([PROMPT]))
        tids = team_threads()
        assert tids
        spun = 0
        for pos in range(len(PROMPT), len(PROMPT) + 20):
            stage(Batch((0,), (pos,), 1), torch.tensor([[7]]))
            before = sum(cpu_ns(t) for t in tids)
            time.sleep(0.002)  # longer than SPIN, which a thread left awake would spin through
            spun += sum(cpu_ns(t) for t in tids) - before
    assert spun < 20 * 50_000  # < 50 us a step: one look at the state, then sleep
