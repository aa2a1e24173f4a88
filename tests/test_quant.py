"""Weight-only int8 and int4 stages compute what the fp32 engine computes on their
dequantized weights, on every plan, and a quantized stage reads only its own layers.

The reference of a quantized run is a checkpoint whose linear weights are replaced by
``quant.roundtrip`` of exactly the slices each rank packs (TP changes what a rank's
per-row scales and column groups cover), and its LM head by its int8 roundtrip (an int4
stage keeps the head at 8 bits), run at fp32. What is left between the two is
the kernels' bfloat16 activations: hence a logit tolerance, and top-1 agreement rather
than identity. Top-1 is counted where the reference's best logit leads the next by more
than twice the tolerance: below that, logits within tolerance may rank either way.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from p2pserve.engine import kernels, quant
from p2pserve.engine.build import load_stage
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.tp import shard_for
from p2pserve.engine.weights import GGUFWeights, default_model_path, open_weights
from p2pserve.plan import Plan
from p2pserve.ranks.pipeline import LocalPipeline

from .tiny import make_tiny_llama, scale_layers

PLANS = [([1], [4]), ([1, 1], [2, 2]), ([2, 1], [3, 1])]
# |logit - reference logit| at every position: activations enter the kernels as bfloat16
LOGIT_TOLERANCE = 0.1
MIN_TOP1 = 0.99
PROMPT = [(i * 37) % 250 + 3 for i in range(96)]
LAYER_SCALE = 0.35  # tiny.scale_layers: a bfloat16 rounding stays small


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return scale_layers(make_tiny_llama(tmp_path_factory.mktemp("llama"), tie=True), LAYER_SCALE)


def dequantized_reference(src, dst, plan: Plan, fmt: str):
    """``src`` with each rank's linear weights replaced by what that rank computes with."""
    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    config = open_weights(src).config
    hd = config.head_dim

    def rows(heads):
        return slice(heads[0] * hd, heads[1] * hd)

    def roundtrip(parts):  # parts: (name, row slice, col slice) fused side by side, as load_stage does
        fused = quant.roundtrip(torch.cat([state[n][r, c] for n, r, c in parts]), fmt)
        for (name, r, c), piece in zip(parts, fused.split([state[n][r, c].shape[0] for n, r, c in parts])):
            state[name] = state[name].clone()
            state[name][r, c] = piece

    every = slice(None)
    for stage in plan.stages:
        for i in range(stage.start, stage.end):
            p = f"model.layers.{i}."
            for rank in range(stage.tp):
                shard = shard_for(config, rank, stage.tp)
                ffn = slice(*shard.ffn)
                roundtrip([(p + "self_attn.q_proj.weight", rows(shard.q_heads), every),
                           (p + "self_attn.k_proj.weight", rows(shard.kv_heads), every),
                           (p + "self_attn.v_proj.weight", rows(shard.kv_heads), every)])
                roundtrip([(p + "self_attn.o_proj.weight", every, rows(shard.q_heads))])
                roundtrip([(p + "mlp.gate_proj.weight", ffn, every), (p + "mlp.up_proj.weight", ffn, every)])
                roundtrip([(p + "mlp.down_proj.weight", every, ffn)])
    # the head is quantized, at int8 under int4 too, the embedding is not: the reference unties them
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    state["lm_head.weight"] = quant.roundtrip(head, "int8")
    save_file({k: v.contiguous() for k, v in state.items()}, dst / "model.safetensors")
    hf = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": False}))
    return dst


def greedy_against_fp32(path, plan: Plan, dtype: str):
    """Greedy tokens and prompt logits of ``dtype`` and of the fp32 engine on the same file
    and plan: ``(tokens, fp32 tokens, max |logit difference|)``."""
    got = {}
    for d in (dtype, "fp32"):
        with LocalPipeline(path, plan, dtype=d) as pipe:
            gen = pipe.generate(PROMPT[:12], SamplingParams(max_new_tokens=24), stop_on_eos=False,
                                capture_logits=True)
            got[d] = gen.tokens, gen.prompt_logits
    return got[dtype][0], got["fp32"][0], (got[dtype][1] - got["fp32"][1]).abs().max()


def teacher_forced_logits(path, plan: Plan, dtype: str) -> torch.Tensor:
    """The logits after each prefix of PROMPT: [len(PROMPT), vocab]."""
    with LocalPipeline(path, plan, dtype=dtype) as pipe:
        return torch.stack([pipe.generate(PROMPT[:n], SamplingParams(max_new_tokens=1), stop_on_eos=False,
                                          capture_logits=True).prompt_logits for n in range(1, len(PROMPT) + 1)])


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantized_stages_agree_with_their_dequantized_weights_on_every_plan(fmt, tiny, tmp_path):
    for hetero, partition in PLANS:
        plan = Plan(hetero, partition)
        reference = dequantized_reference(tiny, tmp_path / f"{fmt}-{plan.flags()}".replace(" ", ""), plan, fmt)
        got = teacher_forced_logits(tiny, plan, fmt)
        want = teacher_forced_logits(reference, plan, "fp32")
        best = want.topk(2, dim=-1).values
        decisive = best[:, 0] - best[:, 1] > 2 * LOGIT_TOLERANCE
        same = got.argmax(-1) == want.argmax(-1)
        top1 = same[decisive].float().mean().item()
        assert decisive.float().mean() > 0.8  # the measure covers most positions
        assert top1 >= MIN_TOP1, f"{fmt} {plan.flags()}: top-1 {top1:.3f} ({same.float().mean():.3f} at all positions)"
        assert (got - want).abs().max() < LOGIT_TOLERANCE, f"{fmt} {plan.flags()}"
    # and the reference is not the float model: int4 moves the logits well past the tolerance
    if fmt == "int4":
        assert (teacher_forced_logits(tiny, plan, "fp32") - want).abs().max() > 5 * LOGIT_TOLERANCE


def test_a_quantized_greedy_answer_is_the_same_on_every_plan(tiny):
    answers = []
    for hetero, partition in PLANS[:2]:  # one-rank stages: the same slices, so the same weights
        with LocalPipeline(tiny, Plan(hetero, partition), dtype="int4") as pipe:
            answers.append(pipe.generate(PROMPT[:8], SamplingParams(max_new_tokens=16), stop_on_eos=False).tokens)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_a_quantized_stage_holds_integers_and_keeps_its_activations_fp32(fmt, tiny):
    stage = load_stage(open_weights(tiny), 2, 4, quant=fmt)
    weights = [stage.head] + [w for b in stage.blocks for w in (b.attn.wqkv, b.attn.wo, b.mlp.w13, b.mlp.w2)]
    assert all(quant.is_quantized(w) for w in weights)
    assert stage.dtype == torch.float32
    fp32_bytes = sum(w.shape.numel() * 4 for w in weights)
    packed_bytes = sum(t.nbytes for w in weights for t in w.buffers())
    assert packed_bytes < fp32_bytes / (3 if fmt == "int8" else 5)


def test_int4_falls_back_to_int8_where_torch_cannot_pack_the_shape():
    assert isinstance(quant.pack(torch.randn(32, 96), "int4"), quant.Int4Weight)
    assert isinstance(quant.pack(torch.randn(24, 96), "int4"), quant.Int8Weight)  # rows: not a multiple of 16
    assert isinstance(quant.pack(torch.randn(32, 40), "int4"), quant.Int8Weight)  # columns: no group divides 40


def _int8_case(group):
    q, scales = quant.quantize_int8(torch.randn(48, 192)) if group is None else \
        quant.quantize_int8_groups(torch.randn(48, 192), group)
    return quant.Int8Weight(q, scales, group), quant.dequantize_int8(q, scales), "gemv_int8"


def _int4_case(group):
    q, scales, mins = quant.quantize_int4(torch.randn(48, 192), group)
    w = quant.Int4Weight(q, scales, mins, group)
    assert w.for_kernel
    return w, quant.dequantize_int4(q, scales, mins), "gemv_int4"


@pytest.mark.parametrize("case, group", [(_int8_case, None), (_int8_case, 32), (_int4_case, 64)],
                         ids=["int8-rows", "int8-groups", "int4"])
def test_a_prefill_chunk_multiplies_the_dequantized_weight_by_a_gemm(case, group, monkeypatch):
    """From ``kernels.GEMM_ROWS`` rows of X on (a prefill chunk), an int8 or int4 weight is
    dequantized (exactly: q * scale (+ min), the file's scales) and multiplied by oneDNN's
    GEMM in fp32; below, by ``gemv_int8`` / ``gemv_int4``."""
    if not kernels.available():
        pytest.skip(kernels.why_not())
    w, exact, kernel = case(group)
    assert torch.equal(w.dequantize(), exact)
    gemv = getattr(kernels, kernel)
    for rows in (1, kernels.GEMM_ROWS - 1, kernels.GEMM_ROWS, 3 * kernels.GEMM_ROWS + 5):
        x = torch.randn(1, rows, 192)
        want = (x.double() @ exact.double().T).float()
        gemm = rows >= kernels.GEMM_ROWS
        monkeypatch.setattr(kernels, kernel, _refused if gemm else gemv)
        got = w(x)
        assert got.shape == (1, rows, 48)
        # fp32 sums for the GEMM; the kernel's X rounded to 16 bits on AVX2 / AVX-512
        assert (got - want).abs().max() <= (1e-5 if gemm else 3e-4) * want.abs().max(), rows


def test_dequantize_int8_refuses_what_is_not_an_int8_weight_and_its_scales():
    if not kernels.available():
        pytest.skip(kernels.why_not())
    q, scales = quant.quantize_int8_groups(torch.randn(8, 64), 32)
    scales = scales.reshape(8, -1).float().contiguous()
    with pytest.raises(RuntimeError, match="int8"):
        kernels.dequantize_int8(q.float(), scales)
    with pytest.raises(RuntimeError, match="scales"):
        kernels.dequantize_int8(q, scales[:, :1].repeat(1, 3).contiguous())  # 3 groups do not divide 64


def _refused(*args):
    raise AssertionError("a prefill chunk went to the GEMV kernel")


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_a_packed_weight_multiplies_as_its_roundtrip(fmt):
    w, x = torch.randn(64, 256), torch.randn(3, 256)
    got = quant.pack(w, fmt)(x)
    want = x.bfloat16().float() @ quant.roundtrip(w, fmt).T
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_a_quantized_stage_never_materialises_another_stages_tensors(monkeypatch):
    import p2pserve.engine.weights as weights_module

    source = GGUFWeights(default_model_path())
    config = source.config
    own = {t.name for t in source._tensors.values() if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= 15}
    own |= {"output_norm.weight", "token_embd.weight"}  # the tied head is stored as the embedding
    cut = []  # every tensor whose bytes are sliced out of the map, float or 4-bit reads alike
    real_slice = weights_module._stored_slice

    def spy_slice(tensor, rows, cols):
        cut.append(tensor.name)
        return real_slice(tensor, rows, cols)

    monkeypatch.setattr(weights_module, "_stored_slice", spy_slice)
    stage = load_stage(source, 15, config.n_layers, quant="int4")
    assert cut and set(cut) <= own
    assert all(n.startswith(("model.layers.", "model.norm", "lm_head")) for n in source.reads)
    assert {int(n.split(".")[2]) for n in source.reads if n.startswith("model.layers.")} == set(range(15, 30))
    assert quant.is_quantized(stage.head) and stage.embed is None


def test_gguf_4_bit_blocks_are_packed_as_stored_not_requantized():
    source = open_weights(None)  # SmolLM2's Q4_1 file
    stage = load_stage(source, 0, 1, quant="int4")
    wqkv = stage.blocks[0].attn.wqkv
    assert isinstance(wqkv, quant.Int4Weight) and wqkv.group == 32  # Q4_1's blocks, not a group of our own
    p = "model.layers.0.self_attn."
    stored = torch.cat([source.get(p + f"{m}_proj.weight") for m in "qkv"])
    x = torch.randn(2, stored.shape[1])
    if wqkv.for_kernel:  # the file's numbers exactly: what differs is the order of the sums,
        # and on AVX2 the activations' rounding to 16 bits (tests/test_kernels.py: X_IN_INT16)
        assert torch.equal(wqkv.dequantize(), stored)
        want = x @ stored.T
        assert (wqkv(x) - want).abs().max() < 3e-4 * want.abs().max()
    else:  # torch's kernels: bf16 activations, scales and offsets
        want = x.bfloat16().float() @ stored.T
        assert (wqkv(x) - want).abs().max() < 0.02 * want.abs().max()


def test_an_int4_stage_keeps_the_lm_head_at_8_bits_the_files_q8_0_blocks_as_stored(tiny):
    """The head's rounding reaches every logit undiluted, so int4 never rounds it to 4 bits:
    SmolLM2's Q4_1 file keeps its tied embedding in Q8_0, and an int4 last stage multiplies
    by those blocks as stored (while its layers are the file's Q4_1); a float head (a
    Hugging Face checkpoint) becomes int8 with a scale per row."""
    source = open_weights(None)
    stage = load_stage(source, source.config.n_layers - 1, source.config.n_layers, quant="int4")
    assert isinstance(stage.blocks[0].mlp.w13, quant.Int4Weight)
    head = stage.head
    assert isinstance(head, quant.Int8Weight) and head.group == 32
    q, scales = source.get_stored("lm_head.weight", "int8")
    stored = kernels.pack_int8(q, scales.shape[1]) if head.for_kernel else q  # its values as the file has them
    assert torch.equal(head.q, stored) and torch.equal(head.scales, scales)
    assert torch.equal(head.dequantize(), source.get("lm_head.weight"))  # what the fp32 engine multiplies by

    hf = open_weights(tiny)
    head = load_stage(hf, 3, 4, quant="int4").head
    assert isinstance(head, quant.Int8Weight) and not head.grouped
    assert torch.equal(head.dequantize(), quant.roundtrip(hf.get("lm_head.weight"), "int8"))


def test_an_int4_stage_of_4_bit_layers_and_a_q8_0_head_answers_as_the_file_on_every_plan(tiny, tmp_path):
    """A GGUF laid out as the default file (Q4_1 layers, a tied Q8_0 embedding): int4 serves
    both as stored, so its greedy answer is the fp32 engine's on the same file token for
    token, whichever stage holds the head: one stage, the last of two, a TP-2 last stage."""
    import gguf
    from safetensors.torch import load_file

    from .tiny import make_tiny_gguf

    embedding = load_file(tiny / "model.safetensors")["model.embed_tokens.weight"].numpy()
    q8_0 = {"token_embd.weight": (gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0), "Q8_0")}
    path = make_tiny_gguf(tmp_path / "tiny.Q4_1.gguf", tiny, qtype="Q4_1", tensors=q8_0)
    stage = load_stage(open_weights(path), 0, 4, quant="int4")
    assert isinstance(stage.head, quant.Int8Weight) and stage.head.group == 32
    assert isinstance(stage.blocks[0].mlp.w13, quant.Int4Weight)
    exact = stage.blocks[0].mlp.w13.for_kernel  # else torch's int4 kernels: bf16 activations
    for hetero, partition in [([1], [4]), ([2, 1], [3, 1]), ([1, 2], [2, 2])]:
        plan = Plan(hetero, partition)
        tokens, want, logit_diff = greedy_against_fp32(path, plan, "int4")
        assert tokens == want, plan.flags()
        # fp32 sums in another order (and on AVX2 activations rounded to 16 bits); or bf16 activations
        tolerance = 1e-2 if exact else LOGIT_TOLERANCE
        assert logit_diff < tolerance, plan.flags()


@pytest.mark.parametrize("qtype,fmt", [("Q8_0", "int8"), ("Q4_0", "int4"), ("Q4_1", "int4")])
def test_a_gguf_native_stage_answers_as_its_dequantized_weights(qtype, fmt, tiny, tmp_path):
    """A GGUF's Q8_0 blocks served as int8 and its Q4_0 / Q4_1 blocks as int4, as stored:
    the quantized stage's greedy answer is the fp32 engine's on the same file (which
    dequantizes every block), token for token, on a one-stage and a TP plan."""
    from .tiny import make_tiny_gguf

    path = make_tiny_gguf(tmp_path / f"tiny.{qtype}.gguf", tiny, qtype=qtype)
    stage = load_stage(open_weights(path), 0, 4, quant=fmt)
    for w in [stage.head] + [w for b in stage.blocks for w in (b.attn.wqkv, b.attn.wo, b.mlp.w13, b.mlp.w2)]:
        if fmt == "int8":  # a scale per 32-value block, as stored, not one per row of our own
            assert isinstance(w, quant.Int8Weight) and w.group == 32 and w.scales.shape[1] == w.shape[1] // 32
        else:
            assert isinstance(w, quant.Int4Weight) and w.group == 32
    for hetero, partition in [([1], [4]), ([2, 1], [3, 1])]:
        plan = Plan(hetero, partition)
        tokens, want, logit_diff = greedy_against_fp32(path, plan, fmt)
        assert tokens == want, plan.flags()
        exact = stage.head.for_kernel if fmt == "int4" else True
        # fp32 sums in another order (and on AVX2 activations rounded to 16 bits); or bf16 activations
        tolerance = 1e-2 if exact else LOGIT_TOLERANCE
        assert logit_diff < tolerance, plan.flags()


def test_run_int4_answers_the_capital_of_france():
    from click.testing import CliRunner

    from p2pserve.cli.run import run

    result = CliRunner().invoke(run, ["--dtype", "int4", "--max-new-tokens", "12", "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_the_planner_counts_at_least_the_bytes_a_quantized_model_holds(fmt):
    from p2pserve.planner.cost import DTYPES, weights_bytes

    source = open_weights(None)
    stage = load_stage(source, 0, source.config.n_layers, quant=fmt)
    held = sum(t.nbytes for t in [*stage.parameters(), *stage.buffers()])
    counted = weights_bytes(source.config, DTYPES[fmt])
    assert held <= counted < 1.25 * held


# --- GGUF Q4_K (the Q4_K_M / Q4_K_S files most users have) ----------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny model whose linear weights' rows are whole Q4_K super-blocks (256 values)."""
    path = make_tiny_llama(tmp_path_factory.mktemp("wide"), hidden=256, intermediate=512, tie=True)
    state = load_file(path / "model.safetensors")
    for name in state:
        if ".layers." in name and "norm" not in name:
            state[name] = state[name] * 0.5  # as LAYER_SCALE does: smaller, and greedy answers still vary
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def q4_k_m_like(path, hf_dir):
    """``hf_dir`` as Q4_K, with attn_v and ffn_down in Q6_K as a Q4_K_M file has some of them."""
    import gguf

    from .tiny import make_tiny_gguf

    config = open_weights(hf_dir).config
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(config.n_layers):
        for name, rows, cols in [(f"blk.{i}.attn_v.weight", config.n_kv_heads * config.head_dim, config.hidden_size),
                                 (f"blk.{i}.ffn_down.weight", config.hidden_size, config.intermediate_size)]:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K]
            raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
            raw[..., -2:] = np.array([2e-4], dtype=np.float16).view(np.uint8)  # d last: small, finite weights
            tensors[name] = (raw.reshape(rows, -1), "Q6_K")
    return make_tiny_gguf(path, hf_dir, qtype="Q4_K", tensors=tensors)


def test_gguf_q4_k_blocks_are_packed_as_stored_and_multiply_as_gguf_dequantizes_them(wide, tmp_path):
    """A Q4_K weight, whole or a rank's slice of rows or of columns on a 32-value boundary
    (inside a super-block too), is its file's blocks: the weight it multiplies by is gguf's
    dequantization bit for bit (``d * sc`` needs fp32 scales for that: fp16 would round it),
    so its products differ from the reference's only by the order of fp32 sums (and on
    AVX2 by the activations' rounding to 16 bits). A slice
    that cuts a 32-value block is not stored: the stage quantizes it itself."""
    from .tiny import make_tiny_gguf

    source = open_weights(make_tiny_gguf(tmp_path / "wide.Q4_K.gguf", wide, qtype="Q4_K"))
    slices = [{}, {"rows": (64, 192)}, {"cols": (0, 128)}, {"cols": (128, 256)}, {"cols": (96, 224)}]
    for name in ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]:
        for cut in slices:
            stored = source.get_stored(name, "int4", **cut)
            reference = source.get(name, **cut)  # gguf.quants.dequantize of the same bytes
            assert stored is not None and stored[0].shape == reference.shape, (name, cut)
            w = quant.pack_parts([stored], "int4")
            assert isinstance(w, quant.Int4Weight) and w.group == 32
            x = torch.randn(3, reference.shape[1])
            if w.for_kernel:
                assert w.scales.dtype == torch.float32
                assert torch.equal(w.dequantize(), reference), (name, cut)
                # the order of fp32 sums, and on AVX2 the activations' rounding to 16 bits
                assert ((w(x) - x @ reference.T).abs().max() / (x @ reference.T).abs().max()) < 3e-4
            else:  # torch's kernels: bf16 activations, scales and offsets
                want = x.bfloat16().float() @ reference.T
                assert (w(x) - want).abs().max() < 0.02 * want.abs().max()
    assert source.get_stored("model.layers.0.mlp.down_proj.weight", "int4", cols=(16, 256)) is None


def test_a_gguf_q4_k_stage_answers_as_its_dequantized_weights_on_one_rank_and_tp(wide, tmp_path):
    """Greedy answers of an int4 stage on a Q4_K file equal the fp32 engine's on the same file
    (which dequantizes every block) token for token: one stage, a TP-2 stage, and TP 2 then
    1 (TP 2 cuts o_proj's 256 columns at 128, inside a super-block)."""
    from .tiny import make_tiny_gguf

    path = make_tiny_gguf(tmp_path / "wide.Q4_K.gguf", wide, qtype="Q4_K")
    stage = load_stage(open_weights(path), 0, 4, quant="int4")
    for w in [stage.head] + [w for b in stage.blocks for w in (b.attn.wqkv, b.attn.wo, b.mlp.w13, b.mlp.w2)]:
        assert isinstance(w, quant.Int4Weight) and w.group == 32
    if not stage.head.for_kernel:  # torch's int4 kernels round activations, scales and minima to bf16
        pytest.skip(f"token identity is the CPU kernels' claim, and they are not built: {kernels.why_not()}")
    for hetero, partition in [([1], [4]), ([2], [4]), ([2, 1], [3, 1])]:
        plan = Plan(hetero, partition)
        tokens, want, logit_diff = greedy_against_fp32(path, plan, "int4")
        assert tokens == want, plan.flags()
        # fp32 sums in another order, and on AVX2 the activations rounded to 16 bits
        assert logit_diff < 1e-2, plan.flags()
        assert len(set(tokens)) > 4  # an answer, not one token repeated


def test_a_q4_k_m_files_q6_k_tensors_are_quantized_by_the_stage_beside_its_stored_q4_k(wide, tmp_path):
    """Q6_K has no int4 form: under --dtype int4 its rows are dequantized and quantized in
    the stage's own int4 (in 32-value groups beside stored Q4_K parts, so a fused q/k/v
    stays one weight), while the Q4_K parts keep the file's numbers."""
    source = open_weights(q4_k_m_like(tmp_path / "wide.Q4_K_M.gguf", wide))
    stage = load_stage(source, 0, 2, quant="int4")
    p = "model.layers.1."
    assert source.get_stored(p + "self_attn.v_proj.weight", "int4") is None
    q, k, v = (source.get(p + f"self_attn.{m}_proj.weight") for m in "qkv")
    wqkv = stage.blocks[1].attn.wqkv
    assert isinstance(wqkv, quant.Int4Weight) and wqkv.group == 32
    if wqkv.for_kernel:
        v_int4 = quant.dequantize_int4(*quant.quantize_int4(v, 32))
        assert torch.equal(wqkv.dequantize(), torch.cat([q, k, v_int4]))
        down = source.get(p + "mlp.down_proj.weight")
        assert torch.equal(stage.blocks[1].mlp.w2.dequantize(), quant.roundtrip(down, "int4"))
    with LocalPipeline(source.path, Plan([1], [4]), dtype="int4") as pipe:
        assert len(pipe.generate(PROMPT[:8], SamplingParams(max_new_tokens=8), stop_on_eos=False).tokens) == 8
