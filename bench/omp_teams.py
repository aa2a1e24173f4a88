"""Why a worker runs all its torch work on one thread (node/compute.py).

    python bench/omp_teams.py [--layers 15] [--steps 60]

Times a one-token decode step of SmolLM2's first `--layers` layers on this thread, then
again while a second thread that has run one parallel region (and so owns an OpenMP team)
is alive, then after that thread exits. libgomp stops spinning between parallel regions
when a process has more team threads than CPUs, so on a machine with few cores the
middle figure is the slow one. cpu/wall is the process's CPU time over wall time during
the steps: ~threads when the team spins, lower when it sleeps between regions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import p2pserve  # noqa: E402,F401  (sets GOMP_SPINCOUNT before torch loads)
import torch  # noqa: E402

from p2pserve.engine.build import load_stage  # noqa: E402
from p2pserve.engine.model import Batch  # noqa: E402
from p2pserve.engine.weights import open_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    runner = load_stage(open_weights(None), 0, args.layers)
    runner.allocate(1, 512)
    x = torch.tensor([[5]])

    def steps():
        walls, ratios = [], []
        with torch.inference_mode():
            for i in range(args.steps):
                t, c = time.perf_counter(), time.process_time()
                runner.forward(Batch((0,), (40 + i,), 1), x)
                walls.append(time.perf_counter() - t)
                ratios.append((time.process_time() - c) / walls[-1])
        return statistics.median(walls) * 1e3, statistics.median(ratios)

    rows = [("this thread only", steps())]
    stop = threading.Event()
    other = threading.Thread(target=lambda: (steps(), stop.wait()))
    other.start()
    time.sleep(1.0)
    rows.append(("while a second team lives", steps()))
    stop.set()
    other.join()
    time.sleep(0.5)
    rows.append(("after it exited", steps()))
    print(f"{args.layers}-layer decode step, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    base = rows[0][1][0]
    for name, (ms, ratio) in rows:
        print(f"  {name:28s} {ms:6.2f} ms  {ms / base:5.2f}x  cpu/wall {ratio:4.2f}")


if __name__ == "__main__":
    main()
