"""A change to the CPU kernels against a git revision's, alternating in one process.

A decode step's time moves by 20-40% from run to run on shared cores, more than most kernel
changes gain, so two runs of bench/engine.py compare the neighbours, not the builds. This
bench compiles this tree's gemv.cpp and decode_step.cpp and a revision's (HEAD by default)
into two extensions, loads one stage of the default model (SmolLM2-135M) for each (its
weights in the layouts that build reads), builds a fused decode step with each, checks
they compute the same logits, and then times the two in alternation (``--steps`` steps
of one, then of the other, ``--rounds`` times), the real path (``StageModel.forward``: the
fused step, the head, a greedy argmax). It prints each build's
median ms per step and the tree's speed against the revision's: an A/A run (``--rev`` of
this tree's own commit, nothing changed) shows the harness's own noise, about 1%.

    python bench/kernels_ab.py                          # int4 int8 against HEAD
    python bench/kernels_ab.py --rev f1a7d71 --dtypes int4 bf16 --rounds 20
    python bench/kernels_ab.py --arch=-march=haswell    # both builds' AVX2 loops, on this CPU
    python bench/kernels_ab.py --position 2000          # the attention over 2000 cached positions

``--arch`` builds both for another instruction set than this CPU's own (one it can run): the
loops of an AVX2-only CPU, timed on this one, move with a change as they would there, as
far as this core runs AVX2 as that one would.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch

from context import fill_random
from engine import CORES, DTYPES
from p2pserve.cli.options import KV_DTYPE_NAMES
from p2pserve.engine import kernels
from p2pserve.engine.build import load_stage
from p2pserve.engine.model import Batch
from p2pserve.engine.weights import open_weights
from p2pserve.ranks.pipeline import parse_dtype, parse_kv_dtype, weight_format
from p2pserve.testing.machine import cpu_model

ENGINE = Path(kernels.__file__).parent


def revision_source(rev: str) -> str:
    """The kernels' translation unit as ``rev`` has it (as kernels.py joins it)."""
    def show(name: str) -> str:
        path = (ENGINE / name).relative_to(ENGINE.parent.parent)
        if subprocess.run(["git", "cat-file", "-e", f"{rev}:{path}"], cwd=ENGINE, capture_output=True).returncode:
            return ""  # a file the revision does not have yet
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ENGINE, check=True,
                              capture_output=True, text=True).stdout
    source = "\n".join(show(name) for name in kernels.SOURCE_FILES)
    if not source.strip():
        raise SystemExit(f"no kernel sources at {rev}")
    return source


@contextmanager
def kernels_of(module):
    """kernels.py serving ``module``'s functions while a decode step is built with them."""
    saved, kernels._module = kernels._module, module
    try:
        yield
    finally:
        kernels._module = saved


def step_times(dtype: str, builds: dict, rounds: int, steps: int, position: int,
               kv_dtype: str = "auto") -> dict[str, float]:
    """Median seconds of a decode step at ``position`` with each build's fused step,
    interleaved by round. Each build has a stage of its own, loaded while its functions
    serve kernels.py: a weight is stored in the layout that build multiplies (int8's split
    layout, say, where one build has it), and both stages' caches hold the same values."""
    source = open_weights(None)
    token = torch.tensor([[source.config.bos_token_id or 1]])
    batch = Batch((0,), (position,), 1)
    stages, logits = {}, {}
    with torch.inference_mode():
        for name, module in builds.items():
            with kernels_of(module):
                stage = load_stage(source, 0, source.config.n_layers, dtype=parse_dtype(dtype),
                                   quant=weight_format(dtype), kv_dtype=parse_kv_dtype(kv_dtype))
                stage.allocate(1, position + 1)
                torch.manual_seed(0)
                fill_random(stage)  # positions 8.. as bench/context.py fills them
                stage.forward(Batch((0,), (0,), 8), torch.arange(1, 9)[None])  # a prefill for the step to read
                logits[name] = stage.forward(batch, token).float()  # builds the fused step
            stages[name] = stage
        first, *others = logits.values()
        for other in others:  # the same arithmetic, up to the order of float sums
            torch.testing.assert_close(other, first, rtol=0, atol=1e-3 * first.abs().max().item())
        gc.collect()
        gc.freeze()  # as a serving worker does: no full collection inside the timed steps
        times: dict[str, list[float]] = {name: [] for name in builds}
        for _ in range(rounds):
            for name, stage in stages.items():
                for _ in range(steps):
                    t0 = time.perf_counter()
                    int(torch.argmax(stage.forward(batch, token)[0]))
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="the git revision to compare against (default HEAD)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["int4", "int8"])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20, help="steps of one build before the other's")
    parser.add_argument("--threads", type=int, default=CORES)
    parser.add_argument("--arch", default="-march=native", help="the compiler's -march for both builds")
    parser.add_argument("--position", type=int, default=9,
                        help="the step's position: the cached keys and values its attention reads (default 9)")
    parser.add_argument("--kv-dtype", default="auto", choices=KV_DTYPE_NAMES,
                        help="the KV cache's dtype (default auto: the activations')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"no CPU kernels: {kernels.why_not()}")
    tree = kernels.module() if args.arch == "-march=native" else kernels.build(args.arch)
    builds = {args.rev: kernels.build(args.arch, revision_source(args.rev)), "tree": tree}
    print(f"{cpu_model()}, {args.threads} threads, kernels {tree.isa()} ({args.arch}); {args.rounds} rounds of "
          f"{args.steps} steps a build, at position {args.position}, KV cache {args.kv_dtype}")
    for dtype in args.dtypes:
        medians = step_times(dtype, builds, args.rounds, args.steps, args.position, args.kv_dtype)
        print(f"{dtype}: {args.rev} {medians[args.rev] * 1e3:.3f} ms/step, tree {medians['tree'] * 1e3:.3f} "
              f"ms/step: the tree {medians[args.rev] / medians['tree']:.3f}x the speed of {args.rev}")


if __name__ == "__main__":
    main()
