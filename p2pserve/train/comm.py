"""The few collectives training needs, behind one small face, and the TP ops built on them.

``Comm`` is what a rank's training code calls: an in-place sum over a set of ranks, and
point-to-point sends and receives between pipeline stages. ``DistComm`` runs them over
torch.distributed groups (gloo on CPU, NCCL on CUDA): the ranks of ``p2pserve train``
are processes started by ``p2pserve.ranks.world`` (``launch.run_processes``).
``ThreadWorld`` runs every rank of a layout as a thread of one process instead: the
same algorithm (TP collectives, pipeline schedules, gradient sync across unequal splits)
with no process start-up, which is what lets the test suite train many 8-rank layouts on
two cores, and lets a rank "die" by raising, which Oobleck's reconfiguration
(``elastic.py``) needs until a process world can be re-formed among its survivors.

Every member of a group gets the same bits of a sum (ThreadWorld sums in rank order).
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

import torch
import torch.distributed as dist


class Comm(Protocol):
    rank: int
    world_size: int
    device: torch.device  # where this rank's tensors live

    def all_reduce(self, tensor: torch.Tensor, ranks: tuple[int, ...]) -> None:
        """Sum ``tensor`` in place over ``ranks`` (sorted, this rank among them)."""

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send without waiting for the receiver (a pipeline's two directions cross)."""

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        """Fill ``tensor`` with the next tensor ``src`` sent to this rank."""

    def finish(self) -> None:
        """Wait until every send of this rank has been delivered."""


class ThreadWorld:
    """Shared state of ``world_size`` ranks running as threads of this process."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._cond = threading.Condition()
        self._deposits: dict[tuple, dict[int, torch.Tensor]] = {}
        self._taken: dict[tuple, int] = {}
        self._mail: dict[tuple[int, int], queue.SimpleQueue] = {
            (s, d): queue.SimpleQueue() for s in range(world_size) for d in range(world_size)
        }
        self.failed = threading.Event()  # set when a rank raised: the others stop waiting

    def comm(self, rank: int) -> "ThreadComm":
        return ThreadComm(self, rank)

    def run(self, target, timeout: float = 120.0) -> list:
        """``target(comm)`` on every rank at once; its results by rank, or the first rank's error."""
        results, errors = [None] * self.world_size, [None] * self.world_size

        def body(rank):
            try:
                results[rank] = target(self.comm(rank))
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors[rank] = e
                self.failed.set()
                with self._cond:
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        first = next((e for e in errors if e is not None and not isinstance(e, _PeerFailed)), None)
        if first is not None:
            raise first
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"ranks {[r for r, t in enumerate(threads) if t.is_alive()]} did not finish")
        return results


class _PeerFailed(RuntimeError):
    """Another rank raised; this one gave up waiting for it."""


class ThreadComm:
    device = torch.device("cpu")

    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank, self.world_size = world, rank, world.world_size
        self._calls: dict[tuple[int, ...], int] = {}

    def all_reduce(self, tensor, ranks):
        if len(ranks) == 1:
            return
        n = self._calls.get(ranks, 0)
        self._calls[ranks] = n + 1
        key = (ranks, n)
        w = self.world
        with w._cond:
            w._deposits.setdefault(key, {})[self.rank] = tensor.detach().clone()
            w._cond.notify_all()
            while len(w._deposits[key]) < len(ranks):
                self._wait()
            parts = w._deposits[key]
            total = parts[ranks[0]].clone()
            for r in ranks[1:]:
                total += parts[r]
            w._taken[key] = w._taken.get(key, 0) + 1
            if w._taken[key] == len(ranks):
                del w._deposits[key], w._taken[key]
        tensor.copy_(total)

    def send(self, tensor, dst):
        self.world._mail[(self.rank, dst)].put(tensor.detach().clone())

    def recv(self, tensor, src):
        box = self.world._mail[(src, self.rank)]
        while True:
            try:
                tensor.copy_(box.get(timeout=0.05))
                return
            except queue.Empty:
                if self.world.failed.is_set():
                    raise _PeerFailed(f"rank {self.rank}: a peer failed") from None

    def finish(self):
        pass

    def _wait(self):
        if self.world.failed.is_set():
            raise _PeerFailed(f"rank {self.rank}: a peer failed")
        self.world._cond.wait(0.05)


class DistComm:
    """``Comm`` over torch.distributed. ``groups`` maps each sorted rank tuple training
    reduces over to its process group (every rank created every group, in one order)."""

    def __init__(self, groups: dict[tuple[int, ...], object], device: str):
        # A one-rank world has no process group (``world.join`` makes none) and no peer.
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(device)
        self._groups = groups
        self._pending: list = []

    def all_reduce(self, tensor, ranks):
        if len(ranks) == 1:
            return
        dist.all_reduce(tensor, group=self._groups[ranks])

    def send(self, tensor, dst):
        payload = tensor.detach().contiguous()
        self._pending.append((dist.isend(payload, dst), payload))

    def recv(self, tensor, src):
        dist.recv(tensor, src)

    def finish(self):
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def close(self):
        """Let go of this world's groups, so that leaving it closes their connections: a
        peer still waiting in one of them then fails at once instead of at gloo's timeout."""
        self._groups = {}
        self._pending.clear()


class _ToTP(torch.autograd.Function):
    """Megatron's ``f``: the replicated input of a column-parallel layer; its gradient is
    the sum of every TP rank's partial one."""

    @staticmethod
    def forward(ctx, x, comm, ranks):
        ctx.comm, ctx.ranks = comm, ranks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        ctx.comm.all_reduce(grad, ctx.ranks)
        return grad, None, None


class _FromTP(torch.autograd.Function):
    """Megatron's ``g``: a row-parallel layer's partial outputs summed; the gradient of the
    sum reaches every rank whole."""

    @staticmethod
    def forward(ctx, x, comm, ranks):
        out = x.contiguous().clone()
        comm.all_reduce(out, ranks)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def to_tp(x: torch.Tensor, comm: Comm, ranks: tuple[int, ...]) -> torch.Tensor:
    return x if len(ranks) == 1 else _ToTP.apply(x, comm, ranks)


def from_tp(x: torch.Tensor, comm: Comm, ranks: tuple[int, ...]) -> torch.Tensor:
    return x if len(ranks) == 1 else _FromTP.apply(x, comm, ranks)
