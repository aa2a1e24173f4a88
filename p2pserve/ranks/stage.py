"""Running one stage across its TP group.

The stage's TP rank 0 (the *leader*) receives work from outside (torch.distributed in a
one-world run, libp2p in a swarm), broadcasts it to the other ranks of its group (the
*followers*), and every rank runs the same layers, all-reducing twice per layer. Only
the leader embeds tokens (stage 0) and computes logits (last stage).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from p2pserve.engine.model import Batch, StageModel

OP_STOP, OP_STEP, OP_ALLOC = 0, 1, 2


class StageRunner:
    """The leader's handle on its stage: ``forward`` runs one batched step on every rank."""

    def __init__(self, model: StageModel, group=None, leader_rank: int = 0):
        self.model = model
        self.group = group
        self.leader_rank = leader_rank
        self.hidden_size = model.config.hidden_size

    @property
    def max_len(self) -> int:
        return 0 if self.model.cos is None else self.model.max_len

    @property
    def n_slots(self) -> int:
        blocks = self.model.blocks
        return blocks[0].attn.cache.k.shape[0] if len(blocks) and blocks[0].attn.cache is not None else 0

    def _broadcast(self, header: list[int]) -> None:
        if self.group is not None:
            header = torch.tensor(header, dtype=torch.int64, device=self.model.device)
            dist.broadcast(header, self.leader_rank, group=self.group)

    def allocate(self, n_slots: int, max_len: int) -> None:
        self._broadcast([OP_ALLOC, n_slots, max_len, 0])
        self.model.allocate_cache(n_slots, max_len)

    @torch.inference_mode()
    def forward(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """x: token ids [B, T] on stage 0, hidden states [B, T, hidden] elsewhere.

        Returns hidden states [B, T, hidden], or logits of the last positions [B, vocab]
        on the last stage.
        """
        model = self.model
        if model.is_first:
            x = model.embed_tokens(x.to(model.device))
        x = x.to(model.device, model.dtype)
        if self.group is not None:
            self._broadcast([OP_STEP, batch.size, batch.n_tokens, 0])
            meta = torch.tensor(batch.slots + batch.starts, dtype=torch.int64, device=model.device)
            dist.broadcast(meta, self.leader_rank, group=self.group)
            dist.broadcast(x.contiguous(), self.leader_rank, group=self.group)
        h = model.forward_layers(x, batch)
        return model.logits(h) if model.is_last else h

    def stop(self) -> None:
        self._broadcast([OP_STOP, 0, 0, 0])


@torch.inference_mode()
def follow(model: StageModel, group, leader_rank: int) -> None:
    """A follower's whole life: mirror the leader's steps until it says stop."""
    device = model.device  # NCCL needs device tensors; gloo takes CPU ones
    header = torch.empty(4, dtype=torch.int64, device=device)
    while True:
        dist.broadcast(header, leader_rank, group=group)
        op, a, b, _ = header.tolist()
        if op == OP_STOP:
            return
        if op == OP_ALLOC:
            model.allocate_cache(a, b)
            continue
        size, n_tokens = a, b
        meta = torch.empty(2 * size, dtype=torch.int64, device=device)
        dist.broadcast(meta, leader_rank, group=group)
        meta = meta.tolist()
        batch = Batch(tuple(meta[:size]), tuple(meta[size:]), n_tokens)
        x = torch.empty(size, n_tokens, model.config.hidden_size, dtype=model.dtype, device=device)
        dist.broadcast(x, leader_rank, group=group)
        model.forward_layers(x, batch)
