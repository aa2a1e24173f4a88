"""All-reduce through shared memory for the TP ranks of a stage on one machine's CPU.

A TP stage all-reduces twice per layer. gloo does it over loopback TCP, which on a small
shared CPU costs 1-2 ms a call (thread wake-ups on both sides; ``bench/engine.py``:
``[2 1]/[20 10]`` ran at 0.26x the one-stage plan). Ranks of one machine can instead
write their partial sums into a shared buffer, raise a flag, and wait (spinning briefly,
then yielding the core) until every rank's flag is up; each then adds the slots in rank
order, so every rank holds bit-identical sums, as after gloo.

Two buffers alternate by step parity: a rank writes step s+2 into the buffer of step s
only after every rank raised its flag for s+1, i.e. after they all finished reading s.
The flag is an 8-byte store after the data, which x86's total store order makes visible
in that order; elsewhere (and on GPU, for tensors above the buffer, or with
``P2PSERVE_SHM_ALLREDUCE=0``) the plain ``dist.all_reduce`` runs.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from p2pserve.errors import P2PServeError

CAPACITY = 1 << 20  # floats per rank per buffer: a [256, 4096] prefill chunk
WAIT_TIMEOUT = 60.0  # seconds; ranks of one forward reach an all-reduce within ms of each other
_ALIGN = 64


class ShmAllReduce:
    """``self(h)`` sums ``h`` in place over the ranks of ``group``."""

    def __init__(self, group, capacity: int = CAPACITY):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.capacity = capacity
        self.step = 0
        flags_bytes = _ALIGN * self.size  # one cache line per rank's flag
        data_bytes = 2 * self.size * capacity * 4
        path = [None]
        leader = dist.get_global_rank(group, 0)
        if self.rank == 0:
            fd, path[0] = tempfile.mkstemp(prefix="p2pserve-tp-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.ftruncate(fd, flags_bytes + data_bytes)
            os.close(fd)
        dist.broadcast_object_list(path, src=leader, group=group)
        raw = torch.from_file(path[0], shared=True, size=flags_bytes + data_bytes, dtype=torch.uint8)
        dist.barrier(group=group)
        if self.rank == 0:
            os.unlink(path[0])  # the mappings stay; nothing is left behind in /dev/shm
        self._raw = raw  # keeps the mapping alive
        self.flags = raw[:flags_bytes].numpy().view(np.int64)[:: _ALIGN // 8]
        self.data = raw[flags_bytes:].view(torch.float32).view(2, self.size, capacity)

    def __call__(self, h: torch.Tensor) -> None:
        n = h.numel()
        if n > self.capacity:
            dist.all_reduce(h, group=self.group)  # every rank sees the same n: all take this path
            return
        self.step += 1
        buf = self.data[self.step % 2]
        buf[self.rank, :n].copy_(h.reshape(-1))
        self.flags[self.rank] = self.step
        self._wait(self.step)
        total = buf[0, :n].clone()
        for r in range(1, self.size):
            total += buf[r, :n]
        h.copy_(total.view(h.shape))

    def _wait(self, step: int) -> None:
        flags = self.flags
        spins = 0
        deadline = None
        while flags.min() < step:
            spins += 1
            if spins > 200:
                os.sched_yield()  # a rank without a core of its own must get one
                if deadline is None:
                    deadline = time.monotonic() + WAIT_TIMEOUT
                elif spins % 1024 == 0 and time.monotonic() > deadline:
                    raise P2PServeError(f"TP rank(s) {[r for r in range(self.size) if flags[r] < step]} "
                                        f"did not reach the all-reduce within {WAIT_TIMEOUT:.0f} s")


def all_reduce_for(group, device) -> object | None:
    """The all-reduce a stage's blocks use: None without a group, shared memory for CPU
    ranks on x86 (they are always on one machine: a worker or ``p2pserve run`` starts
    them itself), ``dist.all_reduce`` otherwise."""
    if group is None:
        return None
    cpu = str(device) == "cpu"
    if cpu and platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("P2PSERVE_SHM_ALLREDUCE", "1") != "0":
        return ShmAllReduce(group)
    return lambda h: dist.all_reduce(h, group=group)
