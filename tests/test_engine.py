"""The engine gives the answer transformers gives, on every plan."""

from __future__ import annotations

import pytest
import torch

from p2pserve.errors import ConfigError
from p2pserve.ranks.pipeline import LocalPipeline
from p2pserve.plan import Plan
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.model import RMSNorm
from p2pserve.engine.tp import shard_for, split_evenly
from p2pserve.engine.weights import open_weights

from p2pserve.testing.reference import hf_greedy, hf_model
from .tiny import make_tiny_llama

GREEDY = SamplingParams(max_new_tokens=24)

TINY_CASES = {
    # name: (make_tiny_llama kwargs, plans)
    "mha-tied": (dict(n_heads=4, n_kv_heads=4, tie=True), [([1], [4]), ([2, 1], [3, 1])]),
    "gqa-untied": (dict(n_heads=6, n_kv_heads=3, hidden=96), [([1], [4]), ([1, 2], [1, 3])]),
    "llama3-rope": (
        dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        [([1], [4]), ([1, 1], [2, 2])],
    ),
    # 5 KV heads over TP 3: ranks hold 2, 2, 1 heads and uneven FFN slices
    "odd-tp-split": (dict(n_heads=10, n_kv_heads=5, hidden=80, intermediate=100), [([3], [4]), ([2, 3], [1, 3])]),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return {name: make_tiny_llama(tmp_path_factory.mktemp(name), **kw) for name, (kw, _) in TINY_CASES.items()}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tiny_checkpoints_match_transformers_on_every_plan(case, tiny_models):
    path = tiny_models[case]
    ref_model = hf_model(path)
    prompt = [3, 17, 42, 9, 100, 7, 64, 5]
    ref_tokens, ref_logits = hf_greedy(ref_model, prompt, GREEDY.max_new_tokens)
    for hetero, partition in TINY_CASES[case][1]:
        with LocalPipeline(path, Plan(hetero, partition)) as pipe:
            gen = pipe.generate(prompt, GREEDY, stop_on_eos=False, capture_logits=True)
        assert gen.tokens == ref_tokens, f"plan {hetero}/{partition}"
        assert (gen.prompt_logits - ref_logits).abs().max() < 1e-4, f"plan {hetero}/{partition}"


def test_long_prompt_is_prefilled_in_chunks_with_the_same_answer(tiny_models, monkeypatch):
    import p2pserve.engine.generate as local

    path = tiny_models["gqa-untied"]
    prompt = [(i * 7) % 250 + 3 for i in range(40)]
    ref_tokens, _ = hf_greedy(hf_model(path), prompt, 8)
    monkeypatch.setattr(local, "PREFILL_CHUNK", 16)
    with LocalPipeline(path) as pipe:
        gen = pipe.generate(prompt, SamplingParams(max_new_tokens=8), stop_on_eos=False)
    assert gen.tokens == ref_tokens


def test_seeded_sampling_is_the_same_on_every_plan(tiny_models):
    path = tiny_models["gqa-untied"]
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_new_tokens=16)
    answers = []
    for hetero, partition in [([1], [4]), ([1, 2], [1, 3])]:
        with LocalPipeline(path, Plan(hetero, partition)) as pipe:
            answers.append(pipe.generate([5, 6, 7], params, stop_on_eos=False).tokens)
            other_seed = pipe.generate([5, 6, 7], SamplingParams(temperature=0.9, seed=99, max_new_tokens=16),
                                       stop_on_eos=False).tokens
    assert answers[0] == answers[1]
    assert other_seed != answers[0]


def test_uneven_head_split_covers_every_head_once():
    assert split_evenly(3, 2) == [(0, 2), (2, 3)]
    assert split_evenly(8, 3) == [(0, 3), (3, 6), (6, 8)]
    cfg = open_weights(None).config  # SmolLM2: 9 heads, 3 KV heads
    shards = [shard_for(cfg, r, 2) for r in range(2)]
    assert [s.kv_heads for s in shards] == [(0, 2), (2, 3)]
    assert [s.q_heads for s in shards] == [(0, 6), (6, 9)]
    assert shards[0].ffn[1] == shards[1].ffn[0] and shards[1].ffn[1] == cfg.intermediate_size


@pytest.mark.parametrize(
    "hetero, partition, message",
    [
        ([1, 1], [15], "has 2 stages but --pp-partition has 1"),
        ([1, 1], [15, 14], "sums to 29 layers but smollm2"),
        ([4], [30], "TP degree 4 is above"),
        ([1, 0], [15, 15], "must be a positive integer, got 0"),
    ],
)
def test_a_wrong_plan_is_one_clear_error(hetero, partition, message):
    cfg = open_weights(None).config
    with pytest.raises(ConfigError, match=message):
        Plan(hetero, partition).check_model(cfg)


def test_prompt_beyond_the_context_is_refused(tiny_models):
    with LocalPipeline(tiny_models["mha-tied"]) as pipe:
        with pytest.raises(ConfigError, match="context"):
            pipe.generate(list(range(10)), SamplingParams(max_new_tokens=10_000))


def test_a_rank_killed_mid_answer_is_an_error_not_a_hang(tiny_models):
    from p2pserve.errors import P2PServeError

    with LocalPipeline(tiny_models["mha-tied"], Plan([1, 1], [2, 2])) as pipe:
        answer = pipe.stream([3, 17, 42], SamplingParams(max_new_tokens=250), stop_on_eos=False, step_timeout=60)
        next(answer)
        pipe._ranks.procs[1].kill()  # the last stage, which rank 0 waits on for every token
        with pytest.raises(P2PServeError, match=r"rank 1 of the pipeline was killed \(SIGKILL\)"):
            for _ in answer:
                pass



def test_rms_norm_on_fp32_is_transformers_arithmetic_bit_for_bit():
    """The fp32 path is one ``F.rms_norm`` call; it must equal transformers' spelled-out
    arithmetic exactly, or greedy parity would rest on luck."""
    g = torch.Generator().manual_seed(0)
    for width in (64, 576, 4096):
        weight, x = torch.randn(width, generator=g), 10 * torch.randn(3, 5, width, generator=g)
        want = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert torch.equal(RMSNorm(weight, 1e-6)(x), want)
