"""Weight-only quantized linear weights: int8 with a scale per output channel, int4 with a
scale and an offset per group of input columns.

A decode step streams every weight once, so reading a quarter (int8) or an eighth (int4)
of fp32's bytes is what makes it faster; activations, norms, attention and the KV cache
stay in the stage's own dtype. The matrix products are torch's own kernels:
``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` on CPU (their vectorised
paths take bfloat16 activations only, so the input is cast to bfloat16 and the output
back), ``_weight_int4pack_mm`` on CUDA, and a dequantize-then-multiply for int8 on CUDA;
an int8 decode step on CPU goes to ``kernels.gemv_int8`` instead where it is built.

A weight is quantized where it is loaded, one rank's slice at a time, so a stage never
holds more than one fp32 tensor on its way to its packed form (``build.load_stage``).
``roundtrip`` gives the fp32 weight a packed one computes with, for references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from p2pserve.engine import kernels

FORMATS = ("int8", "int4")
# int4 groups along the input dimension: the largest that divides it (fewer scales to read)
INT4_GROUPS = (128, 64, 32)
# torch's int4 packing wants output rows in multiples of this
INT4_ROW_MULTIPLE = 16
# what the CPU kernels' fast paths multiply in, and what their scales are stored as
KERNEL_DTYPE = torch.bfloat16


class Int8Weight(nn.Module):
    """``[out, in]`` int8 values and one scale per output row: ``W = q * scale``."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q.contiguous())
        # bf16 values (quantize_int8 rounds them) kept as fp32 for kernels.gemv_int8
        self.register_buffer("scales", scales.to(KERNEL_DTYPE).float().contiguous())

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step: the hand-written GEMV streams int8 rows faster than torch's kernel
        # did on the CPU measured, and keeps the activations fp32
        if x.is_cpu and x.dtype == torch.float32 and x.numel() <= kernels.MAX_ROWS * x.shape[-1] \
                and kernels.available():
            return kernels.gemv_int8(x, self.q, self.scales)
        if x.is_cpu:
            flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scales.to(KERNEL_DTYPE))
            return y.to(x.dtype).view(*x.shape[:-1], self.q.shape[0])
        return F.linear(x, self.q.to(x.dtype)) * self.scales.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]


class Int4Weight(nn.Module):
    """``[out, in]`` 4-bit values ``q`` in 0..15, packed by torch for its kernel, and per
    group of ``group`` input columns a scale and an offset: ``W = (q - 8) * scale + zero``."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, out_features: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in / group, out, 2]
        self.group, self.out_features = group, out_features

    @classmethod
    def from_ints(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> "Int4Weight":
        """``q`` int32 [out, in] in 0..15; ``scales``, ``zeros`` [out, in / group]."""
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        if q.is_cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        else:  # the CUDA packing takes two values per byte, the even column in the high nibble
            q8 = q.to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack((q8[:, ::2] << 4 | q8[:, 1::2]).contiguous(), 8)
        return cls(packed, sz, group, q.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.scales_and_zeros.shape[0] * self.group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        if x.is_cpu:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scales_and_zeros)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q, scales)``; the scales already rounded as stored."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(KERNEL_DTYPE).float()
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_group(w: torch.Tensor) -> int | None:
    """The int4 group size for ``w`` [out, in], or None where torch's packing cannot take it."""
    if w.shape[0] % INT4_ROW_MULTIPLE:
        return None
    return next((g for g in INT4_GROUPS if w.shape[1] % g == 0), None)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` columns, min to max over 16 levels:
    ``(q int32 [out, in], scales, zeros)`` with ``W ~ (q - 8) * scale + zero``; the scales
    and offsets already rounded as stored."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(KERNEL_DTYPE).float()
    zeros = (lo + 8 * scales).to(KERNEL_DTYPE).float()
    q = torch.round((g - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15).to(torch.int32)
    return q.reshape(rows, cols), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    group = cols // scales.shape[1]
    g = (q.reshape(rows, -1, group).float() - 8) * scales[..., None] + zeros[..., None]
    return g.reshape(rows, cols)


def pack(w: torch.Tensor, fmt: str) -> nn.Module:
    """``w`` [out, in] in ``fmt``; int4 falls back to int8 for a shape torch cannot pack
    (fewer than a multiple of its row tile of outputs, or inputs no group size divides)."""
    if fmt == "int4" and (group := int4_group(w)) is not None:
        return Int4Weight.from_ints(*quantize_int4(w, group), group)
    if fmt in FORMATS:
        return Int8Weight(*quantize_int8(w))
    raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")


def pack_parts(parts: list, fmt: str) -> nn.Module:
    """Weights side by side (their outputs stacked), each a float tensor or int4 values as
    a file stores them (``(q, scales, zeros)``, ``WeightSource.get_int4``), in ``fmt``:
    stored values are packed as they are where all of them are and torch can take the
    shape, so a GGUF's own 4-bit weights are served without a second rounding."""
    if fmt == "int4" and all(isinstance(p, tuple) for p in parts):
        q, scales, zeros = (torch.cat(t) for t in zip(*parts))
        if q.shape[0] % INT4_ROW_MULTIPLE == 0:
            return Int4Weight.from_ints(q, scales, zeros, q.shape[1] // scales.shape[1])
    return pack(torch.cat([dequantize_int4(*p) if isinstance(p, tuple) else p for p in parts]), fmt)


def roundtrip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The fp32 weight that ``pack(w, fmt)`` multiplies by."""
    if fmt == "int4" and (group := int4_group(w)) is not None:
        return dequantize_int4(*quantize_int4(w, group))
    q, scales = quantize_int8(w)
    return q.float() * scales[:, None]


def is_quantized(w) -> bool:
    return isinstance(w, (Int8Weight, Int4Weight))
