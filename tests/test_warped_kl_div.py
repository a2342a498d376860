"""tpswarp.warped_kl_div: vs the composition masked_kl_div(tps_warp(...)), vs an independent
grid_sample + numpy oracle, every backend vs the reference (gradients w.r.t. student,
teacher, params), empty validity, extreme logits, gradcheck, opcheck, torch.compile of the
three fused ops, hypothesis properties and argument errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tpswarp
from tpswarp.testing import assert_close, non_contiguous, quadrant_points, random_tps, to_channels_last

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------
# independent oracle: explicit grid + grid_sample + numpy KL
# --------------------------------------------------------------------------------------
def _log_softmax_np(x):
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _kl_np(student, teacher, mask, teacher_is_logits, reduction):
    s = student.detach().double().numpy()
    t = teacher.detach().double().numpy()
    log_q = _log_softmax_np(s)
    if teacher_is_logits:
        log_p = _log_softmax_np(t)
        p = np.exp(log_p)
    else:
        p = t
        with np.errstate(divide="ignore"):
            log_p = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    kl = np.where(p > 0, p * (log_p - log_q), 0.0).sum(axis=1)
    w = mask.double().numpy()
    kl = w * kl
    if reduction == "none":
        return torch.from_numpy(kl)
    if reduction == "sum":
        return torch.tensor(kl.sum(), dtype=torch.float64)
    return torch.tensor(kl.sum() / w.sum() if w.sum() else 0.0, dtype=torch.float64)


def _pixel_centres(B, H, W, align_corners):
    """Normalized (x, y) of every output pixel, (B, H*W, 2), float64, row-major."""
    if align_corners:
        xs = np.array([2 * j / (W - 1) - 1 if W > 1 else 0.0 for j in range(W)])
        ys = np.array([2 * i / (H - 1) - 1 if H > 1 else 0.0 for i in range(H)])
    else:
        xs = np.array([(2 * j + 1) / W - 1 for j in range(W)])
        ys = np.array([(2 * i + 1) / H - 1 for i in range(H)])
    pts = np.array([[x, y] for y in ys for x in xs])
    return torch.from_numpy(pts).expand(B, -1, -1).contiguous()


def oracle(student, teacher, src, params, *, teacher_is_logits, align_corners, reduction):
    B, C, H, W = student.shape
    Ht, Wt = teacher.shape[2:]
    q = _pixel_centres(B, H, W, align_corners)
    grid = tpswarp.tps_transform(q, src.double(), params.double()).view(B, H, W, 2)
    warped = F.grid_sample(teacher.detach().double(), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=align_corners)
    gx, gy = grid[..., 0], grid[..., 1]
    if align_corners:
        px, py = (gx + 1) / 2 * (Wt - 1), (gy + 1) / 2 * (Ht - 1)
    else:
        px, py = ((gx + 1) * Wt - 1) / 2, ((gy + 1) * Ht - 1) / 2
    valid = (px >= 0) & (px <= Wt - 1) & (py >= 0) & (py <= Ht - 1)
    return _kl_np(student, warped, valid, teacher_is_logits, reduction), valid


def _inputs(B=2, C=4, H=5, W=6, Ht=None, Wt=None, *, teacher_is_logits=False, dtype=torch.float64, seed=0,
            scale=0.25):
    gen = torch.Generator().manual_seed(seed)
    Ht, Wt = Ht or H, Wt or W
    student = 2 * torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    t = 2 * torch.randn(B, C, Ht, Wt, generator=gen, dtype=torch.float64)
    teacher = t if teacher_is_logits else t.softmax(1)
    src, _, params = random_tps(B, scale=scale, generator=gen, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype), src.to(dtype), params.to(dtype)


# --------------------------------------------------------------------------------------
# 1. vs the composition and vs the independent oracle
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("teacher_size", [(5, 6), (8, 11), (3, 4)], ids=["same", "larger", "smaller"])
def test_matches_composition(backend, teacher_size, teacher_is_logits, align_corners, reduction):
    student, teacher, src, params = _inputs(Ht=teacher_size[0], Wt=teacher_size[1],
                                            teacher_is_logits=teacher_is_logits, seed=1)
    out = tpswarp.warped_kl_div(student, teacher, src, params, teacher_is_logits=teacher_is_logits,
                                align_corners=align_corners, reduction=reduction)
    warped, valid = tpswarp.tps_warp(teacher, src, params, align_corners=align_corners, size=(5, 6))
    assert valid.any() and not valid.all()  # the warp leaves the image somewhere
    expected = tpswarp.masked_kl_div(student, warped, valid, teacher_is_logits=teacher_is_logits,
                                     reduction=reduction)
    assert out.dtype == torch.float64 and out.shape == expected.shape
    assert_close(out, expected)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("teacher_size", [(5, 6), (9, 7)], ids=["same", "other"])
def test_matches_grid_sample_oracle(backend, teacher_size, teacher_is_logits, align_corners):
    student, teacher, src, params = _inputs(Ht=teacher_size[0], Wt=teacher_size[1],
                                            teacher_is_logits=teacher_is_logits, seed=2)
    for reduction in REDUCTIONS:
        expected, valid = oracle(student, teacher, src, params, teacher_is_logits=teacher_is_logits,
                                 align_corners=align_corners, reduction=reduction)
        assert 0 < valid.sum() < valid.numel()
        kw = dict(teacher_is_logits=teacher_is_logits, align_corners=align_corners, reduction=reduction)
        torch.testing.assert_close(tpswarp.reference.warped_kl_div(student, teacher, src, params, **kw), expected,
                                   rtol=1e-10, atol=1e-12)
        assert_close(tpswarp.warped_kl_div(student, teacher, src, params, **kw), expected)


def test_logits_are_warped_before_softmax(backend):
    # Warping logits then softmax differs from warping probabilities: the modes are not aliases.
    student, logits, src, params = _inputs(teacher_is_logits=True, seed=3)
    a = tpswarp.warped_kl_div(student, logits, src, params, teacher_is_logits=True)
    b = tpswarp.warped_kl_div(student, logits.softmax(1), src, params, teacher_is_logits=False)
    assert (a - b).abs() > 1e-6
    expected, _ = oracle(student, logits, src, params, teacher_is_logits=True, align_corners=False,
                         reduction="mean")
    assert_close(a, expected)


# --------------------------------------------------------------------------------------
# 2. backends vs the reference
# --------------------------------------------------------------------------------------
def _layout(t, layout):
    if layout == "channels_last":
        return to_channels_last(t)
    if layout == "non_contiguous":
        return non_contiguous(t)
    return t


def _grads_both(student, teacher, src, params, upstream_dtype, gen, **kw):
    upcast = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # noqa: E731
    a = [x.detach().clone().requires_grad_(True) for x in (student, teacher, src, params)]
    r = [upcast(x.detach()).clone().requires_grad_(True) for x in (student, teacher, src, params)]
    out = tpswarp.warped_kl_div(*a, **kw)
    ref = tpswarp.reference.warped_kl_div(*r, **kw)
    grad = 0.5 + torch.rand(out.shape, generator=gen, dtype=upstream_dtype)
    return out, ref, torch.autograd.grad(out, a, grad), torch.autograd.grad(ref, r, grad.to(ref.dtype))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_reference(backend, dtype, reduction, layout):
    gen = torch.Generator().manual_seed(4)
    teacher_is_logits = reduction != "sum"
    student, teacher, src, params = _inputs(3, 4, 5, 7, 6, 9, teacher_is_logits=teacher_is_logits, dtype=dtype,
                                            seed=4)
    student, teacher = _layout(student, layout), _layout(teacher, layout)
    out, ref, grads, ref_grads = _grads_both(student, teacher, src, params, dtype, gen,
                                             teacher_is_logits=teacher_is_logits, reduction=reduction)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref)
    for name, g, r in zip(("student_logits", "teacher", "src", "params"), grads, ref_grads):
        assert g.shape == r.shape
        assert_close(g, r, grad=True, msg=f"gradient w.r.t. {name}")
    assert all(g.abs().sum() > 0 for g in (grads[0], grads[1], grads[3]))


_ROW_PAIR_CASE = """
import torch, tpswarp
from tpswarp import reference
import sys
sys.path.insert(0, {tests!r})
from test_warped_kl_div import _inputs
worst = 0.0
for Ht, Wt in ((9, 37), (4, 2), (5, 3)):
    for teacher_is_logits in (False, True):
        student, teacher, src, params = _inputs(2, 5, 7, 37, Ht, Wt, teacher_is_logits=teacher_is_logits,
                                                dtype=torch.float32, seed=Wt, scale=0.45)
        a = [x.clone().requires_grad_(True) for x in (student, teacher, src, params)]
        r = [x.double().requires_grad_(True) for x in (student, teacher, src, params)]
        kw = dict(teacher_is_logits=teacher_is_logits, reduction="mean")
        with tpswarp.use_backend("cpp"):
            out = tpswarp.warped_kl_div(*a, **kw)
            got = (out, *torch.autograd.grad(out, a))
        ref = reference.warped_kl_div(*r, **kw)
        want = (ref, *torch.autograd.grad(ref, r))
        for g, w in zip(got, want):
            err = ((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, err)
print("worst", worst)
"""


@pytest.mark.parametrize("no_avx2", [False, True], ids=["avx2", "baseline"])
def test_cpu_row_pair_gather_matches_reference(no_avx2):
    """The CPU kernel's float32 teacher gathers: the AVX2 row-pair path (8 pixels at a time, the
    value and its coordinate derivatives from one pair of loads) and the baseline path
    (TPSWARP_NO_AVX2=1), at a width with full vectors and a tail, teachers 2 and 3 pixels wide,
    taps leaving the image on both sides; all four gradients vs the float64 reference."""
    import os
    import subprocess
    import sys

    if not tpswarp.backends()["extension"]["built"]:
        pytest.skip("C++ extension not built")
    env = dict(os.environ)
    if no_avx2:
        env["TPSWARP_NO_AVX2"] = "1"
    code = _ROW_PAIR_CASE.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    worst = float(result.stdout.split("worst")[-1])
    assert worst < 2e-5, worst


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_float32_reference(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    for teacher_is_logits in (False, True):
        student, teacher, src, params = _inputs(teacher_is_logits=teacher_is_logits, dtype=torch.float32, seed=5)
        student, teacher = student.to(dtype), teacher.to(dtype)
        for reduction in REDUCTIONS:
            out, ref, grads, ref_grads = _grads_both(student, teacher, src, params, torch.float32, gen,
                                                     teacher_is_logits=teacher_is_logits, reduction=reduction)
            assert out.dtype == torch.float32
            assert_close(out, ref, dtype=dtype)
            assert grads[0].dtype == dtype and grads[1].dtype == dtype
            assert_close(grads[0].float(), ref_grads[0], grad=True, dtype=dtype)
            assert_close(grads[1].float(), ref_grads[1], grad=True, dtype=dtype)
            assert_close(grads[3].float(), ref_grads[3], grad=True, dtype=dtype)


def test_identity_warp_equals_masked_kl(backend):
    # sG = 0: the teacher is sampled at the student's own pixel centres.
    student, teacher, _, _ = _inputs(1, 3, 6, 6, dtype=torch.float64, seed=6)
    src = quadrant_points(1, dtype=torch.float64)
    params = tpswarp.tps_solve(src, src.clone())
    for reduction in REDUCTIONS:
        # border pixels (on the pixel-centre hull up to rounding) count as valid
        assert_close(tpswarp.warped_kl_div(student, teacher, src, params, reduction=reduction),
                     tpswarp.masked_kl_div(student, teacher, reduction=reduction))
    for dtype in (torch.float32, torch.float16):
        s32 = tpswarp.tps_solve(src.float(), src.float())
        assert_close(tpswarp.warped_kl_div(student.to(dtype), teacher.to(dtype), src.float(), s32),
                     tpswarp.masked_kl_div(student.to(dtype), teacher.to(dtype)), dtype=dtype)


# --------------------------------------------------------------------------------------
# 3. hypothesis properties
# --------------------------------------------------------------------------------------
@fixture_ok
@given(B=st.integers(1, 2), C=st.integers(1, 5), H=st.integers(1, 6), W=st.integers(1, 6),
       Ht=st.integers(1, 7), Wt=st.integers(1, 7), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(0.0, 0.6), teacher_is_logits=st.booleans(), align_corners=st.booleans())
def test_hypothesis_properties(backend, B, C, H, W, Ht, Wt, seed, scale, teacher_is_logits, align_corners):
    student, teacher, src, params = _inputs(B, C, H, W, Ht, Wt, teacher_is_logits=teacher_is_logits,
                                            dtype=torch.float32, seed=seed, scale=scale)
    kw = dict(teacher_is_logits=teacher_is_logits, align_corners=align_corners)
    none = tpswarp.warped_kl_div(student, teacher, src, params, reduction="none", **kw)
    total = tpswarp.warped_kl_div(student, teacher, src, params, reduction="sum", **kw)
    mean = tpswarp.warped_kl_div(student, teacher, src, params, reduction="mean", **kw)
    _, valid = tpswarp.tps_warp(teacher, src, params, align_corners=align_corners, size=(H, W))
    valid = valid[:, 0]
    assert none.shape == (B, H, W)
    assert torch.isfinite(none).all()
    assert none.min() >= -1e-5
    assert torch.all(none[~valid] == 0)
    assert_close(none.sum(), total)
    n = valid.sum()
    assert_close(mean, total / n if n > 0 else torch.zeros(()))


# --------------------------------------------------------------------------------------
# 4. empty validity and extreme logits
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_empty_valid_mask(backend, teacher_is_logits):
    student, teacher, src, _ = _inputs(teacher_is_logits=teacher_is_logits, dtype=torch.float32, seed=7)
    params = tpswarp.tps_solve(src, src + 4.0)  # every sample lands far outside the teacher
    _, valid = tpswarp.tps_warp(teacher, src, params)
    assert not valid.any()
    leaves = [x.clone().requires_grad_(True) for x in (student, teacher, params)]
    for reduction in REDUCTIONS:
        loss = tpswarp.warped_kl_div(leaves[0], leaves[1], src, leaves[2], teacher_is_logits=teacher_is_logits,
                                     reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss))
        grads = torch.autograd.grad(loss, leaves, torch.rand(loss.shape) + 0.5)
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g)), reduction


@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_extreme_logits_are_finite(backend, teacher_is_logits):
    gen = torch.Generator().manual_seed(8)
    student, _, src, params = _inputs(dtype=torch.float32, seed=8)
    sign = lambda shape: torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
    student = 1e4 * sign(student.shape)
    t = 1e4 * sign((2, 4, 7, 8))
    teacher = t if teacher_is_logits else t.softmax(1)
    leaves = [x.clone().requires_grad_(True) for x in (student, teacher, params)]
    for reduction in REDUCTIONS:
        loss = tpswarp.warped_kl_div(leaves[0], leaves[1], src, leaves[2], teacher_is_logits=teacher_is_logits,
                                     reduction=reduction)
        assert torch.isfinite(loss).all()
        expected, _ = oracle(student, teacher, src, params, teacher_is_logits=teacher_is_logits,
                             align_corners=False, reduction=reduction)
        # float32 grid: bilinear weights of ~1e4 logits carry ~1e-3 absolute error
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-2)
        grads = torch.autograd.grad(loss, leaves, torch.rand(loss.shape, generator=gen) + 0.5)
        assert all(torch.isfinite(g).all() for g in grads), reduction


# --------------------------------------------------------------------------------------
# 5. gradcheck
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("B, teacher_is_logits, reduction", [(2, False, "mean"), (1, True, "sum"), (1, True, "none"),
                                                           (1, False, "none")])
def test_gradcheck(backend, B, teacher_is_logits, reduction):
    student, teacher, src, params = _inputs(B, 2, 3, 3, 3, 4, teacher_is_logits=teacher_is_logits, seed=9)
    inputs = [x.clone().requires_grad_(True) for x in (student, teacher, params)]
    fn = lambda s, t, p: tpswarp.warped_kl_div(s, t, src, p, teacher_is_logits=teacher_is_logits,  # noqa: E731
                                               reduction=reduction)
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_through_solve(backend):
    # end to end: gradient w.r.t. the control points' destinations through tps_solve
    student, teacher, src, _ = _inputs(1, 3, 4, 4, seed=10)
    dst = (src + 0.1 * torch.randn(src.shape, generator=torch.Generator().manual_seed(10),
                                   dtype=torch.float64)).requires_grad_(True)
    fn = lambda d: tpswarp.warped_kl_div(student, teacher, src, tpswarp.tps_solve(src, d))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (dst,))


# --------------------------------------------------------------------------------------
# 6. opcheck
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_is_logits, align_corners, reduction", [
    (False, False, "mean"), (True, True, "sum"), (True, False, "none"),
])
def test_opcheck(backend, teacher_is_logits, align_corners, reduction):
    student, teacher, src, params = _inputs(2, 3, 4, 5, 6, 7, teacher_is_logits=teacher_is_logits,
                                            dtype=torch.float32, seed=11)
    args = (student.requires_grad_(True), teacher.requires_grad_(True), src, params.requires_grad_(True),
            teacher_is_logits, align_corners, reduction)
    torch.library.opcheck(torch.ops.tpswarp.warped_kl_div.default, args)


# --------------------------------------------------------------------------------------
# 7. torch.compile(fullgraph=True) of the three fused ops, forward and backward
# --------------------------------------------------------------------------------------
def _pipeline(image, b, s, h, c, perm, student, teacher, src, params, mask):
    x = tpswarp.photometric_jitter(image, b, s, h, c, perm)
    probs = x.mean(1, keepdim=True).expand(-1, student.shape[1], -1, -1).softmax(1)
    l1 = tpswarp.masked_kl_div(student, probs, mask, reduction="mean")
    l2 = tpswarp.warped_kl_div(student, teacher, src, params, teacher_is_logits=True)
    l3 = tpswarp.warped_kl_div(student, teacher.softmax(1), src, params, reduction="none")
    return x.square().mean() + l1 + l2 + l3.mean()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend, compile_backend):
    gen = torch.Generator().manual_seed(12)
    B = 2
    image = torch.rand(B, 3, 5, 6, generator=gen)
    b, s, h, c = -0.2 + 0.4 * torch.rand(4, B, generator=gen)
    s, c = s + 1.0, c + 1.0
    perm = torch.tensor([[2, 0, 1], [0, 1, 2]])
    student, teacher, src, params = _inputs(B, 4, 5, 6, 7, 8, teacher_is_logits=True, dtype=torch.float32, seed=12)
    mask = torch.rand(B, 5, 6, generator=gen) > 0.3
    leaves = [image, b, s, h, c, student, teacher, params]

    def run(fn):
        xs = [x.detach().clone().requires_grad_(True) for x in leaves]
        image_, b_, s_, h_, c_, student_, teacher_, params_ = xs
        loss = fn(image_, b_, s_, h_, c_, perm, student_, teacher_, src, params_, mask)
        return loss, torch.autograd.grad(loss, xs)

    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, fullgraph=True, backend=compile_backend)
    loss_c, grads_c = run(compiled)
    loss_e, grads_e = run(_pipeline)
    assert_close(loss_c, loss_e)
    for g_c, g_e in zip(grads_c, grads_e):
        assert_close(g_c, g_e, grad=True)


def _one_way(student, teacher, src, params, mask):
    probs = teacher[:, :, :5, :6].softmax(1)
    return (tpswarp.warped_kl_div(student, teacher, src, params, teacher_is_logits=True)
            + tpswarp.masked_kl_div(student, probs, mask, reduction="none").mean())


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_one_way(backend, compile_backend):
    """The student's gradient alone (the statistics ops on the GPU and Triton backends) under
    torch.compile(fullgraph=True)."""
    student, teacher, src, params = _inputs(2, 4, 5, 6, 7, 8, teacher_is_logits=True, dtype=torch.float32, seed=14)
    mask = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(14)) > 0.3

    def run(fn):
        leaf = student.detach().clone().requires_grad_(True)
        loss = fn(leaf, teacher, src, params, mask)
        return loss, torch.autograd.grad(loss, leaf)[0]

    torch._dynamo.reset()
    loss_c, grad_c = run(torch.compile(_one_way, fullgraph=True, backend=compile_backend))
    loss_e, grad_e = run(_one_way)
    assert_close(loss_c, loss_e)
    assert_close(grad_c, grad_e, grad=True)

    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    run(torch.compile(_one_way, fullgraph=True, backend=record))
    with_stats = {t.removesuffix(".default") for t in targets if "_with_stats" in t}
    expected = {"tpswarp._warped_kl_div_with_stats", "tpswarp._masked_kl_div_with_stats"}
    assert with_stats == (expected if backend == "triton" else set()), targets


# --------------------------------------------------------------------------------------
# 8. bad inputs
# --------------------------------------------------------------------------------------
def test_bad_inputs(backend):
    student, teacher, src, params = _inputs(dtype=torch.float32, seed=13)
    with pytest.raises(ValueError, match="`student_logits`"):
        tpswarp.warped_kl_div(student[0], teacher, src, params)
    with pytest.raises(ValueError, match="`student_logits`"):
        tpswarp.warped_kl_div(student[:, :, :, :, None], teacher, src, params)
    with pytest.raises(ValueError, match="`teacher`"):
        tpswarp.warped_kl_div(student, teacher[0], src, params)
    with pytest.raises(ValueError, match="`teacher`"):
        tpswarp.warped_kl_div(student, teacher[:, :3], src, params)
    with pytest.raises(ValueError, match="`teacher`"):
        tpswarp.warped_kl_div(student, teacher[:1], src, params)
    with pytest.raises(TypeError, match="`teacher`"):
        tpswarp.warped_kl_div(student, teacher.long(), src, params)
    with pytest.raises(TypeError, match="`student_logits`"):
        tpswarp.warped_kl_div(student.int(), teacher, src, params)
    with pytest.raises(ValueError, match="`params`"):
        tpswarp.warped_kl_div(student, teacher, src, params[:, :6])
    with pytest.raises(ValueError, match="`params`"):
        tpswarp.warped_kl_div(student, teacher, src, params[:1])
    with pytest.raises(TypeError, match="`params`"):
        tpswarp.warped_kl_div(student, teacher, src, params.long())
    with pytest.raises(ValueError, match="`src`"):
        tpswarp.warped_kl_div(student, teacher, src[..., :1], params)
    with pytest.raises(ValueError, match="`src`"):
        tpswarp.warped_kl_div(student, teacher, src[:1], params)
    with pytest.raises(ValueError, match="`reduction`"):
        tpswarp.warped_kl_div(student, teacher, src, params, reduction="batchmean")
    with pytest.raises(RuntimeError, match="`params`"):
        tpswarp.warped_kl_div(student, teacher, src, params.to("meta"))


# --------------------------------------------------------------------------------------
# 9. the statistics kept by the forward (_warped_kl_div_with_stats): the CUDA kernels' per-pixel
#    code (warp_pixel of csrc/include/tpswarp/warped_kl.h), served on the CPU by its scalar twin
#    (tested here, not routed to on the CPU)
# --------------------------------------------------------------------------------------
def _stats_ops():
    if not tpswarp.backends()["extension"]["built"]:
        pytest.skip("the C++ extension is not built")
    return torch.ops.tpswarp._warped_kl_div_with_stats, torch.ops.tpswarp._warped_kl_div_backward_stats


@pytest.mark.parametrize("case", ["f32", "f64_align", "bf16_cl", "f32_noncontig_extreme", "f32_far"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_statistics_ops_match_plain_ops(case, reduction, teacher_is_logits):
    with_stats, backward_stats = _stats_ops()
    dtype = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}[case.split("_")[0]]
    student, teacher, src, params = _inputs(2, 19, 9, 10, 7, 12, teacher_is_logits=teacher_is_logits, seed=5,
                                            scale=0.4)
    if case.endswith("extreme"):
        student = student * 5e3
    if case.endswith("far"):
        params[0, -3, :] += 10.0  # item 0 warped entirely outside the teacher: weight 0 everywhere
    student, teacher = student.to(dtype), teacher.to(dtype)
    src, params = src.to(dtype if dtype == torch.float64 else torch.float32), params.to(
        dtype if dtype == torch.float64 else torch.float32)
    if case.endswith("_cl"):
        student, teacher = to_channels_last(student), to_channels_last(teacher)
    if "noncontig" in case:
        student, teacher = non_contiguous(student), non_contiguous(teacher)
    align = case.endswith("align")
    loss, stats = with_stats(student, teacher, src, params, teacher_is_logits, align, reduction)
    plain = torch.ops.tpswarp.warped_kl_div(student, teacher, src, params, teacher_is_logits, align, reduction, None)
    assert_close(loss, plain, dtype=dtype)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.shape == (2, 5, 90) and stats.dtype == ct
    _, valid = tpswarp.reference.tps_warp(teacher.to(ct), src, params, align_corners=align, size=(9, 10))
    assert torch.equal(stats[:, 4], valid.reshape(2, 90).to(ct))
    live = valid.reshape(2, 90)
    assert torch.equal(stats[:, 0][live], student.to(ct).reshape(2, 19, 90).amax(1)[live])
    torch.testing.assert_close((stats[:, 0] + stats[:, 1])[live], torch.logsumexp(student.to(ct).reshape(2, 19, 90),
                                                                                  1)[live])
    gen = torch.Generator().manual_seed(3)
    g = torch.rand(loss.shape, generator=gen, dtype=loss.dtype) + 0.5
    grad = backward_stats(g, student, teacher, src, params, stats, teacher_is_logits, align, reduction)
    expected = torch.ops.tpswarp._warped_kl_div_backward(g, student, teacher, src, params, teacher_is_logits, align,
                                                         reduction, None, [True, False, False, False])[0]
    assert grad.dtype == student.dtype and grad.stride() == expected.stride()
    assert torch.isfinite(grad).all()
    assert_close(grad, expected, grad=True, dtype=dtype)
    if case.endswith("far"):
        assert grad[0].abs().max().item() == 0.0


def test_statistics_ops_opcheck_and_errors():
    with_stats, backward_stats = _stats_ops()
    student, teacher, src, params = _inputs(dtype=torch.float32, teacher_is_logits=True)
    torch.library.opcheck(with_stats, (student, teacher, src, params, True, False, "mean"))
    torch.library.opcheck(with_stats, (student, teacher.softmax(1), src, params, False, True, "none"))
    _, stats = with_stats(student, teacher, src, params, True, False, "mean")
    g = torch.tensor(1.5)
    torch.library.opcheck(backward_stats, (g, student, teacher, src, params, stats, True, False, "mean"))
    with pytest.raises(ValueError, match=r"`stats` must have shape \(2, 5, 30\)"):
        backward_stats(g, student, teacher, src, params, stats[:, :4], True, False, "mean")
    with pytest.raises(TypeError, match="`stats` must be Float"):
        backward_stats(g, student, teacher, src, params, stats.double(), True, False, "mean")
    empty = torch.zeros(0, 4, 5, 6)
    loss, stats = with_stats(empty, empty, src[:0], params[:0], False, False, "mean")
    assert loss.item() == 0.0 and stats.shape == (0, 5, 30)
    assert backward_stats(g, empty, empty, src[:0], params[:0], stats, False, False, "mean").shape == empty.shape


def test_statistics_not_routed_on_cpu(backend):
    """On the CPU the C++ kernels keep their own paths (the statistics ops' CPU kernels are the twin of the
    CUDA ones); the Triton backend (TRITON_INTERPRET=1) takes the statistics path."""
    student, teacher, src, params = _inputs(dtype=torch.float32)
    s = student.requires_grad_(True)
    loss = tpswarp.warped_kl_div(s, teacher, src, params, reduction="none")
    assert ("_warped_kl_div_with_stats" in loss.grad_fn.name()) == (backend == "triton")
