"""PhTPS: the paper's perturbation model, a random TPS warp composed with HSV photometric jitter."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .ops import photometric_jitter, tps_solve, tps_warp, warped_kl_div

# Control points at the quadrant centres, normalized (x, y).
QUADRANT_CENTRES = ((-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5))

# All permutations of (0, 1, 2); index 0 is the identity.
_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])

# Uniforms drawn per image, in this order: 8 offsets (x, y per point), brightness,
# saturation, hue, contrast, "apply the permutation", which permutation.
_DRAWS_PER_IMAGE = 14


@dataclass
class PhTPSParams:
    """Per-image perturbation parameters (batch of ``B``).

    ``src (B, 4, 2)`` control points in the output frame, ``dst (B, 4, 2)`` where they
    sample the input, ``tps (B, 7, 2)`` the solved map, ``brightness``/``saturation``/``hue``/
    ``contrast`` ``(B,)``, ``permutation (B, 3)`` int64, ``image_size`` ``(H, W)``.
    """

    src: torch.Tensor
    dst: torch.Tensor
    tps: torch.Tensor
    brightness: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    contrast: torch.Tensor
    permutation: torch.Tensor
    image_size: Tuple[int, int]

    def __len__(self) -> int:
        return self.src.shape[0]

    def to(self, device) -> "PhTPSParams":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def __getitem__(self, index) -> "PhTPSParams":
        """Select batch items (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


class PhTPS(nn.Module):
    """The PhTPS perturbation: ``T = T_G ∘ T_P`` with per-image random parameters.

    Args:
        geometric_strength: ``sG``, scales the control-point offsets (0 = no warp).
        photometric_strength: ``sP``; maps ``(b, s, h, c)`` to
            ``(sP b, exp(sP ln s), sP h, exp(sP ln c))`` and permutes channels with
            probability ``min(sP, 1)`` (0 = identity).
        offset_std: std of the control-point offsets, normalized units (0.2 = 0.1 of the side).
        brightness: ``b ~ U(-brightness, brightness)``; saturation, contrast: ``U(lo, hi)``;
        hue: ``h ~ U(-hue, hue)`` in turns (0.1 = 36°).
        align_corners: coordinate convention of the warps.
        clamp: clamp the jittered image to ``[0, 1]`` (the paper does not).

    Typical one-way step::

        params = phtps.sample(x.shape[0], x.shape[-2:], generator=g, device=x.device)
        x_s, _ = phtps.perturb(x, params)
        with torch.no_grad():
            teacher = model(x).softmax(1)
        loss = phtps.consistency_loss(model(x_s), teacher, params)
    """

    def __init__(
        self,
        geometric_strength: float = 1.0,
        photometric_strength: float = 1.0,
        *,
        offset_std: float = 0.2,
        brightness: float = 0.25,
        saturation: Tuple[float, float] = (0.25, 2.0),
        hue: float = 0.1,
        contrast: Tuple[float, float] = (0.25, 2.0),
        align_corners: bool = False,
        clamp: bool = False,
    ):
        super().__init__()
        for name, v in (("geometric_strength", geometric_strength), ("photometric_strength", photometric_strength),
                        ("offset_std", offset_std), ("brightness", brightness), ("hue", hue)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"PhTPS: `{name}` must be a finite number >= 0, got {v!r}")
        for name, (lo, hi) in (("saturation", saturation), ("contrast", contrast)):
            if not (0 < lo <= hi):
                raise ValueError(f"PhTPS: `{name}` must be a range (lo, hi) with 0 < lo <= hi, got {(lo, hi)!r}")
        self.geometric_strength = float(geometric_strength)
        self.photometric_strength = float(photometric_strength)
        self.offset_std = float(offset_std)
        self.brightness = float(brightness)
        self.saturation = (float(saturation[0]), float(saturation[1]))
        self.hue = float(hue)
        self.contrast = (float(contrast[0]), float(contrast[1]))
        self.align_corners = bool(align_corners)
        self.clamp = bool(clamp)

    def extra_repr(self) -> str:
        return f"geometric_strength={self.geometric_strength}, photometric_strength={self.photometric_strength}"

    # -- sampling -------------------------------------------------------------------------
    def sample(
        self,
        batch_size: int,
        image_size: Sequence[int],
        *,
        generator: Optional[torch.Generator] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> PhTPSParams:
        """Draw parameters for ``batch_size`` images of ``image_size = (H, W)``.

        Each image consumes a fixed block of 14 uniforms from ``generator`` (a CPU
        generator, or the default one), so the same generator state gives the same
        parameters, and the first ``k`` images do not depend on ``batch_size``.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PhTPS.sample: `batch_size` must be a positive int, got {batch_size!r}")
        if len(image_size) != 2 or not all(int(s) > 0 for s in image_size):
            raise ValueError(f"PhTPS.sample: `image_size` must be (H, W) > 0, got {tuple(image_size)!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("PhTPS.sample: `generator` must be a CPU torch.Generator")
        u = torch.rand(batch_size, _DRAWS_PER_IMAGE, generator=generator, dtype=torch.float64)
        eps = torch.finfo(torch.float64).eps
        z = torch.special.ndtri(u[:, :8].clamp(eps, 1 - eps)).view(batch_size, 4, 2)
        src = torch.tensor(QUADRANT_CENTRES, dtype=torch.float64).expand(batch_size, 4, 2)
        dst = src + self.geometric_strength * self.offset_std * z

        sp = self.photometric_strength

        def uniform(col: int, lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * u[:, col]

        brightness = sp * uniform(8, -self.brightness, self.brightness)
        saturation = torch.exp(sp * torch.log(uniform(9, *self.saturation)))
        hue = sp * uniform(10, -self.hue, self.hue)
        contrast = torch.exp(sp * torch.log(uniform(11, *self.contrast)))
        apply = u[:, 12] < min(sp, 1.0)
        which = (u[:, 13] * 6).long().clamp(max=5)
        permutation = torch.where(apply[:, None], _PERMUTATIONS[which], _PERMUTATIONS[0])

        f32 = torch.float32
        src, dst = src.to(device=device, dtype=f32), dst.to(device=device, dtype=f32)
        return PhTPSParams(
            src=src,
            dst=dst,
            tps=tps_solve(src, dst, check_singular=False),
            brightness=brightness.to(device=device, dtype=f32),
            saturation=saturation.to(device=device, dtype=f32),
            hue=hue.to(device=device, dtype=f32),
            contrast=contrast.to(device=device, dtype=f32),
            permutation=permutation.to(device=device),
            image_size=(int(image_size[0]), int(image_size[1])),
        )

    # -- applying -------------------------------------------------------------------------
    def photometric(self, image: torch.Tensor, params: PhTPSParams) -> torch.Tensor:
        """``T_P``: the HSV jitter of ``image (B, 3, H, W)``."""
        return photometric_jitter(image, params.brightness, params.saturation, params.hue, params.contrast,
                                  params.permutation, clamp=self.clamp)

    def warp(self, x: torch.Tensor, params: PhTPSParams, *, mode: str = "bilinear", fill: float = 0.0,
             size: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``T_G``: warp ``x (B, C, H, W)`` (images, teacher outputs); returns ``(out, valid)``."""
        return tps_warp(x, params.src, params.tps, mode=mode, align_corners=self.align_corners, fill=fill, size=size)

    def perturb(self, image: torch.Tensor, params: PhTPSParams) -> Tuple[torch.Tensor, torch.Tensor]:
        """The student input ``T_G(T_P(image))`` and its validity mask ``(B, 1, H, W)``."""
        return self.warp(self.photometric(image, params), params)

    def warp_labels(self, labels: torch.Tensor, params: PhTPSParams, *, ignore_index: int = 255) -> torch.Tensor:
        """Nearest-neighbour warp of integer labels ``(B, H, W)`` or ``(B, 1, H, W)``;
        pixels sampled outside the image get ``ignore_index``."""
        squeeze = labels.dim() == 3
        out, _ = self.warp(labels.unsqueeze(1) if squeeze else labels, params, mode="nearest", fill=ignore_index)
        return out.squeeze(1) if squeeze else out

    def consistency_loss(self, student_logits: torch.Tensor, teacher: torch.Tensor, params: PhTPSParams, *,
                         teacher_is_logits: bool = False, reduction: str = "mean",
                         size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Eq. 3-4: KL between the warped clean-teacher output and the student's prediction
        on the perturbed input, averaged over valid pixels (:func:`tpswarp.warped_kl_div`).

        ``size=(H, W)`` takes the loss at that resolution (e.g. the image size ``params.image_size``)
        from low-resolution logits: both are bilinearly upsampled on the fly
        (``F.interpolate(..., align_corners=False)``), see :func:`tpswarp.warped_kl_div`."""
        return warped_kl_div(student_logits, teacher, params.src, params.tps, teacher_is_logits=teacher_is_logits,
                             align_corners=self.align_corners, reduction=reduction, size=size)

    def forward(self, image: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                generator: Optional[torch.Generator] = None):
        """Sample and apply: a drop-in augmentation.

        ``image`` is ``(3, H, W)`` or ``(B, 3, H, W)``; ``labels`` (optional) ``(H, W)`` or
        ``(B, H, W)`` integers. Returns ``(perturbed, valid, params)`` or, with labels,
        ``(perturbed, warped_labels, valid, params)``; single images come back unbatched
        (``valid`` as ``(1, H, W)``).
        """
        single = image.dim() == 3
        batch = image.unsqueeze(0) if single else image
        if batch.dim() != 4:
            raise ValueError(f"PhTPS: `image` must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        params = self.sample(batch.shape[0], batch.shape[-2:], generator=generator, device=image.device)
        out, valid = self.perturb(batch, params)
        if single:
            out, valid = out[0], valid[0]
        if labels is None:
            return out, valid, params
        lab = labels.unsqueeze(0) if single else labels
        if lab.shape[-2:] != batch.shape[-2:]:
            raise ValueError(f"PhTPS: `labels` {tuple(labels.shape)} must match the image size {tuple(batch.shape[-2:])}")
        warped = self.warp_labels(lab, params)
        return out, (warped[0] if single else warped), valid, params
