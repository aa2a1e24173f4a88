"""The head's view of the swarm: routing as a shortest path, strikes and bans, DHT records."""

from __future__ import annotations

import itertools
import random
import time

from p2pserve.bootstrap.registry import BAN_BASE, HOP_COST, OBSERVED_HALF_LIFE, Registry
from p2pserve.net.records import WorkerRecord


def rec(peer: str, start: int, end: int, layer_time: float = 1e-3, expires_in: float = 30,
        rtts: dict | None = None) -> WorkerRecord:
    return WorkerRecord(peer_id=peer, addrs=[], model="m", fingerprint="f", stage=0, start=start, end=end, tp=1,
                        devices=[{"layer_time": layer_time}], group_id="", version="0", load={},
                        expires_at=time.time() + expires_in, rtts=rtts or {})


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


def brute_force_cost(r: Registry, chain) -> float:
    return sum(r.stage_cost(x) for x in chain) + sum(r.hop_cost(a.peer_id, b.peer_id) for a, b in zip(chain, chain[1:]))


def test_the_shortest_path_is_the_cheapest_of_all_chains_hops_included():
    """Against every chain enumerated, on random swarms: uneven ranges, speeds, and round
    trips announced by one end, the other or both."""
    for seed in range(30):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, 30), 3))
        bounds = [0, *cuts, 30]
        records = []
        for i, (a, b) in enumerate(itertools.product(range(len(bounds)), repeat=2)):
            if a < b and rng.random() < 0.6:
                records.append(rec(f"p{i}", bounds[a], bounds[b], layer_time=rng.uniform(1e-4, 2e-3)))
        for x in records:
            x.rtts.update({y.peer_id: rng.uniform(0, 0.02) for y in rng.sample(records, min(4, len(records)))
                           if y is not x})
        r = registry(*records)
        chains = r.chains()
        best = r.best_chain()
        if not chains:
            assert best is None
            continue
        cheapest = min(brute_force_cost(r, c) for c in chains)
        assert abs(brute_force_cost(r, best) - cheapest) < 1e-12, seed


def test_routing_a_thousand_workers_with_ten_replicas_per_stage():
    """100 stages x 10 replicas, each announcing round trips to the replicas of the next
    stage: the path takes the fast replicas and steps around the one slow hop on it
    (bench/routing.py times this)."""
    records = [rec(f"w{s}-{i}", s, s + 1, layer_time=1e-3 * (1 + i)) for s in range(100) for i in range(10)]
    for x in records:
        s = x.start
        x.rtts.update({f"w{s + 1}-{j}": 1e-4 for j in range(10) if s + 1 < 100})
    records[50 * 10].rtts["w51-0"] = 0.5  # w50-0 -> w51-0: a slow link, as w50-0 sees it
    r = Registry("m", "f", 100)
    for x in records:
        r.update(x)
    chain = [x.peer_id for x in r.best_chain()]
    assert len(chain) == 100 and chain[:50] == [f"w{s}-0" for s in range(50)]
    assert chain[50:52] in (["w50-0", "w51-1"], ["w50-1", "w51-0"])  # either costs one slower stage
    assert chain[52:] == [f"w{s}-0" for s in range(52, 100)]


def test_a_chain_over_a_high_rtt_hop_is_avoided_when_an_equal_one_exists():
    far = rec("b-far", 15, 30, rtts={"a": 0.002})
    near = rec("b-near", 15, 30)
    a = rec("a", 0, 15, rtts={"b-far": 1e-4, "b-near": 1e-4})
    r = registry(a, far, near)
    # the larger of both ends' figures: a's 0.1 ms to b-far does not hide b-far's 2 ms
    assert r.hop_cost("a", "b-far") == 0.002 and r.hop_cost("a", "b-near") == 1e-4
    assert [x.peer_id for x in r.best_chain()] == ["a", "b-near"]
    r.update(rec("b-near", 15, 30, rtts={"a": 0.05}))  # seen from b-near the link is worse still
    assert [x.peer_id for x in r.best_chain()] == ["a", "b-far"]
    r.remove("b-near")
    r.update(rec("b-near", 15, 30))  # back, no figures: a's own 0.1 ms stands
    assert r.hop_cost("a", "b-near") == 1e-4
    assert r.hop_cost("a", "nobody") == HOP_COST


def serve(r: Registry, true_layer_time: dict[str, float], answers: int) -> list[list[str]]:
    """``answers`` answers routed by ``r``, each observed at the chain's true pace."""
    picked = []
    for _ in range(answers):
        chain = r.best_chain()
        picked.append([x.peer_id for x in chain])
        seconds = sum((x.end - x.start) * true_layer_time[x.peer_id] for x in chain) \
            + sum(r.hop_cost(a.peer_id, b.peer_id) for a, b in zip(chain, chain[1:]))
        r.observe(chain, seconds)
    return picked


def test_a_liar_claiming_to_be_fast_loses_its_traffic_after_an_answer_or_two():
    liar, honest = rec("liar", 0, 30, layer_time=1e-9), rec("honest", 0, 30, layer_time=1e-3)
    r = registry(liar, honest)
    picked = serve(r, {"liar": 2e-3, "honest": 1e-3}, 10)
    assert picked[0] == ["liar"] and all(c == ["honest"] for c in picked[1:])
    assert r.layer_time("liar") >= 2e-3 * 0.99  # it cannot look faster than it was seen to be


def test_a_lying_stage_loses_traffic_without_blaming_its_honest_neighbour():
    r = registry(rec("liar", 0, 15, layer_time=1e-9), rec("a", 0, 15), rec("b", 15, 30), rec("c", 15, 30))
    truth = {"liar": 3e-3, "a": 1e-3, "b": 1e-3, "c": 1e-3}
    picked = serve(r, truth, 12)
    assert picked[0][0] == "liar"
    assert all(chain[0] == "a" for chain in picked[3:])  # after a few answers, never again
    assert r.layer_time("liar") > r.layer_time("a")


def test_a_peer_seen_slow_is_tried_again_as_the_observation_ages():
    r = registry(rec("x", 0, 30), rec("y", 0, 30, layer_time=1.2e-3))
    serve(r, {"x": 5e-3, "y": 1.2e-3}, 2)  # x was overloaded
    assert r.best_chain()[0].peer_id == "y"
    r.observed["x"].at -= 5 * OBSERVED_HALF_LIFE  # time passes: x's excess over its claim decays
    assert r.best_chain()[0].peer_id == "x"
    assert serve(r, {"x": 1e-3, "y": 1.2e-3}, 3)[-1] == ["x"]  # it recovered: it keeps its traffic


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
    refreshed = rec("a", 0, 15)  # put in the DHT after its last heartbeat: it expires later
    assert refreshed.expires_at > r.entries["a"].record.expires_at
    r.remove("a")  # its announce stream closed: it left
    assert not r.update_from_dht(old) and not r.update_from_dht(refreshed)
    assert r.update_from_dht(rec("a", 0, 15, expires_in=60))  # a record signed since: it is back
