"""Tensor parallelism inside a stage, Megatron-style, with uneven splits.

Ranks take contiguous groups of KV heads (and the query heads that share them), as
evenly as the counts allow: TP 2 over SmolLM2's 3 KV heads gives ranks 2 and 1 heads.
q/k/v and gate/up are column-parallel (each rank owns output rows, and the q/k/v
biases' same rows), o and down are row-parallel (each rank owns input columns); one
all-reduce after attention and one after the MLP restores the full activation on every
rank. Qwen3's q/k norms act within one head, so every rank holds them whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pserve.engine.config import ModelConfig


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of ``n`` items over ``parts``; sizes differ by at most one."""
    out, start = [], 0
    for i in range(parts):
        size = n // parts + (1 if i < n % parts else 0)
        out.append((start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class Shard:
    """What one TP rank of a stage holds."""

    rank: int
    tp: int
    kv_heads: tuple[int, int]
    q_heads: tuple[int, int]
    ffn: tuple[int, int]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def is_full(self) -> bool:
        return self.tp == 1


def shard_for(config: ModelConfig, rank: int, tp: int) -> Shard:
    kv = split_evenly(config.n_kv_heads, tp)[rank]
    g = config.group_size
    return Shard(
        rank=rank,
        tp=tp,
        kv_heads=kv,
        q_heads=(kv[0] * g, kv[1] * g),
        ffn=split_evenly(config.intermediate_size, tp)[rank],
    )
