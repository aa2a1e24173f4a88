"""Workers of one machine divide its cores between them (p2pserve/ranks/cores.py)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import trio

from p2pserve.engine.generate import SamplingParams
from p2pserve.ranks import cores
from p2pserve.ranks.cores import CoreShare, ThreadFollower, live_ranks, share

from p2pserve.testing.swarm import Swarm, client


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(cores, "machine_cores", lambda: 4)


def test_each_live_worker_takes_its_share_and_gives_it_back_on_leaving(tmp_path, four_cores):
    first = CoreShare(1, directory=tmp_path)
    assert first.threads() == 4 and first.others() == 0
    second = CoreShare(1, directory=tmp_path)
    assert first.threads() == second.threads() == 2 and first.others() == 1
    tp2 = CoreShare(2, directory=tmp_path)  # a TP-2 worker's two ranks compute at once
    assert live_ranks(tmp_path) == 4 and first.threads() == tp2.threads() == 1
    fixed = CoreShare(1, threads=3, directory=tmp_path)  # --threads: kept, and counted
    assert fixed.threads() == 3 and first.threads() == 1 and live_ranks(tmp_path) == 5
    for entry in (tp2, fixed, second):
        entry.close()
    assert first.threads() == 4 and list(tmp_path.glob("*.ranks")) == [first.path]
    first.close()


def test_a_killed_workers_share_is_freed(tmp_path, four_cores):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from p2pserve.ranks.cores import CoreShare
        CoreShare(2, directory=Path({str(tmp_path)!r}))
        print("registered", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "registered"
        assert live_ranks(tmp_path) == 2 and share(1, tmp_path) == 2
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert share(1, tmp_path) == 4  # no process holds its entry: it is gone
        assert not list(tmp_path.glob("*.ranks"))
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_rank_follows_its_share_between_passes(tmp_path, four_cores, monkeypatch):
    monkeypatch.setattr(cores, "RECHECK_S", 0.0)
    before = torch.get_num_threads()
    mine = CoreShare(1, directory=tmp_path)
    follower = ThreadFollower(1, tmp_path)
    try:
        torch.set_num_threads(1)
        assert follower.follow() == 4 and torch.get_num_threads() == 4
        assert follower.follow() is None  # unchanged: nothing to do
        other = CoreShare(1, directory=tmp_path)
        assert follower.follow() == 2 and torch.get_num_threads() == 2
        other.close()
        assert follower.follow() == 4
    finally:
        mine.close()
        torch.set_num_threads(before)


def test_a_worker_says_its_share_and_follows_when_another_leaves(tmp_path, monkeypatch):
    """A worker started beside another's entry takes half the cores and says so; once the
    other is gone it takes them back at its next pass and logs it."""
    registry = tmp_path / "cores"
    registry.mkdir()
    monkeypatch.setenv("P2PSERVE_CORES_DIR", str(registry))
    n = cores.machine_cores()
    if n < 2:
        pytest.skip("one core: nothing to divide")
    neighbour = CoreShare(1, directory=registry)
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap("--pp-partition", "30")
        worker = swarm.start_worker(threads=None)
        line = re.search(r"(\d+) torch thread\(s\) per rank: (\d+) cores shared with (\d+) rank", swarm.log(worker))
        assert line, swarm.log(worker)
        assert (int(line[1]), int(line[2]), int(line[3])) == (n // 2, n, 1)
        neighbour.close()

        async def ask_twice():
            async with client(swarm.addr) as c:
                await c.wait_chains(1)
                for _ in range(2):  # the second pass comes after RECHECK_S
                    await c.ask(prompt="Hello", params=SamplingParams(max_new_tokens=2))
                    await trio.sleep(cores.RECHECK_S)

        trio.run(ask_twice)
        assert f"now {n} torch thread(s) per rank" in swarm.log(worker)
