"""Tiny random checkpoints, made in a test's temporary directory in well under a second.

``make_tiny_llama`` (and ``make_tiny_qwen2``, ``make_tiny_qwen3``, ``make_tiny_mistral``,
``make_tiny_mixtral``, ``make_tiny_qwen3_moe``)
writes a Hugging Face directory the way ``save_pretrained`` does; ``make_tiny_gguf``
converts one to GGUF the way llama.cpp's ``convert_hf_to_gguf.py`` does (q/k rows
permuted per head for the "llama" architecture only, linear weights quantized, no
``output.weight`` when tied, a layer's experts stacked in one tensor a projection).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from p2pserve.engine.config import SUPPORTED_ARCHITECTURES, llama3_rope_factors
from p2pserve.engine.weights import moe_expert, open_weights
from p2pserve.testing.checkpoints import save_random


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
    return save_random(LlamaForCausalLM, config, dirpath, seed=seed, dtype=dtype, shards=shards)


def scale_layers(path: Path, factor: float) -> Path:
    """The decoder layers' linear weights of checkpoint ``path`` times ``factor``, in place.
    tiny random weights make every layer amplify what enters it, a rounding error too;
    scaled down, a layer's gain is nearer a trained model's, and a rounding stays small."""
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    for name in state:
        if ".layers." in name and "norm" not in name:
            state[name] = state[name] * factor
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def make_tiny_qwen2(dirpath, *, n_layers=4, hidden=64, n_heads=4, n_kv_heads=2, intermediate=128,
                    vocab=256, tie=True, seed=0) -> Path:
    """A random ``Qwen2ForCausalLM`` (biases on q/k/v), tied like the small Qwen2.5 models."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tie, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2,
    )
    return save_random(Qwen2ForCausalLM, config, dirpath, seed=seed)


def make_tiny_qwen3(dirpath, *, n_layers=4, hidden=64, n_heads=4, n_kv_heads=2, head_dim=32,
                    intermediate=128, vocab=256, tie=True, seed=0) -> Path:
    """A random ``Qwen3ForCausalLM`` (q/k norms), its heads wider than ``hidden / n_heads``
    as in Qwen3 itself."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tie,
        use_sliding_window=False, bos_token_id=1, eos_token_id=2,
    )
    return save_random(Qwen3ForCausalLM, config, dirpath, seed=seed)


def make_tiny_mistral(dirpath, *, n_layers=4, hidden=64, n_heads=4, n_kv_heads=2, intermediate=128,
                      vocab=256, sliding_window=128, seed=0) -> Path:
    """A random ``MistralForCausalLM`` with a sliding window shorter than its context."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=256,
        sliding_window=sliding_window, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    return save_random(MistralForCausalLM, config, dirpath, seed=seed)


def make_tiny_mixtral(dirpath, *, n_layers=4, hidden=64, n_heads=4, n_kv_heads=2, intermediate=64,
                      vocab=256, experts=4, used=2, seed=0) -> Path:
    """A random ``MixtralForCausalLM``: ``experts`` MLPs a layer, ``used`` of them a token."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=256,
        num_local_experts=experts, num_experts_per_tok=used, rms_norm_eps=1e-5, rope_theta=1000000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    return save_random(MixtralForCausalLM, config, dirpath, seed=seed)


def make_tiny_qwen3_moe(dirpath, *, n_layers=4, hidden=64, n_heads=4, n_kv_heads=2, head_dim=32,
                        intermediate=96, expert_size=64, vocab=256, experts=4, used=2, norm_topk=True,
                        seed=0) -> Path:
    """A random ``Qwen3MoeForCausalLM``: every layer a mixture of ``experts`` MLPs of
    ``expert_size`` (``intermediate``, the dense MLP's, unused), ``used`` a token, their
    weights renormalised where ``norm_topk`` (as Qwen3-30B-A3B's config says)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, moe_intermediate_size=expert_size,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        num_experts=experts, num_experts_per_tok=used, norm_topk_prob=norm_topk, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2,
    )
    return save_random(Qwen3MoeForCausalLM, config, dirpath, seed=seed)


def make_tiny_gguf(path, hf_dir, *, qtype="F32", arch=None, metadata=None, tensors=None) -> Path:
    """Convert the tiny checkpoint in ``hf_dir`` to a GGUF file at ``path``.

    ``arch`` is the GGUF architecture; by default the one llama.cpp gives the checkpoint's.

    ``qtype`` is the ggml type of every linear weight and the embedding (norms stay F32);
    gguf-py quantizes all but Q4_K, which ``quantize_q4_k`` does.
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
    arch = arch or SUPPORTED_ARCHITECTURES[hf["architectures"][0]]
    head_keys = {} if head_dim * n_heads == hf["hidden_size"] else {
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
    }

    config = open_weights(hf_dir).config
    experts = config.n_experts
    if experts:
        metadata = {f"{arch}.expert_count": experts, f"{arch}.expert_used_count": hf["num_experts_per_tok"],
                    **({f"{arch}.expert_feed_forward_length": hf["moe_intermediate_size"]}
                       if "moe_intermediate_size" in hf else {}),
                    **(metadata or {})}

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {
        f"{arch}.block_count": hf["num_hidden_layers"],
        f"{arch}.context_length": hf["max_position_embeddings"],
        f"{arch}.embedding_length": hf["hidden_size"],
        f"{arch}.feed_forward_length": hf["intermediate_size"],
        f"{arch}.attention.head_count": n_heads,
        f"{arch}.attention.head_count_kv": n_kv,
        f"{arch}.rope.freq_base": float(rope.get("rope_theta", 10000.0)),
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": hf["rms_norm_eps"],
        f"{arch}.vocab_size": hf["vocab_size"],
        **head_keys,
        "tokenizer.ggml.bos_token_id": hf["bos_token_id"],
        "tokenizer.ggml.eos_token_id": hf["eos_token_id"],
        **(metadata or {}),
    }.items():
        _add_value(writer, key, value)

    if experts:
        for i in range(config.n_layers):  # [experts, out, in], as llama.cpp stacks them
            stacks = zip(*(moe_expert(config, i, e) for e in range(experts)))  # gate's names, up's, down's
            for part, names in zip(("gate", "up", "down"), stacks):
                state[f"blk.{i}.ffn_{part}_exps.weight"] = torch.stack([state.pop(n) for n in names])

    out = {}
    for name, tensor in state.items():
        gguf_name = name if name.startswith("blk.") else _gguf_name(name)
        if gguf_name is None:
            continue
        w = tensor.float().numpy()
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _permute(w, n_heads)
        elif arch == "llama" and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _permute(w, n_kv)
        if w.ndim == 1 or gguf_name.endswith("ffn_gate_inp.weight"):  # llama.cpp keeps routers F32
            out[gguf_name] = (w, "F32")
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            rows = w.reshape(-1, w.shape[-1])  # a stack of experts' as one matrix
            q = quantize_q4_k(rows) if qtype == "Q4_K" else gguf.quants.quantize(rows, qt)
            out[gguf_name] = (q.reshape(*w.shape[:-1], q.shape[-1]), qtype)
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


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """``w`` [rows, cols] (cols a multiple of 256) as Q4_K bytes [rows, cols / 256 * 144],
    laid out as llama.cpp's ``quantize_row_q4_K`` lays them out (gguf-py can only
    dequantize Q4_K). Each block of 32 spans its own min (at most 0) to max over 16 levels,
    its scale and minimum in 6 bits of the super-block's largest: valid blocks, not
    llama.cpp's search for the best ones."""
    rows, cols = w.shape
    g = w.astype(np.float32).reshape(rows, cols // 256, 8, 32)
    lo, hi = np.minimum(g.min(-1), 0), g.max(-1)
    scale, neg_min = (hi - lo) / 15, -lo  # value = q * scale - neg_min

    def six_bits(x):  # per super-block an fp16 unit, per block a multiple 0..63 of it
        unit = (x.max(-1) / 63).astype(np.float16)
        n = np.clip(np.round(x / np.maximum(unit.astype(np.float32), 1e-30)[..., None]), 0, 63).astype(np.uint8)
        return unit, n, unit.astype(np.float32)[..., None] * n

    d, sc, step = six_bits(scale)
    dmin, m, low = six_bits(neg_min)
    q = np.clip(np.round((g + low[..., None]) / np.maximum(step, 1e-30)[..., None]), 0, 15).astype(np.uint8)
    packed = np.empty((rows, cols // 256, 12), dtype=np.uint8)  # the inverse of gguf's Q4_K.get_scale_min
    packed[..., 0:4] = sc[..., :4] | (sc[..., 4:] >> 4) << 6
    packed[..., 4:8] = m[..., :4] | (m[..., 4:] >> 4) << 6
    packed[..., 8:12] = (sc[..., 4:] & 0xF) | (m[..., 4:] & 0xF) << 4
    pairs = q.reshape(rows, cols // 256, 4, 2, 32)  # block 2k's value j low in byte j of pair k, 2k + 1's high
    quants = (pairs[..., 0, :] | pairs[..., 1, :] << 4).reshape(rows, cols // 256, 128)
    head = np.stack([d, dmin], axis=-1).view(np.uint8)
    return np.concatenate([head, packed, quants], axis=-1).reshape(rows, -1)


def _gguf_name(hf_name: str) -> str | None:
    from p2pserve.engine.weights import LAYER_TENSORS, MODEL_TENSORS

    if hf_name in MODEL_TENSORS:
        return MODEL_TENSORS[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.{weight or bias}
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{LAYER_TENSORS['.'.join(parts[3:-1])]}.{parts[-1]}"
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
