"""Throughput under load, and failover recovery, on a real swarm on 127.0.0.1.

    python bench/load.py [--tokens 64] [--sessions 1 4 16] [--reps 2] [--threads auto N ...] [--no-failover]

Starts a bootstrap and three workers (stage 0 once, stage 1 twice: SmolLM2-135M,
[1 1]/[15 15]) through the CLI, then for each concurrency c sends c queries at once and
measures aggregate decode tokens/s two ways: steady (the tokens that arrived while all c
answers were decoding, over that window: the throughput at c sessions) and span (tokens
after each answer's first, over the wall time from the first token to the last, which
also counts the ramp while the others prefill and the tail of stragglers). The baseline, measured in the same run, is
transformers generate() in one process answering the same c requests one after another.
Ratios are to the 1-session figure of the same system. Finally one stage-1 replica is
killed mid-answer and the recovery time (failure to next token) is printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pserve.net.client import ask  # noqa: E402
from p2pserve.engine.generate import SamplingParams  # noqa: E402
from p2pserve.engine.weights import default_model_path, open_weights  # noqa: E402
from p2pserve.testing.reference import hf_model  # noqa: E402
from p2pserve.testing.swarm import Swarm, client  # noqa: E402
from p2pserve.testing.machine import cpu_model  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
           "What is 2 + 2?", "Tell me a fun fact about cats.", "Who wrote Hamlet?"]


async def swarm_round(c, prompts: list[list[int]], n_tokens: int) -> tuple[float, float]:
    """Aggregate decode tokens/s of len(prompts) concurrent queries: (steady, span).

    steady: tokens that arrived while every query was decoding (from the last query's first
            token to the first query's last token), over that window: throughput *at* this
            concurrency, without the ramp (the others' prefills) and the tail (stragglers)
    span:   every token after each query's first, over the wall time from the first token
            to the last"""
    stamps: list[list[float]] = []

    async def one(ids):
        mine = []
        async for frame in ask(c.host, c.bootstrap_id, tokens=ids, params=SamplingParams(max_new_tokens=n_tokens),
                               stop_on_eos=False, timeout=300):
            if frame["type"] == "token":
                mine.append(time.perf_counter())
        stamps.append(mine)

    async with trio.open_nursery() as nursery:
        for ids in prompts:
            nursery.start_soon(one, ids)
    span = sum(len(s) - 1 for s in stamps) / (max(s[-1] for s in stamps) - min(s[0] for s in stamps))
    lo, hi = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if lo < t <= hi)
    if hi - lo < 0.5 or inside < 4 * len(prompts):  # too short to measure
        return None, span
    return inside / (hi - lo), span


def hf_round(model, prompts: list[list[int]], n_tokens: int) -> float:
    """transformers, one process, the same requests one after another: decode tokens/s."""
    decode_time, decoded = 0.0, 0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(x, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
            t2 = time.perf_counter()
            decode_time += (t2 - t1) - (t1 - t0)
            decoded += n_tokens - 1
    return decoded / decode_time


async def failover(swarm: Swarm, c, ids, n_tokens: int) -> list[float]:
    killed = []
    async for frame in ask(c.host, c.bootstrap_id, tokens=ids, params=SamplingParams(max_new_tokens=n_tokens),
                           stop_on_eos=False, timeout=300):
        if frame["type"] == "route" and not killed:
            route = frame["chain"]
        if frame["type"] == "token" and not killed and frame.get("text") is not None:
            killed.append(route[1])
            swarm.signal(swarm.proc_of(route[1]), signal.SIGKILL)
        if frame["type"] == "done":
            return frame["recovery_s"]
    return []


async def measure(args, threads: str, encoded, model, hf_cache: dict) -> tuple[list, list | None]:
    """One swarm whose workers run ``threads`` torch threads per rank ("auto": their own
    share of the machine, ranks/cores.py): its rows (sessions, steady, span, transformers)
    and its failover recovery."""
    rows, recovery = [], None
    with tempfile.TemporaryDirectory(prefix="p2pserve-bench-load.") as tmp, Swarm(Path(tmp)) as swarm:
        swarm.start_bootstrap("--pp-partition", "15", "15", "--policy", "latency")
        # the three workers compute at once under load
        procs = [swarm.start_worker("--stage", s, threads=None if threads == "auto" else int(threads), wait=False)
                 for s in ("0", "1", "1")]
        for p in procs:
            swarm.wait_serving(p)
        async with client(swarm.addr) as c:
            await c.wait_chains(2)
            await swarm_round(c, encoded[:2], 4)  # warm-up
            for n in args.sessions:
                prompts = [encoded[i % len(encoded)] for i in range(n)]
                runs = [await swarm_round(c, prompts, args.tokens) for _ in range(args.reps)]
                if any(r[0] is None for r in runs):
                    sys.exit(f"{n} queries of {args.tokens} tokens decoded together for under 0.5 s: raise --tokens")
                sw = statistics.median(r[0] for r in runs)
                span = statistics.median(r[1] for r in runs)
                if n not in hf_cache:  # sequential: c does not matter, and neither do the workers' threads
                    hf_cache[n] = hf_round(model, prompts[: min(n, 4)], args.tokens)
                rows.append((n, sw, span, hf_cache[n]))
                print(f"  threads {threads}, {n:>2} sessions: swarm {sw:7.1f} tok/s (span {span:6.1f})   "
                      f"transformers {hf_cache[n]:6.1f} tok/s", flush=True)
            if not args.no_failover:
                recovery = await failover(swarm, c, encoded[0], 48)
    return rows, recovery


async def main(args):
    tok = open_weights(None).tokenizer()
    encoded = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    torch.set_num_threads(os.cpu_count() or 1)
    model = hf_model(default_model_path())
    hf_cache: dict[int, float] = {}
    results = {threads: await measure(args, threads, encoded, model, hf_cache) for threads in args.threads}
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; {args.tokens} tokens per query, median of {args.reps}")
    print("swarm tok/s: steady = while all c queries decode at once; span = first token to last "
          "(includes the others' prefills and the stragglers' tail); threads: per rank of each of the "
          "3 workers, 'auto' = the workers' own share of the machine")
    print("threads | sessions | steady tok/s | x 1-session | span tok/s | x 1-session | transformers tok/s "
          "| steady / transformers")
    for threads, (rows, _) in results.items():
        base_sw, base_span = rows[0][1], rows[0][2]
        for n, sw, span, hf in rows:
            print(f"{threads:>7} | {n:>8} | {sw:12.1f} | {sw / base_sw:11.2f} | {span:10.1f} | "
                  f"{span / base_span:11.2f} | {hf:18.1f} | {sw / hf:8.2f}")
    first = args.threads[0]
    for threads in args.threads[1:]:
        ratios = ", ".join(f"{n}: {sw / ref[1]:.2f}x" for (n, sw, *_), ref in zip(results[threads][0], results[first][0]))
        print(f"threads {threads} against threads {first}, steady tok/s by sessions: {ratios}")
    for threads, (rows, recovery) in results.items():
        n, sw = rows[-1][0], rows[-1][1]
        print(f"threads {threads}: at {n} sessions {sw / rows[0][1]:.2f}x one session's throughput (steady; "
              f"target 4x at 16: {'met' if n >= 16 and sw / rows[0][1] >= 4 else 'NOT met'})"
              + (f"; failover: kill -9 of a stage-1 replica mid-answer, next token after {recovery} s"
                 if recovery is not None else ""))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-failover", action="store_true")
    p.add_argument("--threads", nargs="+", default=["auto"],
                   help="torch threads per worker rank, one swarm each: 'auto' (the workers divide the "
                        "machine's cores themselves) or a number; e.g. --threads auto 2 1")
    trio.run(main, p.parse_args())
