"""The head's view of the swarm: routing as a shortest path, strikes and bans, DHT records."""

from __future__ import annotations

import time

from p2pserve.bootstrap.registry import BAN_BASE, Registry
from p2pserve.net.records import WorkerRecord


def rec(peer: str, start: int, end: int, layer_time: float = 1e-3, expires_in: float = 30) -> WorkerRecord:
    return WorkerRecord(peer_id=peer, addrs=[], model="m", fingerprint="f", stage=0, start=start, end=end, tp=1,
                        devices=[{"layer_time": layer_time}], group_id="", version="0", load={},
                        expires_at=time.time() + expires_in)


def registry(*records) -> Registry:
    r = Registry("m", "f", 30)
    for x in records:
        r.update(x)
    return r


def test_the_cheapest_chain_is_a_shortest_path_over_layer_boundaries():
    r = registry(rec("a", 0, 10), rec("b", 10, 30, layer_time=5e-3), rec("c", 10, 20), rec("d", 20, 30),
                 rec("slow", 0, 30, layer_time=1.0))
    assert [x.peer_id for x in r.best_chain()] == ["a", "c", "d"]
    assert [x.peer_id for x in r.best_chain(avoid=frozenset({"c"}))] == ["a", "b"]
    assert [x.peer_id for x in r.best_chain(exclude=frozenset({"a"}))] == ["slow"]
    assert r.best_chain(exclude=frozenset({"a", "slow"})) is None


def test_routing_a_thousand_workers_takes_milliseconds():
    records = [rec(f"w{s}-{i}", 3 * s, 3 * s + 3, layer_time=1e-3 * (1 + i)) for s in range(10) for i in range(100)]
    r = registry(*records)
    t0 = time.perf_counter()
    chain = r.best_chain()
    took = time.perf_counter() - t0
    assert [x.peer_id for x in chain] == [f"w{s}-0" for s in range(10)]
    print(f"best chain among {len(records)} workers in {took * 1e3:.1f} ms")


def test_strikes_ban_a_peer_that_keeps_failing_and_an_answer_clears_them():
    r = registry(rec("a", 0, 15), rec("b", 15, 30), rec("c", 15, 30))
    r.failed(["a", "b"], "timeout")
    r.succeeded(["a", "c"])  # a chain without b answered
    r.failed(["a", "b"], "timeout")
    assert r.banned("b") and not r.banned("a")
    assert all("b" not in [x.peer_id for x in chain] for chain in r.chains())
    assert r.bans()["b"]["seconds_left"] <= BAN_BASE
    assert r.ban("b", "again") == 2 * BAN_BASE  # each ban of the same peer doubles


def test_a_gap_left_by_a_banned_worker_is_named_as_such():
    r = registry(rec("a", 0, 15), rec("b", 15, 30))
    r.ban("b", "cannot reach it")
    assert "b (layers 15-30) is banned" in r.missing() and "cannot reach it" in r.missing()


def test_dht_records_fill_the_view_but_never_bring_back_a_worker_that_left():
    r = registry(rec("a", 0, 15))
    assert r.update_from_dht(rec("b", 15, 30)) and len(r.chains()) == 1
    old = rec("a", 0, 15, expires_in=20)
    r.remove("a")  # its announce stream closed: it left
    assert not r.update_from_dht(old)
    assert r.update_from_dht(rec("a", 0, 15, expires_in=60))  # a record signed since: it is back
