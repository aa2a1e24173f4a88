"""Start one stage on its own TP group: this process is the leader, one child per other rank.

Used by a swarm worker, whose stage is a torch.distributed world of its own (the stages
of a swarm talk over libp2p, not torch.distributed).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from p2pserve.errors import P2PServeError
from p2pserve.engine.build import load_stage
from p2pserve.ranks.shm import all_reduce_for
from p2pserve.ranks.stage import StageRunner, follow
from p2pserve.engine.weights import open_weights


@dataclass
class GroupSpec:
    model_path: str | None
    start: int
    end: int
    tp: int
    devices: list[str]  # one per rank
    dtype: torch.dtype
    threads: int
    init_method: str


def _init(rank: int, spec: GroupSpec):
    device = spec.devices[rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.set_num_threads(spec.threads)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=spec.init_method, rank=rank, world_size=spec.tp,
                            timeout=datetime.timedelta(minutes=10))
    model = load_stage(open_weights(spec.model_path), spec.start, spec.end, rank=rank, tp=spec.tp,
                       all_reduce=all_reduce_for(dist.group.WORLD, device), device=device, dtype=spec.dtype)
    return model


def _follower_main(rank: int, spec: GroupSpec) -> None:
    model = _init(rank, spec)
    follow(model, dist.group.WORLD, 0)
    dist.destroy_process_group()


class StageGroup:
    """A loaded stage: ``runner`` for the leader, and the follower processes behind it."""

    def __init__(self, model_path, start: int, end: int, tp: int, devices: list[str],
                 dtype: torch.dtype, source=None, threads: int | None = None):
        from p2pserve.ranks.pipeline import free_port

        if len(devices) == 1 and tp > 1:
            devices = devices * tp
        if len(devices) != tp:
            raise P2PServeError(f"TP degree {tp} needs {tp} devices, got {len(devices)}: {','.join(devices)}")
        threads = threads or max(1, (os.cpu_count() or 1) // tp)
        self.procs = []
        if tp == 1:
            torch.set_num_threads(threads)
            model = load_stage(source or open_weights(model_path), start, end,
                               device=devices[0], dtype=dtype)
            self.runner = StageRunner(model)
            return
        spec = GroupSpec(None if model_path is None else str(model_path), start, end, tp, devices,
                         dtype, threads, f"tcp://127.0.0.1:{free_port()}")
        ctx = mp.get_context("spawn")
        for rank in range(1, tp):
            p = ctx.Process(target=_follower_main, args=(rank, spec), daemon=True)
            p.start()
            self.procs.append(p)
        self.runner = StageRunner(_init(0, spec), dist.group.WORLD, 0)

    def close(self) -> None:
        stop_ranks(self.procs, self.runner.stop)
        self.procs = []


def stop_ranks(procs, stop) -> None:
    """Tell child ranks to stop (``stop()``, if all still live), then reap them, killing
    any that do not exit within a few seconds."""
    if procs and all(p.is_alive() for p in procs):
        try:
            stop()
        except Exception:
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
