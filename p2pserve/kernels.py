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

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 4

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Y[m, o] = sum_i X[m, i] * W[o, i] for rows o in [o0, o1); X fp32 [M, in], Y fp32 [M, out].
template <int M>
static void rows(const float* X, const float* W, float* Y, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* w = W + o * in;
    __m256 a0[M], a1[M];
    for (int m = 0; m < M; ++m) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
      __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * in + i), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * in + i + 8), a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm256_add_ps(a0[m], a1[m]));
      for (int64_t j = i; j < in; ++j) s += X[m * in + j] * w[j];
      Y[m * out + o] = s;
    }
  }
}

static void run(const float* X, const float* W, float* Y, int64_t M, int64_t in, int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: rows<1>(X, W, Y, in, out, b, e); break;
      case 2: rows<2>(X, W, Y, in, out, b, e); break;
      case 3: rows<3>(X, W, Y, in, out, b, e); break;
      default: rows<4>(X, W, Y, in, out, b, e); break;
    }
  });
}

// x [M, in] fp32 contiguous, w [out, in] fp32 contiguous -> [M, out] fp32
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: [M, in] fp32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) && w.scalar_type() == at::kFloat,
              "w: [out, in] fp32");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 4, "1 to 4 rows");
  const int64_t M = x.size(0), in = w.size(1), out = w.size(0);
  auto y = torch::empty({M, out}, x.options());
  run(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, in, out);
  return y;
}
"""

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
            f"p2pserve_gemv_{digest}", cpp_sources=_SOURCE, functions=["gemv"],
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
