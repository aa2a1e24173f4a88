"""The fused decode step (``kernels.DecodeStep``) against the modules it stands in for.

Every other test of a CPU stage runs its decode steps through it already (the parity tests
against transformers among them); these compare it with the eager modules directly, on the
inputs where the two could part: batches of sequences at different positions in slots out
of order, each family's extras (Qwen2's q/k/v biases, Qwen3's q/k norms, Mixtral's
and Qwen3-MoE's experts), every weight
format (fp32, int8, int4, and a bf16 stage's weights and cache), and a TP rank's half-layer
calls.
"""

from __future__ import annotations

import pytest
import torch

from p2pserve.engine import kernels
from p2pserve.engine.build import load_stage
from p2pserve.engine.model import Batch, StageModel
from p2pserve.engine.weights import open_weights

from .tiny import make_tiny_llama, make_tiny_mixtral, make_tiny_qwen2, make_tiny_qwen3, make_tiny_qwen3_moe

pytestmark = pytest.mark.skipif(not kernels.vectorised(), reason="no vectorised CPU kernels here: "
                                f"{kernels.why_not() or 'their portable loops are not used for fp32'}")

FAMILIES = {
    "llama": (make_tiny_llama, dict()),
    # a KV group of one query head, and one of five (the attention takes 3 of a group's heads
    # at a time, then the 2 left)
    "llama-mha": (make_tiny_llama, dict(n_heads=4, n_kv_heads=4)),
    "llama-gqa5": (make_tiny_llama, dict(n_heads=10, n_kv_heads=2, hidden=160)),
    "qwen2": (make_tiny_qwen2, dict(n_heads=6, n_kv_heads=3, hidden=96)),
    "qwen3": (make_tiny_qwen3, dict(head_dim=32)),
    # 4 experts, 2 a token: the batch's sequences pick some the same and some not
    "mixtral": (make_tiny_mixtral, dict()),
    # its weights as they are, not renormalised over the chosen experts
    "qwen3moe": (make_tiny_qwen3_moe, dict(norm_topk=False)),
}
# what each kind of stage is loaded as: (quant, activations, KV cache; None: the activations')
KINDS = {"fp32": (None, torch.float32, None), "int8": ("int8", torch.float32, None),
         "int4": ("int4", torch.float32, None), "bf16": (None, torch.bfloat16, None),
         "fp32-kv-bf16": (None, torch.float32, torch.bfloat16), "int4-kv-fp16": ("int4", torch.float32, torch.float16),
         "int4-kv-int8": ("int4", torch.float32, torch.int8)}
# of the largest logit (or cached value): fp32 sums in another order; on AVX2 and AVX-512
# the int8 and int4 products also round their input to 16 bits (gemv.cpp), and a value rounded the other
# way by an fp32 difference upstream moves what follows by a step of that. A bf16 stage's
# modules round every activation to bf16, the fused step only each GEMV's input, the cache
# and the hidden state it returns: on these tiny random models their logits part by up to
# 4.5% of the largest (and each lies as far from an fp32 step over the same bf16 weights)
# A 16-bit or int8 cache holds what each path rounds to it: a key an fp32 sum order apart
# may round to the neighbouring value, a step of 2^-8 (bf16) or 2^-11 (fp16) of it, or of
# 1/127 of its row's largest (int8).
TOLERANCE = {"fp32": 1e-5, "int8": 1e-3, "int4": 1e-3, "bf16": 6e-2, "fp32-kv-bf16": 1e-2, "int4-kv-fp16": 2e-3,
             "int4-kv-int8": 1e-2}
# three sequences of different lengths, prefilled in slots 0..2
PROMPTS = [[3, 17, 42], [9, 100, 7, 64, 5], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make(tmp_path_factory.mktemp(name), **kw) for name, (make, kw) in FAMILIES.items()}


def prefilled(path, kind: str) -> StageModel:
    source = open_weights(path)
    quant, dtype, kv_dtype = KINDS[kind]
    stage = load_stage(source, 0, source.config.n_layers, quant=quant, dtype=dtype, kv_dtype=kv_dtype)
    stage.allocate(len(PROMPTS), 64)
    for slot, prompt in enumerate(PROMPTS):
        stage(Batch((slot,), (0,), len(prompt)), torch.tensor([prompt]))
    return stage


def step_both_ways(stage: StageModel, batch: Batch, tokens: list[int]):
    """The batch's decode step through the modules, then through the fused step from the
    same cache: (logits, caches) of each."""
    caches = [(b.attn.cache.k, b.attn.cache.v) for b in stage.blocks]
    results = []
    for fused in (False, True):
        stage.fused_decode = fused
        logits = stage(batch, torch.tensor(tokens)[:, None])
        results.append((logits, [(k.clone(), v.clone()) for k, v in caches]))
    del stage.fused_decode
    return results


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_fused_decode_step_computes_what_the_modules_compute(family, kind, checkpoints):
    stage = prefilled(checkpoints[family], kind)
    lengths = [len(p) for p in PROMPTS]
    # one sequence, then all three, in slots out of order, each at its own position
    for batch, tokens in [(Batch((1,), (lengths[1],), 1), [4]),
                          (Batch((2, 0, 1), (lengths[2], lengths[0], lengths[1] + 1), 1), [8, 21, 30])]:
        (eager, eager_cache), (fused, fused_cache) = step_both_ways(stage, batch, tokens)
        assert stage._decode_step is not None, "the fused step was not used"
        # an fp32 stage's final norm and head run in the same call (forward_logits)
        assert stage._head_in_step == (stage.dtype == torch.float32)
        assert fused.dtype == eager.dtype and all(k.dtype == (KINDS[kind][2] or stage.dtype) for k, _ in fused_cache)
        tolerance = TOLERANCE[kind]
        # no argmax comparison: a random tiny model's first two logits may tie closer than
        # the tolerance (its quantized MoE's do), and where they do not, this bound implies it
        torch.testing.assert_close(fused, eager, rtol=0, atol=tolerance * eager.abs().max().item())
        for (ek, ev), (fk, fv) in zip(eager_cache, fused_cache):
            if ek.dtype == torch.int8:  # integers: at most one apart (a rounding the other way)
                assert (fk.int() - ek.int()).abs().max() <= 1 and (fv.int() - ev.int()).abs().max() <= 1
                assert (fk != ek).float().mean() < 0.01 and (fv != ev).float().mean() < 0.01
                continue
            torch.testing.assert_close(fk, ek, rtol=0, atol=tolerance * ek.abs().max().item())
            torch.testing.assert_close(fv, ev, rtol=0, atol=tolerance * ev.abs().max().item())


# (a bf16 stage's modules round every activation to bf16: over 600 positions of the random
# gqa5 model they part from the fused step by 10% of the largest logit, beyond TOLERANCE)
@pytest.mark.parametrize("family, kind", [("llama", "fp32"), ("llama", "bf16"), ("llama", "fp32-kv-bf16"),
                                          ("llama-gqa5", "fp32"), ("llama-gqa5", "fp32-kv-bf16"),
                                          ("llama-gqa5", "int4-kv-int8")])
def test_a_context_of_several_chunks_joins_their_softmaxes(family, kind, checkpoints):
    # decode_step.cpp attends 256 cached positions a chunk and joins the chunks' softmaxes
    # (a chunk's KV group at a time): a sequence of 600 cached positions (three chunks, the
    # last a part one) beside one of 5 (one chunk), in slots out of order
    source = open_weights(checkpoints[family])
    quant, dtype, kv_dtype = KINDS[kind]
    stage = load_stage(source, 0, source.config.n_layers, quant=quant, dtype=dtype, kv_dtype=kv_dtype)
    stage.allocate(2, 1024)  # past the tiny config's 256 positions: RoPE's tables follow the cache
    long, short = [(7 * i + 3) % 200 for i in range(600)], [5, 9, 11, 2, 7]
    stage(Batch((1,), (0,), len(long)), torch.tensor([long]))
    stage(Batch((0,), (0,), len(short)), torch.tensor([short]))
    (eager, _), (fused, _) = step_both_ways(stage, Batch((0, 1), (len(short), len(long)), 1), [9, 4])
    assert stage._decode_step is not None, "the fused step was not used"
    torch.testing.assert_close(fused, eager, rtol=0, atol=TOLERANCE[kind] * eager.abs().max().item())
    assert torch.equal(fused.argmax(-1), eager.argmax(-1))


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int4-kv-fp16", "int4-kv-int8"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "llama-mha"])
def test_a_longer_context_takes_the_attention_s_key_blocks(family, kind, checkpoints):
    # 46 cached keys: eleven blocks of four (decode_step.cpp: scores) and a tail of two that
    # the one-key loop takes, five blocks of eight and a tail of six (exp_shifted); fp32,
    # bf16 or fp16 ones
    source = open_weights(checkpoints[family])
    quant, dtype, kv_dtype = KINDS[kind]
    stage = load_stage(source, 0, source.config.n_layers, quant=quant, dtype=dtype, kv_dtype=kv_dtype)
    stage.allocate(1, 64)
    prompt = [(7 * i + 3) % 100 for i in range(45)]
    stage(Batch((0,), (0,), len(prompt)), torch.tensor([prompt]))
    (eager, _), (fused, _) = step_both_ways(stage, Batch((0,), (len(prompt),), 1), [9])
    assert stage._decode_step is not None, "the fused step was not used"
    torch.testing.assert_close(fused, eager, rtol=0, atol=TOLERANCE[kind] * eager.abs().max().item())
    assert torch.equal(fused.argmax(-1), eager.argmax(-1))


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_a_tp_rank_runs_each_half_layer_and_sums_it_before_the_residual(kind, checkpoints):
    """With an all-reduce (here one that doubles what it sums, as two identical ranks
    would), the fused step runs a layer as two calls with the sum between them."""
    stage = prefilled(checkpoints["qwen3"], kind)
    summed = []

    def all_reduce(h):
        summed.append(h.shape)
        h.mul_(2)

    for block in stage.blocks:
        block.all_reduce = all_reduce
    batch = Batch((0, 2), (len(PROMPTS[0]), len(PROMPTS[2])), 1)
    (eager, _), (fused, _) = step_both_ways(stage, batch, [5, 6])
    tolerance = dict(rtol=1e-4, atol=1e-4) if kind == "fp32" else \
        dict(rtol=0, atol=TOLERANCE[kind] * eager.abs().max().item())
    torch.testing.assert_close(fused, eager, **tolerance)
    # two sums a layer on each way through; the head runs after the last sum, in Python
    assert len(summed) == 2 * 2 * len(stage.blocks)
    assert not stage._head_in_step


def test_a_position_beyond_the_cache_is_an_error_not_a_write_past_it(checkpoints):
    stage = prefilled(checkpoints["llama"], "fp32")
    stage(Batch((0,), (len(PROMPTS[0]),), 1), torch.tensor([[1]]))
    step = stage._decode_step
    x = torch.zeros(1, stage.config.hidden_size)
    with pytest.raises(RuntimeError, match="outside the cache"):
        step.forward(x, [0], [stage.max_len])
    with pytest.raises(RuntimeError, match="outside the cache"):
        step.forward(x, [len(PROMPTS)], [0])
    with pytest.raises(RuntimeError, match="a slot and a start per row"):
        step.forward(x, [0, 1], [0, 0])


def test_a_head_of_the_wrong_shape_is_refused_and_a_step_without_one_says_so(checkpoints):
    stage = prefilled(checkpoints["llama"], "fp32")
    stage(Batch((0,), (len(PROMPTS[0]),), 1), torch.tensor([[1]]))
    hidden = stage.config.hidden_size
    step = stage._decode_step
    head = kernels.linear_operand(torch.zeros(8, hidden))
    with pytest.raises(RuntimeError, match="the final norm"):
        step.set_head(torch.ones(hidden + 1), 1e-5, head)
    with pytest.raises(RuntimeError, match="the head's rows"):
        step.set_head(torch.ones(hidden), 1e-5, kernels.linear_operand(torch.zeros(8, hidden + 2)))
    bare = kernels.decode_step(hidden, stage.shard.n_q_heads, stage.shard.n_kv_heads, stage.config.head_dim,
                               stage.cos, stage.sin)
    with pytest.raises(RuntimeError, match="holds no head"):
        bare.forward_logits(torch.zeros(1, hidden), [0], [0])


def test_a_new_cache_gets_a_new_step(checkpoints):
    """``allocate`` replaces the caches the step writes into: the next decode step builds
    another, over the new ones."""
    stage = prefilled(checkpoints["llama"], "fp32")
    stage(Batch((0,), (len(PROMPTS[0]),), 1), torch.tensor([[1]]))
    old = stage._decode_step
    stage.allocate(1, 32)
    stage(Batch((0,), (0,), 2), torch.tensor([[1, 2]]))
    stage(Batch((0,), (2,), 1), torch.tensor([[3]]))
    assert stage._decode_step is not old and stage._decode_step is not None
    keys, _ = stage.blocks[0].attn.cache.read(slice(0, 1), 3)
    assert keys[0, :, 2].abs().sum() > 0  # the new cache took the token
