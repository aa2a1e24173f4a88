"""Summing gradients over pipelines whose TP splits differ.

Every rank holds pieces of Hugging Face tensors (``model.Piece``: a range of rows or
columns, or all of it). For each tensor, the union of all pipelines' piece boundaries
cuts it into segments; each segment is summed among the ranks whose pieces cover it.
That works for any mix of splits (TP 2 against TP 3 on three KV heads, split unevenly),
not only for TP degrees that divide each other. A tensor every TP rank of a stage holds
whole contributes once per pipeline: the copies that are not ``counted`` add zeros.

Segments with the same holders, across all layers, go in one bucket: one all-reduce
per distinct set of holders. Every rank walks the buckets in the same global order, so
ranks that share several buckets never wait on each other crosswise.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from p2pserve.engine.config import ModelConfig
from p2pserve.train.comm import Comm
from p2pserve.train.layout import TrainLayout
from p2pserve.train.model import Piece, pieces_of


@dataclass(frozen=True)
class Segment:
    name: str
    dim: int
    start: int  # in the full tensor
    end: int
    holders: tuple[int, ...]  # sorted global ranks whose pieces cover it


def all_pieces(config: ModelConfig, layout: TrainLayout) -> dict[int, list[Piece]]:
    return {role.rank: pieces_of(config, role) for role in layout.roles()}


def segments(config: ModelConfig, layout: TrainLayout) -> list[Segment]:
    """Every segment of every tensor, in model order."""
    holders: dict[str, list[tuple[int, Piece]]] = defaultdict(list)
    for rank, pieces in all_pieces(config, layout).items():
        for piece in pieces:
            holders[piece.name].append((rank, piece))
    out = []
    for name, held in holders.items():
        dim = held[0][1].dim
        cuts = sorted({p.start for _, p in held} | {p.end for _, p in held})
        for a, b in zip(cuts, cuts[1:]):
            ranks = tuple(sorted(r for r, p in held if p.start <= a and b <= p.end))
            out.append(Segment(name, dim, a, b, ranks))
    return out


def collective_groups(config: ModelConfig, layout: TrainLayout) -> list[tuple[int, ...]]:
    """Every set of ranks training reduces over (TP groups, gradient buckets, the world),
    sorted: the order in which torch.distributed groups are created on every rank."""
    groups = {tuple(r.tp_ranks) for r in layout.roles()}
    groups |= {s.holders for s in segments(config, layout)}
    groups.add(tuple(range(layout.world_size)))
    return sorted(g for g in groups if len(g) > 1)


class GradSync:
    """The buckets of one rank, computed once from the layout."""

    def __init__(self, config: ModelConfig, layout: TrainLayout, rank: int):
        self.rank = rank
        self.world = tuple(range(layout.world_size))
        mine = {p.name: p for p in pieces_of(config, layout.role(rank))}
        self.pieces = mine
        buckets: dict[tuple[int, ...], list[Segment]] = defaultdict(list)
        for seg in segments(config, layout):
            if rank in seg.holders:
                buckets[seg.holders].append(seg)
        self.buckets = sorted(buckets.items())
        # Each segment's norm is counted by its lowest holder, where all holders hold the same sum.
        self.norm_segments = [s for _, segs in self.buckets for s in segs if s.holders[0] == rank]

    def sum_gradients(self, grads: dict[str, torch.Tensor], comm: Comm) -> None:
        """Replace each piece's gradient by the sum over pipelines, in place."""
        for holders, segs in self.buckets:
            parts = [self._local(grads, s) for s in segs]
            flat = torch.cat([
                (part if self.pieces[s.name].counted else torch.zeros_like(part)).reshape(-1)
                for s, part in zip(segs, parts)
            ])
            comm.all_reduce(flat, holders)
            offset = 0
            for part in parts:
                part.copy_(flat[offset : offset + part.numel()].view_as(part))
                offset += part.numel()

    def global_norm(self, grads: dict[str, torch.Tensor], comm: Comm) -> float:
        """The L2 norm of the whole model's summed gradient, each element counted once."""
        sq = torch.zeros(1, dtype=torch.float64, device=comm.device)
        for s in self.norm_segments:
            sq += self._local(grads, s).double().pow(2).sum()
        comm.all_reduce(sq, self.world)
        return float(sq.sqrt())

    def _local(self, grads, seg: Segment) -> torch.Tensor:
        piece = self.pieces[seg.name]
        return grads[seg.name].narrow(seg.dim, seg.start - piece.start, seg.end - seg.start)
