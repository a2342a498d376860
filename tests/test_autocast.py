"""Mixed precision: result dtypes under CPU autocast, and half/bfloat16 inputs that stay
finite wherever float32 is finite (extreme logits included)."""
from __future__ import annotations

import pytest
import torch

import tpswarp
from tpswarp.testing import assert_close, random_tps

HALF = [torch.float16, torch.bfloat16]
REDUCTIONS = ("mean", "sum", "none")


def _finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _finite_where_representable(low: torch.Tensor, ref32: torch.Tensor) -> bool:
    """No NaN in ``low``, and no inf wherever the float32 value of the same computation
    fits the dtype of ``low``. (A gradient returned in float16 cannot hold a true value
    above 65504: e.g. d KL / d p_t = log p_t + 1 - log q ~ 1.2e5 for logits of +-6e4.)"""
    assert _finite(ref32)
    fits = ref32.abs() <= torch.finfo(low.dtype).max * 0.99
    return not bool(torch.isnan(low).any()) and bool(torch.isfinite(low[fits]).all())


# --------------------------------------------------------------------------------------
# dtypes under torch.autocast("cpu", bfloat16)
# --------------------------------------------------------------------------------------
def test_autocast_kl_losses_are_float32(backend):
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(2, 3, 6, 7, generator=gen)
    teacher = torch.randn(2, 4, 6, 7, generator=gen).softmax(1)
    teacher_logits = torch.randn(2, 4, 8, 9, generator=gen)
    src, _, params = random_tps(2, generator=gen)
    mask = torch.rand(2, 6, 7, generator=gen) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = conv(x)
        assert student.dtype == torch.bfloat16  # the model runs in bfloat16
        losses = {
            "masked": tpswarp.masked_kl_div(student, teacher, mask),
            "masked_f32": tpswarp.masked_kl_div(student.float(), teacher, mask),
            "masked_none": tpswarp.masked_kl_div(student, teacher, mask, reduction="none"),
            "warped": tpswarp.warped_kl_div(student, teacher_logits, src, params, teacher_is_logits=True),
            "warped_bf16_teacher": tpswarp.warped_kl_div(student, teacher.bfloat16(), src, params),
            "warped_none": tpswarp.warped_kl_div(student, teacher, src, params, reduction="none"),
        }
        for name, loss in losses.items():
            assert loss.dtype == torch.float32, name
        total = sum(loss.sum() for loss in losses.values())
    total.backward()
    assert conv.weight.grad is not None and _finite(conv.weight.grad)
    # same values as float32 on the bfloat16 logits
    s32 = student.detach().float()
    assert_close(losses["masked"], tpswarp.masked_kl_div(s32, teacher, mask), dtype=torch.bfloat16)
    assert_close(losses["warped"], tpswarp.warped_kl_div(s32, teacher_logits, src, params, teacher_is_logits=True),
                 dtype=torch.bfloat16)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_tps_solve_is_float32(backend, in_dtype):
    gen = torch.Generator().manual_seed(1)
    src, dst, _ = random_tps(3, generator=gen)
    expected = tpswarp.tps_solve(src.to(in_dtype).float(), dst.to(in_dtype).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = tpswarp.tps_solve(src.to(in_dtype), dst.to(in_dtype))
        assert params.dtype == torch.float32
        # the map still interpolates its (rounded) control points
        f = tpswarp.tps_transform(src.to(in_dtype).float(), src.to(in_dtype).float(), params)
    # solved in higher precision internally: as accurate as the float32 solve of the same points
    assert_close(params, expected)
    assert_close(f, dst.to(in_dtype).float())


def test_autocast_keeps_float32_images_and_warps(backend):
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 5, 6, generator=gen)
    p = torch.rand(4, 2, generator=gen) + 0.5
    src, _, params = random_tps(2, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        jit = tpswarp.photometric_jitter(image, p[0] - 1, p[1], p[2] - 1, p[3])
        warped, valid = tpswarp.tps_warp(image, src, params)
    assert jit.dtype == torch.float32 and warped.dtype == torch.float32 and valid.dtype == torch.bool
    assert_close(jit, tpswarp.photometric_jitter(image, p[0] - 1, p[1], p[2] - 1, p[3]))
    assert_close(warped, tpswarp.tps_warp(image, src, params)[0])


# --------------------------------------------------------------------------------------
# half / bfloat16 inputs: finite wherever float32 is
# --------------------------------------------------------------------------------------
def _signs(shape, gen):
    return torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)


def _kl_grads(fn, student, teacher, upstream):
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = fn(s, t)
    gs, gt = torch.autograd.grad(loss, (s, t), upstream.expand(loss.shape))
    return loss, gs, gt


@pytest.mark.parametrize("dtype, magnitude", [
    (torch.float32, 1e4), (torch.float16, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4),
    (torch.bfloat16, 1e30), (torch.float16, 1.0), (torch.bfloat16, 1.0),
])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_masked_kl_extreme_logits_finite(backend, dtype, magnitude, teacher_is_logits):
    gen = torch.Generator().manual_seed(3)
    shape = (2, 5, 4, 6)
    student = magnitude * _signs(shape, gen) * torch.rand(shape, generator=gen).add(0.5).clamp(max=1)
    t = magnitude * _signs(shape, gen)
    teacher = t if teacher_is_logits else t.softmax(1)
    mask = torch.rand(2, 4, 6, generator=gen) > 0.2
    for reduction in REDUCTIONS:
        fn = lambda s, tt: tpswarp.masked_kl_div(s, tt, mask, teacher_is_logits=teacher_is_logits,  # noqa: E731
                                                 reduction=reduction)
        s_low, t_low = student.to(dtype), teacher.to(dtype)
        upstream = torch.rand((2, 4, 6) if reduction == "none" else (), generator=gen) + 0.5
        loss32, gs32, gt32 = _kl_grads(fn, s_low.float(), t_low.float(), upstream)
        assert _finite(loss32, gs32, gt32)  # the float32 computation of the same values is finite
        loss, gs, gt = _kl_grads(fn, s_low, t_low, upstream)
        assert loss.dtype == torch.float32
        assert _finite(loss, gs), (dtype, magnitude, reduction)
        assert _finite_where_representable(gt, gt32), (dtype, magnitude, reduction)
        assert gs.dtype == dtype and gt.dtype == dtype
        # half inputs are computed in float32: the loss matches the float32 loss of the same values
        assert_close(loss, loss32, dtype=dtype)


@pytest.mark.parametrize("dtype, magnitude", [
    (torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4), (torch.float16, 1.0),
])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_warped_kl_extreme_logits_finite(backend, dtype, magnitude, teacher_is_logits):
    gen = torch.Generator().manual_seed(4)
    src, _, params = random_tps(2, generator=gen)
    student = (magnitude * _signs((2, 4, 5, 6), gen)).to(dtype)
    t = magnitude * _signs((2, 4, 7, 8), gen)
    teacher = (t if teacher_is_logits else t.softmax(1)).to(dtype)
    for reduction in REDUCTIONS:
        upstream = None
        results = []
        for inputs in ((student.float(), teacher.float(), params), (student, teacher, params)):
            leaves = [x.clone().requires_grad_(True) for x in inputs]
            loss = tpswarp.warped_kl_div(leaves[0], leaves[1], src, leaves[2], teacher_is_logits=teacher_is_logits,
                                         reduction=reduction)
            assert loss.dtype == torch.float32
            upstream = torch.rand(loss.shape, generator=gen) + 0.5 if upstream is None else upstream
            results.append((loss, *torch.autograd.grad(loss, leaves, upstream)))
        (loss32, gs32, gt32, gp32), (loss, gs, gt, gp) = results
        assert _finite(loss32, gs32, gt32, gp32)  # float32 on the same values is finite
        assert _finite(loss, gs, gp), (dtype, magnitude, reduction)
        assert _finite_where_representable(gt, gt32), (dtype, magnitude, reduction)
        # half inputs are computed in float32
        assert_close(loss, loss32, dtype=dtype)
        if magnitude <= 1.0:
            # At |logits| = 1e4 the TPS-parameter gradient is a sum of O(1e4) terms that cancel to
            # about 1e-9 (float64 reference); float32, the reference backend's included, returns
            # its rounding noise (O(1)), which depends on the order of the operations: half and
            # float32 inputs may take different CPU paths (the AVX2 row-pair gather is float32
            # only), so only finiteness is asserted there.
            assert_close(gp, gp32, grad=True, dtype=dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_photometric_and_warp_half_finite(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 5, 6, generator=gen)
    image[0, :, 0, 0] = 0.0  # black: v = 0, s defined as 0
    image[0, :, 0, 1] = 1.0  # white
    image[1, :, 1, 1] = 0.5  # grey: s = 0, hue defined as 0
    # extreme ends of the PhTPS ranges
    params = [torch.tensor([-0.25, 0.25]), torch.tensor([0.25, 2.0]), torch.tensor([-0.1, 0.1]),
              torch.tensor([2.0, 0.25])]
    perm = torch.tensor([[2, 1, 0], [1, 2, 0]])
    leaves = [x.to(dtype).requires_grad_(True) for x in (image, *params)]
    out = tpswarp.photometric_jitter(*leaves, perm)
    assert out.dtype == dtype and _finite(out)
    grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=gen).to(dtype))
    assert _finite(*grads)
    src, _, tps = random_tps(2, generator=gen)
    img = image.to(dtype).requires_grad_(True)
    p = tps.clone().requires_grad_(True)
    warped, _ = tpswarp.tps_warp(img, src, p)
    assert warped.dtype == dtype and _finite(warped)
    g_img, g_p = torch.autograd.grad(warped, (img, p), torch.randn(warped.shape, generator=gen).to(dtype))
    assert _finite(g_img, g_p)
