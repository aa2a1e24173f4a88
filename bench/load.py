"""Throughput under load, and failover recovery, on a real swarm on 127.0.0.1.

    python bench/load.py [--tokens 32] [--sessions 1 4 16] [--reps 2] [--threads N] [--no-failover]

Starts a bootstrap and three workers (stage 0 once, stage 1 twice: SmolLM2-135M,
[1 1]/[15 15]) through the CLI, then for each concurrency c sends c queries at once and
measures aggregate decode tokens/s (tokens after each answer's first, over the wall time
from the first token to the last). The baseline, measured in the same run, is
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

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pserve.client import ask  # noqa: E402
from p2pserve.sampling import SamplingParams  # noqa: E402
from p2pserve.weights import default_model_path, open_weights  # noqa: E402
from tests.reference import hf_model  # noqa: E402
from tests.swarm import Swarm, client  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
           "What is 2 + 2?", "Tell me a fun fact about cats.", "Who wrote Hamlet?"]


async def swarm_round(c, prompts: list[list[int]], n_tokens: int) -> float:
    """Aggregate decode tokens/s of len(prompts) concurrent queries."""
    firsts, lasts, counts = [], [], []

    async def one(ids):
        n, first, last = 0, None, None
        async for frame in ask(c.host, c.bootstrap_id, tokens=ids, params=SamplingParams(max_new_tokens=n_tokens),
                               stop_on_eos=False, timeout=300):
            if frame["type"] == "token":
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
        firsts.append(first)
        lasts.append(last)
        counts.append(n - 1)

    async with trio.open_nursery() as nursery:
        for ids in prompts:
            nursery.start_soon(one, ids)
    return sum(counts) / (max(lasts) - min(firsts))


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


async def main(args):
    tok = open_weights(None).tokenizer()
    encoded = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    torch.set_num_threads(os.cpu_count() or 1)
    model = hf_model(default_model_path())
    rows = []
    with Swarm(Path(tempfile.mkdtemp(prefix="p2pserve-bench-"))) as swarm:
        swarm.start_bootstrap("--pp-partition", "15", "15", "--policy", "latency")
        threads = str(args.threads or os.cpu_count() or 1)  # default every core per worker: stages take turns
        procs = [swarm.start_worker("--stage", s, "--threads", threads, wait=False) for s in ("0", "1", "1")]
        for p in procs:
            swarm.wait_serving(p)
        async with client(swarm.addr) as c:
            await c.wait_chains(2)
            await swarm_round(c, encoded[:2], 4)  # warm-up
            for n in args.sessions:
                prompts = [encoded[i % len(encoded)] for i in range(n)]
                sw = statistics.median([await swarm_round(c, prompts, args.tokens) for _ in range(args.reps)])
                hf = hf_round(model, prompts[: min(n, 4)], args.tokens)  # sequential: c does not matter
                rows.append((n, sw, hf))
                print(f"  measured {n:>2} sessions: swarm {sw:7.1f} tok/s   transformers {hf:6.1f} tok/s", flush=True)
            recovery = None if args.no_failover else await failover(swarm, c, encoded[0], 48)
    base_sw, base_hf = rows[0][1], rows[0][2]
    print("\nsessions | swarm tok/s | x 1-session | transformers tok/s | x 1-session | swarm / transformers")
    for n, sw, hf in rows:
        print(f"{n:>8} | {sw:11.1f} | {sw / base_sw:11.2f} | {hf:18.1f} | {hf / base_hf:11.2f} | {sw / hf:8.2f}")
    if recovery is not None:
        print(f"\nfailover: kill -9 of a stage-1 replica mid-answer, next token after {recovery} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-failover", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: all cores; 3 workers share this machine)")
    trio.run(main, p.parse_args())
