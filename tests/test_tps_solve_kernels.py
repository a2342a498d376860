"""Kernel-specific tests of the compiled tps_solve and tps_transform (CPU): singular-item detection
and messages identical to the reference (collinear, duplicate and near-duplicate items among good
ones), NaN for singular items with check_singular=False, every storage tier of the solve (n = 3, 4:
fixed arrays, the register path of the CUDA kernel; n = 9: stack workspace; n = 33: heap workspace,
the path of the CUDA kernel's global workspace), reg > 0, mixed dtypes, scale invariance, and
determinism across runs and thread counts (the chunked reductions of tps_transform's backward).
The shared behaviour (every backend vs the reference, gradcheck, opcheck, errors) is in
tests/test_tps_solve.py and tests/test_tps_transform.py."""
from __future__ import annotations

import pytest
import torch

import tpswarp
from tpswarp import reference
from tpswarp.reference.tps_solve import singular_items
from tpswarp.testing import assert_close, non_contiguous

pytestmark = pytest.mark.skipif(not tpswarp.backends()["extension"]["built"],
                                reason="the compiled extension is not built")

TIER_NS = [3, 4, 9, 33]  # fixed arrays (n <= 4), stack workspace (n <= 32), heap workspace (n > 32)


@pytest.fixture(autouse=True)
def _cpp():
    with tpswarp.use_backend("cpp"):
        yield


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def spread(batch: int, n: int, *, seed: int = 0, scale: float = 0.9) -> torch.Tensor:
    """(batch, n, 2) float64 points: a jittered grid, pairwise well separated."""
    g = torch.Generator().manual_seed(seed)
    side = int(n ** 0.5 + 0.999)
    ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)[:n]
    base = (ij.to(torch.float64) + 0.5) / side * 2 - 1
    jitter = (torch.rand(batch, n, 2, generator=g, dtype=torch.float64) - 0.5) * (0.5 / side)
    return (base + jitter) * scale


def singular_batch(n: int) -> tuple[torch.Tensor, dict]:
    """A batch mixing good items with singular and nearly singular ones; returns (src, item kinds)."""
    good = spread(1, n, seed=n)[0]
    t = torch.linspace(-0.8, 0.7, n, dtype=torch.float64)
    items = {
        "good0": good,
        "collinear": torch.stack([t, 0.5 * t + 0.1], -1),
        "good1": good.flip(0) * 0.7,
        "duplicate": torch.cat([good[:-1], good[:1]]),
        "near_duplicate": torch.cat([good[:-1], good[:1] + 1e-8]),  # |d|^2 = 2e-16 <= 1e-12 trace: flagged
        "close_but_regular": torch.cat([good[:-1], good[:1] + 1e-3]),  # 2e-6: not flagged
        "nearly_collinear": torch.stack([t, 0.5 * t + 0.1 + 1e-9 * torch.cos(7 * t)], -1),  # det ~ 1e-19 trace^2
        "all_equal": torch.full((n, 2), 0.3, dtype=torch.float64),
        "good2": good + 0.05,
    }
    return torch.stack(list(items.values())), {k: i for i, k in enumerate(items)}


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("n", TIER_NS)
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_singular_items_match_reference(n, reg):
    src, kinds = singular_batch(n)
    dst = src + 0.1 * torch.randn_like(src)
    collinear, duplicate = singular_items(src, reg)
    # the batch really exercises both tests (for n = 3 a duplicate pair is also collinear)
    assert kinds["collinear"] in collinear and kinds["all_equal"] in collinear
    if reg == 0 and n > 3:
        assert kinds["duplicate"] in duplicate and kinds["near_duplicate"] in duplicate
    assert kinds["close_but_regular"] not in collinear + duplicate
    # the same ValueError message as the reference: collinear items first
    expected = _error(reference.tps_solve, src, dst, reg=reg)
    assert expected is not None
    assert _error(tpswarp.tps_solve, src, dst, reg=reg) == expected
    # without the collinear items, the duplicates are reported (reg == 0)
    keep = [i for i in range(src.shape[0]) if i not in collinear]
    expected = _error(reference.tps_solve, src[keep], dst[keep], reg=reg)
    assert _error(tpswarp.tps_solve, src[keep], dst[keep], reg=reg) == expected
    if reg == 0 and n > 3:
        assert "duplicate" in expected
    # float32 and half inputs are tested on their own (rounded) values, as in the reference
    for dtype in (torch.float32, torch.float16):
        s, d = src.to(dtype), dst.to(dtype)
        assert _error(tpswarp.tps_solve, s, d, reg=reg) == _error(reference.tps_solve, s, d, reg=reg)


@pytest.mark.parametrize("n", TIER_NS)
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_unchecked_singular_items_are_nan(n, reg):
    """check_singular=False: the items the check would report are NaN (never garbage), the others
    are the reference's solution, and the backward gives NaN gradients for exactly those items."""
    src, _ = singular_batch(n)
    dst = src + 0.1 * torch.randn_like(src)
    collinear, duplicate = singular_items(src, reg)
    bad = sorted(collinear + duplicate)
    good = [i for i in range(src.shape[0]) if i not in bad]
    s, d = src.clone().requires_grad_(), dst.clone().requires_grad_()
    params = tpswarp.tps_solve(s, d, reg=reg, check_singular=False)
    assert torch.isnan(params[bad]).all()
    assert torch.isfinite(params[good]).all()
    expected = reference.tps_solve(src[good], dst[good], reg=reg)
    torch.testing.assert_close(params[good], expected, rtol=1e-7, atol=1e-7)  # includes ill-conditioned items
    params.backward(torch.randn_like(params))
    assert torch.isnan(s.grad[bad]).all() and torch.isnan(d.grad[bad]).all()
    assert torch.isfinite(s.grad[good]).all() and torch.isfinite(d.grad[good]).all()


def _solve_with_grads(fn, src, dst, grad, reg):
    s, d = src.detach().requires_grad_(), dst.detach().requires_grad_()
    params = fn(s, d, reg=reg)
    params.backward(grad)
    return params, s.grad, d.grad


@pytest.mark.parametrize("n", TIER_NS)
@pytest.mark.parametrize("reg", [0.0, 0.02])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_storage_tiers_match_reference(n, reg, dtype):
    src = spread(3, n, seed=1).to(dtype)
    dst = (src.double() + 0.15 * torch.randn(3, n, 2, dtype=torch.float64)).to(dtype)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad = torch.randn(3, n + 3, 2, dtype=out_dtype)
    params, g_src, g_dst = _solve_with_grads(tpswarp.tps_solve, src, dst, grad, reg)
    ref_params, ref_src, ref_dst = _solve_with_grads(reference.tps_solve, src, dst, grad, reg)
    assert params.dtype == out_dtype and params.is_contiguous()
    assert g_src.dtype == dtype and g_dst.dtype == dtype
    # both solve the same float64 system: float32 outputs are the same rounding of close values
    assert_close(params, ref_params, dtype=out_dtype)
    assert_close(g_src, ref_src, grad=True, dtype=dtype)
    assert_close(g_dst, ref_dst, grad=True, dtype=dtype)


@pytest.mark.parametrize("n", TIER_NS)
def test_gradcheck_every_tier(n):
    src = spread(2, n, seed=2).requires_grad_()
    dst = (src.detach() + 0.1 * torch.randn(2, n, 2, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, d: tpswarp.tps_solve(s, d, reg=0.01), (src, dst))


@pytest.mark.parametrize("n", [4, 9])
def test_strided_and_mixed_dtype_inputs(n):
    src = spread(4, n, seed=3)
    dst = src + 0.1 * torch.randn_like(src)
    grad = torch.randn(4, n + 3, 2, dtype=torch.float64)
    cases = [
        (non_contiguous(src), dst.transpose(1, 2).contiguous().transpose(1, 2)),
        (src[:1].expand(4, n, 2), dst),
        (src.half(), dst),  # mixed: float64 output, half gradient for src
        (src.float(), dst.bfloat16()),
    ]
    for s, d in cases:
        g = grad.to(torch.float64 if torch.float64 in (s.dtype, d.dtype) else torch.float32)
        params, g_src, g_dst = _solve_with_grads(tpswarp.tps_solve, s, d, g, 0.0)
        ref_params, ref_src, ref_dst = _solve_with_grads(reference.tps_solve, s, d, g, 0.0)
        assert params.dtype == ref_params.dtype and g_src.dtype == s.dtype and g_dst.dtype == d.dtype
        torch.testing.assert_close(params, ref_params, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_src.double(), ref_src.double(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(g_dst.double(), ref_dst.double(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_scale_invariance(scale):
    """Relative thresholds: tiny and huge regular configurations are solved, their duplicates caught."""
    src = spread(2, 5, seed=4) * scale
    dst = src + 0.1 * scale * torch.randn_like(src)
    params = tpswarp.tps_solve(src, dst)
    assert_close(params, reference.tps_solve(src, dst))
    assert_close(tpswarp.tps_transform(src, src, params), dst)
    src[1, 4] = src[1, 0]
    assert _error(tpswarp.tps_solve, src, dst) == _error(reference.tps_solve, src, dst) is not None


def test_solve_deterministic_across_threads(threads):
    src = spread(300, 4, seed=5)
    dst = src + 0.2 * torch.randn_like(src)
    grad = torch.randn(300, 7, 2, dtype=torch.float64)
    results = []
    for t in (1, 2, 1):
        torch.set_num_threads(t)
        results.append(_solve_with_grads(tpswarp.tps_solve, src, dst, grad, 0.0))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("m", [1, 255, 256, 257, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_backward_deterministic_across_threads(threads, m, dtype):
    """The parameter gradients sum over fixed chunks of points: bitwise equal for 1 and 2 threads."""
    src = spread(3, 6, seed=6)
    params = reference.tps_solve(src, src + 0.1 * torch.randn_like(src))
    points = (torch.rand(3, m, 2, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    grad = torch.randn(3, m, 2, dtype=dtype)
    results = []
    for t in (1, 2, 2, 1):
        torch.set_num_threads(t)
        q, s, p = (x.detach().to(dtype).requires_grad_() for x in (points, src, params))
        out = tpswarp.tps_transform(q, s, p)
        out.backward(grad)
        results.append((out, q.grad, s.grad, p.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    ref_q, ref_s, ref_p = (x.detach().to(dtype).requires_grad_() for x in (points, src, params))
    reference.tps_transform(ref_q, ref_s, ref_p).backward(grad)
    assert_close(results[0][2], ref_s.grad, grad=True)
    assert_close(results[0][3], ref_p.grad, grad=True)


@pytest.mark.parametrize("n", [3, 33])
def test_transform_large_n_and_empty(n):
    src = spread(2, n, seed=7)
    params = reference.tps_solve(src, src + 0.1 * torch.randn_like(src))
    points = torch.rand(2, 100, 2, dtype=torch.float64) * 2 - 1
    assert_close(tpswarp.tps_transform(points, src, params), reference.tps_transform(points, src, params))
    empty = torch.zeros(2, 0, 2, dtype=torch.float64, requires_grad=True)
    s, p = src.clone().requires_grad_(), params.clone().requires_grad_()
    out = tpswarp.tps_transform(empty, s, p)
    assert out.shape == (2, 0, 2)
    out.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(src)) and torch.equal(p.grad, torch.zeros_like(params))


def test_transform_backward_output_mask():
    """Only the requested gradients are computed; the others are empty placeholders."""
    src = spread(2, 4, seed=8)
    params = reference.tps_solve(src, src + 0.1 * torch.randn_like(src))
    points = torch.rand(2, 300, 2, dtype=torch.float64)
    grad = torch.randn(2, 300, 2, dtype=torch.float64)
    full = torch.ops.tpswarp._tps_transform_backward(grad, points, src, params, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        part = torch.ops.tpswarp._tps_transform_backward(grad, points, src, params, mask)
        for g, f, need in zip(part, full, mask):
            if need:
                assert torch.equal(g, f)
            else:
                assert g.numel() == 0


def test_solve_backward_output_mask():
    src = spread(3, 5, seed=9)
    dst = src + 0.1 * torch.randn_like(src)
    params = tpswarp.tps_solve(src, dst)
    grad = torch.randn_like(params)
    full = torch.ops.tpswarp._tps_solve_backward(grad, src, dst, params, 0.0, [True, True])
    for mask in ([True, False], [False, True]):
        part = torch.ops.tpswarp._tps_solve_backward(grad, src, dst, params, 0.0, mask)
        for g, f, need in zip(part, full, mask):
            assert torch.equal(g, f) if need else g.numel() == 0


def test_direct_op_rejects_bad_arguments():
    """The C++ kernels check their arguments too (torch.ops called directly, no Python validation)."""
    src = spread(2, 4, seed=10)
    with pytest.raises(ValueError, match="`reg`"):
        torch.ops.tpswarp.tps_solve(src, src, -1.0, True)
    with pytest.raises(ValueError, match="at least 3"):
        torch.ops.tpswarp.tps_solve(src[:, :2], src[:, :2], 0.0, True)
    with pytest.raises(ValueError, match="`params`"):
        torch.ops.tpswarp.tps_transform(src, src, torch.zeros(2, 6, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="`points`"):
        torch.ops.tpswarp.tps_transform(src.long(), src, torch.zeros(2, 7, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="`grad_params`"):
        torch.ops.tpswarp._tps_solve_backward(torch.zeros(2, 5, 2), src, src, torch.zeros(2, 7, 2), 0.0, [True, True])
