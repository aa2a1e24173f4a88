"""Build one TP rank of one stage from a weight source, reading only its own slices."""

from __future__ import annotations

import torch

from p2pserve.engine import quant as quantized
from p2pserve.engine.model import MLP, Attention, Block, RMSNorm, StageModel, pack_linear
from p2pserve.engine.tp import shard_for
from p2pserve.engine.weights import WeightSource


def load_stage(source: WeightSource, start: int, end: int, *, rank: int = 0, tp: int = 1,
               all_reduce=None, device="cpu", dtype=torch.float32, quant: str | None = None) -> StageModel:
    """Layers ``[start, end)`` for TP rank ``rank`` of ``tp``; embedding and head on rank 0 only.
    ``quant`` (int8, int4) quantizes every linear weight, the head too, as it is read;
    activations stay ``dtype``.

    ``all_reduce(h)`` sums a partial result in place over the stage's TP ranks
    (``p2pserve.ranks`` makes it; None for TP 1)."""
    config = source.config
    shard = shard_for(config, rank, tp)
    hd = config.head_dim

    def get(name, rows=None, cols=None):
        return source.get(name, rows=rows, cols=cols).to(device=device, dtype=dtype)

    def weight(name, rows=None, cols=None):
        """A linear weight; a quantized stage takes a file's own values where they are in its format."""
        stored = source.get_stored(name, quant, rows=rows, cols=cols) if quant is not None else None
        return get(name, rows, cols) if stored is None else tuple(t.to(device) for t in stored)

    def linear(*weights):
        """Linear weights, their outputs side by side, packed for ``model.linear``."""
        if quant is not None:
            return quantized.pack_parts(weights, quant)
        return pack_linear(torch.cat(weights))

    def rows(heads):
        return heads[0] * hd, heads[1] * hd

    blocks = []
    for i in range(start, end):
        p = f"model.layers.{i}."
        wqkv = linear(
            weight(p + "self_attn.q_proj.weight", rows=rows(shard.q_heads)),
            weight(p + "self_attn.k_proj.weight", rows=rows(shard.kv_heads)),
            weight(p + "self_attn.v_proj.weight", rows=rows(shard.kv_heads)),
        )
        wo = linear(weight(p + "self_attn.o_proj.weight", cols=rows(shard.q_heads)))
        bqkv = q_norm = k_norm = None
        if config.qkv_bias:  # each rank's biases are the rows of its own q/k/v weights
            bqkv = torch.cat([
                get(p + "self_attn.q_proj.bias", rows=rows(shard.q_heads)),
                get(p + "self_attn.k_proj.bias", rows=rows(shard.kv_heads)),
                get(p + "self_attn.v_proj.bias", rows=rows(shard.kv_heads)),
            ])
        if config.qk_norm:  # over one head's dimensions, so every rank holds all of it
            q_norm = RMSNorm(get(p + "self_attn.q_norm.weight"), config.rms_norm_eps)
            k_norm = RMSNorm(get(p + "self_attn.k_norm.weight"), config.rms_norm_eps)
        w13 = linear(
            weight(p + "mlp.gate_proj.weight", rows=shard.ffn),
            weight(p + "mlp.up_proj.weight", rows=shard.ffn),
        )
        w2 = linear(weight(p + "mlp.down_proj.weight", cols=shard.ffn))
        blocks.append(Block(
            Attention(config, shard, wqkv, wo, bqkv, q_norm, k_norm),
            MLP(w13, w2),
            RMSNorm(get(p + "input_layernorm.weight"), config.rms_norm_eps),
            RMSNorm(get(p + "post_attention_layernorm.weight"), config.rms_norm_eps),
            all_reduce,
        ))
    leader = rank == 0
    embed = get("model.embed_tokens.weight") if leader and start == 0 else None
    norm = head = None
    if leader and end == config.n_layers:
        norm = RMSNorm(get("model.norm.weight"), config.rms_norm_eps)
        tied = config.tie_word_embeddings and embed is not None
        if quant is not None:  # a quantized head of its own, the embedding staying float
            head = linear(weight("lm_head.weight"))
        else:  # tied and dense: the head is the embedding itself, no copy
            head = pack_linear(embed if tied else get("lm_head.weight"))
    return StageModel(config, start, end, shard, blocks, embed=embed, norm=norm, head=head).eval()
