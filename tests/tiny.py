"""Tiny random checkpoints, made in a test's temporary directory in well under a second.

``make_tiny_llama`` writes a Hugging Face directory the way ``save_pretrained`` does;
``make_tiny_gguf`` converts one to GGUF the way llama.cpp's ``convert_hf_to_gguf.py`` does
(q/k rows permuted per head, linear weights quantized, no ``output.weight`` when tied).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from p2pserve.engine.config import llama3_rope_factors


def make_tiny_llama(
    dirpath,
    *,
    n_layers=4,
    hidden=64,
    n_heads=4,
    n_kv_heads=2,
    intermediate=128,
    vocab=256,
    tie=False,
    rope_scaling=None,
    seed=0,
    dtype=torch.float32,
    shards=1,
) -> Path:
    """A random ``LlamaForCausalLM`` saved as safetensors (sharded with an index when ``shards > 1``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dirpath = Path(dirpath)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,  # transformers writes into it
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Far from the default init (std 0.02), so logits are spread and greedy decoding varies.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    model = model.to(dtype)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(dirpath, max_shard_size=total // shards + 1 if shards > 1 else "50GB")
    return dirpath


def make_tiny_gguf(path, hf_dir, *, qtype="F32", arch="llama", metadata=None, tensors=None) -> Path:
    """Convert the tiny checkpoint in ``hf_dir`` to a GGUF file at ``path``.

    ``qtype`` is the ggml type of every linear weight and the embedding (norms stay F32).
    ``metadata`` adds or overrides key/values; ``tensors`` maps GGUF names to raw
    ``(ndarray, ggml type name)`` to write instead of (or besides) the converted ones.
    """
    import gguf
    from safetensors.torch import load_file

    path, hf_dir = Path(path), Path(hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    state = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(file))
    n_heads, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    rope = dict(hf.get("rope_parameters") or {})

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {
        "llama.block_count": hf["num_hidden_layers"],
        "llama.context_length": hf["max_position_embeddings"],
        "llama.embedding_length": hf["hidden_size"],
        "llama.feed_forward_length": hf["intermediate_size"],
        "llama.attention.head_count": n_heads,
        "llama.attention.head_count_kv": n_kv,
        "llama.rope.freq_base": float(rope.get("rope_theta", 10000.0)),
        "llama.rope.dimension_count": head_dim,
        "llama.attention.layer_norm_rms_epsilon": hf["rms_norm_eps"],
        "llama.vocab_size": hf["vocab_size"],
        "tokenizer.ggml.bos_token_id": hf["bos_token_id"],
        "tokenizer.ggml.eos_token_id": hf["eos_token_id"],
        **(metadata or {}),
    }.items():
        _add_value(writer, key, value)

    out = {}
    for name, tensor in state.items():
        gguf_name = _gguf_name(name)
        if gguf_name is None:
            continue
        w = tensor.float().numpy()
        if gguf_name.endswith("attn_q.weight"):
            w = _permute(w, n_heads)
        elif gguf_name.endswith("attn_k.weight"):
            w = _permute(w, n_kv)
        if w.ndim == 1:
            out[gguf_name] = (w, "F32")
        else:
            out[gguf_name] = (gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype]), qtype)
    if hf.get("tie_word_embeddings"):
        out.pop("output.weight", None)
    if rope.get("rope_type") == "llama3":
        factors = np.array(llama3_rope_factors(rope, head_dim, rope["rope_theta"]), dtype=np.float32)
        out["rope_freqs.weight"] = (factors, "F32")
    out.update(tensors or {})

    for gguf_name, (data, type_name) in out.items():
        qt = gguf.GGMLQuantizationType[type_name]
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_name(hf_name: str) -> str | None:
    from p2pserve.engine.weights import LAYER_TENSORS, MODEL_TENSORS

    if hf_name in MODEL_TENSORS:
        return MODEL_TENSORS[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.weight
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{LAYER_TENSORS['.'.join(parts[3:-1])]}.weight"
    return None


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` in convert_hf_to_gguf.py: HF rotate-half rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_value(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))
