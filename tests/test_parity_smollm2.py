"""SmolLM2-135M-Instruct from its GGUF: every plan answers exactly what transformers answers."""

from __future__ import annotations

import pytest

from p2pserve.ranks.pipeline import LocalPipeline
from p2pserve.plan import Plan
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.weights import default_model_path, open_weights

from p2pserve.testing.reference import cached_hf_model, hf_greedy

PROMPT = "What is the capital of France?"
N_TOKENS = 64
PLANS = [([1], [30]), ([1, 1], [15, 15]), ([2, 1], [20, 10]), ([1, 2, 1], [7, 11, 12]), ([3], [30])]


@pytest.fixture(scope="module")
def chat_prompt():
    return open_weights(None).tokenizer().encode_chat([{"role": "user", "content": PROMPT}])


@pytest.fixture(scope="module")
def reference(chat_prompt):
    model = cached_hf_model(str(default_model_path()))
    return hf_greedy(model, chat_prompt, N_TOKENS)


@pytest.mark.parametrize("hetero, partition", PLANS, ids=lambda v: "-".join(map(str, v)))
def test_greedy_answer_and_logits_equal_transformers(hetero, partition, chat_prompt, reference):
    ref_tokens, ref_logits = reference
    with LocalPipeline(None, Plan(hetero, partition)) as pipe:
        gen = pipe.generate(chat_prompt, SamplingParams(max_new_tokens=N_TOKENS), stop_on_eos=False,
                            capture_logits=True)
    assert gen.tokens == ref_tokens
    diff = (gen.prompt_logits - ref_logits).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| = {diff:.2e}"


def test_the_answer_names_paris(chat_prompt):
    tokenizer = open_weights(None).tokenizer()
    with LocalPipeline(None) as pipe:
        gen = pipe.generate(chat_prompt, SamplingParams(max_new_tokens=20))
    assert gen.tokens[-1] in tokenizer.eos_token_ids
    assert "Paris" in tokenizer.decode(gen.tokens)


def test_seeded_sample_is_the_same_on_every_plan(chat_prompt):
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7, max_new_tokens=24)
    answers = {}
    for hetero, partition in [([1], [30]), ([1, 2], [12, 18])]:
        with LocalPipeline(None, Plan(hetero, partition)) as pipe:
            answers[str(hetero)] = pipe.generate(chat_prompt, params, stop_on_eos=False).tokens
    first = next(iter(answers.values()))
    assert all(a == first for a in answers.values()), answers
