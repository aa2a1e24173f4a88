"""Mixtures of experts (Mixtral's, Qwen3-MoE's): the answer transformers gives on every kind
of plan, from a Hugging Face directory and from a GGUF file that stacks the experts;
quantized experts as the file stores them; the planner's bytes; what is refused, by name."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from p2pserve.engine import quant
from p2pserve.engine.build import load_stage
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.model import MLP, MoE, pack_linear
from p2pserve.engine.weights import open_weights
from p2pserve.errors import ConfigError
from p2pserve.plan import Plan
from p2pserve.ranks.pipeline import LocalPipeline

from p2pserve.testing.reference import hf_greedy
from p2pserve.testing.swarm import Swarm, client
from .tiny import make_tiny_gguf, make_tiny_llama, make_tiny_mixtral, make_tiny_qwen3_moe

PROMPT = [3, 17, 42, 9, 100, 7, 64, 5]
NEW_TOKENS = 24
# one stage; two stages of one rank; one stage over two TP ranks (each holds half of
# every expert's columns)
PLANS = [([1], [4]), ([1, 1], [2, 2]), ([2], [4])]
EXPERTS, USED = 4, 2
# Qwen3-MoE: q/k norms, heads wider than hidden / heads, experts narrower than its (unused)
# dense MLP, named mlp.experts.{e}.gate_proj...; Mixtral: block_sparse_moe.experts.{e}.w1...
FAMILIES = {"mixtral": make_tiny_mixtral, "qwen3moe": make_tiny_qwen3_moe}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make(tmp_path_factory.mktemp(name), experts=EXPERTS, used=USED) for name, make in FAMILIES.items()}


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    return checkpoints["mixtral"]


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def answers(path, plans, dtype="fp32"):
    for hetero, partition in plans:
        with LocalPipeline(path, Plan(hetero, partition), dtype=dtype) as pipe:
            yield Plan(hetero, partition).flags(), pipe.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS),
                                                                 stop_on_eos=False, capture_logits=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_mixture_matches_transformers_on_one_stage_two_stages_and_tp2(family, checkpoints):
    path = checkpoints[family]
    config = open_weights(path).config
    assert (config.arch, config.n_experts, config.n_experts_used) == (
        "llama" if family == "mixtral" else family, EXPERTS, USED)
    hf_model = transformers_model(path)
    ref_tokens, ref_logits = hf_greedy(hf_model, PROMPT, NEW_TOKENS)
    # the routing varies from token to token, so a wrong pick or weighting would show
    with torch.no_grad():
        routers = hf_model(torch.tensor([PROMPT + ref_tokens]), output_router_logits=True).router_logits
    varied = [len(layer.topk(USED, dim=-1).indices.unique()) > USED for layer in routers]
    assert sum(varied) >= len(routers) // 2, varied
    for plan, gen in answers(path, PLANS):
        assert gen.tokens == ref_tokens, plan
        assert (gen.prompt_logits - ref_logits).abs().max() < 1e-4, plan


def test_qwen3_moe_without_renormalised_weights_matches_transformers(tmp_path):
    """norm_topk_prob false (transformers' default for Qwen3-MoE): the chosen experts'
    probabilities weight their outputs as they are, in the modules and the fused step."""
    path = make_tiny_qwen3_moe(tmp_path, experts=EXPERTS, used=USED, norm_topk=False)
    assert not open_weights(path).config.norm_topk
    ref_tokens, ref_logits = hf_greedy(transformers_model(path), PROMPT, NEW_TOKENS)
    for plan, gen in answers(path, PLANS[:1]):
        assert gen.tokens == ref_tokens, plan
        assert (gen.prompt_logits - ref_logits).abs().max() < 1e-4, plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_moe_module_computes_what_transformers_sparse_block_computes(family, checkpoints, dtype):
    """One layer's mixture on a batch of tokens (several per expert, as a prefill has), at
    fp32 and bf16: transformers rounds each expert's weighted output to the activations'
    dtype before adding it, and so does MoE."""
    hf_model = transformers_model(checkpoints[family])
    block = copy.deepcopy(hf_model.model.layers[1].mlp).to(dtype)
    I = open_weights(checkpoints[family]).config.intermediate_size
    experts = [MLP(pack_linear(block.experts.gate_up_proj[e].detach().clone()),
                   pack_linear(block.experts.down_proj[e].detach().clone())) for e in range(EXPERTS)]
    assert block.experts.gate_up_proj.shape[1] == 2 * I  # gate rows, then up rows: MLP's w13
    moe = MoE(pack_linear(block.gate.weight.detach().clone()), experts, USED)
    torch.manual_seed(1)
    x = torch.randn(1, 16, hf_model.config.hidden_size).to(dtype)
    with torch.no_grad():
        want = block(x)
        got = moe(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    assert got.dtype == dtype and (got.float() - want.float()).abs().max() < tolerance


async def test_a_swarm_serves_a_mixture_over_a_worker_and_a_tp2_worker(tmp_path):
    """Bootstrap and two workers on 127.0.0.1, the second stage over two TP ranks (each with
    half of every expert), Qwen3-MoE with SmolLM2's tokenizer: transformers' answer."""
    path = make_tiny_qwen3_moe(tmp_path / "qwen3moe", vocab=49152, experts=EXPERTS, used=USED)
    open_weights().tokenizer()._hf.save_pretrained(path)
    ref_tokens, _ = hf_greedy(transformers_model(path), PROMPT, NEW_TOKENS)
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start_bootstrap("--model", str(path), "--hetero-config", "1", "2", "--pp-partition", "2", "2")
        swarm.start_worker("--model", str(path), "--stage", "0")
        swarm.start_worker("--model", str(path), "--stage", "1")
        async with client(swarm.addr) as c:
            await c.wait_chains(1)
            answer = await c.ask(tokens=PROMPT, params=SamplingParams(max_new_tokens=NEW_TOKENS), stop_on_eos=False)
    assert answer.tokens == ref_tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_gguf_reads_back_every_expert_in_hf_layout(family, checkpoints, tmp_path):
    path = checkpoints[family]
    expected = load_file(path / "model.safetensors")
    source = open_weights(make_tiny_gguf(tmp_path / f"{family}.gguf", path))
    assert source.config.fingerprint() == open_weights(path).config.fingerprint()
    assert sum(".experts." in n for n in expected) == 4 * EXPERTS * 3
    for name, want in expected.items():
        assert torch.equal(source.get(name), want), name
        if ".experts." in name:  # a TP rank's slice of one expert, cut from the stack
            half = want.shape[0] // 2
            assert torch.equal(source.get(name, rows=(half, 2 * half)), want[half:]), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_gguf_mixture_matches_transformers_on_two_stages_and_tp2(family, checkpoints, tmp_path):
    ref_tokens, _ = hf_greedy(transformers_model(checkpoints[family]), PROMPT, NEW_TOKENS)
    path = make_tiny_gguf(tmp_path / f"{family}.gguf", checkpoints[family])  # F32: the same weights exactly
    for plan, gen in answers(path, PLANS[1:]):
        assert gen.tokens == ref_tokens, plan


def gentle(src, dst):
    """``src`` with its layers scaled down (as test_quant's), so that a rounding of its
    weights changes the logits by little, not the greedy answer."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    state = load_file(src / "model.safetensors")
    state = {n: t * 0.35 if ".layers." in n and "norm" not in n else t for n, t in state.items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family,qtype,fmt", [("mixtral", "Q8_0", "int8"), ("mixtral", "Q4_0", "int4"),
                                             ("qwen3moe", "Q4_0", "int4")])
def test_quantized_experts_are_served_as_the_file_stores_them(family, qtype, fmt, checkpoints, tmp_path):
    """A GGUF's Q8_0 / Q4_0 expert stacks become an int8 / int4 stage's experts block for
    block as stored (the router stays float, as llama.cpp keeps it); the stage's greedy answer
    is the fp32 engine's on the same file (which dequantizes every block), on one stage and TP 2."""
    path = make_tiny_gguf(tmp_path / f"{family}.{qtype}.gguf", gentle(checkpoints[family], tmp_path / "gentle"),
                          qtype=qtype)
    stage = load_stage(open_weights(path), 0, 4, quant=fmt)
    kind = quant.Int8Weight if fmt == "int8" else quant.Int4Weight
    for block in stage.blocks:
        assert isinstance(block.mlp, MoE) and block.mlp.router.dtype == torch.float32
        for expert in block.mlp.experts:
            assert all(isinstance(w, kind) and w.group == 32 for w in (expert.w13, expert.w2))
    for hetero, partition in [([1], [4]), ([2], [4])]:
        plan = Plan(hetero, partition)
        got = {}
        for dtype in (fmt, "fp32"):
            with LocalPipeline(path, plan, dtype=dtype) as pipe:
                gen = pipe.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS), stop_on_eos=False,
                                    capture_logits=True)
                got[dtype] = gen.tokens, gen.prompt_logits
        assert got[fmt][0] == got["fp32"][0], plan.flags()
        assert (got[fmt][1] - got["fp32"][1]).abs().max() < 0.1, plan.flags()  # bf16 activations in the kernels


def test_a_moe_stage_reads_only_its_own_layers_and_its_slice_of_each_expert(mixtral, tmp_path):
    source = open_weights(make_tiny_gguf(tmp_path / "mixtral.Q4_0.gguf", mixtral, qtype="Q4_0"))
    stage = load_stage(source, 2, 4, rank=1, tp=2, quant="int4", all_reduce=lambda h: None)
    assert {int(n.split(".")[2]) for n in source.reads} == {2, 3}
    assert sum(".experts." in n for n in source.reads) == 2 * EXPERTS * 3
    I, H = source.config.intermediate_size, source.config.hidden_size
    for block in stage.blocks:
        for expert in block.mlp.experts:  # rank 1's half of every expert
            assert tuple(expert.w13.shape) == (I, H) and tuple(expert.w2.shape) == (H, I // 2)


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_the_planner_counts_the_bytes_a_moe_stage_holds(mixtral, fmt):
    from p2pserve.planner.cost import DTYPES, weights_bytes

    source = open_weights(mixtral)
    stage = load_stage(source, 0, source.config.n_layers, quant=None if fmt == "fp32" else fmt)
    held = sum(t.nbytes for t in [*stage.parameters(), *stage.buffers()])
    counted = weights_bytes(source.config, DTYPES[fmt])
    assert held <= counted < 1.25 * held


def test_mixtral_8x7b_plans_on_two_24_gb_gpus_at_int4_and_not_at_fp16():
    from p2pserve.cli.plan import plan

    fits = CliRunner().invoke(plan, ["--model", "mixtral-8x7b", "--devices", "2xRTX4090@m1", "--dtype", "int4"])
    assert fits.exit_code == 0, fits.output
    assert "hetero_config" in fits.output
    too_big = CliRunner().invoke(plan, ["--model", "mixtral-8x7b", "--devices", "2xRTX4090@m1", "--dtype", "fp16"])
    assert isinstance(too_big.exception, ConfigError) and "needs 87.0 GiB for weights" in str(too_big.exception)


def test_a_decode_step_reads_only_the_experts_its_tokens_pick():
    from p2pserve.planner.cost import DTYPES, Shard, experts_read, layer_bytes
    from p2pserve.planner.shapes import KNOWN_MODELS

    model = KNOWN_MODELS["mixtral-8x7b"]
    assert experts_read(model, 1) == 2 and 2 < experts_read(model, 4) < experts_read(model, 64) <= 8
    shard = Shard.of(model, 1)
    one_token = layer_bytes(model, shard, DTYPES["fp16"], experts_read(model, 1))
    assert 0.25 < one_token / layer_bytes(model, shard, DTYPES["fp16"]) < 0.35  # 2 of 8 experts and attention


def test_training_a_mixture_of_experts_is_refused_by_name(mixtral, tmp_path):
    from p2pserve.cli.train import train

    data = tmp_path / "corpus.txt"
    data.write_text("hello world " * 200)
    result = CliRunner().invoke(train, ["--model", str(mixtral), "--data", str(data), "--seq-len", "16",
                                            "--steps", "1"])
    assert isinstance(result.exception, ConfigError)
    assert "mixture-of-experts model: p2pserve serves those but trains dense models only" in str(result.exception)


def test_other_mixtures_and_unstacked_gguf_experts_are_refused(mixtral, tmp_path):
    import shutil

    qwen = tmp_path / "qwen-moe"
    shutil.copytree(mixtral, qwen)
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2MoeForCausalLM"]}))
    with pytest.raises(ConfigError, match="architecture Qwen2MoeForCausalLM is not supported"):
        open_weights(qwen)
    path = make_tiny_gguf(tmp_path / "no-count.gguf", mixtral, metadata={"llama.expert_used_count": 0})
    with pytest.raises(ConfigError, match="lacks llama.expert_count or llama.expert_used_count"):
        open_weights(path)
    # llama.cpp before 2024 wrote blk.N.ffn_gate.E.weight, one tensor an expert: a router and
    # the counts without the stacks
    dense = make_tiny_llama(tmp_path / "dense")
    router = {"blk.0.ffn_gate_inp.weight": (np.zeros((EXPERTS, 64), np.float32), "F32")}
    old = make_tiny_gguf(tmp_path / "old.gguf", dense, tensors=router,
                         metadata={"llama.expert_count": EXPERTS, "llama.expert_used_count": USED})
    with pytest.raises(ConfigError, match="not stacked in blk.N.ffn_gate_exps"):
        open_weights(old)
