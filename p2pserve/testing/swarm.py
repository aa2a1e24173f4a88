"""Start real peers the way a user does (the CLI), on 127.0.0.1, and always stop them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from p2pserve.ranks.world import free_port

STARTUP_TIMEOUT = 120.0


def end_child(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a child that exits when its stdin closes (an echo or bench server); kill it
    if it has not within ``timeout`` seconds."""
    proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_log(proc, log: Path, pattern: str, timeout: float = STARTUP_TIMEOUT) -> re.Match:
    """The first match of ``pattern`` in ``log``, waiting (bounded) while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text())
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name} exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    raise TimeoutError(f"{log.name}: no {pattern!r} within {timeout} s:\n{log.read_text()}")


class Swarm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.addr: str | None = None
        self._n = 0

    def _spawn(self, args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        env = {**os.environ, "P2PSERVE_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "p2pserve.cli", *args], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((proc, log))
        return proc, log

    def _wait_for(self, proc, log: Path, pattern: str, timeout: float = STARTUP_TIMEOUT) -> re.Match:
        return wait_for_log(proc, log, pattern, timeout)

    def start_bootstrap(self, *args: str, port: int | None = None) -> str:
        """Start the bootstrap (again, on the same port and identity, if ``port`` is given)."""
        port = port or free_port()
        self.bootstrap_args = args
        proc, log = self._spawn(["bootstrap", "--listen", f"/ip4/127.0.0.1/tcp/{port}", *args], "bootstrap")
        self.bootstrap_proc, self.bootstrap_port = proc, port
        self.addr = self._wait_for(proc, log, rf"(/ip4/127\.0\.0\.1/tcp/{port}/p2p/\w+)").group(1)
        return self.addr

    def start_worker(self, *args: str, wait: bool = True, group_id: bool = True,
                     threads: int | None = 1) -> subprocess.Popen:
        """A worker; with its own ``--group-id`` unless ``group_id`` is False (then its
        identity is the first one no running worker holds). ``threads`` per rank: one
        unless told, the suite's processes being many; None lets the worker take its
        share of the machine's cores."""
        self._n += 1
        name = f"worker{self._n}"
        threads = [] if "--threads" in args or threads is None else ["--threads", str(threads)]
        pinned = ["--group-id", name] if group_id else []
        proc, log = self._spawn(["worker", "--peer", self.addr, *pinned,
                                 "--listen", "/ip4/127.0.0.1/tcp/0", *threads, *args], name)
        if wait:
            self.wait_serving(proc)
        return proc

    def wait_serving(self, proc) -> str:
        """Wait until a worker serves; its peer id."""
        log = next(log for p, log in self.procs if p is proc)
        return self._wait_for(proc, log, r"worker (\w+) serving layers").group(1)

    def proc_of(self, peer_id: str) -> subprocess.Popen:
        for proc, log in self.procs:
            if f"worker {peer_id} serving" in log.read_text():
                return proc
        raise KeyError(peer_id)

    def signal(self, proc, sig=signal.SIGKILL) -> None:
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)

    def log(self, proc) -> str:
        return next(log.read_text() for p, log in self.procs if p is proc)

    def ticket(self, session: str, chain: list[dict]) -> bytes:
        """A session ticket signed with this swarm's head key, as the head would sign it:
        what a test needs to speak to workers directly, which no outsider can."""
        from p2pserve.net.host import load_or_create_identity
        from p2pserve.net.protocols import Hop
        from p2pserve.net.tickets import sign_ticket

        key = load_or_create_identity(self.home / "bootstrap.key")
        return sign_ticket(key, session, [Hop.from_dict(h) for h in chain])

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        env = {**os.environ, "P2PSERVE_HOME": str(self.home)}
        return subprocess.run([sys.executable, "-m", "p2pserve.cli", *args], capture_output=True, text=True,
                              env=env, timeout=timeout)

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client:
    """An in-process libp2p client of the swarm, for asserting on tokens."""

    def __init__(self, host, bootstrap_id, key_pair=None):
        self.host, self.bootstrap_id, self.key_pair = host, bootstrap_id, key_pair

    async def ask(self, **kw):
        from p2pserve.net.client import ask_all

        return await ask_all(self.host, self.bootstrap_id, **kw)

    async def status(self) -> dict:
        from p2pserve.net.client import status

        return await status(self.host, self.bootstrap_id)

    async def wait_chains(self, n: int = 1, timeout: float = 60.0) -> dict:
        with trio.fail_after(timeout):
            while True:
                st = await self.status()
                if len(st["chains"]) >= n:
                    return st
                await trio.sleep(0.2)


def client(addr: str, swarm_key: str | None = None):
    """``async with client(addr) as c:`` an in-process client connected to the bootstrap."""
    from contextlib import asynccontextmanager

    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.net.host import connect, quiet_libp2p_logs, running_host

    @asynccontextmanager
    async def cm():
        quiet_libp2p_logs()
        key_pair = create_new_key_pair()
        async with running_host(key_pair, ["/ip4/127.0.0.1/tcp/0"], swarm_key) as host:
            yield Client(host, await connect(host, addr, timeout=15), key_pair)

    return cm()
