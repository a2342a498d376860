"""tps_transform: reference vs a float64 NumPy evaluation, every backend vs the reference
(dtypes, layouts, gradients), gradcheck, opcheck and bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tpswarp
from tpswarp import reference
from tpswarp.testing import assert_close, non_contiguous, quadrant_points, random_tps


def np_phi(r2: np.ndarray) -> np.ndarray:
    safe = np.where(r2 > 0, r2, 1.0)
    return np.where(r2 > 0, 0.5 * r2 * np.log(safe), 0.0)


def np_tps_eval(points: np.ndarray, src: np.ndarray, params: np.ndarray) -> np.ndarray:
    """f(q) = sum_i W_i phi(|q - src_i|) + a_0 + a_x q_x + a_y q_y, one item, float64."""
    n = src.shape[0]
    U = np_phi(((points[:, None, :] - src[None, :, :]) ** 2).sum(-1))
    return U @ params[:n] + params[n] + points[:, :1] * params[n + 1] + points[:, 1:] * params[n + 2]


def np_eval_batch(points, src, params) -> torch.Tensor:
    p, s, w = (t.detach().double().numpy() for t in (points, src, params))
    return torch.from_numpy(np.stack([np_tps_eval(*item) for item in zip(p, s, w)]))


def random_inputs(batch: int, m: int, n: int, *, seed: int = 0, dtype=torch.float64):
    """Arbitrary (not necessarily solved) params: tps_transform must evaluate any of them.
    Some points coincide with control points (phi(0) = 0, and its gradient)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(batch, n, 2, generator=g, dtype=torch.float64) * 1.8 - 0.9
    params = torch.randn(batch, n + 3, 2, generator=g, dtype=torch.float64)
    points = torch.rand(batch, m, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2
    k = min(m, n)
    points[:, :k] = src[:, :k]
    return points.to(dtype), src.to(dtype), params.to(dtype)


# ----------------------------------------------------------------------------- reference vs oracle


@pytest.mark.parametrize("batch, m, n", [(1, 1, 3), (2, 17, 4), (3, 9, 10)])
def test_reference_matches_numpy(batch, m, n):
    points, src, params = random_inputs(batch, m, n, seed=1)
    out = reference.tps_transform(points, src, params)
    assert out.shape == (batch, m, 2) and out.dtype == torch.float64
    assert_close(out, np_eval_batch(points, src, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_matches_numpy(backend, dtype):
    points, src, params = random_inputs(2, 13, 5, seed=2, dtype=dtype)
    out = tpswarp.tps_transform(points, src, params)
    assert out.dtype == dtype
    assert_close(out, np_eval_batch(points, src, params).to(dtype))


def test_affine_params_give_affine_map(backend):
    points, src, _ = random_inputs(2, 11, 4, seed=3)
    params = torch.zeros(2, 7, 2, dtype=torch.float64)
    params[:, 4:] = torch.tensor([[0.2, -0.1], [0.9, 0.3], [-0.4, 1.1]], dtype=torch.float64)
    expected = params[:, 4:5] + points[..., :1] * params[:, 5:6] + points[..., 1:] * params[:, 6:7]
    assert_close(tpswarp.tps_transform(points, src, params), expected)


def test_identity_solve_gives_identity_map(backend):
    src = quadrant_points(2, dtype=torch.float64)
    points, _, _ = random_inputs(2, 20, 4, seed=4)
    params = tpswarp.tps_solve(src, src)
    assert_close(tpswarp.tps_transform(points, src, params), points)


# ----------------------------------------------------------------------------- backends vs reference

DTYPE_CASES = {
    # id: (points dtype, src dtype, params dtype) -> output is their promotion
    "f32": (torch.float32, torch.float32, torch.float32),
    "f64": (torch.float64, torch.float64, torch.float64),
    "f32_points_f64_params": (torch.float32, torch.float32, torch.float64),
    "f16_points": (torch.float16, torch.float32, torch.float32),
    "f16_all": (torch.float16, torch.float16, torch.float16),
    "bf16_all": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "non_contiguous":
        out = non_contiguous(t)
        assert not out.is_contiguous()
        return out
    if layout == "transposed":  # (B, m, 2) stored as (B, 2, m)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


@pytest.mark.parametrize("dtypes", list(DTYPE_CASES.values()), ids=list(DTYPE_CASES))
@pytest.mark.parametrize("layout", ["contiguous", "non_contiguous", "transposed"])
def test_matches_reference_with_gradients(backend, dtypes, layout):
    points, src, params = random_inputs(3, 10, 5, seed=5)
    points, src, params = (_layout(t.to(d), layout) for t, d in zip((points, src, params), dtypes))
    out_dtype = torch.promote_types(torch.promote_types(dtypes[0], dtypes[1]), dtypes[2])
    grad = torch.randn(3, 10, 2, dtype=torch.float64).to(out_dtype)

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in (points, src, params)]
        out = fn(*leaves)
        out.backward(grad)
        return out, [leaf.grad for leaf in leaves]

    out, grads = run(tpswarp.tps_transform)
    ref, ref_grads = run(reference.tps_transform)
    assert out.dtype == out_dtype and out.shape == (3, 10, 2)
    assert_close(out, ref)
    for g, r, d in zip(grads, ref_grads, dtypes):
        assert g.dtype == d
        assert torch.isfinite(g).all()
        assert_close(g, r, grad=True)


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)])
def test_partial_gradients(backend, wanted):
    """Only the requested gradients are computed, and they equal the reference's."""
    points, src, params = random_inputs(2, 8, 4, seed=6)
    grad = torch.randn(2, 8, 2, dtype=torch.float64)
    results = []
    for fn in (tpswarp.tps_transform, reference.tps_transform):
        leaves = [t.clone().requires_grad_(w) for t, w in zip((points, src, params), wanted)]
        fn(*leaves).backward(grad)
        results.append([leaf.grad for leaf in leaves])
    for g, r, w in zip(*results, wanted):
        if w:
            assert_close(g, r, grad=True)
        else:
            assert g is None


def test_gradient_at_control_points_is_finite(backend):
    """phi(r) = r^2 log r has gradient 0 at r = 0: evaluating at a control point must not give NaN."""
    src = quadrant_points(1, dtype=torch.float64)
    params = torch.randn(1, 7, 2, dtype=torch.float64)
    points = src.clone().requires_grad_()
    s = src.clone().requires_grad_()
    out = tpswarp.tps_transform(points, s, params)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(points.grad).all() and torch.isfinite(s.grad).all()
    # at q = src_i the radial term i contributes nothing: d f / d q is the affine part plus the
    # gradients of the other radial terms; compare with float64 NumPy central differences.
    eps = 1e-6
    p = points.detach().numpy()[0]
    s_np, w = src.numpy()[0], params.numpy()[0]
    for k in range(4):
        for axis in range(2):
            hi, lo = p.copy(), p.copy()
            hi[k, axis] += eps
            lo[k, axis] -= eps
            num = (np_tps_eval(hi[k : k + 1], s_np, w) - np_tps_eval(lo[k : k + 1], s_np, w)) / (2 * eps)
            jac = torch.autograd.functional.jacobian(
                lambda q: tpswarp.tps_transform(q, src, params), points.detach()[:, k : k + 1]
            )[0, 0, :, 0, 0, axis]
            torch.testing.assert_close(jac, torch.from_numpy(num[0]), rtol=1e-5, atol=1e-5)


def test_empty_points(backend):
    points = torch.zeros(2, 0, 2, requires_grad=True)
    src, _, params = random_tps(2)
    out = tpswarp.tps_transform(points, src, params)
    assert out.shape == (2, 0, 2)
    out.sum().backward()
    assert points.grad.shape == (2, 0, 2)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    m=st.integers(1, 20),
    n=st.integers(3, 8),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layout=st.sampled_from(["contiguous", "non_contiguous", "transposed"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_numpy(backend, batch, m, n, dtype, layout, seed):
    points, src, params = (_layout(t, layout) for t in random_inputs(batch, m, n, seed=seed, dtype=dtype))
    out = tpswarp.tps_transform(points, src, params)
    assert_close(out, np_eval_batch(points, src, params).to(dtype))


# ----------------------------------------------------------------------------- gradcheck, opcheck


def test_gradcheck(backend):
    points, src, params = random_inputs(2, 6, 4, seed=7)
    points[:, :4] += 0.05  # away from r = 0, where phi is only C^1
    inputs = tuple(t.requires_grad_() for t in (points, src, params))
    assert torch.autograd.gradcheck(tpswarp.tps_transform, inputs)


def test_opcheck(backend):
    points, src, params = random_inputs(2, 7, 4, seed=9, dtype=torch.float32)
    torch.library.opcheck(torch.ops.tpswarp.tps_transform,
                          (points.requires_grad_(), src.requires_grad_(), params.requires_grad_()))


def test_opcheck_mixed_dtypes(backend):
    """half points, float32 src, float64 params; gradient to two of the three inputs."""
    points, src, params = random_inputs(2, 5, 4, seed=10)
    torch.library.opcheck(torch.ops.tpswarp.tps_transform,
                          (points.half().requires_grad_(), src.float(), params.requires_grad_()))


# ----------------------------------------------------------------------------- bad inputs


def _good():
    src, _, params = random_tps(2)
    return torch.rand(2, 5, 2), src, params


BAD_INPUTS = [
    ("points_rank", lambda p, s, w: (p[0], s, w), ValueError, "`points`"),
    ("points_last_dim", lambda p, s, w: (torch.rand(2, 5, 3), s, w), ValueError, "`points`"),
    ("src_rank", lambda p, s, w: (p, s[0], w), ValueError, "`src`"),
    ("params_rows", lambda p, s, w: (p, s, w[:, :-1]), ValueError, "`params`"),
    ("params_cols", lambda p, s, w: (p, s, torch.cat([w, w], -1)), ValueError, "`params`"),
    ("params_rank", lambda p, s, w: (p, s, w[0]), ValueError, "`params`"),
    ("batch_src", lambda p, s, w: (p, s[:1], w[:1]), ValueError, "`src`"),
    ("batch_params", lambda p, s, w: (p, s, w[:1]), ValueError, "`params`"),
    ("int_points", lambda p, s, w: (p.long(), s, w), TypeError, "`points`"),
    ("int_src", lambda p, s, w: (p, s.int(), w), TypeError, "`src`"),
    ("int_params", lambda p, s, w: (p, s, w.long()), TypeError, "`params`"),
    ("device_src", lambda p, s, w: (p, s.to("meta"), w), RuntimeError, "`src`"),
    ("device_params", lambda p, s, w: (p, s, w.to("meta")), RuntimeError, "`params`"),
]


@pytest.mark.parametrize("fn", [tpswarp.tps_transform, reference.tps_transform], ids=["public", "reference"])
@pytest.mark.parametrize("make, exc, pattern", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(backend, fn, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(*make(*_good()))
