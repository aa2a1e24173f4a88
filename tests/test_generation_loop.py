"""One generation loop: `p2pserve run` and the swarm's stage 0 both run
p2pserve.engine.generate.GenerationLoop, and it alone decides chunks and when to stop."""

from __future__ import annotations

import pytest
import torch
import trio

from p2pserve.engine import generate
from p2pserve.engine.build import load_stage
from p2pserve.engine.generate import GenerationLoop, Step, first_max
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.weights import open_weights
from p2pserve.errors import ConfigError
from p2pserve.net.protocols import Hop
from p2pserve.node import driver
from p2pserve.node.compute import InlineCompute
from p2pserve.node.sessions import Session, StageServer
from p2pserve.ranks import pipeline
from p2pserve.ranks.pipeline import LocalPipeline

from p2pserve.testing.reference import hf_greedy, hf_model
from .test_upstream import _Recorder
from .tiny import make_tiny_llama

PROMPT = [(i * 11) % 200 + 3 for i in range(21)]


def test_the_loop_prefills_in_chunks_then_decodes_until_max_tokens():
    loop = GenerationLoop(PROMPT, max_new_tokens=3, eos=(), chunk=8)
    steps = []
    while (step := loop.next_step()) is not None:
        steps.append(step)
        if step.want:
            loop.take(100 + len(loop.tokens))
    assert steps == [Step(PROMPT[:8], 0, False), Step(PROMPT[8:16], 8, False), Step(PROMPT[16:], 16, True),
                     Step([100], 21, True), Step([101], 22, True)]
    assert loop.tokens == [100, 101, 102]


def test_the_loop_stops_on_eos_only_when_asked():
    for stop_on_eos, expected in [(True, [7, 2]), (False, [7, 2, 5])]:
        loop = GenerationLoop([1, 2], max_new_tokens=3, eos=(2,), stop_on_eos=stop_on_eos)
        answers = iter([7, 2, 5])
        while loop.next_step() is not None:
            loop.take(next(answers))
        assert loop.tokens == expected


def test_the_loop_refuses_a_step_before_the_last_token_is_taken():
    loop = GenerationLoop([1, 2], max_new_tokens=3, eos=())
    loop.next_step()
    with pytest.raises(RuntimeError):
        loop.next_step()


@pytest.mark.parametrize("prompt", [[], [3, 10**6], [3, True], "hello"])
def test_a_bad_prompt_is_refused(prompt):
    with pytest.raises(ConfigError):
        generate.check_prompt(prompt, 256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), n_layers=2)


class _Spy(GenerationLoop):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Spy.made.append(self)


def test_p2pserve_run_answers_through_the_generation_loop(tiny, monkeypatch):
    _Spy.made = []
    monkeypatch.setattr(pipeline, "GenerationLoop", _Spy)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 8)
    with LocalPipeline(tiny) as pipe:  # one rank: in this process, where the spy is
        answer = pipe.generate(PROMPT, SamplingParams(max_new_tokens=5), stop_on_eos=False)
    assert len(_Spy.made) == 1 and _Spy.made[0].tokens == answer.tokens
    assert answer.tokens == hf_greedy(hf_model(tiny), PROMPT, 5)[0]


class _UpstreamStream(_Recorder):
    """Stage 0's stream to the bootstrap: records what stage 0 writes, never sends."""

    async def read(self, n=None):
        await trio.sleep_forever()

    async def reset(self):
        pass


async def test_the_swarm_stage_0_answers_through_the_generation_loop(tiny, monkeypatch):
    _Spy.made = []
    monkeypatch.setattr(driver, "GenerationLoop", _Spy)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 8)
    source = open_weights(tiny)
    n = source.config.n_layers
    runner = load_stage(source, 0, n)
    runner.allocate(2, 64)
    server = StageServer(None, runner, model_name="tiny", fingerprint="f", start=0, end=n,
                         max_sessions=2, max_len=64, compute=InlineCompute())
    session = Session("s1", 0, [Hop("me", (), 0, n)], 0, SamplingParams(max_new_tokens=5),
                      {"stop_on_eos": False}, prompt=PROMPT)
    stream = _UpstreamStream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.executor.run)
        with trio.fail_after(60):
            await driver.drive(server, stream, session)
        nursery.cancel_scope.cancel()
    sent = [t for _, frames in stream.writes for f in frames for t in f.get("tokens", [])]
    assert len(_Spy.made) == 1 and _Spy.made[0].tokens == sent
    assert sent == hf_greedy(hf_model(tiny), PROMPT, 5)[0]


def test_first_max_is_torch_argmax_on_ties_nans_and_views():
    """The greedy pick's argmax: the first of tied maxima, NaN as the largest, any strides,
    and off the fp32 CPU path torch's own."""
    x = torch.tensor([1.0, 3.0, 2.0, 3.0])
    cases = [x, torch.tensor([1.0, float("nan"), 5.0, float("nan")]), torch.randn(8, 6)[:, 2],
             torch.full((49152,), -1.0), torch.randn(49152), x.double(), x.bfloat16()]
    for case in cases:
        assert first_max(case) == int(torch.argmax(case)), case
