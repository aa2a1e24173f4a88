"""One training stage on one TP rank: the engine's model math with autograd, no KV cache.

Each trainable tensor is a *piece* of one Hugging Face tensor: the rows a column-parallel
rank owns (q/k/v and gate/up, the engine's uneven head split), the columns a row-parallel
rank owns (o and down), or all of it for the norms, the embedding and the head, which
every TP rank of their stage holds and computes alike (so each of them sees the whole
loss and the whole gradient of its input). RMSNorm and RoPE are the engine's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from p2pserve.engine.config import ModelConfig
from p2pserve.engine.model import RMSNorm, apply_rope, rope_tables
from p2pserve.engine.tp import shard_for
from p2pserve.engine.weights import WeightSource, tensor_shape
from p2pserve.train.comm import Comm, from_tp, to_tp
from p2pserve.train.layout import Role


@dataclass(frozen=True)
class Piece:
    """Which part of Hugging Face tensor ``name`` a rank holds: ``[start, end)`` along ``dim``.

    ``counted``: this copy's gradient is part of the sum over pipelines. A tensor every TP
    rank of a stage holds whole and applies to the whole activation gets the same gradient
    on each, so it counts once per stage; Qwen3's q/k norms act on each rank's own heads,
    so every rank's gradient is a part and each counts.
    """

    name: str
    shape: tuple[int, ...]
    dim: int
    start: int
    end: int
    counted: bool


def layer_names(config: ModelConfig, i: int) -> dict[str, str]:
    """Each tensor of layer ``i`` -> how TP ranks hold it: rows, columns, whole, or whole but
    applied to each rank's own heads (``per_head``: every rank's gradient is a part of the sum)."""
    p = f"model.layers.{i}."
    names = {
        p + "input_layernorm.weight": "whole",
        p + "self_attn.q_proj.weight": "q_rows",
        p + "self_attn.k_proj.weight": "kv_rows",
        p + "self_attn.v_proj.weight": "kv_rows",
        p + "self_attn.o_proj.weight": "q_cols",
        p + "post_attention_layernorm.weight": "whole",
        p + "mlp.gate_proj.weight": "ffn_rows",
        p + "mlp.up_proj.weight": "ffn_rows",
        p + "mlp.down_proj.weight": "ffn_cols",
    }
    if config.qkv_bias:
        names.update({p + "self_attn.q_proj.bias": "q_rows", p + "self_attn.k_proj.bias": "kv_rows",
                      p + "self_attn.v_proj.bias": "kv_rows"})
    if config.qk_norm:
        names.update({p + "self_attn.q_norm.weight": "per_head", p + "self_attn.k_norm.weight": "per_head"})
    return names


def head_name(config: ModelConfig) -> str:
    """A tied head is the embedding tensor itself: one tensor, one gradient, one update."""
    return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


def pieces_of(config: ModelConfig, role: Role) -> list[Piece]:
    """Every piece ``role``'s rank holds, in the model's order."""
    shard = shard_for(config, role.tp_rank, role.tp)
    hd = config.head_dim
    spans = {
        "q_rows": (0, (shard.q_heads[0] * hd, shard.q_heads[1] * hd)),
        "kv_rows": (0, (shard.kv_heads[0] * hd, shard.kv_heads[1] * hd)),
        "q_cols": (1, (shard.q_heads[0] * hd, shard.q_heads[1] * hd)),
        "ffn_rows": (0, shard.ffn),
        "ffn_cols": (1, shard.ffn),
    }
    counted_whole = role.tp_rank == 0
    names = {}
    if role.is_first:
        names["model.embed_tokens.weight"] = "whole"
    for i in range(role.start, role.end):
        names.update(layer_names(config, i))
    if role.is_last:
        names["model.norm.weight"] = "whole"
        names[head_name(config)] = "whole"
    out = []
    for name, split in names.items():
        shape = tensor_shape(config, name)
        if split == "whole":
            out.append(Piece(name, shape, 0, 0, shape[0], counted_whole))
        elif split == "per_head":
            out.append(Piece(name, shape, 0, 0, shape[0], True))
        else:
            dim, (a, b) = spans[split]
            out.append(Piece(name, shape, dim, a, b, True))
    return out


def read_piece(source: WeightSource, piece: Piece, dtype=torch.float32) -> torch.Tensor:
    span = (piece.start, piece.end)
    rows, cols = (span, None) if piece.dim == 0 else (None, span)
    return source.get(piece.name, rows=rows, cols=cols).to(dtype).clone()


class TrainStage(nn.Module):
    """Layers ``[role.start, role.end)`` on one TP rank, with the embedding on stage 0 and
    the final norm and head on the last stage. ``params[name]`` is the piece ``pieces``
    describes."""

    def __init__(self, config: ModelConfig, role: Role, tensors: dict[str, torch.Tensor], comm: Comm):
        super().__init__()
        self.config, self.role, self.comm = config, role, comm
        self.pieces = pieces_of(config, role)
        self.params = nn.ParameterDict()
        for piece in self.pieces:
            self.params[_key(piece.name)] = nn.Parameter(tensors[piece.name])
        shard = shard_for(config, role.tp_rank, role.tp)
        self.n_q, self.n_kv = shard.n_q_heads, shard.n_kv_heads

    @classmethod
    def load(cls, source: WeightSource, role: Role, comm: Comm, dtype=torch.float32) -> "TrainStage":
        config = source.config
        tensors = {p.name: read_piece(source, p, dtype).to(comm.device) for p in pieces_of(config, role)}
        return cls(config, role, tensors, comm)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[_key(self.pieces[0].name)].dtype

    @property
    def device(self) -> torch.device:
        return self.params[_key(self.pieces[0].name)].device

    def param(self, name: str) -> nn.Parameter:
        return self.params[_key(name)]

    def named_pieces(self):
        for piece in self.pieces:
            yield piece, self.param(piece.name)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.param("model.embed_tokens.weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] entering layer ``start``; returns it leaving layer ``end - 1``."""
        T = x.shape[1]
        cos, sin = rope_tables(self.config, T, x.device, x.dtype)
        cos, sin = cos[None, :, None], sin[None, :, None]
        for i in range(self.role.start, self.role.end):
            x = self._layer(i, x, cos, sin)
        return x

    def loss_sum(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The sum of the token losses of ``targets`` [B, T] after the final norm and head."""
        h = self._norm("model.norm.weight", x)
        logits = F.linear(h, self.param(head_name(self.config)))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # never below fp32
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")

    def _layer(self, i, x, cos, sin):
        p = f"model.layers.{i}."
        w = lambda name: self.param(p + name)  # noqa: E731
        cfg, hd, ranks = self.config, self.config.head_dim, self.role.tp_ranks
        B, T, _ = x.shape
        h = to_tp(self._norm(p + "input_layernorm.weight", x), self.comm, ranks)
        q = F.linear(h, w("self_attn.q_proj.weight"), self._bias(p + "self_attn.q_proj.bias"))
        k = F.linear(h, w("self_attn.k_proj.weight"), self._bias(p + "self_attn.k_proj.bias"))
        v = F.linear(h, w("self_attn.v_proj.weight"), self._bias(p + "self_attn.v_proj.bias"))
        q, k, v = q.view(B, T, self.n_q, hd), k.view(B, T, self.n_kv, hd), v.view(B, T, self.n_kv, hd)
        if cfg.qk_norm:
            q, k = self._norm(p + "self_attn.q_norm.weight", q), self._norm(p + "self_attn.k_norm.weight", k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.repeat_interleave(cfg.group_size, dim=1), v.repeat_interleave(cfg.group_size, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        att = att.transpose(1, 2).reshape(B, T, self.n_q * hd)
        x = x + from_tp(F.linear(att, w("self_attn.o_proj.weight")), self.comm, ranks)
        h = to_tp(self._norm(p + "post_attention_layernorm.weight", x), self.comm, ranks)
        gate, up = F.linear(h, w("mlp.gate_proj.weight")), F.linear(h, w("mlp.up_proj.weight"))
        return x + from_tp(F.linear(F.silu(gate) * up, w("mlp.down_proj.weight")), self.comm, ranks)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return RMSNorm.forward(_NormView(self.param(name), self.config.rms_norm_eps), x)

    def _bias(self, name: str):
        return self.param(name) if self.config.qkv_bias else None


class _NormView:
    """The attributes the engine's ``RMSNorm.forward`` reads, over a trainable piece."""

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps = weight, eps


def _key(name: str) -> str:
    return name.replace(".", "/")  # ParameterDict keys may not contain dots
