"""tps_solve: reference vs float64 NumPy and scipy oracles, every backend vs the reference,
gradients, gradcheck, opcheck, singular systems and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.interpolate import RBFInterpolator

import tpswarp
from tpswarp import reference
from tpswarp.testing import assert_close, non_contiguous, quadrant_points, tolerance

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- oracles


def np_phi(r2: np.ndarray) -> np.ndarray:
    """phi(r) = r^2 log r from the squared distance, phi(0) = 0."""
    safe = np.where(r2 > 0, r2, 1.0)
    return np.where(r2 > 0, 0.5 * r2 * np.log(safe), 0.0)


def np_tps_solve(src: np.ndarray, dst: np.ndarray, reg: float = 0.0) -> np.ndarray:
    """float64 solve of [[K + reg I, P], [P^T, 0]] [W; A] = [dst; 0] for one item (n, 2)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n = src.shape[0]
    K = np_phi(((src[:, None, :] - src[None, :, :]) ** 2).sum(-1)) + reg * np.eye(n)
    P = np.hstack([np.ones((n, 1)), src])
    L = np.zeros((n + 3, n + 3))
    L[:n, :n], L[:n, n:], L[n:, :n] = K, P, P.T
    rhs = np.vstack([dst, np.zeros((3, 2))])
    return np.linalg.solve(L, rhs)


def np_tps_eval(points: np.ndarray, src: np.ndarray, params: np.ndarray) -> np.ndarray:
    n = src.shape[0]
    U = np_phi(((points[:, None, :] - src[None, :, :]) ** 2).sum(-1))
    return U @ params[:n] + params[n] + points[:, :1] * params[n + 1] + points[:, 1:] * params[n + 2]


def spread_points(rng: np.random.Generator, batch: int, n: int, min_dist: float = 0.25,
                  scale: float = 0.9) -> np.ndarray:
    """(batch, n, 2) points in [-scale, scale]^2, pairwise at least ``min_dist * scale`` apart
    (well-conditioned systems, so float64 comparisons can be tight)."""
    out = np.empty((batch, n, 2))
    for b in range(batch):
        pts: list = []
        while len(pts) < n:
            p = rng.uniform(-scale, scale, 2)
            if all(np.hypot(*(p - q)) >= min_dist * scale for q in pts):
                pts.append(p)
        out[b] = pts
    return out


def make_problem(seed: int, batch: int, n: int, noise: float = 0.2):
    rng = np.random.default_rng(seed)
    src = spread_points(rng, batch, n)
    dst = src + noise * rng.standard_normal(src.shape)
    return src, dst


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64)


# ----------------------------------------------------------------------------- reference vs oracles


@pytest.mark.parametrize("n", [3, 4, 9])
@pytest.mark.parametrize("reg", [0.0, 0.05])
def test_reference_matches_numpy(n, reg):
    src, dst = make_problem(1, 3, n)
    params = reference.tps_solve(t64(src), t64(dst), reg=reg)
    assert params.shape == (3, n + 3, 2) and params.dtype == torch.float64
    expected = np.stack([np_tps_solve(s, d, reg) for s, d in zip(src, dst)])
    assert_close(params, t64(expected))


@pytest.mark.parametrize("n", [3, 5, 8])
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_reference_matches_scipy_rbf(n, reg):
    """scipy's thin_plate_spline kernel is r^2 log r and `smoothing` is added to the kernel
    diagonal, so RBFInterpolator(degree=1, smoothing=reg) is the same function."""
    src, dst = make_problem(2, 2, n)
    params = reference.tps_solve(t64(src), t64(dst), reg=reg)
    rng = np.random.default_rng(3)
    points = rng.uniform(-1.2, 1.2, (2, 40, 2))
    got = reference.tps_transform(t64(points), t64(src), params)
    for b in range(2):
        rbf = RBFInterpolator(src[b], dst[b], kernel="thin_plate_spline", degree=1, smoothing=reg)
        assert_close(got[b], t64(rbf(points[b])))


def test_reference_reproduces_affine_maps():
    """A TPS interpolating an affine map is that affine map: W = 0."""
    src, _ = make_problem(4, 2, 6)
    A = np.array([[0.1, -0.2], [1.3, 0.4], [-0.3, 0.8]])  # rows: 1, x, y
    dst = A[0] + src[..., :1] * A[1] + src[..., 1:] * A[2]
    params = reference.tps_solve(t64(src), t64(dst))
    assert_close(params[:, :6], torch.zeros(2, 6, 2, dtype=torch.float64))
    assert_close(params[:, 6:], t64(np.broadcast_to(A, (2, 3, 2))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 4, 7])
def test_interpolates_control_points(backend, dtype, n):
    src, dst = make_problem(5, 2, n)
    src, dst = t64(src).to(dtype), t64(dst).to(dtype)
    params = tpswarp.tps_solve(src, dst)
    assert params.dtype == dtype
    assert_close(tpswarp.tps_transform(src, src, params), dst)


@pytest.mark.parametrize("reg", [0.01, 0.3])
def test_smoothing_spline(backend, reg):
    """reg > 0 matches NumPy with reg * I in the kernel block and no longer interpolates:
    the first block row of the system gives f(src) = dst - reg * W."""
    src, dst = make_problem(6, 2, 6)
    params = tpswarp.tps_solve(t64(src), t64(dst), reg=reg)
    expected = np.stack([np_tps_solve(s, d, reg) for s, d in zip(src, dst)])
    assert_close(params, t64(expected))
    fitted = tpswarp.tps_transform(t64(src), t64(src), params)
    assert_close(fitted, t64(dst) - reg * params[:, :6])
    assert (fitted - t64(dst)).abs().max() > 1e-3  # it really smooths


# ----------------------------------------------------------------------------- backends vs reference


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "non_contiguous":
        out = non_contiguous(t)
        assert not out.is_contiguous()
        return out
    if layout == "expanded":  # stride-0 batch dimension
        return t[:1].expand_as(t)
    return t.contiguous()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "non_contiguous", "expanded"])
@pytest.mark.parametrize("reg", [0.0, 0.02])
def test_matches_reference_with_gradients(backend, dtype, layout, reg):
    src, dst = make_problem(7, 3, 5)
    if layout == "expanded":
        src[1:] = src[0]  # the expanded view repeats item 0
    src = _layout(t64(src).to(dtype), layout)
    dst = _layout(t64(dst).to(dtype), layout)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad = torch.randn(3, 8, 2, dtype=out_dtype)

    def run(fn):
        s, d = src.detach().requires_grad_(), dst.detach().requires_grad_()
        params = fn(s, d, reg=reg)
        params.backward(grad)
        return params, s.grad, d.grad

    params, g_src, g_dst = run(tpswarp.tps_solve)
    ref_params, ref_src, ref_dst = run(reference.tps_solve)
    assert params.dtype == out_dtype and params.shape == (3, 8, 2)
    assert g_src.dtype == dtype and g_dst.dtype == dtype
    assert_close(params, ref_params, dtype=out_dtype)
    assert_close(g_src, ref_src, grad=True, dtype=dtype)
    assert_close(g_dst, ref_dst, grad=True, dtype=dtype)


def test_batch_items_are_independent(backend):
    src, dst = make_problem(8, 3, 6)
    batched = tpswarp.tps_solve(t64(src), t64(dst))
    for b in range(3):
        single = tpswarp.tps_solve(t64(src[b : b + 1]), t64(dst[b : b + 1]))
        assert_close(batched[b : b + 1], single)


def test_empty_batch(backend):
    params = tpswarp.tps_solve(torch.zeros(0, 4, 2), torch.zeros(0, 4, 2))
    assert params.shape == (0, 7, 2) and params.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_solved_accurately(backend, dtype):
    """Half points give float32 params as accurate as a float64 solve of the same (rounded)
    points, within 1e-4 (the solve is done in higher precision, not in half)."""
    src, dst = make_problem(9, 2, 6)
    src_h, dst_h = t64(src).to(dtype), t64(dst).to(dtype)
    params = tpswarp.tps_solve(src_h, dst_h)
    assert params.dtype == torch.float32
    expected = np.stack([np_tps_solve(s, d) for s, d in zip(src_h.double().numpy(), dst_h.double().numpy())])
    torch.testing.assert_close(params, t64(expected).float(), rtol=1e-4, atol=1e-4)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    n=st.integers(3, 9),
    reg=st.sampled_from([0.0, 0.0, 1e-3, 0.5]),
    scale=st.sampled_from([1e-2, 1.0, 50.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_numpy(backend, batch, n, reg, scale, dtype, seed):
    """Random point sets at several scales (the singularity test is relative to the scale)."""
    src, dst = make_problem(seed, batch, n)
    src, dst = t64(src * scale).to(dtype), t64(dst * scale).to(dtype)
    params = tpswarp.tps_solve(src, dst, reg=reg)
    src64, dst64 = src.double().numpy(), dst.double().numpy()  # the points as rounded to dtype
    expected = np.stack([np_tps_solve(s, d, reg) for s, d in zip(src64, dst64)])
    # float32 params are the float64 solution rounded: compare at float32 resolution.
    assert_close(params, t64(expected).to(dtype))
    if reg == 0.0:
        fitted = np.stack([np_tps_eval(s, s, p) for s, p in zip(src64, params.double().numpy())])
        # f(src) = dst up to the rounding of params to dtype; dst is of size `scale`.
        np.testing.assert_allclose(fitted, dst64, rtol=0, atol=tolerance(dtype)["atol"] * scale)


# ----------------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_gradcheck(backend, reg):
    src, dst = make_problem(10, 2, 5)
    s = t64(src).requires_grad_()
    d = t64(dst).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, d: tpswarp.tps_solve(s, d, reg=reg), (s, d))


def test_gradcheck_singular_check_disabled(backend):
    src, dst = make_problem(11, 1, 4)
    s, d = t64(src).requires_grad_(), t64(dst).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, d: tpswarp.tps_solve(s, d, check_singular=False), (s, d))


@pytest.mark.parametrize("dtype, reg, check_singular, wanted", [
    (torch.float64, 0.0, True, (True, True)),
    (torch.float32, 0.1, False, (False, True)),  # one gradient: the backward's output_mask
])
def test_opcheck(backend, dtype, reg, check_singular, wanted):
    src, dst = make_problem(12, 2, 5)
    s = t64(src).to(dtype).requires_grad_(wanted[0])
    d = t64(dst).to(dtype).requires_grad_(wanted[1])
    torch.library.opcheck(torch.ops.tpswarp.tps_solve, (s, d, reg, check_singular))


def test_opcheck_half_inputs(backend):
    src, dst = make_problem(13, 2, 4)
    s = t64(src).half().requires_grad_()
    d = t64(dst).half()
    torch.library.opcheck(torch.ops.tpswarp.tps_solve, (s, d, 0.0, True))


# ----------------------------------------------------------------------------- singular systems


def _duplicate_points():
    src = quadrant_points(2, dtype=torch.float64)
    src = torch.cat([src, src[:, :1]], dim=1)  # point 0 repeated
    dst = src + 0.1 * torch.randn_like(src)
    return src, dst


def _collinear_points():
    t = torch.linspace(-0.8, 0.7, 5, dtype=torch.float64)
    src = torch.stack([t, 0.5 * t + 0.1], dim=-1).expand(2, 5, 2).contiguous()
    dst = src + 0.1 * torch.randn_like(src)
    return src, dst


@pytest.mark.parametrize("fn", [tpswarp.tps_solve, reference.tps_solve], ids=["public", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicate_points_raise_without_reg(backend, fn, dtype):
    src, dst = _duplicate_points()
    with pytest.raises(ValueError, match="singular"):
        fn(src.to(dtype), dst.to(dtype))


@pytest.mark.parametrize("fn", [tpswarp.tps_solve, reference.tps_solve], ids=["public", "reference"])
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_collinear_points_raise(backend, fn, reg):
    src, dst = _collinear_points()
    with pytest.raises(ValueError, match="singular"):
        fn(src, dst, reg=reg)


def test_all_points_equal_raise(backend):
    src = torch.full((1, 4, 2), 0.3, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        tpswarp.tps_solve(src, src + 0.1, reg=0.5)


def test_singular_item_in_batch_is_reported(backend):
    """One singular item among regular ones is enough to raise."""
    src, dst = make_problem(14, 3, 5)
    src, dst = t64(src), t64(dst)
    src[1, 3] = src[1, 0]
    with pytest.raises(ValueError, match="singular"):
        tpswarp.tps_solve(src, dst)


def test_duplicate_points_with_reg_are_solved(backend):
    src, dst = _duplicate_points()
    params = tpswarp.tps_solve(src, dst, reg=0.1)
    assert torch.isfinite(params).all()
    expected = np.stack([np_tps_solve(s, d, 0.1) for s, d in zip(src.numpy(), dst.numpy())])
    assert_close(params, t64(expected))


def test_tiny_but_regular_configuration_is_not_singular(backend):
    """The singularity thresholds are relative: a small, well-shaped point set is fine."""
    src, dst = make_problem(15, 1, 5)
    src, dst = t64(src) * 1e-3, t64(dst) * 1e-3
    params = tpswarp.tps_solve(src, dst)
    assert_close(tpswarp.tps_transform(src, src, params), dst)


def test_check_singular_false_on_well_posed_system(backend):
    src, dst = make_problem(16, 2, 6)
    src, dst = t64(src), t64(dst)
    assert_close(tpswarp.tps_solve(src, dst, check_singular=False), tpswarp.tps_solve(src, dst))


# ----------------------------------------------------------------------------- bad inputs


def _good():
    return quadrant_points(2), quadrant_points(2) + 0.1


BAD_INPUTS = [
    # (id, kwargs to tps_solve, exception, message pattern)
    ("src_rank", lambda s, d: dict(src=s[0], dst=d), ValueError, "`src`"),
    ("dst_rank", lambda s, d: dict(src=s, dst=d[None]), ValueError, "`dst`"),
    ("src_last_dim", lambda s, d: dict(src=torch.zeros(2, 4, 3), dst=d), ValueError, "`src`"),
    ("shape_mismatch", lambda s, d: dict(src=s, dst=d[:, :3]), ValueError, "`src`"),
    ("batch_mismatch", lambda s, d: dict(src=s, dst=d[:1]), ValueError, "`dst`"),
    ("n_below_3", lambda s, d: dict(src=s[:, :2], dst=d[:, :2]), ValueError, "`src`"),
    ("int_src", lambda s, d: dict(src=s.long(), dst=d), TypeError, "`src`"),
    ("int_dst", lambda s, d: dict(src=s, dst=d.int()), TypeError, "`dst`"),
    ("bool_src", lambda s, d: dict(src=s > 0, dst=d), TypeError, "`src`"),
    ("not_a_tensor", lambda s, d: dict(src=s.tolist(), dst=d), TypeError, "`src`"),
    ("negative_reg", lambda s, d: dict(src=s, dst=d, reg=-0.1), ValueError, "`reg`"),
    ("nan_reg", lambda s, d: dict(src=s, dst=d, reg=float("nan")), ValueError, "`reg`"),
    ("device_mismatch", lambda s, d: dict(src=s, dst=d.to("meta")), RuntimeError, "`dst`"),
]


@pytest.mark.parametrize("fn", [tpswarp.tps_solve, reference.tps_solve], ids=["public", "reference"])
@pytest.mark.parametrize("make, exc, pattern", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(backend, fn, make, exc, pattern):
    kwargs = make(*_good())
    src, dst = kwargs.pop("src"), kwargs.pop("dst")
    with pytest.raises(exc, match=pattern):
        fn(src, dst, **kwargs)


@pytest.mark.parametrize("n", [3, 5, 9, 16, 17, 25])
def test_grid_control_points_are_well_conditioned(n):
    """tpswarp.testing.random_tps(points="grid"): distinct jittered grid nodes, moderate TPS weights
    (uniform random points can nearly coincide; the GPU tests of many control points rely on this)."""
    from tpswarp.testing import jittered_grid_points, random_tps

    g = torch.Generator().manual_seed(n)
    pts = jittered_grid_points(64, n, generator=g)
    assert pts.shape == (64, n, 2) and pts.dtype == torch.float64
    m = max(2, math.ceil(math.sqrt(n)))
    spacing = 1.5 / (m - 1)
    dist = torch.cdist(pts, pts) + torch.eye(n, dtype=torch.float64) * 10
    assert dist.min() >= 0.9 * spacing and pts.abs().max() <= 0.75 + spacing / 20
    src, dst, params = random_tps(64, n=n, scale=0.1, generator=g, dtype=torch.float64, points="grid")
    assert params.abs().max() < 20
    with pytest.raises(ValueError, match="points"):
        random_tps(2, n=n, points="uniform")
