"""A hand-written CPU matrix-vector product for decode steps.

A decode step multiplies one token's activations by every weight of the stage: it is
bound by how fast the weights stream from memory. On this project's reference machine
(2-core AMD EPYC) one core reads memory at ~31 GB/s, yet MKL's fp32 GEMV streams at
~15-20 GB/s on one core only and oneDNN's reaches ~26 GB/s; this kernel, rows split
over torch's OpenMP threads with two AVX2 FMA accumulators per row, streams at ~34 GB/s
(``python bench/engine.py`` shows what it buys end to end; ``P2PSERVE_KERNELS=0``
turns it off for comparison).

It handles ``M <= MAX_ROWS`` activation rows (a decode step of a few sequences) against
a dense ``[out, in]`` fp32 weight and reads each weight row once for all ``M`` rows.
Larger batches go to oneDNN's GEMM. bf16 stays with oneDNN: widening bf16 in this loop
measured 5% slower than oneDNN's packed bf16 GEMV.

The extension is compiled on first use with the system C++ compiler (``-march=native``,
cached by torch under ``~/.cache/torch_extensions`` under a name that includes the
source and the CPU's flags) and linked against the OpenMP runtime torch already
loaded, so it shares torch's thread pool. Without a compiler, ninja or AVX2 it is
simply absent and ``available()`` says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 4

_SOURCE = (Path(__file__).parent / "gemv.cpp").read_text()

_lock = threading.Lock()
_module = None
_why_not: str | None = None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _load():
    global _module, _why_not
    if os.environ.get("P2PSERVE_KERNELS", "1") == "0":
        _why_not = "turned off by P2PSERVE_KERNELS=0"
        return
    flags = _cpu_flags().split()
    if not {"avx2", "fma"} <= set(flags):
        _why_not = "the CPU lacks AVX2/FMA"
        return
    bindir = os.path.dirname(sys.executable)  # pip's ninja lives beside python, maybe off PATH
    if os.path.exists(os.path.join(bindir, "ninja")) and not shutil.which("ninja"):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("ninja"):
        _why_not = "no C++ compiler or ninja on PATH"
        return
    from torch.utils.cpp_extension import load_inline

    digest = hashlib.sha256((_SOURCE + " ".join(flags) + torch.__version__).encode()).hexdigest()[:12]
    try:
        _module = load_inline(
            f"p2pserve_gemv_{digest}", cpp_sources=_SOURCE, functions=["gemv", "gemv_int8"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # a broken toolchain must not take the engine down
        _why_not = f"compiling it failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        log.warning("CPU decode kernel unavailable (%s); using oneDNN", _why_not)


def module():
    """The compiled extension, or None (``why_not()`` says why)."""
    if _module is None and _why_not is None:
        with _lock:
            if _module is None and _why_not is None:
                _load()
    return _module


def available() -> bool:
    return module() is not None


def why_not() -> str | None:
    module()
    return _why_not


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for fp32 ``x`` [..., in] with at most MAX_ROWS rows, ``w`` fp32 [out, in]."""
    y = module().gemv(x.reshape(-1, x.shape[-1]).contiguous(), w)
    return y.view(*x.shape[:-1], w.shape[0])


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scales[:, None]).T`` for fp32 ``x`` with at most MAX_ROWS rows, int8 ``q``
    [out, in] and fp32 ``scales`` [out] (``quant.Int8Weight``)."""
    y = module().gemv_int8(x.reshape(-1, x.shape[-1]).contiguous(), q, scales)
    return y.view(*x.shape[:-1], q.shape[0])
