"""Shared memory between the CPU ranks of one machine's world: the TP all-reduce of a
stage, and the hand-offs from stage to stage.

**All-reduce.**
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

**Hand-offs.** Consecutive stages of a local world pass each step from leader to leader,
and the last leader passes the logits back to rank 0. Over gloo a hand-off is a TCP
message that wakes a transport thread and then the waiting rank, and on a small CPU whose
cores the stages' OpenMP threads keep busy, each wake-up waits for a core
(``bench/engine.py`` measures what a second stage costs). A ``Link`` instead copies the
tensor into a shared slot and writes one byte into a FIFO: the receiver, blocked in
``read``, wakes straight into its copy (the pipe's lock orders the copy before the read),
and asleep it takes no core from the stage computing. A slot is reused only after the
receiver copied out of it (its count in shared memory, read after x86's ordered stores).
A rank that dies closes its end of the FIFO: the other's read ends, or its write fails,
with an error. Tensors above a slot go through ``dist.send``/``recv``, as everything does
on GPU, off x86 and with ``P2PSERVE_SHM_ALLREDUCE=0``. A stage leader tells its TP
followers each step over a link to each, too.
"""

from __future__ import annotations

import os
import platform
import shutil
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


def shared_memory(device) -> bool:
    """Whether ranks on ``device`` talk through shared memory: CPU ranks on x86 (a world's
    ranks are always on one machine: a worker or ``p2pserve run`` starts them itself)."""
    return str(device) == "cpu" and platform.machine().lower() in ("x86_64", "amd64") \
        and os.environ.get("P2PSERVE_SHM_ALLREDUCE", "1") != "0"


def all_reduce_for(group, device) -> object | None:
    """The all-reduce a stage's blocks use: None without a group, ``ShmAllReduce`` where
    ``shared_memory``, ``dist.all_reduce`` otherwise."""
    if group is None:
        return None
    if shared_memory(device):
        return ShmAllReduce(group)
    return lambda h: dist.all_reduce(h, group=group)


SLOT_BYTES = 2 << 20  # the logits of a few sequences, a prefill chunk's activations
SLOTS = 2  # a step's header, meta and activations follow each other without waiting


class Link:
    """One direction between two ranks of a world: ``send(t)`` on one, ``recv(t)`` of a
    tensor of the same size on the other. Made by ``open_link`` on both."""

    def __init__(self, peer: int, raw: torch.Tensor | None = None, fifo: int | None = None):
        self.peer, self._raw, self._fifo = peer, raw, fifo
        self.seq = 0
        if raw is not None:  # the receiver's count of messages copied out, then the slots
            self._read = raw[:_ALIGN].numpy().view(np.int64)
            # copied with numpy's one thread: torch's copy_ of a logits row is a parallel
            # region, which wakes torch's OpenMP threads and leaves them spinning
            # (GOMP_SPINCOUNT) on the cores the stage that computes next needs
            self._slots = raw[_ALIGN:].numpy().reshape(SLOTS, SLOT_BYTES)

    def send(self, t: torch.Tensor) -> None:
        data = t.contiguous().view(-1).view(torch.uint8)
        if self._raw is None or data.numel() > SLOT_BYTES:
            dist.send(t.contiguous(), self.peer)
            return
        self.seq += 1
        deadline = None
        while self._read[0] < self.seq - SLOTS:  # the receiver is still copying this slot out
            os.sched_yield()
            deadline = deadline or time.monotonic() + WAIT_TIMEOUT
            if time.monotonic() > deadline:
                raise P2PServeError(f"rank {self.peer} did not take a hand-off within {WAIT_TIMEOUT:.0f} s")
        self._slots[self.seq % SLOTS, : data.numel()] = data.numpy()
        try:
            os.write(self._fifo, b"\0")
        except BrokenPipeError:
            raise P2PServeError(f"rank {self.peer} closed its link: it exited") from None

    def recv(self, t: torch.Tensor) -> None:
        """Into ``t`` (contiguous)."""
        data = t.view(-1).view(torch.uint8)
        if self._raw is None or data.numel() > SLOT_BYTES:
            dist.recv(t, self.peer)
            return
        if os.read(self._fifo, 1) != b"\0":
            raise P2PServeError(f"rank {self.peer} closed its link: it exited")
        self.seq += 1
        data.numpy()[:] = self._slots[self.seq % SLOTS, : data.numel()]
        self._read[0] = self.seq

    def close(self) -> None:
        if self._fifo is not None:
            os.close(self._fifo)
            self._fifo = None


def open_link(peer: int, sending: bool, device) -> Link:
    """This rank's end of a link to (``sending``) or from ``peer``; both ranks call it at
    the same point of their setup. The sender makes the shared file and the FIFO and sends
    their paths; the receiver maps the file and opens the FIFO for reading; then the sender
    opens it for writing (a read before that would see no writer: the end of the link),
    removes both names and says so."""
    if not shared_memory(device):
        return Link(peer)
    size = _ALIGN + SLOTS * SLOT_BYTES
    if sending:
        where = tempfile.mkdtemp(prefix="p2pserve-link-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        paths = [os.path.join(where, "slots"), os.path.join(where, "ready")]
        try:
            with open(paths[0], "wb") as f:
                f.truncate(size)
            os.mkfifo(paths[1])
            raw = torch.from_file(paths[0], shared=True, size=size, dtype=torch.uint8)
            dist.send_object_list(paths, dst=peer)
            dist.recv_object_list([None], src=peer)  # the receiver's end is open
            fifo = os.open(paths[1], os.O_WRONLY)
        finally:
            shutil.rmtree(where)  # the mapping and the open FIFO stay; nothing is left behind
        dist.send_object_list([True], dst=peer)
    else:
        paths = [None, None]
        dist.recv_object_list(paths, src=peer)
        raw = torch.from_file(paths[0], shared=True, size=size, dtype=torch.uint8)
        fifo = os.open(paths[1], os.O_RDONLY | os.O_NONBLOCK)  # without a writer yet: not blocking
        os.set_blocking(fifo, True)
        dist.send_object_list([True], dst=peer)
        dist.recv_object_list([None], src=peer)  # the sender's end is open
    return Link(peer, raw, fifo)
