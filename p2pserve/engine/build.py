"""Build one TP rank of one stage from a weight source, reading only its own slices."""

from __future__ import annotations

from typing import Callable

import torch

from p2pserve.engine import quant as quantized
from p2pserve.engine.config import ModelConfig
from p2pserve.engine.model import MLP, Attention, Block, MoE, RMSNorm, StageModel, pack_linear
from p2pserve.engine.tp import Shard, shard_for
from p2pserve.engine.weights import WeightSource, moe_expert, moe_router, tensor_shape

# the roles of a stage's tensors that are linear weights (quantized in an int8/int4 stage);
# expert e's are "gate.e", "up.e" and "down.e" (``is_linear``). A MoE router stays float:
# its rounding would move tokens to other experts.
LINEARS = frozenset({"q", "k", "v", "o", "gate", "up", "down", "head"})
# bytes per value of a quantized linear weight, its scales aside: what ``progress`` counts
QUANT_VALUE_BYTES = {"int8": 1.0, "int4": 0.5}


def is_linear(role: str) -> bool:
    return role.partition(".")[0] in LINEARS


def load_stage(source: WeightSource, start: int, end: int, *, rank: int = 0, tp: int = 1,
               all_reduce=None, device="cpu", dtype=torch.float32, quant: str | None = None,
               kv_dtype: torch.dtype | None = None,
               progress: Callable[[int, int], None] | None = None) -> StageModel:
    """Layers ``[start, end)`` for TP rank ``rank`` of ``tp``; embedding and head on rank 0 only.
    ``quant`` (int8, int4) quantizes every linear weight as it is read, the head at 8 bits
    (``quantized_head``); activations stay ``dtype``. ``kv_dtype``: the KV cache's
    (``StageModel.allocate``), the activations' where None.

    ``all_reduce(h)`` sums a partial result in place over the stage's TP ranks
    (``p2pserve.ranks`` makes it; None for TP 1).

    ``progress(done, total)`` is called once before the first read and after each tensor:
    the bytes of this rank's tensors loaded so far, of ``total`` it loads in all (float
    tensors at ``dtype``'s size, quantized weights at ``QUANT_VALUE_BYTES`` per value);
    ``done`` never decreases and its last value is ``total``."""
    config = source.config
    shard = shard_for(config, rank, tp)
    layers = [_layer_tensors(config, shard, i) for i in range(start, end)]
    ends = _end_tensors(config, start, end, leader=rank == 0, quant=quant)

    def size(role: str, name: str, rows, cols) -> int:
        per_value = QUANT_VALUE_BYTES[quant] if quant is not None and is_linear(role) else dtype.itemsize
        return round(_values(config, name, rows, cols) * per_value)

    total = sum(size(role, *t) for tensors in (*layers, ends) for role, t in tensors.items())
    done = 0
    if progress is not None:
        progress(done, total)

    def get(name, rows=None, cols=None):
        return source.get(name, rows=rows, cols=cols).to(device=device, dtype=dtype)

    def weight(name, rows=None, cols=None):
        """A linear weight; a quantized stage takes a file's own values where they are in its format."""
        stored = source.get_stored(name, quant, rows=rows, cols=cols) if quant is not None else None
        return get(name, rows, cols) if stored is None else tuple(t.to(device) for t in stored)

    def read(tensors: dict, role: str, load=None):
        """One of the stage's tensors (read by ``load(name, rows, cols)`` where given),
        counted for ``progress``."""
        nonlocal done
        t = (load or (weight if is_linear(role) else get))(*tensors[role])
        done += size(role, *tensors[role])
        if progress is not None:
            progress(done, total)
        return t

    def linear(*weights):
        """Linear weights, their outputs side by side, packed for ``model.linear``."""
        if quant is not None:
            return quantized.pack_parts(weights, quant)
        return pack_linear(torch.cat(weights))

    eps = config.rms_norm_eps
    blocks = []
    for t in layers:
        wqkv = linear(read(t, "q"), read(t, "k"), read(t, "v"))
        wo = linear(read(t, "o"))
        bqkv = q_norm = k_norm = None
        if config.qkv_bias:  # each rank's biases are the rows of its own q/k/v weights
            bqkv = torch.cat([read(t, "q_bias"), read(t, "k_bias"), read(t, "v_bias")])
        if config.qk_norm:  # over one head's dimensions, so every rank holds all of it
            q_norm, k_norm = RMSNorm(read(t, "q_norm"), eps), RMSNorm(read(t, "k_norm"), eps)
        if config.is_moe:  # every rank routes alike, each expert sliced as the dense MLP is
            router = pack_linear(read(t, "router"))
            mlp = MoE(router, [MLP(linear(read(t, f"gate.{e}"), read(t, f"up.{e}")), linear(read(t, f"down.{e}")))
                               for e in range(config.n_experts)], config.n_experts_used, config.norm_topk)
        else:
            mlp = MLP(linear(read(t, "gate"), read(t, "up")), linear(read(t, "down")))
        blocks.append(Block(
            Attention(config, shard, wqkv, wo, bqkv, q_norm, k_norm),
            mlp,
            RMSNorm(read(t, "input_norm"), eps),
            RMSNorm(read(t, "post_norm"), eps),
            all_reduce,
        ))
    embed = read(ends, "embed") if "embed" in ends else None
    norm = head = None
    if "norm" in ends:
        norm = RMSNorm(read(ends, "norm"), eps)
        if quant is not None:  # a quantized head of its own, the embedding staying float
            head = read(ends, "head", lambda *_: quantized_head(source, quant, device))
        else:  # tied and dense: the head is the embedding itself, no copy
            head = pack_linear(read(ends, "head") if "head" in ends else embed)
    return StageModel(config, start, end, shard, blocks, embed=embed, norm=norm, head=head, kv_dtype=kv_dtype).eval()


def _layer_tensors(config: ModelConfig, shard: Shard, i: int) -> dict[str, tuple]:
    """What rank ``shard`` reads of layer ``i``: {role: (name, rows, cols)}."""
    p, hd = f"model.layers.{i}.", config.head_dim
    q = (shard.q_heads[0] * hd, shard.q_heads[1] * hd)
    kv = (shard.kv_heads[0] * hd, shard.kv_heads[1] * hd)
    tensors = {
        "q": (p + "self_attn.q_proj.weight", q, None),
        "k": (p + "self_attn.k_proj.weight", kv, None),
        "v": (p + "self_attn.v_proj.weight", kv, None),
        "o": (p + "self_attn.o_proj.weight", None, q),
        "input_norm": (p + "input_layernorm.weight", None, None),
        "post_norm": (p + "post_attention_layernorm.weight", None, None),
    }
    if config.is_moe:
        tensors["router"] = (moe_router(config, i), None, None)
        for e in range(config.n_experts):
            gate, up, down = moe_expert(config, i, e)
            tensors.update({f"gate.{e}": (gate, shard.ffn, None), f"up.{e}": (up, shard.ffn, None),
                            f"down.{e}": (down, None, shard.ffn)})
    else:
        tensors.update(gate=(p + "mlp.gate_proj.weight", shard.ffn, None),
                       up=(p + "mlp.up_proj.weight", shard.ffn, None),
                       down=(p + "mlp.down_proj.weight", None, shard.ffn))
    if config.qkv_bias:
        tensors.update(q_bias=(p + "self_attn.q_proj.bias", q, None), k_bias=(p + "self_attn.k_proj.bias", kv, None),
                       v_bias=(p + "self_attn.v_proj.bias", kv, None))
    if config.qk_norm:
        tensors.update(q_norm=(p + "self_attn.q_norm.weight", None, None),
                       k_norm=(p + "self_attn.k_norm.weight", None, None))
    return tensors


def _end_tensors(config: ModelConfig, start: int, end: int, *, leader: bool,
                 quant: str | None) -> dict[str, tuple]:
    """The embedding (the first stage's leader), final norm and head (the last's)."""
    tensors = {}
    if leader and start == 0:
        tensors["embed"] = ("model.embed_tokens.weight", None, None)
    if leader and end == config.n_layers:
        tensors["norm"] = ("model.norm.weight", None, None)
        # a dense head tied to an embedding this rank holds is that embedding, not read again
        if quant is not None or not (config.tie_word_embeddings and "embed" in tensors):
            tensors["head"] = ("lm_head.weight", None, None)
    return tensors


def _values(config: ModelConfig, name: str, rows, cols) -> int:
    shape = tensor_shape(config, name)
    n_rows = rows[1] - rows[0] if rows is not None else shape[0]
    n_cols = (cols[1] - cols[0] if cols is not None else shape[1]) if len(shape) == 2 else 1
    return n_rows * n_cols


def quantized_head(source: WeightSource, quant: str, device="cpu"):
    """The LM head of a stage quantized in ``quant``, never rounded to 4 bits by the stage.

    Each logit is a row of the head times the last hidden state, so the head's rounding
    reaches the output with no layer after it to dilute it: an int4 head made nearly all of
    int4's difference from fp32 in top-1 agreement and perplexity, its layers almost none
    (``bench/quality.py``; figures in docs/ARCHITECTURE.md). llama.cpp's quantizer keeps
    ``output.weight`` at Q6_K or Q8_0 in its 4-bit files for the same reason. So the head
    is int8 under int4 too: a file's Q8_0 blocks as stored, or int8 per row of its float
    (or otherwise quantized) values. A head the file itself stores in a 4-bit type is taken
    as stored: 8 bits of it would add a rounding, not undo one. The planner counts the head
    at int8's bytes (``planner.cost.Dtype.head_bytes``)."""
    for fmt in dict.fromkeys(("int8", quant)):
        stored = source.get_stored("lm_head.weight", fmt)
        if stored is not None:
            return quantized.pack_parts([tuple(t.to(device) for t in stored)], fmt)
    return quantized.pack(source.get("lm_head.weight").to(device), "int8")
