"""Kernel-specific tests of the compiled photometric_jitter (CPU): determinism across runs and
thread counts, the kernel-level permutation check, large and odd images, extreme parameters,
ties (torch.maximum / minimum split the gradient), layouts and upstream-gradient strides.
The shared behaviour (every backend vs the reference, gradcheck, opcheck, errors) is in
tests/test_photometric_jitter.py."""
from __future__ import annotations

import pytest
import torch

import tpswarp
from tpswarp.reference import photometric_jitter as reference
from tpswarp.testing import assert_close, non_contiguous, to_channels_last

pytestmark = pytest.mark.skipif(not tpswarp.backends()["extension"]["built"],
                                reason="the compiled extension is not built")

PERMS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
op = torch.ops.tpswarp.photometric_jitter
backward_op = torch.ops.tpswarp._photometric_jitter_backward


@pytest.fixture(autouse=True)
def _cpp():
    with tpswarp.use_backend("cpp"):
        yield


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _params(B, dtype=torch.float32, gen=None):
    u = torch.rand(4, B, generator=gen, dtype=torch.float64)
    return tuple(p.to(dtype) for p in (-0.25 + 0.5 * u[0], 0.25 + 1.75 * u[1], -0.1 + 0.2 * u[2], 0.25 + 1.75 * u[3]))


def _inputs(B, H, W, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=gen, dtype=torch.float64).to(dtype)
    perm = PERMS[torch.randint(0, 6, (B,), generator=gen)]
    return image, _params(B, dtype, gen), perm, gen


def _grads(image, params, perm, grad, clamp=False):
    leaves = [t.detach().clone().requires_grad_(True) for t in (image, *params)]
    out = tpswarp.photometric_jitter(*leaves, perm, clamp=clamp)
    return (out, *torch.autograd.grad(out, leaves, grad))


def _ref_grads(image, params, perm, grad, clamp=False):
    leaves = [t.detach().clone().requires_grad_(True) for t in (image, *params)]
    out = reference(*leaves, perm, clamp=clamp)
    return (out, *torch.autograd.grad(out, leaves, grad))


# --------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_deterministic_across_runs_and_thread_counts(dtype, threads):
    image, params, perm, gen = _inputs(3, 67, 301, dtype)  # many chunks, chunks straddle rows
    grad = torch.randn(image.shape, generator=gen).to(dtype)
    results = []
    for n in (1, 2, 3, 1):
        torch.set_num_threads(n)
        results.append(_grads(image, params, perm, grad, clamp=True))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_parameter_gradients_do_not_depend_on_the_layout():
    """The reduction's block decomposition follows the pixels' row-major order, not memory."""
    image, params, perm, gen = _inputs(2, 45, 77, torch.float32)
    grad = torch.randn(image.shape, generator=gen)
    base = _grads(image, params, perm, grad)
    for layout in (to_channels_last, non_contiguous):
        other = _grads(layout(image), params, perm, layout(grad))
        for a, b in zip(base, other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# the kernel-level permutation check (the Python wrapper checks shapes and dtypes only)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", [[0, 0, 2], [0, 1, 3], [-1, 0, 1], [2, 2, 2], [1, 0, 1], [0, 1, 9999999999]])
def test_invalid_permutation_rows_raise_from_the_op(row):
    image, params, _, _ = _inputs(3, 4, 5)
    bad = torch.tensor([[0, 1, 2], [2, 0, 1], row])
    with pytest.raises(ValueError, match=r"`permutation`.*row 2"):
        op(image, *params, bad, False)
    with pytest.raises(ValueError, match=r"`permutation`.*row 2"):
        backward_op(torch.ones_like(image), image, *params, bad, False, [True] * 5)


def test_kernel_argument_checks():
    image, params, perm, _ = _inputs(2, 4, 5)
    with pytest.raises(TypeError, match="`permutation`"):
        op(image, *params, perm.int(), False)
    with pytest.raises(ValueError, match="`permutation`"):
        op(image, *params, perm[:, :2], False)
    with pytest.raises(ValueError, match="`image`"):
        op(image[:, :2], *params, perm, False)
    with pytest.raises(ValueError, match="`hue`"):
        op(image, params[0], params[1], params[2][:1], params[3], perm, False)
    with pytest.raises(TypeError, match="`contrast`"):
        op(image, *params[:3], torch.ones(2, dtype=torch.int64), perm, False)
    with pytest.raises(ValueError, match="`grad_out`"):
        backward_op(image[:1], image, *params, perm, False, [True] * 5)


# --------------------------------------------------------------------------------------
# sizes, layouts, upstream gradients
# --------------------------------------------------------------------------------------
def test_large_image_matches_reference():
    image, params, perm, gen = _inputs(2, 517, 1031)  # > 2 ** 19 pixels per image, odd sizes
    grad = torch.randn(image.shape, generator=gen)
    got = _grads(image, params, perm, grad)
    want = _ref_grads(image, params, perm, grad)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1], grad=True)
    for g, r in zip(got[2:], want[2:]):  # sums over 1.6M terms: relative to their magnitude
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * max(1.0, r.abs().max().item()))


_BASELINE_CASE = """
import sys
import torch
import tpswarp
sys.path.insert(0, {tests!r})
from test_photometric_jitter_kernels import _grads, _inputs, _ref_grads
from tpswarp.testing import assert_close
with tpswarp.use_backend("cpp"):
    for clamp in (False, True):
        image, params, perm, gen = _inputs(2, 19, 67)
        grad = torch.randn(image.shape, generator=gen)
        got, want = _grads(image, params, perm, grad, clamp), _ref_grads(image, params, perm, grad, clamp)
        assert_close(got[0], want[0])
        for g, r in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * max(1.0, r.abs().max().item()))
print("ok")
"""


def test_baseline_isa_path_matches_reference():
    """TPSWARP_NO_AVX2=1 runs the kernels compiled for the baseline ISA (what a CPU without AVX2
    runs) on this machine: against the reference, forward and all gradients, with and without clamp."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TPSWARP_NO_AVX2="1")
    code = _BASELINE_CASE.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 257), (1, 300, 1), (2, 3, 255), (1, 16, 16)])
def test_odd_shapes_with_gradients(shape):
    B, H, W = shape
    image, params, perm, gen = _inputs(B, H, W, torch.float64)
    grad = torch.randn(image.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(_grads(image, params, perm, grad), _ref_grads(image, params, perm, grad)):
        assert_close(got, want, grad=True)


def test_expanded_and_strided_upstream_gradients():
    image, params, perm, _ = _inputs(2, 6, 7, torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (image, *params)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (image, *params)]
    got = torch.autograd.grad(tpswarp.photometric_jitter(*leaves, perm).sum(), leaves)  # stride-0 grad
    want = torch.autograd.grad(reference(*ref_leaves, perm).sum(), ref_leaves)
    for g, r in zip(got, want):
        assert_close(g, r, grad=True)
    grad = non_contiguous(torch.randn(image.shape, dtype=torch.float64)).transpose(2, 3).contiguous().transpose(2, 3)
    got = backward_op(grad, image, *params, perm, False, [True] * 5)
    want = torch.autograd.grad(reference(*ref_leaves, perm), ref_leaves, grad)
    for g, r in zip(got, want):
        assert_close(g, r, grad=True)


def test_channels_last_gradient_keeps_the_format():
    image, params, perm, _ = _inputs(2, 5, 6)
    image = to_channels_last(image)
    grad_image, *_ = backward_op(torch.ones_like(image), image, *params, perm, True, [True] * 5)
    assert grad_image.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mask", [[True, False, False, False, False], [False, True, False, True, False],
                                  [False] * 5, [False, False, False, False, True]])
def test_output_mask(mask):
    image, params, perm, gen = _inputs(2, 5, 6, torch.float64)
    grad = torch.randn(image.shape, generator=gen, dtype=torch.float64)
    full = backward_op(grad, image, *params, perm, False, [True] * 5)
    part = backward_op(grad, image, *params, perm, False, mask)
    for need, g, f in zip(mask, part, full):
        if need:
            assert torch.equal(g, f)
        else:
            assert g.numel() == 0


def test_parameter_gradient_dtypes_follow_the_parameters():
    image, params, perm, gen = _inputs(2, 5, 6, torch.float32)
    params = (params[0].double(), params[1].half(), params[2], params[3].bfloat16())
    grads = backward_op(torch.ones_like(image), image, *params, perm, False, [True] * 5)
    assert [g.dtype for g in grads[1:]] == [p.dtype for p in params]
    assert all(g.shape == (2,) for g in grads[1:])


# --------------------------------------------------------------------------------------
# values where the math has special cases
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,s,h,c", [
    (0.0, 0.0, 0.0, 1.0),      # saturation 0: grey
    (0.1, 1.0, 0.0, 0.0),      # contrast 0: black
    (-1.5, 1.0, 0.05, 1.0),    # brightness pushes v below 0
    (-2.0, 5.0, 3.7, -2.0),    # everything out of range
    (1e3, 1e3, -1e6, 1e3),     # huge values
])
@pytest.mark.parametrize("clamp", [False, True])
def test_extreme_parameters_are_finite_and_match(b, s, h, c, clamp):
    B = 2
    image, _, perm, gen = _inputs(B, 33, 35)
    image[0, :, :4, :4] = 0  # black pixels: v = 0, delta = 0
    image[1, :, :4, :4] = 0.5  # grey pixels: delta = 0
    params = tuple(torch.full((B,), float(x)) for x in (b, s, h, c))
    grad = torch.randn(image.shape, generator=gen)
    got = _grads(image, params, perm, grad, clamp)
    want = _ref_grads(image, params, perm, grad, clamp)
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))


def test_ties_split_the_gradient_like_torch_maximum():
    """Pixels with equal channels (r == g > b, r > g == b, all equal, zeros): the gradients of
    the hexcone's max/min follow torch.maximum/minimum's 1/2-1/2 split on ties."""
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    combos = torch.cartesian_prod(levels, levels, levels)  # every tie pattern, 125 pixels
    image = combos.T.reshape(1, 3, 5, 25).repeat(2, 1, 1, 1)
    params = _params(2, torch.float64, torch.Generator().manual_seed(3))
    grad = torch.randn(image.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    perm = PERMS[[4, 1]]
    for clamp in (False, True):
        for g, r in zip(_grads(image, params, perm, grad, clamp), _ref_grads(image, params, perm, grad, clamp)):
            assert_close(g, r, grad=True)


def test_nan_pixels_stay_nan():
    image, params, perm, _ = _inputs(1, 3, 3)
    image[0, 1, 1, 1] = float("nan")
    out = op(image, *params, perm, False)
    assert torch.isnan(out[0, :, 1, 1]).all()
    assert torch.isfinite(out[0, :, 0, 0]).all()
