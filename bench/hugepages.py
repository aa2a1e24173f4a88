"""Do 2 MiB pages speed up a decode step? A paired test in one process.

    python bench/hugepages.py [--blocks 40] [--steps 10] [--dtype int8]

Loads SmolLM2's 30 layers twice, moves each copy's weights into one arena, madvised
MADV_HUGEPAGE for one copy and MADV_NOHUGEPAGE for the other, then times one-token decode
steps, alternating between the copies every ``--steps`` steps (the order flips each
block), so that both see the same machine. Prints each copy's median step and the ratio
4 KiB / huge (above 1: huge pages help), with the process's AnonHugePages as a check
that the kernel gave them. On the development machine: 1.005x and 1.007x, so p2pserve
leaves PyTorch's THP_MEM_ALLOC_ENABLE alone (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch

from p2pserve.engine.build import load_stage
from p2pserve.engine.model import Batch
from p2pserve.testing.machine import cpu_model
from p2pserve.engine.weights import open_weights
from p2pserve.ranks.pipeline import parse_dtype, weight_format

DTYPES = ["fp32", "bf16", "int8", "int4"]

HUGE = 2 << 20
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15


def into_arena(model: torch.nn.Module, advice: int) -> torch.Tensor:
    """Copy every distinct parameter and buffer (a quantized weight's values and scales) into
    one 2 MiB-aligned buffer madvised ``advice``."""
    tensors = [*model.parameters(), *model.buffers()]
    params = list({p.data_ptr(): p for p in tensors if p.numel()}.values())
    sizes = [(p.numel() * p.element_size() + 63) // 64 * 64 for p in params]
    total = (sum(sizes) + HUGE - 1) // HUGE * HUGE
    buf = torch.empty(total + HUGE, dtype=torch.uint8)
    base = (buf.data_ptr() + HUGE - 1) // HUGE * HUGE
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(base), ctypes.c_size_t(total), advice) != 0:
        raise SystemExit(f"madvise failed: {os.strerror(ctypes.get_errno())}")
    offset = base - buf.data_ptr()
    for p, size in zip(params, sizes):
        n = p.numel() * p.element_size()
        view = buf[offset : offset + n].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view
        offset += size
    return buf


def anon_huge_kib() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    source = open_weights(None)
    runners, arenas = {}, []
    for name, advice in (("huge", MADV_HUGEPAGE), ("4 KiB", MADV_NOHUGEPAGE)):
        model = load_stage(source, 0, source.config.n_layers, dtype=parse_dtype(args.dtype),
                           quant=weight_format(args.dtype))
        arenas.append(into_arena(model, advice))
        runners[name] = model
        runners[name].allocate(1, args.steps + 1)
    print(f"{cpu_model()}, {args.dtype}: AnonHugePages {anon_huge_kib() / 1024:.0f} MiB")
    x = torch.tensor([[1]])
    times = {name: [] for name in runners}
    with torch.inference_mode():
        for block in range(args.blocks):
            order = list(runners) if block % 2 else list(reversed(runners))
            for name in order:
                for i in range(args.steps):
                    t = time.perf_counter()
                    runners[name].forward(Batch((0,), (i,), 1), x)
                    if block >= 2:  # the first two blocks warm up
                        times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, m in med.items():
        print(f"{name:>6s} pages: median decode step {m * 1e3:.2f} ms over {len(times[name])} steps")
    print(f"4 KiB / huge = {med['4 KiB'] / med['huge']:.3f}x")


if __name__ == "__main__":
    main()
