"""Every supported model family gives the answer transformers gives, on every kind of plan,
from a Hugging Face directory and from a GGUF file; other architectures are refused.
Mixtral's mixture of experts has its own file, test_moe.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.weights import open_weights
from p2pserve.errors import ConfigError
from p2pserve.plan import Plan
from p2pserve.ranks.pipeline import LocalPipeline

from p2pserve.testing.reference import hf_greedy
from .tiny import make_tiny_gguf, make_tiny_llama, make_tiny_mistral, make_tiny_qwen2, make_tiny_qwen3

GREEDY = SamplingParams(max_new_tokens=24)
PROMPT = [3, 17, 42, 9, 100, 7, 64, 5]
# one stage; two stages of one rank; one stage over two TP ranks
PLANS = [([1], [4]), ([1, 1], [2, 2]), ([2], [4])]

FAMILIES = {
    # 3 KV heads over TP 2: the ranks' q/k/v biases are uneven slices (2 heads and 1)
    "qwen2": (make_tiny_qwen2, dict(n_heads=6, n_kv_heads=3, hidden=96)),
    # heads of 32 dimensions under a hidden size of 64: q is wider than the hidden state
    "qwen3": (make_tiny_qwen3, dict(head_dim=32)),
    "mistral": (make_tiny_mistral, dict()),
    "llama": (make_tiny_llama, dict()),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make(tmp_path_factory.mktemp(name), **kw) for name, (make, kw) in FAMILIES.items()}


def reference(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf_greedy(model, PROMPT, GREEDY.max_new_tokens)


def answers(path, plans):
    for hetero, partition in plans:
        with LocalPipeline(path, Plan(hetero, partition)) as pipe:
            yield (hetero, partition), pipe.generate(PROMPT, GREEDY, stop_on_eos=False, capture_logits=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_matches_transformers_on_one_stage_two_stages_and_tp2(family, checkpoints):
    path = checkpoints[family]
    assert open_weights(path).config.arch == ("llama" if family in ("llama", "mistral") else family)
    ref_tokens, ref_logits = reference(path)
    for plan, gen in answers(path, PLANS):
        assert gen.tokens == ref_tokens, f"plan {plan}"
        assert (gen.prompt_logits - ref_logits).abs().max() < 1e-4, f"plan {plan}"


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_gguf_reads_back_every_tensor_in_hf_layout(family, checkpoints, tmp_path):
    """llama.cpp keeps Qwen's q/k rows in Hugging Face order (its rope for Qwen is rotate-half)."""
    from safetensors.torch import load_file

    path = checkpoints[family]
    expected = load_file(path / "model.safetensors")
    source = open_weights(make_tiny_gguf(tmp_path / f"{family}.gguf", path))
    assert source.config.fingerprint() == open_weights(path).config.fingerprint()
    extra = [n for n in expected if n.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight"))]
    assert extra  # the family's own tensors are among those compared
    head = source.config.head_dim
    for name, want in expected.items():
        assert torch.equal(source.get(name), want), name
        if name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.bias")):
            assert torch.equal(source.get(name, rows=(head, 2 * head)), want[head : 2 * head]), name


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_transformers_on_two_stages_and_tp2(family, checkpoints, tmp_path):
    path = checkpoints[family]
    ref_tokens, _ = reference(path)
    gguf_path = make_tiny_gguf(tmp_path / f"{family}.gguf", path)  # F32: the same weights exactly
    for plan, gen in answers(gguf_path, PLANS[1:]):
        assert gen.tokens == ref_tokens, f"plan {plan}"


def test_llama_fingerprint_is_unchanged_by_the_other_families():
    # What workers of earlier versions announce for the default model; a change splits swarms.
    assert open_weights(None).config.fingerprint() == "f11c5c310459bf29"


def test_mistral_context_is_bounded_by_its_sliding_window(checkpoints):
    # Beyond the window, Mistral attends to the window only: the bound keeps answers exact.
    config = open_weights(checkpoints["mistral"]).config
    assert config.max_position_embeddings == 128


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_an_unknown_architecture_is_refused_naming_the_supported_ones(checkpoints, tmp_path):
    path = _edited_copy(checkpoints["llama"], tmp_path / "gemma", architectures=["GemmaForCausalLM"])
    with pytest.raises(ConfigError, match=r"architecture GemmaForCausalLM is not supported \(supported: "
                                          r"LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, "
                                          r"Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM\)"):
        open_weights(path)


def test_an_unknown_gguf_architecture_is_refused_naming_the_supported_ones(checkpoints, tmp_path):
    path = make_tiny_gguf(tmp_path / "other.gguf", checkpoints["llama"], arch="gemma")
    with pytest.raises(ConfigError, match=r"architecture gemma is not supported \(supported: llama, qwen2, qwen3, qwen3moe\)"):
        open_weights(path)


def test_a_bias_on_the_attention_output_is_refused(checkpoints, tmp_path):
    path = _edited_copy(checkpoints["qwen3"], tmp_path / "biased", attention_bias=True)
    with pytest.raises(ConfigError, match="attention_bias/mlp_bias .* are not supported"):
        open_weights(path)
