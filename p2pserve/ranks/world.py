"""The one way p2pserve starts a world of ranks: processes, torch.distributed, groups,
ports and threads.

A *world* is a set of processes on this machine that talk torch.distributed (gloo on
CPU, NCCL on CUDA): the local pipeline of ``p2pserve run``, the TP group of a worker's
stage, several stages inside one worker, the ranks of ``p2pserve train``. Every one of
them is started here and joins here; this is the only module that calls
``init_process_group``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import signal
import socket
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from p2pserve.errors import ConfigError, P2PServeError

JOIN_TIMEOUT = datetime.timedelta(minutes=10)  # ranks load their weights before the first collective


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_threads(ranks_at_once: int) -> int:
    """Torch threads for a rank when ``ranks_at_once`` ranks of this machine compute at the
    same moment (a TP group's ranks do; pipeline stages take turns on a sequence, so each
    may use every core: ``p2pserve/__init__.py``'s GOMP_SPINCOUNT keeps a waiting stage
    from stealing them)."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks_at_once))


def rank_devices(device: str, size: int) -> tuple[str, ...]:
    """One device per rank: ``cuda`` spreads the ranks over every GPU of the machine."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine; use --device cpu")
        return tuple(f"cuda:{r % torch.cuda.device_count()}" for r in range(size))
    return (device,) * size


@dataclass(frozen=True)
class World:
    devices: tuple[str, ...]  # one per rank
    init_method: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")

    @property
    def size(self) -> int:
        return len(self.devices)


def join(world: World, rank: int, threads: int) -> str:
    """Make this process rank ``rank`` of ``world``; returns its device."""
    torch.set_num_threads(threads)
    device = world.devices[rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world.size > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=world.init_method, rank=rank, world_size=world.size,
                                timeout=JOIN_TIMEOUT)
    return device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def new_groups(rank_lists: Sequence[Sequence[int]]) -> list:
    """A process group for each list of ranks (None for a single rank). Every rank of the
    world must call this with the same lists in the same order."""
    return [dist.new_group(list(ranks)) if len(ranks) > 1 else None for ranks in rank_lists]


def _child(target: Callable, rank: int, args: tuple, errors) -> None:
    try:
        target(rank, *args)
    except BaseException as e:  # the parent owns the terminal: it reports the first cause
        detail = str(e) if isinstance(e, P2PServeError) else f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        errors.put((rank, detail))
        raise SystemExit(1)


class Ranks:
    """Child processes running ranks of a world, started with ``target(rank, *args)``."""

    def __init__(self, target: Callable, ranks: Sequence[int], *args, what: str = "the pipeline"):
        ctx = mp.get_context("spawn")
        self.what = what  # errors say "rank R of <what>"
        self.errors = ctx.Queue()
        self.procs = {}
        for rank in ranks:
            p = ctx.Process(target=_child, args=(target, rank, args, self.errors), daemon=True)
            p.start()
            self.procs[rank] = p

    def check(self, finished_ok: bool = False) -> None:
        """Raise, naming the rank, if any rank has died. ``finished_ok``: a rank that exited
        with status 0 has done its work (ranks that return, as training's do), not died."""
        dead = [(rank, p.exitcode) for rank, p in self.procs.items()
                if p.exitcode is not None and not (finished_ok and p.exitcode == 0)]
        if not dead:
            return
        killed = [(rank, code) for rank, code in dead if code < 0]
        if killed:  # the cause; the others' errors (a reset connection) only follow from it
            rank, code = killed[0]
            raise P2PServeError(f"rank {rank} of {self.what} was killed ({signal.Signals(-code).name})")
        try:
            rank, detail = self.errors.get(timeout=2)
        except queue.Empty:
            rank, detail = dead[0][0], f"exit code {dead[0][1]}"
        raise P2PServeError(f"rank {rank} of {self.what} failed: {detail}")

    def join(self, timeout: float) -> None:
        for p in self.procs.values():
            p.join(timeout=timeout)

    def all_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs.values())

    def stop(self, say_stop: Callable[[], None] | None = None, timeout: float = 10) -> None:
        """Ask the ranks to stop (``say_stop()``, only while all live: a collective with a
        dead rank would hang), then reap them, killing any that do not exit in time."""
        if say_stop is not None and self.procs and self.all_alive():
            try:
                say_stop()
            except Exception:  # a rank died meanwhile: it is reaped below
                pass
        for p in self.procs.values():
            p.join(timeout=timeout)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = {}
