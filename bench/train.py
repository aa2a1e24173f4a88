"""Training throughput of heterogeneous layouts against the one-rank layout, same run.

Each layout trains the same steps on the same global batches; the bench prints its
tokens/s (median over the steps after the first), its ratio to the one-rank layout,
the ratio the template estimate predicts (``PipelineTemplate.time``: ranks as equal
devices), and the last loss of each, which must agree.

The ranks are threads of this process, so they share this machine's cores: the
prediction is what separate devices would give, the measurement what these cores give.

    .venv/bin/python bench/train.py [--model PATH] [--data FILE] [--seq-len 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve train)
from p2pserve.engine.weights import open_weights
from p2pserve.train.comm import ThreadWorld
from p2pserve.train.data import TokenWindows
from p2pserve.train.layout import make_layout
from p2pserve.train.model import TrainStage
from p2pserve.train.templates import PipelineTemplate
from p2pserve.train.trainer import OptimConfig, RankTrainer

LAYOUTS = {  # name -> hetero_configs, layer_partitions (of 30 layers), batch sizes, chunks
    "one rank": ([[1]], [[30]], [4], [4]),
    "pp2": ([[1, 1]], [[15, 15]], [4], [4]),
    "tp1+2 | tp3": ([[1, 2], [3]], [[12, 18], [30]], [2, 2], [2, 2]),
}


def predicted_time(layout) -> float:
    return max(PipelineTemplate(p.tps, p.layers).time(p.chunks) for p in layout.pipelines)


def measure(model, layout, data, steps):
    def rank(comm):
        stage = TrainStage.load(open_weights(model), layout.role(comm.rank), comm)
        trainer = RankTrainer(stage, layout, comm, data, OptimConfig(lr=1e-4), "1f1b")
        times, losses = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(trainer.step())
            times.append(time.perf_counter() - t0)
        return times, losses

    times, losses = ThreadWorld(layout.world_size).run(rank, timeout=None)[0]
    return statistics.median(times[1:] or times), losses[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="docs/ARCHITECTURE.md")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    source = open_weights(args.model)
    data = TokenWindows.from_file(args.data, source.tokenizer(), args.seq_len, seed=0)
    base = None
    for name, spec in LAYOUTS.items():
        layout = make_layout(*spec)
        layout.check_model(source.config)
        step_s, loss = measure(args.model, layout, data, args.steps)
        tokens_per_s = layout.global_batch * args.seq_len / step_s
        if base is None:
            base = (tokens_per_s, predicted_time(layout))
        print(f"{name:14s} ranks {layout.world_size}  {tokens_per_s:7.1f} tokens/s  "
              f"x{tokens_per_s / base[0]:.2f} measured  x{base[1] / predicted_time(layout):.2f} predicted  "
              f"last loss {loss:.8g}", flush=True)


if __name__ == "__main__":
    main()
