"""Routing time: the head's best_chain over a large synthetic swarm.

    python bench/routing.py [--stages 100] [--replicas 10] [--rtts 20] [--repeat 200]

Builds a Registry of stages x replicas workers (by default the issue's 1,000 workers with
10 replicas per stage: 100 one-layer stages), each with a claimed layer time, a load, an
observed pace for a third of them, and a round-trip map to ``--rtts`` replicas of the
stages before and after it, as node/pings.py announces. Times ``best_chain()`` (the whole
call: the routable view, every stage cost, the shortest path) and prints the median and
spread (min, p10, p90, max) of its wall and CPU time, and the CPU it ran on. A second line times the other shape of
1,000 workers, 10 stages x 100 replicas.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from p2pserve.bootstrap.registry import Registry
from p2pserve.net.records import WorkerRecord
from p2pserve.testing.machine import cpu_model


def swarm(stages: int, replicas: int, rtts: int, seed: int = 0) -> Registry:
    rng = random.Random(seed)
    ids = [[f"12D3KooW{s:03d}{i:03d}{'x' * 38}" for i in range(replicas)] for s in range(stages)]
    registry = Registry("m", "f", stages)
    expires = time.time() + 3600
    records = []
    for s in range(stages):
        for i in range(replicas):
            near = [q for t in (s - 1, s + 1) if 0 <= t < stages for q in ids[t]]
            record = WorkerRecord(
                peer_id=ids[s][i], addrs=[f"/ip4/10.0.{s}.{i}/tcp/4001"], model="m", fingerprint="f", stage=s,
                start=s, end=s + 1, tp=1, devices=[{"name": "gpu", "layer_time": rng.uniform(2e-4, 2e-3)}],
                group_id="", version="0", load={"sessions": rng.randrange(4), "queue": 0}, expires_at=expires,
                rtts={q: rng.uniform(1e-3, 0.1) for q in rng.sample(near, min(rtts, len(near)))})
            records.append(record)
            registry.update_from_dht(record)  # as read from the DHT: live until the record expires
    for record in records[::3]:  # some of them have been seen serving
        registry.observe([record], rng.uniform(2e-4, 4e-3))
    return registry


def timed(registry: Registry, repeat: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each call: on a shared machine the wall time includes the
    waits for a core, which the process's CPU time leaves out."""
    registry.best_chain()  # warm
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        chain = registry.best_chain()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert chain is not None and chain[-1].end == registry.n_layers
    return wall, cpu


def spread(times: list[float]) -> str:
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=10)
    return (f"median {statistics.median(ms):.2f} ms (min {ms[0]:.2f}, p10 {q[0]:.2f}, p90 {q[-1]:.2f}, "
            f"max {ms[-1]:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--rtts", type=int, default=20, help="round trips each worker announces")
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}; Python {platform.python_version()}")
    shapes = [(args.stages, args.replicas)]
    if (args.stages, args.replicas) == (100, 10):
        shapes.append((10, 100))
    for stages, replicas in shapes:
        registry = swarm(stages, replicas, args.rtts)
        label = f"{stages * replicas} workers, {stages} stages x {replicas} replicas, {args.rtts} RTTs each"
        wall, cpu = timed(registry, args.repeat)
        print(f"{label}, {args.repeat} runs of best_chain\n  wall {spread(wall)}\n  CPU  {spread(cpu)}", flush=True)


if __name__ == "__main__":
    main()
