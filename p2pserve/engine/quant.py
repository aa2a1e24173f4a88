"""Weight-only quantized linear weights: int8 with a scale per output channel (or per
group of 32 input columns, a GGUF's Q8_0 as stored), int4 with a scale and a minimum per
group of input columns.

A decode step streams every weight once, so reading a quarter (int8) or an eighth (int4)
of fp32's bytes is what makes it faster; activations, norms, attention and the KV cache
stay in the stage's own dtype. On a CPU where ``kernels`` is built, the products are its
hand-written ones (``gemv_int8`` and ``gemv_int4`` for decode steps and short prefills;
a longer prefill chunk multiplies the weight dequantized, by oneDNN's GEMM:
``kernels.GEMM_ROWS``), fp32 activations throughout (which the AVX2 loops round to
16-bit integers inside the product: ``kernels``). Elsewhere they are torch's own kernels:
``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` on CPU (their vectorised paths
take bfloat16 activations only, so the input is cast to bfloat16 and the output back),
``_weight_int4pack_mm`` on CUDA, and a dequantize-then-multiply for int8 on CUDA.

A weight is quantized where it is loaded, one rank's slice at a time, so a stage never
holds more than one fp32 tensor on its way to its packed form (``build.load_stage``), and
a GGUF's Q8_0, Q4_0, Q4_1 and Q4_K blocks are taken as stored (``pack_parts``).
``roundtrip`` gives the fp32 weight a packed one computes with, for references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from p2pserve.engine import kernels
from p2pserve.engine.model import linear as dense_linear

FORMATS = ("int8", "int4")
# int4 groups along the input dimension: the largest that divides it (fewer scales to read)
INT4_GROUPS = (128, 64, 32)
# torch's int4 packing wants output rows in multiples of this
INT4_ROW_MULTIPLE = 16
# what torch's CPU kernels' fast paths multiply in, and what their scales are stored as
KERNEL_DTYPE = torch.bfloat16
# values per int4 block in the kernel layout (and a GGUF's Q4_0 / Q4_1 block)
INT4_BLOCK = 32


class Int8Weight(nn.Module):
    """``[out, in]`` int8 values and a scale per output row, or per group of input columns
    (a GGUF's Q8_0 blocks, kept as stored): ``W = q * scale``. On a CPU whose kernels take
    it (``kernels.int8_split_layout``: AVX-512 VNNI), ``q`` is kept in their split layout
    (uint8, ``kernels.pack_int8``), which only they and ``dequantize`` read."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group: int | None = None):
        """``scales`` [out] (one per row: bf16-rounded by ``quantize_int8``, so torch's kernel,
        which takes bf16, multiplies by the same weight), or [out, in / group] for groups."""
        super().__init__()
        self.group = group
        # [out, groups] fp32, what kernels.gemv_int8 takes
        self.register_buffer("scales", scales.float().reshape(q.shape[0], -1).contiguous())
        self.for_kernel = q.is_cpu and kernels.int8_split_layout(q.shape[1], self.scales.shape[1])
        self.register_buffer("q", kernels.pack_int8(q, self.scales.shape[1]) if self.for_kernel else q.contiguous())

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def grouped(self) -> bool:
        """Scales per group (even one group, a slice of a Q8_0 row): fp16 values, not bf16."""
        return self.group is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the hand-written kernel streams int8 rows faster than torch's kernel on the CPUs
        # measured; a prefill chunk multiplies the dequantized weight by oneDNN's blocked
        # GEMM instead, as int4's does (on a Zen 4 EPYC, 2 threads, the two meet near 32 rows
        # and the GEMM is 1.6-2x faster from 128 on, dequantizing included; torch's int8
        # kernel, which rounds the activations to bf16, is slower than either there)
        if x.is_cpu and x.dtype == torch.float32 and kernels.available():
            if x.numel() >= kernels.GEMM_ROWS * x.shape[-1]:
                return dense_linear(x, self.dequantize())
            return kernels.gemv_int8(x, self.q, self.scales)
        if self.for_kernel:  # the split layout, for activations the kernels do not take
            return F.linear(x, self.dequantize().to(x.dtype))
        if x.is_cpu and not self.grouped:
            flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scales[:, 0].to(KERNEL_DTYPE))
            return y.to(x.dtype).view(*x.shape[:-1], self.q.shape[0])
        if not self.grouped:
            return F.linear(x, self.q.to(x.dtype)) * self.scales[:, 0].to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight this module multiplies by."""
        if self.q.is_cpu and kernels.available():
            return kernels.dequantize_int8(self.q, self.scales)
        return dequantize_int8(self.q, self.scales)

    def kernel_operands(self) -> tuple | None:
        """``(q, scales, None)`` for ``kernels.Linear``, or None off the CPU."""
        return (self.q, self.scales, None) if self.q.is_cpu else None


class Int4Weight(nn.Module):
    """``[out, in]`` 4-bit values ``q`` in 0..15 and per group of ``group`` input columns a
    scale and a minimum: ``W = q * scale + min`` (GGUF's Q4_1; Q4_0 is ``min = -8 * scale``).

    Two layouts, chosen where the weight is made: on a CPU with ``kernels`` built, blocks
    of 32 values in 16 bytes as a GGUF's Q4_0 stores them, with fp16 scales and minima, or
    fp32 ones where fp16 would round them (a Q4_K's ``d * sc``: 24 bytes per 32 values to
    read instead of 20, for the file's weights exactly), for ``kernels.gemv_int4`` (a
    prefill chunk of ``kernels.GEMM_ROWS`` rows or more: its weight dequantized to fp32
    for oneDNN's GEMM, as the chunk passes); elsewhere torch's packing for
    ``_weight_int4pack_mm`` (CUDA) or ``_weight_int4pack_mm_for_cpu``, whose bf16 scales
    and offsets round the file's."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int):
        """``q`` integers [out, in] in 0..15 (uint8); ``scales``, ``mins`` [out, in / group]."""
        super().__init__()
        self.group, self.out_features = group, q.shape[0]
        self.for_kernel = q.is_cpu and kernels.available()
        if self.for_kernel:
            blocks = q.to(torch.uint8).reshape(q.shape[0], -1, 2, INT4_BLOCK // 2)
            self.register_buffer("packed", (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(q.shape[0], -1))
            dtype = torch.float16 if _fp16_holds(scales) and _fp16_holds(mins) else torch.float32
            self.register_buffer("scales", scales.to(dtype).contiguous())
            self.register_buffer("mins", mins.to(dtype).contiguous())
            return
        zeros = mins + 8 * scales  # torch's kernels compute (q - 8) * scale + zero
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        self.register_buffer("scales_and_zeros", sz)  # [in / group, out, 2]
        if q.is_cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        else:  # the CUDA packing takes two values per byte, the even column in the high nibble,
            # and tiles of 16 inputs, `inner` of them at once: as many as the inputs allow
            q8 = q.to(torch.uint8)
            inner = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((q8[:, ::2] << 4 | q8[:, 1::2]).contiguous(), inner)
        self.register_buffer("packed", packed)

    @property
    def shape(self) -> torch.Size:
        groups = self.scales.shape[1] if self.for_kernel else self.scales_and_zeros.shape[0]
        return torch.Size((self.out_features, groups * self.group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.for_kernel:
            if x.numel() >= kernels.GEMM_ROWS * x.shape[-1]:  # a prefill chunk: a blocked GEMM
                return dense_linear(x.float(), self.dequantize()).to(x.dtype)
            return kernels.gemv_int4(x.float(), self.packed, self.scales, self.mins).to(x.dtype)
        flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        if x.is_cpu:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scales_and_zeros)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def kernel_operands(self) -> tuple | None:
        """``(packed, scales, mins)`` for ``kernels.Linear``, or None in torch's layout."""
        return (self.packed, self.scales, self.mins) if self.for_kernel else None

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight this module multiplies by."""
        if self.for_kernel:
            return kernels.dequantize_int4(self.packed, self.scales, self.mins)
        eye = torch.eye(self.shape[1], dtype=KERNEL_DTYPE, device=self.packed.device)
        return self(eye).float().T.contiguous()


def _fp16_holds(t: torch.Tensor) -> bool:
    return torch.equal(t.to(torch.float16).to(t.dtype), t)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q, scales)``; the scales already rounded as stored."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(KERNEL_DTYPE).float()
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int8_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of ``group`` columns, as Q8_0 does: ``(q, scales [out, in / group])``."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group, group)
    scales = (g.abs().amax(dim=-1) / 127).clamp(min=1e-10).to(torch.float16).float()
    q = torch.round(g / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, cols), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    scales = scales.reshape(rows, -1)
    return (q.reshape(rows, scales.shape[1], -1).float() * scales[..., None]).reshape(rows, cols)


def int4_group(w: torch.Tensor) -> int | None:
    """The int4 group size for ``w`` [out, in], or None where torch's packing cannot take it."""
    if w.shape[0] % INT4_ROW_MULTIPLE:
        return None
    return next((g for g in INT4_GROUPS if w.shape[1] % g == 0), None)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` columns, min to max over 16 levels:
    ``(q uint8 [out, in], scales, mins)`` with ``W ~ q * scale + min``; the scales and
    minima already rounded to fp16, as stored."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(torch.float16).float()
    mins = lo.to(torch.float16).float()
    q = torch.round((g - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(rows, cols), scales, mins


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    group = cols // scales.shape[1]
    g = q.reshape(rows, -1, group).float() * scales[..., None] + mins[..., None]
    return g.reshape(rows, cols)


def pack(w: torch.Tensor, fmt: str) -> nn.Module:
    """``w`` [out, in] in ``fmt``; int4 falls back to int8 for a shape torch cannot pack
    (fewer than a multiple of its row tile of outputs, or inputs no group size divides)."""
    if fmt == "int4" and (group := int4_group(w)) is not None:
        return Int4Weight(*quantize_int4(w, group), group)
    if fmt in FORMATS:
        return Int8Weight(*quantize_int8(w))
    raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")


def pack_parts(parts: list, fmt: str) -> nn.Module:
    """Weights side by side (their outputs stacked), each a float tensor or values as a
    file stores them in ``fmt`` (``WeightSource.get_stored``: int4 ``(q, scales, mins)``,
    int8 ``(q, scales)``, both in groups of columns), packed in ``fmt``. Where any part is
    stored, the float parts are quantized in the same groups and the stored ones kept as
    they are, so a GGUF's own Q8_0 / Q4 weights are served without a second rounding."""
    stored = [p for p in parts if isinstance(p, tuple)]
    if stored:
        q0, s0 = stored[0][:2]
        group = q0.shape[1] // s0.shape[1]
        same = all(p[0].shape[1] // p[1].shape[1] == group for p in stored)
        if fmt == "int4" and same and sum(p.shape[0] if not isinstance(p, tuple) else p[0].shape[0]
                                          for p in parts) % INT4_ROW_MULTIPLE == 0:
            q, scales, mins = (torch.cat(t) for t in zip(*[
                p if isinstance(p, tuple) else quantize_int4(p, group) for p in parts]))
            return Int4Weight(q, scales, mins, group)
        if fmt == "int8" and same:
            q, scales = (torch.cat(t) for t in zip(*[
                p if isinstance(p, tuple) else quantize_int8_groups(p, group) for p in parts]))
            return Int8Weight(q, scales, group)
        parts = [_dequantize(p, fmt) if isinstance(p, tuple) else p for p in parts]
    return pack(torch.cat(parts), fmt)


def _dequantize(stored: tuple, fmt: str) -> torch.Tensor:
    return dequantize_int4(*stored) if fmt == "int4" else dequantize_int8(*stored)


def roundtrip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The fp32 weight that ``pack(w, fmt)`` multiplies by (on the CPU kernels' layout)."""
    if fmt == "int4" and (group := int4_group(w)) is not None:
        return dequantize_int4(*quantize_int4(w, group))
    return dequantize_int8(*quantize_int8(w))


def is_quantized(w) -> bool:
    return isinstance(w, (Int8Weight, Int4Weight))
