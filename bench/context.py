"""One-stage decode at long contexts, against the floor of the bytes a step reads.

A decode step at position p reads every weight once and, in each layer, the keys and values
of the p positions before it: at a few thousand positions the KV cache is as many bytes as
a quantized model. This bench fills the cache of one stage holding the whole default model
(SmolLM2-135M) with random keys and values (a step's time does not depend on their values)
and times the decode step at each position, the real path (``StageModel.forward``: the fused
step, the head) with a greedy argmax after it. It prints, per dtype and position:

- ms per step, and its ratio to the same dtype's step at the first position (what the
  attention over the cache adds);
- the floor: read bandwidth (measured in the same run, the fastest of its measurements, as
  bench/engine.py measures it) / (weight bytes + KV bytes read at that position), and the
  step's fraction of it.

    python bench/context.py                      # fp32 bf16 int8 int4 at 1 .. 2000
    python bench/context.py --dtypes int4 --positions 1 1000 4000
    python bench/context.py --dtypes int4 --kv-dtypes auto bf16 fp16   # the cache in 16 bits
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch
from rich.console import Console
from rich.table import Table

from engine import BANDWIDTH_BYTES, CORES, DTYPES, Bandwidth, bytes_per_token
from p2pserve.engine.build import load_stage
from p2pserve.engine.model import Batch
from p2pserve.engine.weights import open_weights
from p2pserve.node.budget import kv_bytes_per_session
from p2pserve.ranks.pipeline import KV_DTYPES, parse_dtype, parse_kv_dtype, weight_format
from p2pserve.testing.machine import cpu_model


def fill_random(stage) -> None:
    """Every slot and position of the stage's KV cache random (an int8 cache's integers and
    its scales): a step reads them as it would a real context's."""
    for block in stage.blocks:
        cache = block.attn.cache
        for t in (cache.k, cache.v):
            if t.dtype == torch.int8:
                t.random_(-127, 128)
            else:
                t.normal_()
        for scales in (cache.k_scales, cache.v_scales):
            if scales is not None:
                scales.uniform_(0.01, 0.03)


def step_times(dtype: str, kv_dtype: str, positions: list[int], reps: int) -> dict[int, float]:
    """Median seconds of a decode step at each position, the positions interleaved by round."""
    source = open_weights(None)
    config = source.config
    stage = load_stage(source, 0, config.n_layers, dtype=parse_dtype(dtype), quant=weight_format(dtype),
                       kv_dtype=parse_kv_dtype(kv_dtype))
    stage.allocate(1, max(*positions, 9) + 1)  # room for the 8-token prefill and its step
    token = torch.tensor([[config.bos_token_id or 1]])
    times: dict[int, list[float]] = {p: [] for p in positions}
    with torch.inference_mode():
        stage.forward(Batch((0,), (0,), 8), torch.arange(1, 9)[None])  # a prefill, then the step is built
        stage.forward(Batch((0,), (8,), 1), token)
        fill_random(stage)
        for _ in range(reps):
            for p in positions:
                t0 = time.perf_counter()
                int(torch.argmax(stage.forward(Batch((0,), (p - 1,), 1), token)[0]))
                times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(ts) for p, ts in times.items()}


def kv_bytes(config, dtype: str, kv_dtype: str, position: int) -> int:
    """Keys and values a step at ``position`` reads: every cached position's and its own (a
    worker's budget of one session that long, an int8 cache's scales included)."""
    cache = parse_kv_dtype(kv_dtype) or parse_dtype(dtype)
    return kv_bytes_per_session(config, config.n_layers, 1, position, cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--positions", nargs="+", type=int, default=[1, 250, 500, 1000, 2000],
                        help="positions of the new token (1: an empty cache)")
    parser.add_argument("--kv-dtypes", nargs="+", default=["auto"], choices=list(KV_DTYPES),
                        help="the KV cache's dtypes, each with every --dtypes (auto: the activations')")
    parser.add_argument("--reps", type=int, default=30, help="steps timed per position")
    parser.add_argument("--threads", type=int, default=CORES)
    args = parser.parse_args()
    if min(args.positions) < 1:
        parser.error("positions start at 1")
    positions = sorted(set(args.positions))
    console = Console(width=130)
    torch.set_num_threads(args.threads)
    bandwidth = Bandwidth(args.threads)
    console.print(f"{cpu_model()}, {args.threads} threads; read bandwidth {bandwidth.read(reps=5) / 1e9:.1f} GB/s "
                  f"over {BANDWIDTH_BYTES >> 20} MiB")
    config = open_weights(None).config
    results = {}
    for dtype in args.dtypes:
        for kv_dtype in args.kv_dtypes:
            console.print(f"measuring {dtype}, KV cache {kv_dtype}…")
            results[dtype, kv_dtype] = step_times(dtype, kv_dtype, positions, args.reps)
            for p in positions:  # over a step's bytes, which may fit a cache (bench/engine.py)
                bandwidth.read(bytes_per_token(dtype) + kv_bytes(config, dtype, kv_dtype, p), 5)
    console.print("read bandwidth over each step's bytes, the fastest of the run, gives the floors below")
    table = Table(title=f"one-stage decode step by position, SmolLM2-135M, {cpu_model()}, {args.threads} threads")
    for col in ("dtype", "KV cache", "position", "ms/step", "vs first", "KV MB read", "floor ms", "of floor"):
        table.add_column(col, justify="left" if col in ("dtype", "KV cache") else "right")
    for (dtype, kv_dtype), times in results.items():
        weights = bytes_per_token(dtype)
        for p in positions:
            kv = kv_bytes(config, dtype, kv_dtype, p)
            floor = (weights + kv) / bandwidth.fastest[weights + kv]
            table.add_row(dtype, kv_dtype, str(p), f"{times[p] * 1e3:.2f}", f"{times[p] / times[positions[0]]:.2f}x",
                          f"{kv / 1e6:.1f}", f"{floor * 1e3:.2f}", f"{floor / times[p]:.0%}")
    console.print(table)
    console.print(f"(load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
