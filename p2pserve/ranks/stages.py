"""Stages on their ranks: one stage across its TP group, and consecutive stages run by
one local world, driven from its rank 0.

A stage's TP rank 0 (its *leader*) receives work from outside (the previous stage's
leader, or the worker's server), broadcasts it to the other ranks of its group (the
*followers*), and every rank runs the same layers, all-reducing twice per layer. Only
the leader embeds tokens (stage 0) and computes logits (last stage).

Ranks are laid out stage after stage (``Plan.stages``); each stage's first rank leads it
and the others follow it over the stage's TP group. Rank 0 leads the first stage and is
the world's face to its caller: ``LocalStages.forward(batch, x)`` runs a step through
every stage and returns the last one's output. Activations go from leader to leader
and the last leader sends its output back to rank 0 over links (``shm.Link``: shared
memory on a CPU, else point-to-point send/recv, NCCL on CUDA).

One shape serves every local use: a worker's stage with its TP group (one stage), a
worker holding several stages (``p2pserve worker --stage 1,2``), and the whole model of
``p2pserve run``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from p2pserve.engine.build import load_stage
from p2pserve.engine.model import Batch, StageModel
from p2pserve.engine.weights import open_weights
from p2pserve.errors import P2PServeError
from p2pserve.heap import freeze_startup_heap
from p2pserve.plan import Plan
from p2pserve.ranks import cores, world
from p2pserve.ranks.header import OP_ALLOC, OP_STEP, OP_STOP, Messenger
from p2pserve.ranks.shm import Link, all_reduce_for, open_link, shared_memory


class StageRunner:
    """The leader's handle on its stage: ``forward`` runs one batched step on every rank of
    its TP group (a one-rank stage needs none: the StageModel is its own runner), telling
    them each step through ``followers`` (``_Member.group_messenger``)."""

    def __init__(self, model: StageModel, followers: Messenger):
        self.model = model
        self.config = model.config
        self.is_first, self.is_last = model.is_first, model.is_last
        self.device, self.dtype = model.device, model.dtype
        self._followers = followers

    @property
    def max_len(self) -> int:
        return self.model.max_len

    @property
    def n_slots(self) -> int:
        return self.model.n_slots

    def allocate(self, n_slots: int, max_len: int) -> None:
        self._followers.put(OP_ALLOC, n_slots, max_len)
        self.model.allocate(n_slots, max_len)

    @torch.inference_mode()
    def forward(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """As ``StageModel.forward``, with the followers computing their shards beside it."""
        model = self.model
        x = model.embed_input(x)
        self._followers.put_step(batch, x)
        h = model.forward_layers(x, batch)
        return model.logits(h) if model.is_last else h

    def stop(self) -> None:
        self._followers.put(OP_STOP)


@torch.inference_mode()
def follow(model: StageModel, leader: Messenger, threads: cores.ThreadFollower | None = None) -> None:
    """A follower's whole life: mirror the leader's steps until it says stop."""
    while True:
        msg = leader.get()
        if threads is not None:
            threads.follow()
        if msg.op == OP_STOP:
            return
        if msg.op == OP_ALLOC:
            model.allocate(msg.a, msg.b)
        elif msg.op == OP_STEP:
            model.forward_layers(msg.x, msg.batch)


@dataclass(frozen=True)
class StagesSpec:
    """What every rank of the world needs to find and load its part."""

    model_path: str | None
    stages: tuple[tuple[int, int, int], ...]  # (start, end, tp) of each stage, consecutive
    dtype: torch.dtype
    world: world.World
    threads: int | None = None  # per rank; None: world.default_threads of its stage's TP
    quant: str | None = None  # weight format (int8, int4) of a quantized world, None for float weights
    kv_dtype: torch.dtype | None = None  # the KV cache's, None: the activations' (``dtype``)
    share_cores: bool = False  # without threads: follow this machine's share among its workers (ranks/cores.py)

    def __post_init__(self):
        if any(self.stages[k][1] != self.stages[k + 1][0] for k in range(len(self.stages) - 1)):
            raise P2PServeError(f"the stages of one world must be consecutive, got {list(self.stages)}")
        if self.world.size != self.layout.world_size:
            raise P2PServeError(f"{len(self.world.devices)} devices for a world of {self.layout.world_size} ranks")

    @property
    def ranks_at_once(self) -> int:
        """Ranks computing at the same moment: one stage's TP group (stages take turns)."""
        return max(tp for _, _, tp in self.stages)

    def rank_threads(self, tp: int) -> int:
        if self.threads:
            return self.threads
        return cores.share(self.ranks_at_once) if self.share_cores else world.default_threads(tp)

    def thread_follower(self) -> cores.ThreadFollower | None:
        return cores.ThreadFollower(self.ranks_at_once) if self.share_cores and not self.threads else None

    @property
    def layout(self) -> Plan:  # the world's ranks laid out as a plan: stage after stage
        return Plan([tp for _, _, tp in self.stages], [end - start for start, end, _ in self.stages])


class _Member:
    """One rank of the world: joined, grouped, its shard loaded (``progress``: ``load_stage``'s)."""

    def __init__(self, rank: int, spec: StagesSpec, source=None, progress=None):
        layout = spec.layout
        self.stage = layout.stage_of_rank(rank)
        device = world.join(spec.world, rank, spec.rank_threads(self.stage.tp))
        self.threads = spec.thread_follower()
        groups = world.new_groups([s.ranks for s in layout.stages])
        self.group = groups[self.stage.index]
        start, end, tp = spec.stages[self.stage.index]
        self.model = load_stage(source or open_weights(spec.model_path), start, end,
                                rank=rank - self.stage.first_rank, tp=tp,
                                all_reduce=all_reduce_for(self.group, device), device=device, dtype=spec.dtype,
                                quant=spec.quant, kv_dtype=spec.kv_dtype, progress=progress)
        leaders = [s.first_rank for s in layout.stages]
        i = self.stage.index
        self.prev_leader = leaders[i - 1] if i > 0 else None
        self.next_leader = leaders[i + 1] if i + 1 < len(leaders) else None
        # links, opened in an order in which no two ranks wait for each other: a leader's to
        # its followers, from the previous leader, to the next, the last stage's output to rank 0
        self.upstream = self.downstream = self.group_messenger = None
        self.results: Link | None = None
        self._links: list[Link] = []
        if self.group is not None:
            self.group_messenger = self._group_messenger(rank, device)
        # a one-rank stage is its own runner; a TP group needs its followers told each step
        self.runner = self.model if self.group is None else StageRunner(self.model, self.group_messenger)
        if rank == self.stage.first_rank:
            if self.prev_leader is not None:
                self.upstream = self._messenger(recv=self._open(self.prev_leader, False, device).recv)
            if self.next_leader is not None:
                self.downstream = self._messenger(send=self._open(self.next_leader, True, device).send)
            if len(leaders) > 1 and rank == 0:
                self.results = self._open(leaders[-1], False, device)
            elif len(leaders) > 1 and self.next_leader is None:
                self.results = self._open(0, True, device)

    def stop_followers(self) -> None:
        if self.group is not None:
            self.runner.stop()

    def _open(self, peer: int, sending: bool, device) -> Link:
        link = open_link(peer, sending, device)
        self._links.append(link)
        return link

    def _messenger(self, send=None, recv=None) -> Messenger:
        """Messages of this rank's model shape over ``send`` and ``recv``: one way or both."""
        return Messenger(self.model.config.hidden_size, self.model.dtype, self.model.device, send, recv)

    def _group_messenger(self, rank: int, device) -> Messenger:
        """A leader's messages to its TP followers: over a link to each where ranks share
        memory, else one broadcast (NCCL's, on GPUs)."""
        leader = self.stage.first_rank
        if not shared_memory(device):
            def broadcast(t: torch.Tensor) -> None:
                dist.broadcast(t, leader, group=self.group)

            return self._messenger(broadcast, broadcast)
        if rank != leader:
            return self._messenger(recv=self._open(leader, False, device).recv)
        links = [self._open(r, True, device) for r in self.stage.ranks[1:]]

        def send(t: torch.Tensor) -> None:
            for link in links:
                link.send(t)

        return self._messenger(send=send)

    def close_links(self) -> None:
        for link in self._links:
            link.close()


def serve_rank(rank: int, spec: StagesSpec) -> None:
    """The whole life of every rank but 0: follow its leader, or lead a later stage."""
    me = _Member(rank, spec)
    freeze_startup_heap()  # full GC passes must not walk the model and torch
    if rank != me.stage.first_rank:
        follow(me.model, me.group_messenger, me.threads)
        me.close_links()
    else:
        _lead_later_stage(me)
    world.leave()


@torch.inference_mode()
def _lead_later_stage(me: _Member) -> None:
    upstream, downstream = me.upstream, me.downstream
    runner = me.runner
    while True:
        msg = upstream.get()
        if me.threads is not None:
            me.threads.follow()
        if msg.op == OP_STOP:
            if downstream is not None:
                downstream.put(OP_STOP)
            me.stop_followers()
            me.close_links()
            return
        if msg.op == OP_ALLOC:
            runner.allocate(msg.a, msg.b)
            if downstream is not None:
                downstream.put(OP_ALLOC, msg.a, msg.b)
        elif msg.op == OP_STEP:
            out = runner.forward(msg.batch, msg.x)
            if downstream is not None:
                downstream.put_step(msg.batch, out)
            else:
                me.results.send(out)


class LocalStages:
    """Rank 0's handle on the world's stages: ``forward(batch, x)`` through all of them.

    ``LocalStages(spec)`` joins as rank 0 of a world whose other ranks already run
    ``serve_rank``; ``LocalStages.start(spec)`` starts them first, and ``close()`` stops them.
    ``progress(done, total)`` follows rank 0's loading (``load_stage``), not the others'.
    """

    def __init__(self, spec: StagesSpec, source=None, ranks: world.Ranks | None = None, progress=None):
        self._me = _Member(0, spec, source, progress)
        self._ranks = ranks
        self._first = self._me.runner
        self._next = self._me.downstream
        self.config = self._first.config
        self.start, self.end = spec.stages[0][0], spec.stages[-1][1]
        self.is_first = self.start == 0
        self.is_last = self.end == self.config.n_layers
        self.device, self.dtype = self._first.device, self._first.dtype

    @classmethod
    def start(cls, spec: StagesSpec, source=None, progress=None) -> "LocalStages":
        ranks = world.Ranks(serve_rank, range(1, spec.world.size), spec) if spec.world.size > 1 else None
        try:
            return cls(spec, source, ranks, progress)
        except BaseException:
            if ranks is not None:
                ranks.stop()
            raise

    @property
    def max_len(self) -> int:
        return self._first.max_len

    @property
    def n_slots(self) -> int:
        return self._first.n_slots

    def allocate(self, n_slots: int, max_len: int) -> None:
        self._first.allocate(n_slots, max_len)
        if self._next is not None:
            self._next.put(OP_ALLOC, n_slots, max_len)

    @torch.inference_mode()
    def forward(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """As ``StageRunner.forward``, through every stage of the world."""
        out = self._first.forward(batch, x)
        if self._next is None:
            return out
        self._next.put_step(batch, out)
        shape = (batch.size, self.config.vocab_size) if self.is_last else (batch.size, batch.n_tokens, self.config.hidden_size)
        result = torch.empty(shape, dtype=torch.float32 if self.is_last else self.dtype, device=self.device)
        self._me.results.recv(result)
        return result

    def stop(self) -> None:
        if self._next is not None:
            self._next.put(OP_STOP)
        self._me.stop_followers()

    def check_ranks(self) -> None:
        if self._ranks is not None:
            self._ranks.check()

    def close(self) -> None:
        if self._ranks is not None:
            self._ranks.stop(self.stop)
            self._ranks = None
        self._me.close_links()
        world.leave()


def open_runner(spec: StagesSpec, source=None, progress=None):
    """A worker's stages, ready to step: ``(runner, close)``. One rank is the StageModel
    itself, so a token crosses no layer of this module; more start their world.
    ``progress(done, total)``: rank 0's loading (``load_stage``)."""
    if spec.world.size > 1:
        stages = LocalStages.start(spec, source, progress)
        return stages, stages.close
    stage = spec.stages[0]
    device = world.join(spec.world, 0, spec.rank_threads(1))
    model = load_stage(source or open_weights(spec.model_path), stage[0], stage[1], device=device, dtype=spec.dtype,
                       quant=spec.quant, kv_dtype=spec.kv_dtype, progress=progress)
    return model, lambda: None
