"""Kernel-specific tests of the compiled tps_warp (CPU): determinism across runs and thread counts
(forward and backward, both task decompositions of the backward), integer label maps of many
dtypes with `fill`, half/bfloat16 images with float32 params, channels_last and non-contiguous
inputs and upstream gradients, `size` different from the input, the gradients w.r.t. `src` and
`params` against the float64 reference, tiny images (B = 1, C = 1, one pixel wide or high),
locations far outside the image and NaN parameters, every output_mask, and the baseline-ISA code
path (TPSWARP_NO_AVX2=1). The shared behaviour (every backend vs the reference, gradcheck,
opcheck, torch.compile, errors) is in tests/test_tps_warp.py."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tpswarp
from tpswarp import reference
from tpswarp._backend import _native_kernels
from tpswarp.testing import assert_close, non_contiguous, random_tps, to_channels_last, tolerance

pytestmark = pytest.mark.skipif(not _native_kernels()[("tps_warp", "cpu")],
                                reason="the compiled extension has no CPU tps_warp kernel")

op = torch.ops.tpswarp.tps_warp
backward_op = torch.ops.tpswarp._tps_warp_backward
PADDINGS = ["zeros", "border", "reflection"]


@pytest.fixture(autouse=True)
def _cpp():
    with tpswarp.use_backend("cpp"):
        yield


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def warp_inputs(B, C, H, W, *, dtype=torch.float32, pdtype=torch.float32, scale=0.3, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src, _, params = random_tps(B, n=n, scale=scale, generator=gen, dtype=pdtype)
    image = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    return image, src, params, gen


def grads(fn, image, src, params, grad_out, **kw):
    """(out, valid, d image, d src, d params) of ``fn`` against ``grad_out``."""
    leaves = [t.detach().requires_grad_(True) for t in (image, src, params)]  # strides kept
    out, valid = fn(*leaves, **kw)
    gs = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)  # nearest: no path to src, params
    return (out, valid, *(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)))


def assert_close_scaled(actual, expected, rtol):
    """|actual - expected| <= rtol * max|expected| (gradients: sums with cancellation)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.double() - expected.double()).abs().max()
    assert err <= rtol * scale, f"max error {err.item():.3e} > {rtol:g} * {scale.item():.3e}"


# --------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 3], ids=["B1-split-tasks", "B3"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_deterministic_across_runs_and_thread_counts(B, layout, dtype, threads):
    # 37 x 301 output: several column chunks, rows split unevenly between threads. With B=1 the
    # backward splits the image scatter over channel groups when there are several threads and
    # runs one fused sweep with one thread: both must give the same bits.
    image, src, params, gen = warp_inputs(B, 3, 29, 211, dtype=dtype, scale=0.4)
    if layout == "channels_last":
        image = to_channels_last(image)
    kw = dict(size=(37, 301), padding_mode="border", fill=0.25)
    grad_out = torch.randn(B, 3, 37, 301, generator=gen).to(dtype)
    results = []
    for n in (1, 2, 3, 2, 1):
        torch.set_num_threads(n)
        results.append(grads(tpswarp.tps_warp, image, src, params, grad_out, **kw))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True), (False, False, True)])
def test_partial_backward_deterministic_and_equal_to_full(mask, threads):
    image, src, params, gen = warp_inputs(2, 3, 33, 40, scale=0.4)
    grad_out = torch.randn(2, 3, 33, 40, generator=gen)
    args = (grad_out, image, src, params, "bilinear", "zeros", False, 0.0, None)
    full = backward_op(*args, [True, True, True])
    for n in (1, 2):
        torch.set_num_threads(n)
        part = backward_op(*args, list(mask))
        for want, g, f in zip(mask, part, full):
            if want:
                assert torch.equal(g, f)
            else:
                assert g.numel() == 0


# --------------------------------------------------------------------------------------
# label maps, fill, dtypes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, fill", [(torch.uint8, 255), (torch.int8, -1), (torch.int16, -7), (torch.int32, -1),
                                         (torch.int64, 2**40), (torch.uint16, 65535), (torch.float16, 255.0),
                                         (torch.bfloat16, -1.0)])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_nearest_label_maps_match_reference_exactly(dtype, fill, padding_mode, layout):
    image, src, params, gen = warp_inputs(2, 2, 13, 17, scale=0.6)
    labels = torch.randint(0, 19, image.shape, generator=gen).to(dtype)
    labels = {"contiguous": labels, "channels_last": to_channels_last(labels),
              "non_contiguous": non_contiguous(labels)}[layout]
    kw = dict(mode="nearest", padding_mode=padding_mode, fill=fill, size=(15, 11))
    out, valid = tpswarp.tps_warp(labels, src, params, **kw)
    ref_out, ref_valid = reference.tps_warp(labels, src, params, **kw)
    assert out.dtype == dtype and torch.equal(out, ref_out) and torch.equal(valid, ref_valid)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    if padding_mode == "zeros":
        assert (out == fill).any()  # the warp reaches outside the image


@pytest.mark.parametrize("fill", [-1, 256, 1e3])
def test_fill_that_does_not_fit_the_label_dtype_raises(fill):
    # as torch.full_like(uint8 tensor, float(fill)); the op's schema takes `fill` as a float
    image, src, params, _ = warp_inputs(1, 1, 5, 6)
    labels = torch.zeros(1, 1, 5, 6, dtype=torch.uint8)
    for backend in ("cpp", "reference"):
        with tpswarp.use_backend(backend), pytest.raises(RuntimeError, match="overflow"):
            tpswarp.tps_warp(labels, src, params, mode="nearest", fill=fill)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_images_with_float32_params(mode, dtype, layout):
    image, src, params, gen = warp_inputs(2, 3, 19, 23, dtype=dtype, scale=0.4)
    if layout == "channels_last":
        image = to_channels_last(image)
    grad_out = torch.randn(2, 3, 19, 23, generator=gen).to(dtype)
    kw = dict(mode=mode, fill=0.5)
    got = grads(tpswarp.tps_warp, image, src, params, grad_out, **kw)
    want = grads(reference.tps_warp, image, src, params, grad_out, **kw)
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[3].dtype == torch.float32
    assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert got[2].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    # image gradient: the kernel sums in float32 and rounds once, the reference scatters in `dtype`
    assert_close(got[2].float(), want[2].float(), grad=True, dtype=dtype)
    for g, w in zip(got[3:], want[3:]):
        assert_close_scaled(g, w, 2e-2)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                    (torch.bfloat16, torch.float64)], ids=["f32-img-f64-params", "f64-img-f32-params",
                                                                          "bf16-img-f64-params"])
def test_mixed_dtypes_compute_in_float64(dtypes):
    dtype, pdtype = dtypes
    image, src, params, gen = warp_inputs(2, 2, 11, 14, dtype=dtype, pdtype=pdtype, scale=0.4)
    grad_out = torch.randn(2, 2, 11, 14, generator=gen).to(dtype)
    got = grads(tpswarp.tps_warp, image, src, params, grad_out)
    want = grads(reference.tps_warp, image, src, params, grad_out)
    assert got[0].dtype == dtype and got[3].dtype == pdtype and got[4].dtype == pdtype
    for g, w in zip(got, want):
        if g.dtype == torch.bool:
            assert torch.equal(g, w)
        else:
            assert_close(g, w, grad=True, dtype=g.dtype)


# --------------------------------------------------------------------------------------
# layouts, strides, sizes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "channels_last_sliced"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "non_contiguous"])
def test_layouts_of_image_and_upstream_gradient(layout, grad_layout):
    image, src, params, gen = warp_inputs(2, 4, 15, 21, dtype=torch.float64, scale=0.4)
    if layout == "channels_last":
        x = to_channels_last(image)
    elif layout == "non_contiguous":
        x = non_contiguous(image)
    else:  # a channels_last tensor's channel slice: strided in every dimension
        x = to_channels_last(torch.cat([image, image], dim=1))[:, 1:5]
        image = x.contiguous()
    grad_out = torch.randn(2, 4, 15, 21, generator=gen, dtype=torch.float64)
    g = {"contiguous": grad_out, "channels_last": to_channels_last(grad_out),
         "non_contiguous": non_contiguous(grad_out)}[grad_layout]
    got = grads(tpswarp.tps_warp, x, src, params, g, padding_mode="reflection")
    want = grads(reference.tps_warp, image, src, params, grad_out, padding_mode="reflection")
    for a, b in zip(got, want):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            assert_close(a, b, grad=True)
    keeps = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert got[0].is_contiguous(memory_format=torch.channels_last if keeps else torch.contiguous_format)
    assert got[2].is_contiguous(memory_format=torch.channels_last if keeps else torch.contiguous_format)


@pytest.mark.parametrize("size", [(1, 1), (3, 200), (64, 7), (31, 33)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_output_size_differs_from_input(size, align_corners):
    image, src, params, gen = warp_inputs(2, 3, 16, 24, dtype=torch.float64, scale=0.4)
    grad_out = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    kw = dict(size=size, align_corners=align_corners, fill=-1.0)
    got = grads(tpswarp.tps_warp, image, src, params, grad_out, **kw)
    want = grads(reference.tps_warp, image, src, params, grad_out, **kw)
    assert got[0].shape == (2, 3, *size) and got[1].shape == (2, 1, *size)
    for a, b in zip(got, want):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            assert_close(a, b, grad=True)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 1, 9), (1, 1, 9, 1), (1, 2, 5, 1), (2, 1, 1, 6), (1, 1, 2, 2)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_tiny_images(shape, mode, padding_mode, align_corners):
    B, C, H, W = shape
    image, src, params, gen = warp_inputs(B, C, H, W, dtype=torch.float64, scale=0.4)
    grad_out = torch.randn(B, C, H + 1, W + 2, generator=gen, dtype=torch.float64)
    kw = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners, fill=0.5, size=(H + 1, W + 2))
    got = grads(tpswarp.tps_warp, image, src, params, grad_out, **kw)
    want = grads(reference.tps_warp, image, src, params, grad_out, **kw)
    for a, b in zip(got, want):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            assert_close(a, b, grad=True)


# --------------------------------------------------------------------------------------
# gradients w.r.t. src and params
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 4, 9])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_tps_gradients_match_reference_float64(n, padding_mode, align_corners):
    image, src, params, gen = warp_inputs(2, 3, 17, 19, dtype=torch.float64, scale=0.4, n=n)
    grad_out = torch.randn(2, 3, 20, 15, generator=gen, dtype=torch.float64)
    kw = dict(padding_mode=padding_mode, align_corners=align_corners, fill=0.3, size=(20, 15))
    got = grads(tpswarp.tps_warp, image, src, params, grad_out, **kw)
    want = grads(reference.tps_warp, image, src, params, grad_out, **kw)
    torch.testing.assert_close(got[3], want[3], **tolerance(torch.float64, grad=True))
    torch.testing.assert_close(got[4], want[4], **tolerance(torch.float64, grad=True))


@pytest.mark.parametrize("n", [4, 9])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tps_gradients_float32_close_to_float64_reference(n, padding_mode, layout):
    """float32 kernels (fast logarithm, per-row partial sums) against the float64 reference, no
    less accurate than the float32 reference; errors relative to each tensor's scale (single
    gradient entries can cancel)."""
    image, src, params, gen = warp_inputs(3, 3, 45, 150, scale=0.4, n=n)
    if layout == "channels_last":
        image = to_channels_last(image)
    grad_out = torch.randn(3, 3, 45, 150, generator=gen)
    got = grads(tpswarp.tps_warp, image, src, params, grad_out, padding_mode=padding_mode)
    ref32 = grads(reference.tps_warp, image, src, params, grad_out, padding_mode=padding_mode)
    want = grads(reference.tps_warp, image.double(), src.double(), params.double(), grad_out.double(),
                 padding_mode=padding_mode)
    for k in (0, 2, 3, 4):
        scale = want[k].abs().max()
        err = (got[k].double() - want[k]).abs().max() / scale
        err32 = (ref32[k].double() - want[k]).abs().max() / scale
        assert err <= 2 * err32 + 1e-6, (k, err.item(), err32.item())


def test_nearest_has_zero_tps_gradients_and_scatters_the_image_gradient():
    image, src, params, gen = warp_inputs(2, 3, 12, 14, dtype=torch.float64, scale=0.5)
    grad_out = torch.randn(2, 3, 12, 14, generator=gen, dtype=torch.float64)
    got = grads(tpswarp.tps_warp, image, src, params, grad_out, mode="nearest", fill=9.0)
    want = grads(reference.tps_warp, image, src, params, grad_out, mode="nearest", fill=9.0)
    assert torch.equal(got[3], torch.zeros_like(src)) and torch.equal(got[4], torch.zeros_like(params))
    assert_close(got[2], want[2])


# --------------------------------------------------------------------------------------
# extreme geometry
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [3.0, -1e6, 1e30])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_locations_far_outside_give_fill_and_zero_gradients(shift, mode):
    image, src, params, gen = warp_inputs(2, 2, 8, 9, dtype=torch.float64)
    params = params.clone()
    params[:, -3] += shift  # translate f far away
    grad_out = torch.randn(2, 2, 8, 9, generator=gen, dtype=torch.float64)
    out, valid, g_image, g_src, g_params = grads(tpswarp.tps_warp, image, src, params, grad_out, mode=mode, fill=4.0)
    assert torch.equal(out, torch.full_like(out, 4.0)) and not valid.any()
    assert not g_image.any() and not g_src.any() and not g_params.any()


def test_nan_params_sample_fill_as_the_reference():
    image, src, params, _ = warp_inputs(1, 2, 6, 7)
    params = params.clone()
    params[0, 0, 0] = float("nan")
    out, valid = tpswarp.tps_warp(image, src, params, fill=2.0)
    ref_out, ref_valid = reference.tps_warp(image, src, params, fill=2.0)
    assert torch.equal(out, ref_out) and torch.equal(valid, ref_valid)


def test_identity_warp_reproduces_the_image():
    image, _, _, _ = warp_inputs(2, 3, 21, 34, dtype=torch.float64)
    src = torch.tensor([[[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]], dtype=torch.float64).expand(2, 4, 2)
    params = tpswarp.tps_solve(src, src)
    for align_corners in (False, True):
        out, valid = tpswarp.tps_warp(image, src, params, align_corners=align_corners)
        assert_close(out, image)
        assert valid[..., 1:-1, 1:-1].all()  # the border may fall outside by a rounding error


_ROW_PAIR_BACKWARD_CASE = """
import torch, tpswarp
from tpswarp import reference
from tpswarp.testing import random_tps
gen = torch.Generator().manual_seed(3)
worst = 0.0
# input widths 2 and 3 (pairs clamped at the right edge), output widths with full 8-pixel vectors,
# tails and more than one 128-column chunk; a large warp sends taps out on every side
for (H, W), size in [((13, 2), (9, 11)), ((11, 3), (12, 21)), ((40, 37), (41, 150))]:
    for pad in ("zeros", "border", "reflection"):
        for ac in (False, True):
            src, _, params = random_tps(2, scale=0.6, generator=gen)
            image = torch.randn(2, 3, H, W, generator=gen)
            grad_out = torch.randn(2, 3, *size, generator=gen)
            kw = dict(padding_mode=pad, align_corners=ac, fill=0.5, size=size)
            def grads(fn, *xs):
                leaves = [t.detach().clone().requires_grad_(True) for t in xs]
                out, _ = fn(*leaves, **kw)
                return (out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))
            with tpswarp.use_backend("cpp"):
                got = grads(tpswarp.tps_warp, image, src, params)
            ref32 = grads(reference.tps_warp, image, src, params)
            want = grads(reference.tps_warp, image.double(), src.double(), params.double())
            for k in range(4):
                scale = want[k].abs().max().clamp_min(1e-12)
                err = ((got[k].double() - want[k]).abs().max() / scale).item()
                err32 = ((ref32[k].double() - want[k]).abs().max() / scale).item()
                assert err <= 2 * err32 + 1e-5, (H, W, size, pad, ac, k, err, err32)
                worst = max(worst, err)
print("worst", worst)
"""


@pytest.mark.parametrize("no_avx2", [False, True], ids=["avx2", "baseline"])
def test_float32_row_pair_backward_matches_reference(no_avx2):
    """The float32 NCHW backward: with AVX2 through row pairs (the coordinate gradient from 64-bit
    pair loads, the image gradient as 64-bit read-modify-writes, or 128-bit ones for two neighbouring
    pixels, in interleaved passes), without it
    through the four taps (TPSWARP_NO_AVX2=1); input widths 2 and 3, output widths with vector
    tails and several chunks, taps leaving the image, every padding mode and align_corners: all
    four gradients against the float64 reference, no less accurate than the float32 reference."""
    env = dict(os.environ)
    if no_avx2:
        env["TPSWARP_NO_AVX2"] = "1"
    result = subprocess.run([sys.executable, "-c", _ROW_PAIR_BACKWARD_CASE], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("worst")[-1]) < 1e-4


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_upstream_gradient_reaches_only_its_taps(value):
    """An infinite or NaN upstream gradient at one output pixel makes the image gradient
    non-finite exactly where the reference's is (that pixel's taps): the float32 scatter adds two
    neighbouring pixels through one 4-column window, whose other columns must not receive g * 0."""
    gen = torch.Generator().manual_seed(0)
    src, _, params = random_tps(1, scale=0.1, generator=gen)
    image = torch.randn(1, 2, 40, 48, generator=gen)
    for i, j in [(20, 21), (20, 20), (5, 7), (33, 40)]:  # odd and even columns (both pixels of a pair)
        grad_out = torch.randn(1, 2, 40, 48, generator=gen)
        grad_out[0, 1, i, j] = value
        got = grads(tpswarp.tps_warp, image, src, params, grad_out)[2]
        want = grads(reference.tps_warp, image, src, params, grad_out)[2]
        assert (~want.isfinite()).sum() == 4
        assert torch.equal(got.isfinite(), want.isfinite()), (i, j)
        finite = want.isfinite()
        assert_close(got[finite], want[finite], grad=True)


# --------------------------------------------------------------------------------------
# the baseline-ISA code (no AVX2), in a subprocess
# --------------------------------------------------------------------------------------
def test_baseline_isa_path_matches_reference():
    code = textwrap.dedent("""
        import torch, tpswarp
        from tpswarp import reference
        from tpswarp.testing import random_tps, to_channels_last
        gen = torch.Generator().manual_seed(0)
        src, _, params = random_tps(2, scale=0.4, generator=gen)
        image = to_channels_last(torch.randn(2, 3, 19, 150, generator=gen))
        grad_out = torch.randn(2, 3, 19, 150, generator=gen)
        def grads(fn, pad):
            leaves = [t.detach().clone().requires_grad_(True) for t in (image, src, params)]
            out, valid = fn(*leaves, padding_mode=pad)
            return (out, *torch.autograd.grad(out, leaves, grad_out))
        with tpswarp.use_backend("cpp"):
            for pad in ("zeros", "border", "reflection"):
                got, want = grads(tpswarp.tps_warp, pad), grads(reference.tps_warp, pad)
                for g, w in zip(got, want):
                    err = (g - w).abs().max() / w.abs().max().clamp_min(1e-12)
                    assert err < 1e-4, (pad, err)
        print("ok")
    """)
    env = dict(os.environ, TPSWARP_NO_AVX2="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
