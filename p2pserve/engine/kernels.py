"""Hand-written CPU matrix-vector products for decode steps (``gemv.cpp``).

A decode step multiplies one token's activations by every weight of the stage: it is
bound by how fast the weights stream from memory. ``gemv`` takes a dense fp32 or bf16
weight (bf16: X rounded to bf16, as a bf16 stage's activations are, and AVX-512 BF16's
``vdpbf16ps`` where the CPU has it),
``gemv_int8`` int8 rows with a scale per row or per group, ``gemv_int4`` 4-bit values in
GGUF's block order with a scale and minimum per group (fp16, or fp32 for a Q4_K's); rows
are split over torch's OpenMP threads and each weight row is read once for every
activation row. Torch's own kernels take bf16 activations and, for int8, stream far more
slowly on the CPU measured. ``gemv_int8`` and ``gemv_int4`` keep the file's scales exactly;
on AVX2 and AVX-512 they round the activations to 16-bit integers, a scale per group of
the weight's, and multiply in integers (``gemv.cpp``: ``QuantX``; AVX-512 VNNI's
``vpdpwssd`` where the CPU has it); the portable loops take them in fp32
(``python bench/engine.py`` shows what the kernels buy end to end; ``P2PSERVE_KERNELS=0``
turns them off to compare).

``decode_step`` runs a whole decode step of a stage's layers in one call (``decode_step.cpp``,
used by ``model.StageModel``): around these GEMVs, the norms, RoPE, the attention over each
sequence's cached positions and the gated MLP, instead of ~40 PyTorch ops a layer. It runs
fp32 stages (fp32, int8 or int4 weights) and bf16 ones (bf16 weights and KV cache, fp32
arithmetic in between).

``gemv`` (as a Python call) handles ``M <= MAX_ROWS`` activation rows; larger batches go to
oneDNN's GEMM (AMX or AVX-512 BF16 where the CPU has them). The quantized ones take any
number of rows: a weight row stays in L1 while every activation row passes over it; from
``GEMM_ROWS`` rows on (a prefill chunk) an int8 or int4 weight is dequantized for
oneDNN's GEMM instead (``quant.Int8Weight``, ``quant.Int4Weight``).

The extension is compiled on first use with the system C++ compiler for this CPU
(``-march=native``, cached by torch under ``~/.cache/torch_extensions`` under a name that
includes the source and the CPU's flags), so the loops it runs are the AVX-512, AVX2 or
portable ones of ``gemv.cpp`` as the CPU allows (``isa()``); it links against the OpenMP
runtime torch already loaded, so it shares torch's thread pool. Without a compiler or
ninja it is absent and ``available()`` says why.
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
# rows of X from which an int8 or int4 product (a prefill chunk's) dequantizes its weight for
# oneDNN's blocked GEMM instead of gemv_int8 / gemv_int4, whose cost grows with every row:
# int4 on a Zen 5 EPYC met it near 24 rows and the GEMM was 1.5x faster at 64, 2.3x at 256;
# int8 on a Zen 4 near 32, 1.6-2x from 128 on (a slower per-row loop, as on AVX2 CPUs,
# only moves the meeting point lower)
GEMM_ROWS = 32
# the dense weights ``gemv`` and ``DecodeStep`` take: activations are fp32 inside either
FLOAT_WEIGHTS = (torch.float32, torch.bfloat16)

# one translation unit: the threads the loops run on, the GEMVs, then the fused decode step
# and the bindings, which use them
SOURCE_FILES = ("team.cpp", "gemv.cpp", "decode_step.cpp")
_SOURCE = "\n".join((Path(__file__).parent / name).read_text() for name in SOURCE_FILES)

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
    try:
        _module = build("-march=native")
    except RuntimeError as e:
        _why_not = str(e)
        if shutil.which("c++") or shutil.which("g++"):
            log.warning("CPU decode kernel unavailable (%s); using torch's kernels", _why_not)


def build(arch_flag: str, source: str = _SOURCE):
    """Compile gemv.cpp for ``arch_flag`` (``-march=native``: the instructions of this CPU,
    which pick the source's AVX-512, AVX2 or portable loops), or raise RuntimeError why not.
    ``source``: another version of the unit (bench/kernels_ab.py builds a git revision's)."""
    bindir = os.path.dirname(sys.executable)  # pip's ninja lives beside python, maybe off PATH
    if os.path.exists(os.path.join(bindir, "ninja")) and not shutil.which("ninja"):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("ninja"):
        raise RuntimeError("no C++ compiler or ninja on PATH")
    from torch.utils.cpp_extension import load_inline

    key = source + arch_flag + _cpu_flags() + torch.__version__
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    try:
        return load_inline(
            f"p2pserve_gemv_{digest}", cpp_sources=source,
            extra_cflags=["-O3", arch_flag, "-fopenmp"], extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # a broken toolchain must not take the engine down
        raise RuntimeError(f"compiling it failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def module():
    """The compiled extension, or None (``why_not()`` says why)."""
    if _module is None and _why_not is None:
        with _lock:
            if _module is None and _why_not is None:
                _load()
    return _module


def available() -> bool:
    return module() is not None


def isa() -> str | None:
    """The instructions the built kernels use: "avx512", "avx2", "portable", or None unbuilt."""
    return module().isa() if available() else None


def vectorised() -> bool:
    """Whether ``gemv`` and ``DecodeStep`` are vectorised here: the portable loops are slower
    than oneDNN's."""
    return isa() in ("avx2", "avx512")


def why_not() -> str | None:
    module()
    return _why_not


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for ``x`` [..., in] with at most MAX_ROWS rows and ``w`` [out, in], fp32 or
    bf16; a bf16 ``w`` rounds ``x`` to bf16 (``gemv.cpp``) and sums in fp32. In x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    if w.dtype == torch.bfloat16:
        y = module().gemv_bf16(flat.float().contiguous(), w).to(x.dtype)
    else:
        y = module().gemv(flat.contiguous(), w)
    return y.view(*x.shape[:-1], w.shape[0])


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for fp32 ``x`` [..., in], any number of rows, int8 ``q`` [out, in] and fp32
    ``scales`` [out, groups]: ``W = q * scales`` per group of ``in / groups`` columns
    (``quant.Int8Weight``)."""
    y = module().gemv_int8(x.reshape(-1, x.shape[-1]).contiguous(), q, scales)
    return y.view(*x.shape[:-1], q.shape[0])


def decode_step(hidden: int, n_q: int, n_kv: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor):
    """An empty ``DecodeStep`` (``decode_step.cpp``) for a stage's layers, which ``add_layer``
    fills: one call runs a decode step through all of them (``forward``), or, for a TP rank,
    one half of a layer at a time (``attention``, ``mlp``), each returning what its residual
    adds. ``cos`` and ``sin`` are the stage's RoPE tables (``model.rope_tables``)."""
    return module().DecodeStep(hidden, n_q, n_kv, head_dim, cos, sin)


def linear_operand(w: torch.Tensor, scales: torch.Tensor | None = None, mins: torch.Tensor | None = None):
    """A linear weight for ``DecodeStep.add_layer``: fp32 or bf16 ``w`` [out, in], int8 ``w`` with
    ``scales`` (as ``gemv_int8``), or packed int4 with ``scales`` and ``mins`` (as ``gemv_int4``)."""
    return module().Linear(w, scales, mins)


def int8_split_layout(in_features: int, groups: int) -> bool:
    """Whether an int8 weight of ``in_features`` inputs in ``groups`` groups is multiplied
    here in ``gemv.cpp``'s split layout (``pack_int8``): AVX-512 VNNI's, for rows of whole
    32-value blocks in groups of a power of two or one group a row."""
    # a build of an earlier revision (bench/kernels_ab.py's) may not have the layout at all
    return available() and getattr(module(), "int8_splits", lambda in_features, groups: False)(in_features, groups)


def pack_int8(q: torch.Tensor, groups: int) -> torch.Tensor:
    """int8 ``q`` [out, in] in ``groups`` groups a row as ``gemv_int8`` multiplies it fastest
    (``int8_split_layout``): uint8, each value plus 128, in int4's order within 128 values."""
    return module().pack_int8(q.contiguous(), groups)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] of an int8 one (in either layout), ``q`` times its group's
    scale (as ``gemv_int8``)."""
    return module().dequantize_int8(q, scales)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] of an int4 one in the kernel's layout (as ``gemv_int4``)."""
    return module().dequantize_int4(packed, scales, mins)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for fp32 ``x`` [..., in], any number of rows, and an int4 weight in the
    kernel's layout (``quant.Int4Weight``): ``packed`` uint8 [out, in / 2], ``scales`` and
    ``mins`` [out, groups], both fp16 or both fp32, ``W = q * scale + min`` per group."""
    y = module().gemv_int4(x.reshape(-1, x.shape[-1]).contiguous(), packed, scales, mins)
    return y.view(*x.shape[:-1], packed.shape[0])
