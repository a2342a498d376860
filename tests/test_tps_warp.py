"""tps_warp: reference vs grid_sample with an explicit TPS grid, the validity mask vs a warp of
ones and an independent pixel-centre hull, label maps, every backend vs the reference (dtypes,
layouts, gradients), hypothesis properties, gradcheck, opcheck, torch.compile, bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tpswarp
from tpswarp import reference
from tpswarp.testing import assert_close, non_contiguous, quadrant_points, to_channels_last, tolerance

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border", "reflection"]
HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- helpers and oracles


def pixel_centres(height: int, width: int, align_corners: bool, dtype=torch.float64) -> torch.Tensor:
    """Normalized (x, y) of the output pixel centres, (H * W, 2), x along the width, built in
    float64 NumPy. A size-1 axis with align_corners=True sits at 0 (as affine_grid)."""

    def axis(n: int) -> np.ndarray:
        j = np.arange(n, dtype=np.float64)
        if align_corners:
            return 2 * j / (n - 1) - 1 if n > 1 else np.zeros(1)
        return (2 * j + 1) / n - 1

    ys, xs = np.meshgrid(axis(height), axis(width), indexing="ij")
    return torch.from_numpy(np.stack([xs, ys], axis=-1).reshape(height * width, 2)).to(dtype)


def explicit_grid(src, params, out_size, align_corners) -> torch.Tensor:
    """grid[b, i, j] = f_b(q_ij), (B, Ho, Wo, 2), in the dtype of params."""
    B = src.shape[0]
    Ho, Wo = out_size
    q = pixel_centres(Ho, Wo, align_corners, params.dtype).expand(B, -1, -1)
    return reference.tps_transform(q, src, params).reshape(B, Ho, Wo, 2)


def grid_sample_warp(image, src, params, *, mode="bilinear", padding_mode="zeros", align_corners=False,
                     fill=0.0, size=None):
    """The oracle: grid_sample with the explicit grid. Sampling with a constant ``fill`` outside the
    image is grid_sample(image - fill) + fill."""
    H, W = image.shape[-2:]
    grid = explicit_grid(src, params, size or (H, W), align_corners)
    img = image.to(grid.dtype)
    out = F.grid_sample(img - fill, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return out + fill


def pixel_hull(grid: torch.Tensor, height: int, width: int, align_corners: bool) -> torch.Tensor:
    """(B, 1, Ho, Wo): sample location inside [0, W-1] x [0, H-1] in pixel units, in NumPy float64."""
    g = grid.detach().double().numpy()
    if align_corners:
        px, py = (g[..., 0] + 1) / 2 * (width - 1), (g[..., 1] + 1) / 2 * (height - 1)
    else:
        px, py = ((g[..., 0] + 1) * width - 1) / 2, ((g[..., 1] + 1) * height - 1) / 2
    inside = (px >= 0) & (px <= width - 1) & (py >= 0) & (py <= height - 1)
    return torch.from_numpy(inside)[:, None]


def spread_points(rng: np.random.Generator, batch: int, n: int, min_dist: float = 0.3) -> torch.Tensor:
    out = np.empty((batch, n, 2))
    for b in range(batch):
        pts: list = []
        while len(pts) < n:
            p = rng.uniform(-0.85, 0.85, 2)
            if all(np.hypot(*(p - q)) >= min_dist for q in pts):
                pts.append(p)
        out[b] = pts
    return torch.from_numpy(out)


def make_warp(batch: int, *, seed: int = 0, n: int = 5, zoom: float = 1.4, noise: float = 0.15,
              dtype=torch.float64):
    """(src, dst, params) of a random smooth warp; zoom > 1 samples outside the image."""
    rng = np.random.default_rng(seed)
    src = spread_points(rng, batch, n)
    dst = zoom * src + noise * torch.from_numpy(rng.standard_normal(src.shape))
    params = reference.tps_solve(src, dst)
    return src.to(dtype), dst.to(dtype), params.to(dtype)


def randn(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- reference vs grid_sample

SHAPES = [
    # (B, C, H, W, size)
    (2, 3, 7, 9, None),
    (1, 1, 6, 5, (9, 4)),
    (2, 2, 5, 5, (3, 8)),
    (1, 2, 1, 6, (2, 5)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-size{s[4]}")
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_grid_sample(shape, align_corners, padding_mode, mode, dtype):
    B, C, H, W, size = shape
    # zoom 2.2 samples far outside the image: several reflections, long border clamps
    src, _, params = make_warp(B, seed=1, zoom=2.2 if padding_mode == "reflection" else 1.4, dtype=dtype)
    image = randn(B, C, H, W, seed=2, dtype=dtype)
    out, valid = reference.tps_warp(image, src, params, mode=mode, padding_mode=padding_mode,
                                    align_corners=align_corners, size=size)
    expected = grid_sample_warp(image, src, params, mode=mode, padding_mode=padding_mode,
                                align_corners=align_corners, size=size)
    Ho, Wo = size or (H, W)
    assert out.shape == (B, C, Ho, Wo) and out.dtype == dtype
    assert valid.shape == (B, 1, Ho, Wo) and valid.dtype == torch.bool
    assert_close(out, expected)
    if H > 1 and W > 1:  # (a 1-pixel-high hull is a line, hit with probability 0)
        assert 0 < valid.sum() < valid.numel()  # the warp samples both inside and outside


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fill", [0.5, -3.0])
def test_reference_fill_matches_shifted_grid_sample(mode, fill):
    src, _, params = make_warp(2, seed=3)
    image = randn(2, 3, 6, 7, seed=4)
    out, _ = reference.tps_warp(image, src, params, mode=mode, fill=fill)
    assert_close(out, grid_sample_warp(image, src, params, mode=mode, fill=fill))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [None, (8, 11), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_validity_mask_is_ones_warp_and_pixel_hull(backend, align_corners, size, dtype):
    src, _, params = make_warp(2, seed=5, dtype=dtype)
    H, W = 6, 9
    image = randn(2, 3, H, W, seed=6, dtype=dtype)
    _, valid = tpswarp.tps_warp(image, src, params, align_corners=align_corners, size=size)
    grid = explicit_grid(src, params, size or (H, W), align_corners)
    ones = F.grid_sample(torch.ones(2, 1, H, W, dtype=dtype), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=align_corners)
    assert valid.dtype == torch.bool and valid.shape == ones.shape
    assert (ones[valid] >= 1 - 1e-5).all()
    assert not valid[ones < 1 - 1e-3].any()
    assert torch.equal(valid, pixel_hull(grid, H, W, align_corners))
    assert 0 < valid.sum() < valid.numel()


@pytest.mark.parametrize("mode, padding_mode, fill", [("nearest", "reflection", 0.0), ("bilinear", "border", 2.0),
                                                      ("nearest", "zeros", 255.0)])
def test_validity_mask_depends_on_geometry_only(backend, mode, padding_mode, fill):
    src, _, params = make_warp(2, seed=7, dtype=torch.float32)
    image = torch.rand(2, 3, 6, 9)
    _, expected = tpswarp.tps_warp(torch.ones(2, 1, 6, 9), src, params)
    _, valid = tpswarp.tps_warp(image, src, params, mode=mode, padding_mode=padding_mode, fill=fill)
    assert torch.equal(valid, expected)
    _, valid_labels = tpswarp.tps_warp((image * 10).long(), src, params, mode="nearest", fill=255)
    assert torch.equal(valid_labels, expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nearest_label_maps(backend, dtype, align_corners, padding_mode, layout):
    """Integer labels, fill=255 (the ignore index): out-of-image pixels get 255, the others are
    exactly grid_sample's nearest sample (round half to even)."""
    src, _, params = make_warp(2, seed=8, dtype=torch.float32)
    labels = torch.randint(0, 10, (2, 2, 7, 6)).to(dtype)
    if layout == "channels_last":
        labels = to_channels_last(labels)
    out, _ = tpswarp.tps_warp(labels, src, params, mode="nearest", padding_mode=padding_mode,
                              align_corners=align_corners, fill=255, size=(8, 5))
    assert out.dtype == dtype and out.shape == (2, 2, 8, 5)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    # grid_sample's zero padding on labels + 1 marks the out-of-image pixels with 0
    shifted = grid_sample_warp(labels.double() + 1, src, params, mode="nearest", padding_mode=padding_mode,
                               align_corners=align_corners, size=(8, 5))
    outside = shifted == 0
    expected = torch.where(outside, torch.full_like(shifted, 255), shifted - 1)
    assert torch.equal(out, expected.to(dtype))
    if padding_mode == "zeros":
        assert outside.any() and (~outside).any()
    else:
        assert not outside.any()


# ----------------------------------------------------------------------------- backends vs reference

CONFIGS = {
    "bilinear_zeros": dict(mode="bilinear", padding_mode="zeros"),
    "bilinear_border_ac_size": dict(mode="bilinear", padding_mode="border", align_corners=True, size=(6, 11)),
    "bilinear_reflection_size": dict(mode="bilinear", padding_mode="reflection", size=(9, 4)),
    "bilinear_zeros_fill": dict(mode="bilinear", fill=0.5),
    "nearest_zeros_fill_ac": dict(mode="nearest", fill=-1.0, align_corners=True),
}

DTYPES = {
    # id: (image dtype, src/params dtype)
    "f32": (torch.float32, torch.float32),
    "f64": (torch.float64, torch.float64),
    "f16": (torch.float16, torch.float32),
    "bf16": (torch.bfloat16, torch.float32),
    "f32_image_f64_params": (torch.float32, torch.float64),
}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The layouts under test. (Tiny shapes, e.g. C = 1 or W = 1, can make the result
    contiguous as well; that is still a valid input.)"""
    if layout == "channels_last" and t.dim() == 4:
        return to_channels_last(t)
    if layout == "non_contiguous":
        return non_contiguous(t)
    return t.contiguous()


def _run_with_grads(fn, image, src, params, grad, **options):
    leaves = [t.detach().requires_grad_() for t in (image, src, params)]
    out, valid = fn(*leaves, **options)
    out.backward(grad)
    return out, valid, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_matches_reference_with_gradients(backend, config, dtypes, layout):
    image_dtype, param_dtype = dtypes
    B, C, H, W = 2, 3, 7, 9
    src, _, params = make_warp(B, seed=9, dtype=param_dtype)
    image = _layout(randn(B, C, H, W, seed=10, dtype=image_dtype), layout)
    src, params = _layout(src, layout), _layout(params, layout)
    Ho, Wo = config.get("size") or (H, W)
    grad = _layout(randn(B, C, Ho, Wo, seed=11, dtype=image_dtype), layout)

    out, valid, grads = _run_with_grads(tpswarp.tps_warp, image, src, params, grad, **config)
    ref, ref_valid, ref_grads = _run_with_grads(reference.tps_warp, image, src, params, grad, **config)

    assert out.dtype == image_dtype and out.shape == (B, C, Ho, Wo)
    if layout != "contiguous":
        assert not image.is_contiguous()
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(valid, ref_valid)
    assert_close(out, ref)
    # the image dtype's tolerance for every gradient: half images carry half rounding into
    # the src/params gradients too
    for g, r, leaf_dtype in zip(grads, ref_grads, (image_dtype, param_dtype, param_dtype)):
        assert g.dtype == leaf_dtype
        if r is None:  # the reference's graph does not reach the geometry in nearest mode
            assert config["mode"] == "nearest"
            r = torch.zeros_like(g)
        assert_close(g, r, grad=True, dtype=image_dtype)
    if config["mode"] == "nearest":  # piecewise constant in the sample location
        assert not grads[2].any()
    if image_dtype in HALF:
        # half images are warped in float32 and rounded once
        ref32, _ = reference.tps_warp(image.float(), src, params, **config)
        assert_close(out.float(), ref32, dtype=image_dtype)


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True)])
def test_partial_gradients(backend, wanted):
    src, _, params = make_warp(2, seed=12)
    image = randn(2, 2, 5, 6, seed=13)
    grad = randn(2, 2, 5, 6, seed=14)
    results = []
    for fn in (tpswarp.tps_warp, reference.tps_warp):
        leaves = [t.clone().requires_grad_(w) for t, w in zip((image, src, params), wanted)]
        fn(*leaves)[0].backward(grad)
        results.append([leaf.grad for leaf in leaves])
    for g, r, w in zip(*results, wanted):
        if w:
            assert_close(g, r, grad=True)
        else:
            assert g is None


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5)], ids=["B0", "C0"])
def test_empty_inputs(backend, shape):
    B = shape[0]
    src, _, params = make_warp(max(B, 1), seed=15, dtype=torch.float32)
    src, params = src[:B], params[:B]
    image = torch.rand(shape, requires_grad=True)
    out, valid = tpswarp.tps_warp(image, src, params, size=(3, 2))
    assert out.shape == (B, shape[1], 3, 2) and valid.shape == (B, 1, 3, 2)
    out.sum().backward()
    assert image.grad.shape == shape


# ----------------------------------------------------------------------------- hypothesis properties

image_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
layouts = st.sampled_from(["contiguous", "channels_last", "non_contiguous"])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 8), W=st.integers(1, 8),
    dtype=image_dtypes, layout=layouts, align_corners=st.booleans(), mode=st.sampled_from(MODES),
    padding_mode=st.sampled_from(PADDINGS), n=st.integers(3, 6), seed=st.integers(0, 2**31 - 1),
)
def test_identity_warp(backend, B, C, H, W, dtype, layout, align_corners, mode, padding_mode, n, seed):
    """dst == src is the identity map: every output pixel centre is an input pixel centre, so
    all of them lie in the hull (valid) and the image comes back unchanged."""
    src = spread_points(np.random.default_rng(seed), B, n).float()
    params = tpswarp.tps_solve(src, src)
    image = _layout(randn(B, C, H, W, seed=seed, dtype=dtype), layout)
    out, valid = tpswarp.tps_warp(image, src, params, mode=mode, padding_mode=padding_mode,
                                  align_corners=align_corners)
    assert valid.all(), f"{(~valid).sum().item()} of {valid.numel()} pixels invalid under the identity"
    assert_close(out, image)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2), H=st.integers(1, 8), W=st.integers(1, 8), size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dtype=image_dtypes, seed=st.integers(0, 2**31 - 1),
)
def test_identity_warp_resized_is_valid(backend, B, H, W, size, dtype, seed):
    """With align_corners=True the output centres span [-1, 1] whatever the size, and the
    identity maps them into the input's pixel-centre hull: all valid."""
    src = spread_points(np.random.default_rng(seed), B, 4).float()
    params = tpswarp.tps_solve(src, src)
    image = randn(B, 1, H, W, seed=seed, dtype=dtype)
    _, valid = tpswarp.tps_warp(image, src, params, align_corners=True, size=size)
    assert valid.all()


@pytest.mark.parametrize("case", [
    # (control points, image (H, W), align_corners)
    ("quadrant", (5, 7), False),
    ("quadrant", (9, 4), False),
    ("random_seed1", (2, 1), True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_warp_keeps_border_valid(backend, dtype, case):
    """Minimal repros of the identity property: border centres map to px = 0 (or W - 1) in real
    arithmetic, but the normalize/unnormalize round trip (align_corners=False) or the rounding
    of the solved identity params (any align_corners) lands them a few ulps outside, and the
    hull test, which has no slack, marks them invalid although the warp of ones there is 1."""
    name, shape, align_corners = case
    if name == "quadrant":
        src = quadrant_points(2, dtype=dtype)
    else:
        src = spread_points(np.random.default_rng(1), 2, 4).to(dtype)
    params = tpswarp.tps_solve(src, src)
    out, valid = tpswarp.tps_warp(torch.ones(2, 1, *shape, dtype=dtype), src, params, align_corners=align_corners)
    assert (out >= 1 - 1e-6).all()
    assert valid.all(), f"invalid pixels under the identity warp: {(~valid).nonzero().tolist()}"


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2), H=st.integers(1, 9), W=st.integers(1, 9),
    size=st.one_of(st.none(), st.tuples(st.integers(1, 9), st.integers(1, 9))),
    dtype=image_dtypes, layout=layouts, align_corners=st.booleans(), zoom=st.sampled_from([0.8, 1.0, 1.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_validity_is_warp_of_ones(backend, B, H, W, size, dtype, layout, align_corners, zoom, seed):
    src, _, params = make_warp(B, seed=seed, n=4, zoom=zoom, dtype=torch.float32)
    ones = _layout(torch.ones(B, 1, H, W, dtype=dtype), layout)
    out, valid = tpswarp.tps_warp(ones, src, params, align_corners=align_corners, size=size)
    assert (out[valid] >= 1 - 1e-5).all()
    assert not valid[out < 1 - 1e-3].any()
    # and the mask does not depend on the image, the mode or the padding
    image = _layout(randn(B, 2, H, W, seed=seed, dtype=dtype), layout)
    _, valid2 = tpswarp.tps_warp(image, src, params, mode="nearest", padding_mode="border",
                                 align_corners=align_corners, size=size)
    assert torch.equal(valid, valid2)


# ----------------------------------------------------------------------------- gradcheck


def _away_from_kinks(src, params, shape, align_corners, min_dist=1e-3) -> bool:
    """True when no sample coordinate is within ``min_dist`` of an integer or half-integer pixel
    coordinate (bilinear taps, nearest ties and reflection folds are kinks there)."""
    B, _, H, W = shape
    grid = explicit_grid(src, params, (H, W), align_corners)
    if align_corners:
        px, py = (grid[..., 0] + 1) / 2 * (W - 1), (grid[..., 1] + 1) / 2 * (H - 1)
    else:
        px, py = ((grid[..., 0] + 1) * W - 1) / 2, ((grid[..., 1] + 1) * H - 1) / 2
    c = torch.cat([2 * px.flatten(), 2 * py.flatten()])
    return bool(((c - c.round()).abs() > 2 * min_dist).all())


def _smooth_warp(shape, align_corners, seed=0, zoom=1.3):
    for s in range(seed, seed + 100):
        src, dst, params = make_warp(shape[0], seed=s, n=4, zoom=zoom)
        if _away_from_kinks(src, params, shape, align_corners):
            return src, dst, params
    raise AssertionError("no smooth warp found")


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_gradcheck_bilinear(backend, padding_mode, align_corners):
    shape = (1, 2, 5, 6)
    src, _, params = _smooth_warp(shape, align_corners, zoom=2.0 if padding_mode == "reflection" else 1.3)
    image = randn(*shape, seed=16).requires_grad_()

    def fn(image, src, params):
        return tpswarp.tps_warp(image, src, params, padding_mode=padding_mode, align_corners=align_corners,
                                fill=0.25)[0]

    assert torch.autograd.gradcheck(fn, (image, src.requires_grad_(), params.requires_grad_()), fast_mode=True)


def test_gradcheck_nearest(backend):
    """Nearest: linear in the image; zero gradient for the (piecewise constant) geometry."""
    shape = (1, 2, 5, 6)
    src, _, params = _smooth_warp(shape, False, seed=20)
    image = randn(*shape, seed=17).requires_grad_()

    def fn(image, params):
        return tpswarp.tps_warp(image, src, params, mode="nearest", padding_mode="reflection")[0]

    assert torch.autograd.gradcheck(fn, (image, params.requires_grad_()), fast_mode=True)


def test_gradcheck_through_solve(backend):
    """image, src and dst through tps_solve + tps_warp (bilinear, resized output)."""
    shape = (1, 2, 5, 6)
    src, dst, _ = _smooth_warp(shape, False, seed=30)
    image = randn(*shape, seed=18).requires_grad_()

    def fn(image, src, dst):
        return tpswarp.tps_warp(image, src, tpswarp.tps_solve(src, dst))[0]

    assert torch.autograd.gradcheck(fn, (image, src.requires_grad_(), dst.requires_grad_()), fast_mode=True)


# ----------------------------------------------------------------------------- opcheck, compile

OPCHECK_CASES = {
    "f64_bilinear_zeros_grad": (torch.float64, "contiguous", (True, True, True), ("bilinear", "zeros", False, 0.0, None)),
    "f32_channels_last_border_size": (torch.float32, "channels_last", (True, False, True),
                                      ("bilinear", "border", True, 0.0, [4, 7])),
    "f16_reflection": (torch.float16, "contiguous", (True, False, True), ("bilinear", "reflection", False, 0.5, None)),
    "f32_noncontig_nearest": (torch.float32, "non_contiguous", (True, True, True), ("nearest", "zeros", False, 0.0, None)),
    "uint8_labels_channels_last": (torch.uint8, "channels_last", (False, False, False),
                                   ("nearest", "border", True, 255.0, [6, 3])),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES.values()), ids=list(OPCHECK_CASES))
def test_opcheck(backend, case):
    dtype, layout, wanted, options = case
    src, _, params = make_warp(2, seed=19, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype.is_floating_point:
        image = randn(2, 3, 5, 6, seed=20, dtype=dtype)
    else:
        image = torch.randint(0, 10, (2, 3, 5, 6)).to(dtype)
    image = _layout(image, layout)
    args = [t.detach().requires_grad_(w) for t, w in zip((image, src, params), wanted)]
    torch.library.opcheck(torch.ops.tpswarp.tps_warp, (*args, *options))


def test_torch_compile_fullgraph(backend):
    """tps_solve + tps_warp under torch.compile(fullgraph=True): forward and backward as eager.
    A channels_last image and gradients to src and dst check the fake kernels' strides too."""
    torch._dynamo.reset()
    src, dst, _ = make_warp(2, seed=21, dtype=torch.float32)
    image = to_channels_last(randn(2, 3, 6, 7, seed=22, dtype=torch.float32))
    grad = randn(2, 3, 6, 7, seed=23, dtype=torch.float32)

    def f(image, src, dst):
        params = tpswarp.tps_solve(src, dst)
        return tpswarp.tps_warp(image, src, params, padding_mode="border")

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (image, src, dst)]
        out, valid = fn(*leaves)
        (out * grad).sum().backward()
        results.append((out, valid, *(leaf.grad for leaf in leaves)))
    (out, valid, *grads), (c_out, c_valid, *c_grads) = results
    assert c_out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(c_valid, valid)
    assert_close(c_out, out)
    for c_g, g in zip(c_grads, grads):
        assert_close(c_g, g, grad=True)


# ----------------------------------------------------------------------------- bad inputs


def _good():
    src, _, params = make_warp(2, seed=24, dtype=torch.float32)
    return dict(image=torch.rand(2, 3, 5, 6), src=src, params=params)


def _with(**changes):
    def make():
        kw = _good()
        for k, v in changes.items():
            kw[k] = v(kw) if callable(v) else v
        return kw
    return make


BAD_INPUTS = [
    # (id, kwargs maker, exception, message pattern)
    ("image_rank", _with(image=lambda kw: kw["image"][0]), ValueError, "`image`"),
    ("image_rank5", _with(image=lambda kw: kw["image"][None]), ValueError, "`image`"),
    ("image_not_tensor", _with(image=lambda kw: kw["image"].numpy()), TypeError, "`image`"),
    ("bool_image", _with(image=lambda kw: kw["image"] > 0.5, mode="nearest"), TypeError, "`image`"),
    ("int_image_bilinear", _with(image=lambda kw: (kw["image"] * 9).long()), TypeError, "`image`"),
    ("complex_image_nearest", _with(image=lambda kw: kw["image"].to(torch.complex64), mode="nearest"),
     TypeError, "`image`"),
    ("src_rank", _with(src=lambda kw: kw["src"][0]), ValueError, "`src`"),
    ("src_last_dim", _with(src=torch.zeros(2, 5, 3)), ValueError, "`src`"),
    ("int_src", _with(src=lambda kw: kw["src"].long()), TypeError, "`src`"),
    ("params_rows", _with(params=lambda kw: kw["params"][:, :-1]), ValueError, "`params`"),
    ("params_rank", _with(params=lambda kw: kw["params"][0]), ValueError, "`params`"),
    ("int_params", _with(params=lambda kw: kw["params"].int()), TypeError, "`params`"),
    ("batch_src", _with(src=lambda kw: kw["src"][:1], params=lambda kw: kw["params"][:1]), ValueError, "`src`"),
    ("batch_params", _with(params=lambda kw: kw["params"][:1]), ValueError, "`params`"),
    ("bad_mode", _with(mode="bicubic"), ValueError, "`mode`"),
    ("bad_padding", _with(padding_mode="constant"), ValueError, "`padding_mode`"),
    ("size_zero", _with(size=(0, 5)), ValueError, "`size`"),
    ("size_negative", _with(size=[4, -1]), ValueError, "`size`"),
    ("size_one_value", _with(size=(5,)), ValueError, "`size`"),
    ("size_int", _with(size=5), ValueError, "`size`"),
    ("size_float", _with(size=(2.5, 3)), ValueError, "`size`"),
    ("size_bool", _with(size=(True, 3)), ValueError, "`size`"),
    ("fill_str", _with(fill="255"), TypeError, "`fill`"),
    ("device_src", _with(src=lambda kw: kw["src"].to("meta")), RuntimeError, "`src`"),
    ("device_params", _with(params=lambda kw: kw["params"].to("meta")), RuntimeError, "`params`"),
]


@pytest.mark.parametrize("fn", [tpswarp.tps_warp, reference.tps_warp], ids=["public", "reference"])
@pytest.mark.parametrize("make, exc, pattern", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(backend, fn, make, exc, pattern):
    kw = make()
    image, src, params = kw.pop("image"), kw.pop("src"), kw.pop("params")
    with pytest.raises(exc, match=pattern):
        fn(image, src, params, **kw)


@pytest.mark.parametrize("args, pattern", [
    (("bicubic", "zeros", False, 0.0, None), "mode"),
    (("bilinear", "wrap", False, 0.0, None), "padding_mode"),
    (("bilinear", "zeros", False, 0.0, [3, 0]), "size"),
])
def test_direct_op_call_validates(backend, args, pattern):
    """torch.ops.tpswarp.tps_warp called directly (no Python wrapper) still rejects bad options
    (compiled kernels raise RuntimeError from TORCH_CHECK; Python kernels ValueError)."""
    kw = _good()
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        torch.ops.tpswarp.tps_warp(kw["image"], kw["src"], kw["params"], *args)
