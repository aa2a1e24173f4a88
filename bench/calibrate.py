"""The planner's cost model against this machine: predicted vs measured, from measured device figures.

    python bench/calibrate.py [--tokens 64] [--reps 3] [--threads N]

For SmolLM2-135M-Instruct in fp32 on CPU, two systems:

  run     `p2pserve run` with one stage (--hetero-config 1 --pp-partition 30): a
          LocalPipeline in this process
  swarm   a bootstrap and two workers (--hetero-config 1 1 --pp-partition 15 15) started
          through the CLI on 127.0.0.1, asked by an in-process libp2p client

Each round re-measures the device (``measure_device(refresh=True)``: the figures the
workers announce, medians of steps through the engine's own layers, so the load of other
processes shows in them as it does in the answers), then times one answer of ``--tokens`` greedy tokens (no stop on EOS) on
each system, and on the swarm two answers at once. Rounds interleave so that load from
other processes falls on all alike. The cost model (``p2pserve.planner``) predicts each
round from the device figures measured just before it; the measured values are

  per-token latency  an answer's decode time over its tokens after the first
  throughput         tokens per second of decode: one session, and on the swarm two
                     sessions at once (both answers' tokens over the span they overlap)
  TTFT               from the request to the first token

and the table prints the median prediction, the median measurement and the median of the
rounds' predicted / measured (1.00 is exact; the target is within 25%).
The two workers of the swarm share this machine's cores, which the cost model cannot
know from their records: the two-session figure is predicted both as the model sees it
(two machines) and with the stages' compute serialised on one machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch
import trio

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"
SWARM_PLAN = ([1, 1], [15, 15])
TARGET = 0.25


# --- measuring -----------------------------------------------------------------------------------


def time_local(pipe, ids, params) -> dict:
    stamps = []
    t0 = time.perf_counter()
    for item in pipe.stream(ids, params, stop_on_eos=False):
        if isinstance(item, int):
            stamps.append(time.perf_counter())
    return _figures(t0, stamps)


async def time_swarm(c, ids, params) -> dict:
    from p2pserve.net.client import ask

    stamps = []
    t0 = time.perf_counter()
    async for frame in ask(c.host, c.bootstrap_id, tokens=ids, params=params, stop_on_eos=False):
        if frame["type"] == "token":
            stamps.append(time.perf_counter())
    return _figures(t0, stamps)


async def time_swarm_together(c, ids, params, n: int) -> float:
    """Tokens per second of ``n`` answers at once, over the span where all of them decode."""
    from p2pserve.net.client import QueryError, ask

    stamps: list[list[float]] = [[] for _ in range(n)]
    failed: list[QueryError] = []

    async def one(i):
        try:
            async for frame in ask(c.host, c.bootstrap_id, tokens=ids, params=params, stop_on_eos=False):
                if frame["type"] == "token":
                    stamps[i].append(time.perf_counter())
        except QueryError as e:
            failed.append(e)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    if failed:
        raise failed[0]
    start, end = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    return sum(sum(1 for t in s if start < t <= end) for s in stamps) / (end - start)


def _figures(t0: float, stamps: list[float]) -> dict:
    latency = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {"ttft": stamps[0] - t0, "latency": latency, "throughput": 1 / latency}


async def measure(args, addr, pipe, ids):
    from p2pserve.net.client import QueryError
    from p2pserve.node.compute import compute_thread
    from p2pserve.planner import measure_device
    from p2pserve.engine.generate import SamplingParams
    from p2pserve.testing.swarm import client

    params = SamplingParams(max_new_tokens=args.tokens)
    speeds, run, swarm, together = [], [], [], []
    async with client(addr) as c:
        await c.wait_chains(1, timeout=60)
        compute = compute_thread()  # one thread for this process's torch work (node/compute.py)
        await compute.run(partial(time_local, pipe, ids, params))  # warm-up: allocations, streams
        await time_swarm(c, ids, params)
        systems = [lambda: compute.run(partial(time_local, pipe, ids, params)),
                   lambda: time_swarm(c, ids, params),
                   lambda: time_swarm_together(c, ids, params, 2)]
        for rep in range(args.reps):
            for attempt in range(3):
                speed = await compute.run(lambda: measure_device("cpu", refresh=True))
                results = {}
                try:
                    for i in list(range(3))[rep % 3:] + list(range(3))[: rep % 3]:
                        results[i] = await systems[i]()
                    break
                except QueryError as e:  # a loaded machine can starve a worker's heartbeats
                    print(f"  round {rep + 1}: {e}; once the swarm is whole again, the round restarts",
                          file=sys.stderr, flush=True)
                    await c.wait_chains(1, timeout=60)
            else:
                sys.exit("the swarm failed three times in one round")
            speeds.append(speed)
            run.append(results[0])
            swarm.append(results[1])
            together.append(results[2])
            print(f"  round {rep + 1}/{args.reps}: {speeds[-1].bandwidth / 1e9:.1f} GB/s, "
                  f"{speeds[-1].layer_overhead * 1e6:.0f} us/layer, "
                  f"run {run[-1]['latency'] * 1e3:.1f} ms/token, swarm {swarm[-1]['latency'] * 1e3:.1f} ms/token, "
                  f"2 sessions {together[-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    return speeds, run, swarm, together


# --- predicting ----------------------------------------------------------------------------------


def predict(speed, config, n_prompt: int, tokens: int):
    """Predicted figures for the run (one stage) and the swarm (two, each worker its own machine)."""
    from p2pserve.planner import Workload, evaluate_plan
    from p2pserve.planner.cost import dtype_named
    from p2pserve.planner.devices import Device, Group
    from p2pserve.planner.swarm import SWARM

    kind = speed.device_type()
    fp32 = dtype_named("fp32")

    def plan(layers, sessions):
        stages = [(Group((Device(kind, f"worker{i}", i),)), n) for i, n in enumerate(layers)]
        return evaluate_plan(config, fp32, [stages], Workload(n_prompt, tokens, sessions), SWARM)

    run, swarm, together = plan([30], 1), plan(SWARM_PLAN[1], 1), plan(SWARM_PLAN[1], 2)
    # On one machine the stages' compute cannot overlap: a period serves both micro-batches
    # through both stages in turn, while the hops may overlap with compute.
    compute = sum(s.decode_time for s in swarm.pipelines[0].stages)
    hops = swarm.token_latency - compute
    shared = 2 / max(2 * compute, compute + hops)
    return run, swarm, together, shared


# --- the report ----------------------------------------------------------------------------------

METRICS = [
    ("run 30: per-token latency, ms", lambda p: p[0].token_latency * 1e3, lambda m: m[0]["latency"] * 1e3),
    ("run 30: throughput, tokens/s", lambda p: p[0].throughput, lambda m: m[0]["throughput"]),
    ("swarm 15+15: per-token latency, ms", lambda p: p[1].token_latency * 1e3, lambda m: m[1]["latency"] * 1e3),
    ("swarm 15+15: throughput 1 session, tokens/s", lambda p: p[1].throughput, lambda m: m[1]["throughput"]),
    ("swarm 15+15: throughput 2 sessions, tokens/s", lambda p: p[2].throughput, lambda m: m[2]),
    ("  same, stages sharing one machine's cores", lambda p: p[3], lambda m: m[2]),
    ("run 30: time to first token, ms", lambda p: p[0].ttft * 1e3, lambda m: m[0]["ttft"] * 1e3),
    ("swarm 15+15: time to first token, ms", lambda p: p[1].ttft * 1e3, lambda m: m[1]["ttft"] * 1e3),
]


def report(args, speeds, predicted, measured, n_prompt) -> None:
    """Per metric: the median prediction, the median measurement, and the median of the
    rounds' ratios (each round predicted from the device figures measured just before it)."""
    med = statistics.median
    print(f"SmolLM2-135M-Instruct fp32 on CPU; prompt {n_prompt} tokens, {args.tokens} greedy tokens; "
          f"{args.reps} interleaved rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads")
    print(f"device ({speeds[0].name}), median of {len(speeds)} measurements: prefill "
          f"{med(s.flops for s in speeds) / 1e9:.1f} GFLOP/s, weights streamed at "
          f"{med(s.bandwidth for s in speeds) / 1e9:.2f} GB/s, {med(s.layer_overhead for s in speeds) * 1e6:.0f} us "
          f"per layer beyond bytes")
    print(f"{'':46s} {'predicted':>10s} {'measured':>10s} {'pred/meas':>10s}  rounds' pred/meas")
    for label, pred, meas in METRICS:
        ratios = sorted(pred(p) / meas(m) for p, m in zip(predicted, measured))
        ratio = med(ratios)
        flag = "" if abs(ratio - 1) <= TARGET else f"  off by more than {TARGET:.0%}"
        print(f"{label:46s} {med(pred(p) for p in predicted):10.2f} {med(meas(m) for m in measured):10.2f} "
              f"{ratio:10.2f}  {ratios[0]:.2f}-{ratios[-1]:.2f}{flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every process (default: torch's own choice, all cores)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the bootstrap's and workers' torch
        torch.set_num_threads(args.threads)

    from p2pserve.net.host import quiet_libp2p_logs
    from p2pserve.ranks.pipeline import LocalPipeline
    from p2pserve.plan import Plan
    from p2pserve.engine.weights import open_weights
    from p2pserve.testing.swarm import Swarm

    quiet_libp2p_logs()
    source = open_weights(None)
    ids = source.tokenizer().encode_chat([{"role": "user", "content": PROMPT}])
    with tempfile.TemporaryDirectory(prefix="p2pserve-calibrate.") as tmp, Swarm(Path(tmp)) as swarm:
        print("starting a bootstrap, 2 workers and a local pipeline…", file=sys.stderr, flush=True)
        flags = ["--hetero-config", *map(str, SWARM_PLAN[0]), "--pp-partition", *map(str, SWARM_PLAN[1])]
        swarm.start_bootstrap(*flags)
        swarm.start_worker("--stage", "0")
        swarm.start_worker("--stage", "1")
        from p2pserve.node.compute import compute_thread

        # built (and later timed) on the one compute thread: no second OpenMP team here
        with compute_thread().call(lambda: LocalPipeline(None, Plan([1], [source.config.n_layers]),
                                                         threads=torch.get_num_threads())) as pipe:
            speeds, *measured = trio.run(measure, args, swarm.addr, pipe, ids)
    predicted = [predict(speed, source.config, len(ids), args.tokens) for speed in speeds]
    report(args, speeds, predicted, list(zip(*measured)), len(ids))


if __name__ == "__main__":
    main()
