"""The machine's cores, divided among the p2pserve workers computing on it.

Workers started side by side on one machine would each size torch's thread pool to every
core, and their passes would then fight for the cores: two workers on two cores serve
concurrent clients barely faster than one. Instead each worker holds an entry here saying
how many of its ranks compute at once (its TP degree), and every rank of an automatically
threaded worker uses ``cores // (ranks of all live entries)`` threads, following the
count as workers come and go (checked at most every ``RECHECK_S`` seconds, between
passes). A worker given ``--threads`` keeps its count but is still counted.

An entry is a file named after the worker's pid, holding its rank count and locked by
the worker for its life, so that an entry whose process died (even by SIGKILL) is seen
as such and removed by the next reader. The directory is per user and per machine, not
per ``P2PSERVE_HOME``: cores are the machine's.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch

RECHECK_S = 2.0
_entries = itertools.count()  # one process may hold several entries (tests do)


def registry_dir() -> Path:
    path = Path(os.environ.get("P2PSERVE_CORES_DIR") or Path(tempfile.gettempdir()) / f"p2pserve-{os.getuid()}-cores")
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine_cores() -> int:
    """The cores this process may run on (its affinity, as a container or taskset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def live_ranks(directory: Path | None = None) -> int:
    """The ranks of every live worker's entry; entries of dead workers are removed."""
    directory = directory or registry_dir()
    total = 0
    for path in directory.glob("*.ranks"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # removed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its worker holds it: live
                total += _ranks_in(fd)
                continue
            path.unlink(missing_ok=True)  # nobody holds it: its worker died
        finally:
            os.close(fd)
    return total


def share(ranks: int, directory: Path | None = None) -> int:
    """Threads per rank for a worker whose ``ranks`` ranks compute at once, beside every
    live worker of this machine."""
    return max(1, machine_cores() // max(ranks, live_ranks(directory)))


def _ranks_in(fd: int) -> int:
    try:
        return max(1, int(os.pread(fd, 16, 0) or b"1"))
    except ValueError:
        return 1


class CoreShare:
    """This worker's entry, and the thread count each of its ranks should use."""

    def __init__(self, ranks: int, threads: int | None = None, directory: Path | None = None):
        """``ranks``: how many of this worker's ranks compute at once; ``threads``: a fixed
        count per rank (``--threads``), None to take the share."""
        self.directory = directory or registry_dir()
        self.fixed = threads
        self.ranks = ranks
        # written under a temporary name and renamed once locked, so no reader ever sees
        # an entry unlocked and takes it for a dead worker's
        name = f"{os.getpid()}-{next(_entries)}"
        tmp = self.directory / f".{name}.tmp"
        self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.write(self._fd, str(ranks).encode())
        self.path = self.directory / f"{name}.ranks"
        os.rename(tmp, self.path)

    def threads(self) -> int:
        return self.fixed or share(self.ranks, self.directory)

    def others(self) -> int:
        """Ranks of the other workers on this machine."""
        return max(0, live_ranks(self.directory) - self.ranks)

    def close(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


class ThreadFollower:
    """Keeps the calling thread's torch thread count at the machine's share, for a rank of
    an automatically threaded worker: ``follow()`` before each pass, on the thread that
    computes (OpenMP's thread count is per calling thread)."""

    def __init__(self, ranks_of_worker: int, directory: Path | None = None):
        self.ranks = ranks_of_worker
        self.directory = directory
        self._next_check = 0.0

    def follow(self) -> int | None:
        """The new thread count if it just changed, else None."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + RECHECK_S
        threads = share(self.ranks, self.directory)
        if threads == torch.get_num_threads():
            return None
        torch.set_num_threads(threads)
        return threads
