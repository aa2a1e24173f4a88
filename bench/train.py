"""Training throughput of heterogeneous layouts, every rank a process (as `p2pserve train`
runs them), against the single-process run and the planner's prediction, same run.

First the one-rank layout trains in this process (no torch.distributed): the
single-process figure. Then each layout trains the same steps on the same global batches
with one process per rank over gloo (``train.launch.run_processes``). Per layout the bench
prints tokens/s (median over the steps after the first, best of ``--rounds`` rounds
that each run every layout), its ratio to the single-process run, the planner's predicted tokens/s (``planner.train.predict``) and the
measured/predicted ratio, and the last loss, which must agree across layouts.

The prediction's devices are this machine's CPU as ``planner.measure`` measures it, its
FLOP/s and bytes/s split evenly among the ranks (they share the cores); ``--separate``
predicts as if every rank had a CPU of its own instead.

    .venv/bin/python bench/train.py [--model PATH] [--data FILE] [--seq-len 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import time

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve train)
import torch
from p2pserve.engine.weights import open_weights
from p2pserve.planner.devices import Device
from p2pserve.planner.measure import measure_device
from p2pserve.planner.train import predict
from p2pserve.ranks.world import default_threads
from p2pserve.train.comm import ThreadWorld
from p2pserve.train.data import TokenWindows
from p2pserve.train.launch import run_processes
from p2pserve.train.layout import make_layout
from p2pserve.train.model import TrainStage
from p2pserve.train.trainer import OptimConfig, RankTrainer

LAYOUTS = {  # name -> hetero_configs, layer_partitions (of 30 layers), batch sizes, chunks
    "one rank": ([[1]], [[30]], [4], [4]),
    "pp2": ([[1, 1]], [[15, 15]], [4], [4]),
    "dp2": ([[1], [1]], [[30], [30]], [2, 2], [2, 2]),
    "tp1+2 | tp3": ([[1, 2], [3]], [[12, 18], [30]], [2, 2], [2, 2]),
}


@dataclasses.dataclass(frozen=True)
class Job:
    model: str | None
    layout: object
    data: TokenWindows
    steps: int


def bench_rank(comm, job: Job):
    """One rank: its step times and losses."""
    stage = TrainStage.load(open_weights(job.model), job.layout.role(comm.rank), comm)
    trainer = RankTrainer(stage, job.layout, comm, job.data, OptimConfig(lr=1e-4), "1f1b")
    times, losses = [], []
    for _ in range(job.steps):
        t0 = time.perf_counter()
        losses.append(trainer.step())
        times.append(time.perf_counter() - t0)
    return times, losses


def median_step(times) -> float:
    return statistics.median(times[1:] or times)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="docs/ARCHITECTURE.md")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the single process and of every rank (default: as p2pserve train, "
                         "the cores shared by the ranks)")
    ap.add_argument("--separate", action="store_true", help="predict one CPU per rank")
    args = ap.parse_args()
    source = open_weights(args.model)
    data = TokenWindows.from_file(args.data, source.tokenizer(), args.seq_len, seed=0)
    cpu = measure_device("cpu", refresh=True).device_type()
    print(f"{cpu_name()}, {os.cpu_count()} cores; {source.config.name}, seq-len {args.seq_len}, "
          f"{args.steps} steps, best of {args.rounds} interleaved rounds, "
          f"{args.threads or 'cores / ranks'} torch threads; planner's CPU (measured now): "
          f"{cpu.flops / 1e9:.0f} GFLOP/s, {cpu.bandwidth / 1e9:.1f} GB/s", flush=True)

    one = make_layout(*LAYOUTS["one rank"])
    torch.set_num_threads(args.threads or default_threads(1))
    best: dict[str, float] = {}
    last_loss: dict[str, float] = {}
    for _ in range(args.rounds):  # others' load comes and goes: every layout in every round
        times, losses = ThreadWorld(1).run(lambda comm: bench_rank(comm, Job(args.model, one, data, args.steps)),
                                           timeout=None)[0]
        best["single process"] = max(best.get("single process", 0.0), one.global_batch * args.seq_len / median_step(times))
        last_loss["single process"] = losses[-1]
        for name, spec in LAYOUTS.items():
            layout = make_layout(*spec)
            results = run_processes(layout, source.config, bench_rank, Job(args.model, layout, data, args.steps),
                                    threads=args.threads or default_threads(layout.world_size))
            step_s = max(median_step(times) for times, _ in results.values())
            best[name] = max(best.get(name, 0.0), layout.global_batch * args.seq_len / step_s)
            last_loss[name] = results[0][1][-1]
    single = best["single process"]
    print(f"{'single process':14s} ranks 1  {single:7.1f} tokens/s  x1.00{'':37s}last loss "
          f"{last_loss['single process']:.8g}")
    for name, spec in LAYOUTS.items():
        layout = make_layout(*spec)
        share = 1 if args.separate else layout.world_size
        kind = dataclasses.replace(cpu, flops=cpu.flops / share, bandwidth=cpu.bandwidth / share)
        predicted = predict(source.config, layout, [Device(kind, "local", r) for r in range(layout.world_size)],
                            args.seq_len).tokens_per_s
        print(f"{name:14s} ranks {layout.world_size}  {best[name]:7.1f} tokens/s  x{best[name] / single:.2f}  "
              f"predicted {predicted:7.1f} tokens/s (x{best[name] / predicted:.2f})  last loss {last_loss[name]:.8g}")

if __name__ == "__main__":
    main()
