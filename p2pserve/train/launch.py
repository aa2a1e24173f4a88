"""Every rank of a training layout as a process of its own, started by ``p2pserve.ranks.world``.

``run_processes(layout, config, target, *args)`` starts this machine's ranks, one process
each (gloo on CPU, NCCL on CUDA), creates in each the process groups training reduces
over (``sync.collective_groups``: the same list, in the same order, on every rank), and
calls ``target(comm, *args)`` there with a ``DistComm``. What each rank returns comes
back to the caller by rank; a rank that fails or is killed ends the run with an error
naming it, and every rank of this machine is then killed (also on Ctrl-C, and when
this process dies without a word: a rank whose parent is gone exits).

Several machines (``Nodes``): the world's ranks are cut into ``nnodes`` contiguous
blocks, node 0 first (``Nodes.ranks``), each machine runs ``run_processes`` with its own
``node_rank``, and every rank meets at ``master`` (``HOST:PORT`` where node 0 listens).

``target`` and ``args`` cross to a fresh interpreter, so ``target`` must be a module-level
function and ``args`` picklable.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError, P2PServeError
from p2pserve.ranks import world
from p2pserve.train.comm import DistComm
from p2pserve.train.layout import TrainLayout
from p2pserve.train.sync import collective_groups


@dataclass(frozen=True)
class Nodes:
    """Which machines run the world: ``nnodes`` of them, this one ``node_rank``, meeting at ``master``."""

    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None  # HOST:PORT; None on one machine (a free local port)

    def ranks(self, world_size: int) -> range:
        """This node's ranks: contiguous, node 0 first, the first ``world_size % nnodes`` nodes one more."""
        base, extra = divmod(world_size, self.nnodes)
        start = self.node_rank * base + min(self.node_rank, extra)
        return range(start, start + base + (self.node_rank < extra))

    def init_method(self) -> str:
        return f"tcp://{self.master}" if self.master else f"tcp://127.0.0.1:{world.free_port()}"


def parse_nodes(nnodes: int, node_rank: int, master: str | None, world_size: int) -> Nodes:
    """The ``--nnodes/--node-rank/--master`` flags, checked; ConfigError naming what would do."""
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} is not one of the {nnodes} nodes: use 0 to {nnodes - 1}")
    if nnodes > world_size:
        raise ConfigError(f"--nnodes {nnodes} is more than the layout's {world_size} ranks: "
                          f"use at most {world_size} nodes")
    if nnodes > 1 and master is None:
        raise ConfigError("--nnodes above 1 needs --master HOST:PORT (where node 0 listens; the same on every node)")
    if master is not None:
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--master {master!r} is not HOST:PORT, e.g. --master 10.0.0.1:29500")
    return Nodes(nnodes, node_rank, master)


@dataclass(frozen=True)
class RankJob:
    world: world.World
    groups: tuple[tuple[int, ...], ...]  # every rank creates them, in this order
    threads: int
    target: Callable
    args: tuple


def run_processes(layout: TrainLayout, config: ModelConfig, target: Callable, *args,
                  device: str = "cpu", threads: int | None = None, nodes: Nodes = Nodes()) -> dict[int, object]:
    """``target(comm, *args)`` on this node's ranks of ``layout``, each in its own process;
    their results by rank. ``threads``: torch threads per rank (default: this machine's
    cores shared by its ranks, which compute at the same moments)."""
    n = layout.world_size
    mine = nodes.ranks(n)
    local = world.rank_devices(device, len(mine))
    devices = tuple(local[r - mine.start] if r in mine else device for r in range(n))
    job = RankJob(world.World(devices, nodes.init_method()), tuple(collective_groups(config, layout)),
                  threads or world.default_threads(len(mine)), target, args)
    results_queue = mp.get_context("spawn").Queue()
    ranks = world.Ranks(_rank_main, mine, job, results_queue, os.getpid(), what="the training world")
    results: dict[int, object] = {}
    failed = True
    try:
        while len(results) < len(mine):
            everyone_exited = not any(p.is_alive() for p in ranks.procs.values())
            try:
                rank, payload = results_queue.get(timeout=2 if everyone_exited else 0.2)
            except queue.Empty:
                ranks.check(finished_ok=True)
                if everyone_exited:
                    missing = sorted(set(mine) - set(results))
                    raise P2PServeError(f"ranks {missing} of the training world exited without a result") from None
                continue
            results[rank] = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        failed = False
    finally:
        # A failed rank leaves the others waiting in a collective until gloo's timeout: kill them now.
        ranks.stop(timeout=10 if not failed else 0)
    return results


def _rank_main(rank: int, job: RankJob, results_queue, parent: int) -> None:
    threading.Thread(target=exit_when_orphaned, args=(parent,), daemon=True).start()
    device = world.join(job.world, rank, job.threads)
    try:
        groups = dict(zip(job.groups, world.new_groups(job.groups)))
        result = job.target(DistComm(groups, device), *job.args)
        # Bytes, not tensors, cross the queue: torch would share a tensor's memory through
        # a handle this process must outlive the reading of, and it is about to exit.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        results_queue.put((rank, buffer.getvalue()))
    finally:
        world.leave()
    results_queue.close()
    results_queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    # The work is delivered; the interpreter's teardown after gloo takes seconds (14 s
    # measured for 4 ranks on 2 busy cores) that nobody waits for.
    os._exit(0)


def exit_when_orphaned(parent: int) -> None:
    """A rank whose launcher died (SIGKILL, a lost terminal) would wait in a collective
    for gloo's timeout: it exits instead."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
