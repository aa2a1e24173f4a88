"""The hand-written CPU decode kernel: the same products as torch, on every shape it takes."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from p2pserve.engine import kernels, quant
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
    assert kernels.isa() in ("avx2", "avx512")


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


def _bf16_case(out, inp, rows, seed):
    """A bf16 weight, fp32 X, and the product the kernel must give: X rounded to bf16 times
    the weight, summed in fp64 (every product of two bf16 values is exact in fp32)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).bfloat16()
    x = torch.randn(rows, inp, generator=g)
    return w, x, (x.bfloat16().double() @ w.double().T).float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("shape", [(576, 192), (37, 29), (1536, 576), (8, 16), (40, 100)])
def test_gemv_bf16_is_the_product_of_its_rounded_input(rows, shape):
    """Rows of any length: 64 at a time, a masked tail of 1-63 (AVX-512 BF16), 16 at a time
    and a scalar tail (AVX2)."""
    if not kernels.available():
        pytest.skip(kernels.why_not())
    w, x, want = _bf16_case(*shape, rows, seed=rows * 1000 + shape[0])
    got = kernels.module().gemv_bf16(x, w)
    assert _relative_error(got, want) < EXACT
    if rows <= kernels.MAX_ROWS:  # the Python entry: bf16 activations in, bf16 out
        y = kernels.gemv(x.bfloat16(), w)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want.bfloat16(), rtol=2**-8, atol=EXACT * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_linear_dispatch_matches_torch(dtype, rows):
    """``linear`` picks the kernel, oneDNN's GEMM or packed weights; all give x @ W.T."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(linear(x, pack_linear(w)), F.linear(x, w), **tol)


def _int4_case(out, inp, group, rows, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    q, scales, mins = quant.quantize_int4(w, group)
    x = torch.randn(rows, inp, generator=g)
    return q, scales, mins, x, x @ quant.dequantize_int4(q, scales, mins).T


def _relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


# 1e-5 of the largest output: fp32 sums in another order; a wrong nibble, group, scale or
# row is off by far more (the quantization step alone is ~7% of a weight's range)
EXACT = 1e-5
# The AVX2 and AVX-512 int8 and int4 loops round the activations to 16 bits (gemv.cpp: QuantX), which
# moves an output by up to about 1e-4 of the largest on these random cases
X_IN_INT16 = 3e-4


def int_tolerance(module=None) -> float:
    """What an int8 / int4 product of ``module`` (this CPU's build by default) may be off by."""
    return X_IN_INT16 if (module or kernels.module()).isa() in ("avx2", "avx512") else EXACT


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 9, 33])
@pytest.mark.parametrize("shape", [(576, 576, 64), (1536, 576, 32), (576, 1536, 128), (16, 96, 32)])
def test_gemv_int4_is_the_product_with_its_dequantized_weight(rows, shape):
    """Every row count (a decode step's few, a prefill chunk's many) and group size."""
    if not kernels.available():
        pytest.skip(kernels.why_not())
    out, inp, group = shape
    q, scales, mins, x, want = _int4_case(out, inp, group, rows, seed=rows * 7 + out)
    w = quant.Int4Weight(q, scales, mins, group)
    assert w.for_kernel
    assert torch.equal(w.dequantize(), quant.dequantize_int4(q, scales, mins))
    assert _relative_error(w(x), want) < int_tolerance()


def _x_in_int16(x, group):
    """X as the AVX2 and AVX-512 loops round it (gemv.cpp: QuantX): per group of ``group``
    values, ``round(x * I16_TOP / largest |x|)``; with each group's scale and sum."""
    rows, inp = x.shape
    g = x.reshape(rows, inp // group, group)
    top = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(top > 0, torch.tensor(32639.0) / top, torch.zeros(()))
    return torch.round(g * inv), top / 32639.0, g.sum(dim=-1)


@pytest.mark.parametrize("arch", ["-march=native", "-march=haswell"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("shape", [(576, 576, 64), (64, 576, 32), (48, 1536, 128), (16, 96, 32), (32, 1024, 1024),
                                   (40, 160, 32)])
def test_gemv_int4_multiplies_its_16_bit_activations_exactly(arch, rows, shape):
    """Where the loops take X in 16 bits, every product of a nibble and an x is exact in
    integers: the output is each group's integer sum times its two scales, plus the minima
    times X's group sums, up to the order of the fp32 sums. Shapes with groups of 32, 64,
    128 and 1024 values, windows of 16 groups and a last part one (AVX2: of 8, the last
    overlapping the one before), rows of 96, 160 and 576 values (AVX-512 VNNI takes whole
    quads of 128 values and a masked last one, AVX2 halves of quads and a last block). This
    CPU's loops, and AVX2's beside them."""
    if arch == "-march=native":
        if not kernels.available() or kernels.isa() not in ("avx2", "avx512"):
            pytest.skip("the loops take X in fp32 here")
        module = kernels.module()
    else:
        if not _toolchain():
            pytest.skip("no AVX2 / compiler / ninja here")
        module = kernels.build(arch)
    out, inp, group = shape
    q, scales, mins, x, _ = _int4_case(out, inp, group, rows, seed=rows + inp)
    x16, xs, gsum = _x_in_int16(x, group)
    sums = torch.einsum("mgi,ogi->mog", x16.double(), q.reshape(out, inp // group, group).double())
    want = (sums * (scales.double()[None] * xs.double().transpose(1, 2))).sum(-1) + gsum.double() @ mins.double().T
    w = quant.Int4Weight(q, scales, mins, group)
    assert _relative_error(module.gemv_int4(x, w.packed, w.scales, w.mins).double(), want) < EXACT


def test_gemv_int4_fails_where_a_nibble_is_wrong():
    """The tolerance above is one a wrong kernel fails: a single weight off by one level is seen."""
    if not kernels.available():
        pytest.skip(kernels.why_not())
    q, scales, mins, x, want = _int4_case(64, 128, 32, 1, seed=3)
    q[5, 77] = (q[5, 77] + 1) % 16
    assert _relative_error(quant.Int4Weight(q, scales, mins, 32)(x), want) > 10 * int_tolerance()


def test_gemv_int4_refuses_groups_longer_than_its_int32_sums_allow():
    """A group's products are summed in int32 before its scale applies (AVX2), so a group is
    at most 1024 values; a longer one is an error, not an overflow."""
    if not kernels.available():
        pytest.skip(kernels.why_not())
    x = torch.randn(1, 2048)
    packed = torch.zeros(4, 1024, dtype=torch.uint8)
    scales = mins = torch.ones(4, 1, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="at most 1024"):
        kernels.gemv_int4(x, packed, scales, mins)
    kernels.gemv_int4(x, packed, torch.ones(4, 2, dtype=torch.float16), torch.ones(4, 2, dtype=torch.float16))


@pytest.mark.parametrize("arch", ["-march=native", "-march=haswell"])
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
# one scale a row or a group; out not a multiple of the rows a pass; in not of 32 (a scalar
# tail); in past one int32 run; groups in windows of 8 (AVX2) with an odd one after
@pytest.mark.parametrize("group, shape", [(None, (96, 160)), (32, (96, 160)), (None, (90, 176)),
                                          (None, (20, 2080)), (32, (20, 2080)), (64, (40, 576))])
def test_gemv_int8_with_row_or_group_scales(arch, rows, group, shape):
    """This CPU's loops, and AVX2's beside them."""
    if arch == "-march=native":
        if not kernels.available():
            pytest.skip(kernels.why_not())
        module = kernels.module()
    else:
        if not _toolchain():
            pytest.skip("no AVX2 / compiler / ninja here")
        module = kernels.build(arch)
    out, n = shape
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(out, n, generator=g), torch.randn(rows, n, generator=g)
    q, scales = quant.quantize_int8(w) if group is None else quant.quantize_int8_groups(w, group)
    want = x @ quant.dequantize_int8(q, scales).T
    assert _relative_error(module.gemv_int8(x, q, scales.reshape(out, -1)), want) < int_tolerance(module)


def _split_module():
    """This CPU's build where it multiplies int8 in the split layout (AVX-512 VNNI), else a skip."""
    if not kernels.available() or not kernels.module().int8_split_layout():
        pytest.skip("no int8 split layout here (it is AVX-512 VNNI's)")
    return kernels.module()


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
# one scale a row (576, a last part quad of 4.5; 2080; 32, one block; 96, three); groups of
# 32 (GGUF's Q8_0, windows of 16 and a part one) and 64
@pytest.mark.parametrize("group, shape", [(None, (96, 576)), (None, (20, 2080)), (None, (16, 32)), (None, (40, 96)),
                                          (32, (48, 576)), (32, (20, 2080)), (64, (40, 576))])
def test_gemv_int8_split_layout_multiplies_its_16_bit_activations_exactly(rows, group, shape):
    """In the split layout (each value plus 128, in int4's order) every product of a weight
    and an x is exact in integers and the offset's share cancels: the output is each
    group's integer sum of q * x16 times its two scales, up to the order of the fp32 sums;
    and the weight dequantizes to what the plain layout does."""
    module = _split_module()
    out, n = shape
    g = torch.Generator().manual_seed(rows + n)
    w, x = torch.randn(out, n, generator=g), torch.randn(rows, n, generator=g)
    q, scales = quant.quantize_int8(w) if group is None else quant.quantize_int8_groups(w, group)
    scales = scales.reshape(out, -1)
    gs = n // scales.shape[1]
    x16, xs, _ = _x_in_int16(x, gs)
    sums = torch.einsum("mgi,ogi->mog", x16.double(), q.reshape(out, n // gs, gs).double())
    want = (sums * (scales.double()[None] * xs.double().transpose(1, 2))).sum(-1)
    packed = module.pack_int8(q, scales.shape[1])
    assert packed.dtype == torch.uint8 and packed.shape == q.shape
    assert _relative_error(module.gemv_int8(x, packed, scales).double(), want) < EXACT
    assert torch.equal(module.dequantize_int8(packed, scales), module.dequantize_int8(q, scales))
    i = int(x[0].abs().argmax())  # one weight a level off is seen (where x is not near 0)
    q[out // 2, i] += 1 if q[out // 2, i] < 127 else -1
    assert _relative_error(module.gemv_int8(x, module.pack_int8(q, scales.shape[1]), scales).double(), want) > EXACT


def test_the_split_layout_refuses_rows_it_cannot_hold():
    """Rows of a whole number of 32-value blocks, in groups of a power of two or one a row."""
    module = _split_module()
    with pytest.raises(RuntimeError, match="no split int8 layout"):
        module.pack_int8(torch.zeros(4, 90, dtype=torch.int8), 1)
    with pytest.raises(RuntimeError, match="no split int8 layout"):
        module.pack_int8(torch.zeros(4, 192, dtype=torch.int8), 2)  # groups of 96
    assert not kernels.int8_split_layout(192, 2) and kernels.int8_split_layout(192, 6)
    with pytest.raises(RuntimeError, match="no split int8 layout"):  # a uint8 weight it cannot be
        module.gemv_int8(torch.randn(1, 192), torch.zeros(4, 192, dtype=torch.uint8), torch.ones(4, 2))


def test_an_int8_weight_in_the_split_layout_serves_any_activations():
    """Int8Weight keeps the split layout where the kernels take it; bf16 activations, which
    they do not, multiply its dequantized weight."""
    _split_module()
    g = torch.Generator().manual_seed(5)
    q, scales = quant.quantize_int8_groups(torch.randn(64, 256, generator=g), 32)
    w = quant.Int8Weight(q, scales, 32)
    assert w.for_kernel and w.q.dtype == torch.uint8 and w.shape == (64, 256)
    x = torch.randn(3, 256, generator=g)
    want = x @ quant.dequantize_int8(q, scales).T
    assert torch.equal(w.dequantize(), quant.dequantize_int8(q, scales))
    assert _relative_error(w(x), want) < int_tolerance()
    assert _relative_error(w(x.bfloat16()).float(), want) < 2e-2  # bf16's own rounding


@pytest.mark.parametrize("arch", ["-march=x86-64", "-march=haswell", "-march=skylake-avx512", "-march=cascadelake"])
def test_every_instruction_set_path_computes_the_same(arch):
    """The portable, AVX2 and AVX-512 (without VNNI or BF16; with VNNI but not GFNI) loops,
    built here beside this CPU's own, give the same products: each machine runs only one of them."""
    isa, needs = {"-march=x86-64": ("portable", set()), "-march=haswell": ("avx2", set()),
                  "-march=skylake-avx512": ("avx512", {"avx512f", "avx512bw", "avx512vl"}),
                  "-march=cascadelake": ("avx512", {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})}[arch]
    if not _toolchain() or not needs <= set(kernels._cpu_flags().split()):
        pytest.skip(f"no {' / '.join(sorted(needs | {'AVX2'}))} / compiler / ninja here")
    # the loops this CPU runs are built already (and every other test runs them); AVX-512
    # is built again for the loops of CPUs without VNNI and BF16, or with VNNI but no GFNI
    module = kernels.module() if kernels.isa() == isa and isa != "avx512" else kernels.build(arch)
    assert module.isa() == isa
    for rows in (1, 3, 8, 11):
        q, scales, mins, x, want = _int4_case(48, 192, 64, rows, seed=rows)
        w = quant.Int4Weight(q, scales, mins, 64)
        assert _relative_error(module.gemv_int4(x, w.packed, w.scales, w.mins), want) < int_tolerance(module)
        # scales and minima fp16 cannot hold (a Q4_K's d * sc) go in as fp32, through the same loops
        s32, m32 = scales * (1 + 2**-12), mins * (1 + 2**-12)
        w = quant.Int4Weight(q, s32, m32, 64)
        assert w.scales.dtype == torch.float32
        want = x @ quant.dequantize_int4(q, s32, m32).T
        assert _relative_error(module.gemv_int4(x, w.packed, w.scales, w.mins), want) < int_tolerance(module)
        q8, s8 = quant.quantize_int8_groups(torch.randn(48, 192), 32)
        want8 = x @ quant.dequantize_int8(q8, s8).T
        assert _relative_error(module.gemv_int8(x, q8, s8), want8) < int_tolerance(module)
        assert module.int8_split_layout() == (arch == "-march=cascadelake")  # AVX-512 VNNI's only
        if module.int8_split_layout():
            p8 = module.pack_int8(q8, s8.shape[1])
            assert _relative_error(module.gemv_int8(x, p8, s8), want8) < int_tolerance(module)
        wb, xb, want_b = _bf16_case(40, 200, rows, seed=rows)
        assert _relative_error(module.gemv_bf16(xb, wb), want_b) < EXACT
        w32 = torch.randn(40, 192)
        if rows <= kernels.MAX_ROWS:
            assert _relative_error(module.gemv(x, w32), x @ w32.T) < EXACT


def test_the_fused_steps_weight_takes_the_split_layout_and_refuses_what_it_is_not():
    """``DecodeStep``'s Linear reads a uint8 weight without minima as int8 in the split
    layout (with its scales), and refuses one without scales or an int8 ``pack_int8`` did
    not get."""
    module = _split_module()
    q, scales = quant.quantize_int8_groups(torch.randn(32, 128), 32)
    kernels.linear_operand(module.pack_int8(q, scales.shape[1]), scales)
    with pytest.raises(RuntimeError, match="split layout has scales"):
        kernels.linear_operand(module.pack_int8(q, scales.shape[1]))
    with pytest.raises(RuntimeError, match=r"q: \[out, in\] int8"):
        module.pack_int8(q.to(torch.uint8), scales.shape[1])
    assert not module.int8_splits(128, 0) and not module.int8_splits(128, 3)
