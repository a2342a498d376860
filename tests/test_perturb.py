"""PhTPS: the perturbation model. Defaults and distributions of DESIGN.md, determinism,
strengths (paper Eq. 9), the one-pass perturbation, label warps, the consistency loss and
use inside a multi-worker DataLoader."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import tpswarp
from tpswarp import PhTPS, PhTPSParams
from tpswarp.testing import assert_close

PERMS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
IDENTITY = torch.tensor([0, 1, 2])
QUADRANTS = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _image(B, H, W, seed=0):
    return torch.rand(B, 3, H, W, generator=_gen(seed))


# --------------------------------------------------------------------------------------
# defaults and distributions
# --------------------------------------------------------------------------------------
def test_default_hyperparameters():
    m = PhTPS()
    assert m.geometric_strength == 1.0 and m.photometric_strength == 1.0
    assert m.offset_std == 0.2
    assert m.brightness == 0.25 and m.hue == 0.1
    assert m.saturation == (0.25, 2.0) and m.contrast == (0.25, 2.0)
    assert m.align_corners is False and m.clamp is False


def test_sample_shapes_and_control_points(backend):
    p = PhTPS().sample(5, (12, 16), generator=_gen(0))
    assert isinstance(p, PhTPSParams) and len(p) == 5
    assert p.src.shape == (5, 4, 2) and p.dst.shape == (5, 4, 2) and p.tps.shape == (5, 7, 2)
    for t in (p.brightness, p.saturation, p.hue, p.contrast):
        assert t.shape == (5,) and t.dtype == torch.float32
    assert p.permutation.shape == (5, 3) and p.permutation.dtype == torch.int64
    assert p.image_size == (12, 16)
    # control points at the quadrant centres (+-0.5), (x, y) normalized
    assert torch.equal(p.src, QUADRANTS.expand(5, 4, 2))
    # the solved map sends the control points to their destinations
    assert_close(tpswarp.tps_transform(p.src, p.src, p.tps), p.dst, dtype=torch.float32)
    assert_close(p.tps, tpswarp.tps_solve(p.src, p.dst))


def test_default_distributions(backend):
    N = 20000
    p = PhTPS().sample(N, (8, 8), generator=_gen(1))
    off = (p.dst - p.src).double()
    # offsets ~ N(0, 0.2) per coordinate, independent of the point
    assert abs(off.std().item() / 0.2 - 1) < 0.02
    for k in range(4):
        for d in range(2):
            assert abs(off[:, k, d].std().item() / 0.2 - 1) < 0.04
            assert abs(off[:, k, d].mean().item()) < 0.01
    assert stats.kstest(off.flatten().numpy(), "norm", args=(0, 0.2)).pvalue > 1e-3

    def check_uniform(x, lo, hi):
        x = x.double().numpy()
        assert x.min() >= lo and x.max() <= hi
        assert x.min() < lo + 0.01 * (hi - lo) and x.max() > hi - 0.01 * (hi - lo)  # the whole range
        assert stats.kstest(x, "uniform", args=(lo, hi - lo)).pvalue > 1e-3

    check_uniform(p.brightness, -0.25, 0.25)
    check_uniform(p.saturation, 0.25, 2.0)
    check_uniform(p.hue, -0.1, 0.1)
    check_uniform(p.contrast, 0.25, 2.0)
    # parameters are independent of each other (no shared draw)
    corr = np.corrcoef(torch.stack([p.brightness, p.saturation, p.hue, p.contrast]).double().numpy())
    assert np.abs(corr - np.eye(4)).max() < 0.05

    # a uniformly random permutation per image, among all six
    perm = p.permutation
    assert torch.equal(perm.sort(dim=1).values, IDENTITY.expand(N, 3))
    counts = torch.stack([(perm == q).all(dim=1).sum() for q in PERMS]).numpy()
    assert counts.sum() == N and counts.min() > 0
    assert stats.chisquare(counts).pvalue > 1e-3
    assert abs(counts[0] / N - 1 / 6) < 0.02


def test_same_seed_same_params(backend):
    m = PhTPS()
    a = m.sample(6, (10, 12), generator=_gen(7))
    b = m.sample(6, (10, 12), generator=_gen(7))
    c = m.sample(6, (10, 12), generator=_gen(8))
    for name in ("src", "dst", "tps", "brightness", "saturation", "hue", "contrast", "permutation"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.dst, c.dst) and not torch.equal(a.brightness, c.brightness)
    # the default generator is used (and advanced) when none is given
    torch.manual_seed(3)
    d = m.sample(6, (10, 12))
    torch.manual_seed(3)
    e = m.sample(6, (10, 12))
    assert torch.equal(d.dst, e.dst) and torch.equal(d.permutation, e.permutation)


def test_first_images_independent_of_batch_size(backend):
    m = PhTPS()
    small = m.sample(3, (8, 8), generator=_gen(11))
    large = m.sample(10, (8, 8), generator=_gen(11))
    for name in ("src", "dst", "brightness", "saturation", "hue", "contrast", "permutation"):
        assert torch.equal(getattr(small, name), getattr(large, name)[:3]), name
    assert_close(small.tps, large.tps[:3])


# --------------------------------------------------------------------------------------
# strengths (paper Eq. 9)
# --------------------------------------------------------------------------------------
def test_photometric_strength_zero_is_identity(backend):
    m = PhTPS(photometric_strength=0.0)
    p = m.sample(8, (6, 7), generator=_gen(2))
    assert torch.all(p.brightness == 0) and torch.all(p.hue == 0)
    assert torch.all(p.saturation == 1) and torch.all(p.contrast == 1)
    assert torch.equal(p.permutation, IDENTITY.expand(8, 3))
    x = _image(8, 6, 7)
    assert_close(m.photometric(x, p), x)
    # the warp is still applied
    assert (p.dst - p.src).abs().max() > 0.05


def test_geometric_strength_zero_is_identity_warp(backend):
    m = PhTPS(geometric_strength=0.0)
    p = m.sample(3, (6, 7), generator=_gen(3))
    assert torch.equal(p.dst, p.src)
    x = _image(3, 6, 7)
    out, valid = m.warp(x, p)
    assert_close(out, x)
    # every pixel is valid, border pixels included (their centres lie on the pixel-centre
    # hull, up to rounding)
    assert valid.all()
    assert_close(m.perturb(x, p)[0], m.photometric(x, p))


def test_strength_mapping_eq9(backend):
    one = PhTPS().sample(500, (8, 8), generator=_gen(4))
    for sp in (0.5, 2.0):
        s = PhTPS(photometric_strength=sp).sample(500, (8, 8), generator=_gen(4))
        assert_close(s.brightness, sp * one.brightness)
        assert_close(s.hue, sp * one.hue)
        assert_close(s.saturation, torch.exp(sp * torch.log(one.saturation)))
        assert_close(s.contrast, torch.exp(sp * torch.log(one.contrast)))
        assert torch.equal(s.dst, one.dst)  # sP leaves the geometry alone
    for sg in (0.5, 3.0):
        g = PhTPS(geometric_strength=sg).sample(500, (8, 8), generator=_gen(4))
        assert_close(g.dst - g.src, sg * (one.dst - one.src))
        assert torch.equal(g.brightness, one.brightness)  # sG leaves the photometry alone
    # sP = 2: the permutation probability is min(sP, 1) = 1, as for sP = 1
    assert torch.equal(PhTPS(photometric_strength=2.0).sample(500, (8, 8), generator=_gen(4)).permutation,
                       one.permutation)


@pytest.mark.parametrize("sp", [0.25, 0.5])
def test_permutation_probability(backend, sp):
    N = 6000
    full = PhTPS().sample(N, (4, 4), generator=_gen(5)).permutation
    part = PhTPS(photometric_strength=sp).sample(N, (4, 4), generator=_gen(5)).permutation
    is_ident = (part == IDENTITY).all(dim=1)
    same = (part == full).all(dim=1)
    assert torch.all(is_ident | same)  # either not applied, or the same draw as at sP = 1
    moved = ~(full == IDENTITY).all(dim=1)
    frac = (same & moved).sum().item() / moved.sum().item()
    assert abs(frac - sp) < 0.03
    assert abs((~is_ident).float().mean().item() - sp * 5 / 6) < 0.03


# --------------------------------------------------------------------------------------
# applying the perturbation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("clamp", [False, True])
def test_perturb_is_warp_of_photometric(backend, clamp):
    m = PhTPS(clamp=clamp)
    x = _image(4, 9, 11)
    p = m.sample(4, (9, 11), generator=_gen(6))
    out, valid = m.perturb(x, p)
    jittered = tpswarp.photometric_jitter(x, p.brightness, p.saturation, p.hue, p.contrast, p.permutation,
                                          clamp=clamp)
    exp_out, exp_valid = tpswarp.tps_warp(jittered, p.src, p.tps)
    assert out.shape == (4, 3, 9, 11) and valid.shape == (4, 1, 9, 11) and valid.dtype == torch.bool
    assert_close(out, exp_out)
    assert torch.equal(valid, exp_valid)
    assert not valid.all() and valid.any()
    if clamp:
        assert jittered.min() >= 0 and jittered.max() <= 1


def test_perturb_differentiable_wrt_image(backend):
    m = PhTPS()
    x = _image(2, 5, 6).requires_grad_(True)
    p = m.sample(2, (5, 6), generator=_gen(9))
    out, _ = m.perturb(x, p)
    (g,) = torch.autograd.grad(out, x, torch.randn(out.shape))
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_forward_batched(backend):
    m = PhTPS()
    x = _image(3, 8, 10)
    labels = torch.randint(0, 19, (3, 8, 10), generator=_gen(12))
    out, warped, valid, p = m(x, labels, generator=_gen(13))
    ref = m.sample(3, (8, 10), generator=_gen(13))
    assert torch.equal(p.dst, ref.dst) and torch.equal(p.permutation, ref.permutation)
    exp_out, exp_valid = m.perturb(x, ref)
    assert_close(out, exp_out)
    assert torch.equal(valid, exp_valid)
    assert torch.equal(warped, m.warp_labels(labels, ref))
    out2, valid2, p2 = m(x, generator=_gen(13))
    assert torch.equal(out2, out) and torch.equal(valid2, valid) and len(p2) == 3


def test_forward_single_image(backend):
    m = PhTPS()
    x = _image(1, 8, 10)[0]
    labels = torch.randint(0, 19, (8, 10), generator=_gen(14))
    out, warped, valid, p = m(x, labels, generator=_gen(15))
    assert out.shape == (3, 8, 10) and out.dtype == x.dtype
    assert warped.shape == (8, 10) and warped.dtype == labels.dtype
    assert valid.shape == (1, 8, 10) and valid.dtype == torch.bool
    assert len(p) == 1
    b_out, b_warped, b_valid, _ = m(x[None], labels[None], generator=_gen(15))
    assert torch.equal(out, b_out[0]) and torch.equal(warped, b_warped[0]) and torch.equal(valid, b_valid[0])
    out2, valid2, _ = m(x, generator=_gen(15))
    assert out2.shape == (3, 8, 10) and torch.equal(out2, out)


@pytest.mark.parametrize("labels_4d", [False, True])
def test_warp_labels_uses_ignore_index_outside(backend, labels_4d):
    m = PhTPS(offset_std=0.4)
    B, H, W = 3, 9, 12
    labels = torch.randint(0, 19, (B, H, W), generator=_gen(16))
    p = m.sample(B, (H, W), generator=_gen(17))
    inp = labels[:, None] if labels_4d else labels
    warped = m.warp_labels(inp, p)
    assert warped.shape == inp.shape and warped.dtype == labels.dtype
    warped = warped[:, 0] if labels_4d else warped
    # oracle: explicit grid at the pixel centres, nearest sampling of (label + 1) with zero
    # padding, so 0 marks "outside"
    ys, xs = torch.meshgrid((2 * torch.arange(H) + 1) / H - 1, (2 * torch.arange(W) + 1) / W - 1, indexing="ij")
    q = torch.stack([xs, ys], -1).reshape(1, H * W, 2).expand(B, -1, -1).double()
    grid = tpswarp.tps_transform(q, p.src.double(), p.tps.double()).view(B, H, W, 2)
    sampled = F.grid_sample(labels[:, None].double() + 1, grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)[:, 0]
    expected = torch.where(sampled == 0, torch.full_like(sampled, 255), sampled - 1).long()
    assert (expected == 255).any() and (expected != 255).any()
    assert torch.equal(warped, expected)
    # a custom ignore index
    other = m.warp_labels(labels, p, ignore_index=100)
    assert torch.equal(other == 100, expected == 255)


def test_warp_teacher_outputs(backend):
    m = PhTPS()
    p = m.sample(2, (6, 8), generator=_gen(18))
    probs = torch.randn(2, 5, 6, 8, generator=_gen(19)).softmax(1)
    out, valid = m.warp(probs, p)
    exp_out, exp_valid = tpswarp.tps_warp(probs, p.src, p.tps)
    assert_close(out, exp_out)
    assert torch.equal(valid, exp_valid)
    # valid pixels hold distributions
    sums = out.sum(1, keepdim=True)
    assert_close(sums[valid], torch.ones_like(sums[valid]))
    # a teacher at another resolution, warped to the student's size
    small, _ = m.warp(torch.rand(2, 5, 3, 4), p, size=(6, 8))
    assert small.shape == (2, 5, 6, 8)


@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_consistency_loss_equals_warped_kl_div(backend, teacher_is_logits, reduction):
    m = PhTPS()
    p = m.sample(2, (6, 8), generator=_gen(20))
    student = torch.randn(2, 5, 6, 8, generator=_gen(21), requires_grad=True)
    t = torch.randn(2, 5, 6, 8, generator=_gen(22))
    teacher = t if teacher_is_logits else t.softmax(1)
    loss = m.consistency_loss(student, teacher, p, teacher_is_logits=teacher_is_logits, reduction=reduction)
    expected = tpswarp.warped_kl_div(student, teacher, p.src, p.tps, teacher_is_logits=teacher_is_logits,
                                     reduction=reduction)
    assert_close(loss, expected)
    # and it is the masked KL against the warped teacher
    warped, valid = m.warp(teacher, p)
    assert_close(loss, tpswarp.masked_kl_div(student, warped, valid, teacher_is_logits=teacher_is_logits,
                                             reduction=reduction))
    loss.sum().backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_align_corners_option(backend):
    m = PhTPS(align_corners=True)
    x = _image(2, 5, 6)
    p = m.sample(2, (5, 6), generator=_gen(23))
    out, valid = m.perturb(x, p)
    jit = m.photometric(x, p)
    exp_out, exp_valid = tpswarp.tps_warp(jit, p.src, p.tps, align_corners=True)
    assert_close(out, exp_out)
    assert torch.equal(valid, exp_valid)
    student = torch.randn(2, 4, 5, 6)
    teacher = torch.randn(2, 4, 5, 6).softmax(1)
    assert_close(m.consistency_loss(student, teacher, p),
                 tpswarp.warped_kl_div(student, teacher, p.src, p.tps, align_corners=True))


def test_params_indexing(backend):
    p = PhTPS().sample(4, (5, 5), generator=_gen(24))
    one = p[2]
    assert len(one) == 1 and torch.equal(one.dst, p.dst[2:3]) and one.image_size == (5, 5)
    last = p[-1]
    assert len(last) == 1 and torch.equal(last.permutation, p.permutation[3:])
    assert len(p[1:3]) == 2
    moved = p.to("cpu")
    assert torch.equal(moved.tps, p.tps)


# --------------------------------------------------------------------------------------
# DataLoader with workers
# --------------------------------------------------------------------------------------
class _PerturbedDataset(torch.utils.data.Dataset):
    """Applies PhTPS to one image per item with a per-item seeded generator."""

    def __init__(self, n=6, H=8, W=10):
        g = _gen(100)
        self.images = torch.rand(n, 3, H, W, generator=g)
        self.labels = torch.randint(0, 19, (n, H, W), generator=g)
        self.phtps = PhTPS()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(1000 + i)
        out, labels, valid, p = self.phtps(self.images[i], self.labels[i], generator=gen)
        return out, labels, valid, p.tps[0], p.permutation[0]


def test_dataloader_workers_match_main_process(backend):
    ds = _PerturbedDataset()

    def collect(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, shuffle=False)
        return [torch.cat(parts) for parts in zip(*[tuple(batch) for batch in loader])]

    main = collect(0)
    multi = collect(2)
    assert main[0].shape == (6, 3, 8, 10) and main[1].shape == (6, 8, 10) and main[2].shape == (6, 1, 8, 10)
    for a, b in zip(main, multi):
        assert torch.equal(a, b)
    # items differ from each other (per-item seeds)
    assert not torch.equal(main[3][0], main[3][1])


# --------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------
def test_bad_arguments(backend):
    with pytest.raises(ValueError, match="`geometric_strength`"):
        PhTPS(geometric_strength=-1.0)
    with pytest.raises(ValueError, match="`photometric_strength`"):
        PhTPS(photometric_strength=math.inf)
    with pytest.raises(ValueError, match="`saturation`"):
        PhTPS(saturation=(0.0, 2.0))
    with pytest.raises(ValueError, match="`contrast`"):
        PhTPS(contrast=(2.0, 1.0))
    m = PhTPS()
    with pytest.raises(ValueError, match="`batch_size`"):
        m.sample(0, (4, 4))
    with pytest.raises(ValueError, match="`image_size`"):
        m.sample(2, (4,))
    with pytest.raises(ValueError, match="`image`"):
        m(torch.rand(4, 4))
    with pytest.raises(ValueError, match="`labels`"):
        m(torch.rand(3, 4, 4), torch.zeros(4, 5, dtype=torch.long))
