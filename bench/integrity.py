"""What checking results costs: swarm throughput with spot checks off, at the default rate
and on every answer, and the admission probe's one-off cost, in the same run.

    python bench/integrity.py [--tokens 48] [--sessions 4] [--rounds 4] [--rates 0 0.05 1]

For each rate a bootstrap (--spot-check RATE) and three workers (stage 0 once, stage 1
twice: SmolLM2-135M, [1 1]/[15 15], the cores split between them) start through the CLI;
rounds of SESSIONS concurrent greedy queries measure aggregate decode tokens/s (bench/
load.py's steady figure). Ratios are to the rate-0 swarm of the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import PROMPTS, swarm_round  # noqa: E402
from p2pserve.engine.weights import open_weights  # noqa: E402
from p2pserve.testing.swarm import Swarm, client  # noqa: E402
from p2pserve.testing.machine import cpu_model  # noqa: E402


async def measure(rate: float, args, encoded) -> dict:
    with tempfile.TemporaryDirectory(prefix="p2pserve-bench-integrity.") as tmp, Swarm(Path(tmp)) as swarm:
        swarm.start_bootstrap("--pp-partition", "15", "15", "--spot-check", str(rate))
        threads = str(max(1, (os.cpu_count() or 1) // 3))
        swarm.start_worker("--stage", "0", "--threads", threads)
        swarm.start_worker("--stage", "1", "--threads", threads)
        async with client(swarm.addr) as c:
            await c.wait_chains(1)
            t0 = time.perf_counter()
            swarm.start_worker("--stage", "1", "--threads", threads)  # joins through the admission probe
            await c.wait_chains(2)
            admission = time.perf_counter() - t0
            await swarm_round(c, encoded[:2], 4)  # warm-up
            prompts = [encoded[i % len(encoded)] for i in range(args.sessions)]
            runs = [(await swarm_round(c, prompts, args.tokens))[0] for _ in range(args.rounds)]
            checks = (await c.status())["spot_checks"]
    runs = [r for r in runs if r is not None]
    return {"rate": rate, "runs": runs, "median": statistics.median(runs), "admission_s": admission,
            "checks": checks}


async def main(args):
    tok = open_weights(None).tokenizer()
    encoded = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    rows = []
    for rate in args.rates:
        rows.append(await measure(rate, args, encoded))
        r = rows[-1]
        print(f"  --spot-check {rate:g}: {r['median']:.1f} tok/s (runs {', '.join(f'{x:.1f}' for x in r['runs'])})",
              flush=True)
    base = rows[0]["median"]
    print(f"\n{cpu_model()}; {args.sessions} concurrent greedy queries of {args.tokens} tokens, "
          f"median of {args.rounds} rounds per swarm")
    print("spot-check rate | steady tok/s | x rate 0 | spread (min-max) | answers checked | admission of a replica (s)")
    for r in rows:
        checked = (r["checks"] or {}).get("checked", 0)
        print(f"{r['rate']:>15g} | {r['median']:12.1f} | {r['median'] / base:8.2f} | "
              f"{min(r['runs']):6.1f}-{max(r['runs']):<6.1f}   | {checked:>15} | {r['admission_s']:.1f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 1.0])
    trio.run(main, p.parse_args())
