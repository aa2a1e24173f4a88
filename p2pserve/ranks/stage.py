"""Running one stage across its TP group.

The stage's TP rank 0 (the *leader*) receives work from outside (the previous stage's
leader, or the worker's server), broadcasts it to the other ranks of its group (the
*followers*), and every rank runs the same layers, all-reducing twice per layer. Only
the leader embeds tokens (stage 0) and computes logits (last stage).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from p2pserve.engine.model import Batch, StageModel
from p2pserve.ranks.header import OP_ALLOC, OP_STEP, OP_STOP, Messenger


def _group_messenger(model: StageModel, group, leader_rank: int) -> Messenger:
    def broadcast(t: torch.Tensor) -> None:
        dist.broadcast(t, leader_rank, group=group)

    return Messenger(model.config.hidden_size, model.dtype, model.device, broadcast, broadcast)


class StageRunner:
    """The leader's handle on its stage: ``forward`` runs one batched step on every rank."""

    def __init__(self, model: StageModel, group=None, leader_rank: int = 0):
        self.model = model
        self.config = model.config
        self.is_first, self.is_last = model.is_first, model.is_last
        self.device, self.dtype = model.device, model.dtype
        self._followers = None if group is None else _group_messenger(model, group, leader_rank)

    @property
    def max_len(self) -> int:
        return 0 if self.model.cos is None else self.model.max_len

    @property
    def n_slots(self) -> int:
        blocks = self.model.blocks
        return blocks[0].attn.cache.k.shape[0] if len(blocks) and blocks[0].attn.cache is not None else 0

    def allocate(self, n_slots: int, max_len: int) -> None:
        if self._followers is not None:
            self._followers.put(OP_ALLOC, n_slots, max_len)
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
        if self._followers is not None:
            self._followers.put_step(batch, x)
        h = model.forward_layers(x, batch)
        return model.logits(h) if model.is_last else h

    def stop(self) -> None:
        if self._followers is not None:
            self._followers.put(OP_STOP)


@torch.inference_mode()
def follow(model: StageModel, group, leader_rank: int) -> None:
    """A follower's whole life: mirror the leader's steps until it says stop."""
    leader = _group_messenger(model, group, leader_rank)
    while True:
        msg = leader.get()
        if msg.op == OP_STOP:
            return
        if msg.op == OP_ALLOC:
            model.allocate_cache(msg.a, msg.b)
        elif msg.op == OP_STEP:
            model.forward_layers(msg.x, msg.batch)
