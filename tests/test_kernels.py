"""The hand-written CPU decode kernel: the same products as torch, on every shape it takes."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from p2pserve.engine import kernels
from p2pserve.engine.model import linear, pack_linear


def _toolchain() -> bool:
    flags = kernels._cpu_flags().split()
    return {"avx2", "fma"} <= set(flags) and bool(shutil.which("c++") or shutil.which("g++")) \
        and bool(shutil.which("ninja"))


def test_kernel_builds_where_it_can():
    """On a machine with AVX2, a compiler and ninja, the kernel must build: a silent
    fallback would hide a 1.3x slower decode."""
    if not _toolchain():
        pytest.skip("no AVX2 / compiler / ninja here")
    assert kernels.available(), kernels.why_not()


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(576, 192), (37, 29), (1536, 576), (8, 16)])
def test_gemv_matches_torch(rows, shape):
    if not kernels.available():
        pytest.skip(kernels.why_not())
    out, inp = shape
    g = torch.Generator().manual_seed(rows * 1000 + out)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(1, rows, inp, generator=g)
    got = kernels.gemv(x, w)
    assert got.shape == (1, rows, out)
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_linear_dispatch_matches_torch(dtype, rows):
    """``linear`` picks the kernel, oneDNN's GEMM or packed weights; all give x @ W.T."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(linear(x, pack_linear(w)), F.linear(x, w), **tol)
