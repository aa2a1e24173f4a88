"""Why a CPU worker computes on its trio loop's own thread (node/compute.py).

    python bench/wakeup.py [--rounds 300]

A job on p2pserve's compute thread ends; how long until the trio task that awaited it
runs again? That hand-off happens twice per stage per decode token when a worker
computes on a second thread. The job either sleeps or spins for a while first, so the
loop's thread sleeps (blocked in epoll) that long before it is woken. On a VM whose idle
vCPUs halt (no guest halt-polling: /sys/module/haltpoll/parameters/guest_halt_poll_ns
is 0 on this project's CI machines), waking a thread that slept through a whole
forward pass costs far more than waking one that slept a moment: the ratio against the
0 ms row, measured in the same run, is the point.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pserve.node.compute import ComputeThread  # noqa: E402


async def wake_delays(compute: ComputeThread, seconds: float, spin: bool, rounds: int) -> list[float]:
    delays = []
    for _ in range(rounds):
        ended = []

        def job():
            if spin:  # a forward pass: the job's own core busy, the loop's idle
                t = time.perf_counter()
                while time.perf_counter() - t < seconds:
                    pass
            else:
                time.sleep(seconds)
            ended.append(time.perf_counter())

        await compute.run(job)
        delays.append(time.perf_counter() - ended[0])
    return delays


async def main(args) -> None:
    compute = ComputeThread()
    rows = []
    for spin in (False, True):
        for ms in (0, 1, 8):
            d = sorted(await wake_delays(compute, ms / 1000, spin, args.rounds))
            rows.append((f"{'busy' if spin else 'sleeping'} job of {ms} ms", statistics.median(d), d[int(0.9 * len(d))]))
    compute.close()
    base = rows[0][1]
    try:
        poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text().strip()
    except OSError:
        poll = "n/a"
    print(f"compute-thread job end -> awaiting trio task running again ({args.rounds} rounds; "
          f"guest_halt_poll_ns={poll})")
    for name, med, p90 in rows:
        print(f"  {name:24s} median {med * 1e6:6.0f} us   p90 {p90 * 1e6:6.0f} us   {med / base:5.1f}x the 0 ms job")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    trio.run(main, parser.parse_args())
