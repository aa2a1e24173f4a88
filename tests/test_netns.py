"""A swarm across emulated machines: each peer in its own network namespace, 100 Mbit/s
links with 5 ms one way between any two (tests/netns.py), one machine behind a NAT.

Needs root, iproute2 and nftables (scripts/setup.sh installs them as root); skips otherwise.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

from .netns import Network, Peers, why_unavailable

WHY = why_unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")

PROMPT = "What is the capital of France?"
GREEDY = ["--max-new-tokens", "16", "--temperature", "0"]
SMALL = ["--max-sessions", "2"]  # a small KV cache: quicker to start, and these tests ask one at a time


@pytest.fixture(scope="module")
def reference():
    """`p2pserve run`'s answer (a function), computed while the swarm starts."""
    proc = subprocess.Popen([sys.executable, "-m", "p2pserve.cli", "run", "--pp-partition", "15", "15", *GREEDY,
                             PROMPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @functools.cache
    def answer() -> str:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return out

    yield answer
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A bootstrap on "head", stage 0 on "a" and, behind a NAT, on "n0", stage 1 on "b"."""
    with Network(rate="100mbit", delay_ms=5) as net:
        peers = Peers(net, tmp_path_factory.mktemp("netns"))
        peers.head, a, b, n0 = (net.machine("head"), net.machine("a"), net.machine("b"),
                                net.machine("n0", nat=True))
        peers.start_bootstrap(peers.head, "--pp-partition", "15", "15")
        peers.a = peers.start_worker(a, "--stage", "0", *SMALL)
        peers.b = peers.start_worker(b, "--stage", "1", *SMALL)
        peers.n0 = peers.start_worker(n0, "--stage", "0", *SMALL)
        peers.ids = {proc.pid: peers.wait_serving(proc) for proc in (peers.a, peers.b, peers.n0)}
        yield peers


def ask(peers: Peers) -> subprocess.CompletedProcess:
    return peers.query(peers.head, PROMPT, *GREEDY, "--stats", "--timeout", "30", timeout=120)


def test_answer_across_slow_links_equals_run(reference, wan):
    answer = ask(wan)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == reference()


def test_worker_behind_nat_serves_the_first_stage(reference, wan):
    # The NAT'd worker dialled the bootstrap to join; the bootstrap opens sessions over
    # that connection, and stage 0 dials stage 1 outwards: nothing needs to dial in.
    wan.a.kill()
    wan.a.wait()
    answer = ask(wan)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == reference()
    assert f"[route: {wan.ids[wan.n0.pid][-8:]} -> " in answer.stderr


def test_each_worker_says_how_it_is_reached(wan):
    # a public machine is dialled back by the head; a NAT'd one reserves a slot on the
    # head's relay and announces the relayed address
    for proc in (wan.a, wan.b):
        assert "reachable directly at /ip4/10.77." in wan.log(proc), wan.log(proc)
    assert (f"behind NAT: serving through relay {wan.addr}/p2p-circuit/p2p/{wan.ids[wan.n0.pid]}"
            in wan.log(wan.n0)), wan.log(wan.n0)


def test_worker_behind_nat_serves_the_last_stage(reference, wan):
    # Stage 0 (n0, itself behind a NAT) must dial the last stage, which only a relay
    # reaches: it dials n1's relayed address, and the head relays the connection.
    n1 = wan.start_worker(wan.net.machine("n1", nat=True), "--stage", "1", *SMALL)
    n1_id = wan.wait_serving(n1)
    assert "behind NAT: serving through relay" in wan.log(n1), wan.log(n1)
    wan.b.kill()
    wan.b.wait()
    answer = ask(wan)
    assert answer.returncode == 0, f"{answer.stderr}\nbootstrap: {wan.log(wan.bootstrap)[-1500:]}"
    assert answer.stdout == reference()
    assert f"-> {n1_id[-8:]}" in answer.stderr, answer.stderr
