"""Reference HSV photometric jitter, in the order of DESIGN.md (the authors' code)."""
from __future__ import annotations

from typing import Optional

import torch

from .._validation import check_photometric_jitter


def rgb_to_hsv(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor):
    """Hexcone HSV: v = max, s = (v - min) / v (0 where v = 0), h in [0, 1) (0 where s = 0)."""
    v = torch.maximum(torch.maximum(r, g), b)
    mn = torch.minimum(torch.minimum(r, g), b)
    delta = v - mn
    has_v = v != 0
    s = torch.where(has_v, delta / torch.where(has_v, v, torch.ones_like(v)), torch.zeros_like(v))
    has_delta = delta != 0
    d = torch.where(has_delta, delta, torch.ones_like(delta))
    h = torch.where(
        r == v,
        (g - b) / d,
        torch.where(g == v, 2 + (b - r) / d, 4 + (r - g) / d),
    )
    h = torch.where(has_delta, torch.remainder(h / 6, 1.0), torch.zeros_like(h))
    return h, s, v


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor):
    """c_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1 for r, g, b."""

    def channel(n: int) -> torch.Tensor:
        k = torch.remainder(n + 6 * h, 6.0)
        return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

    return channel(5), channel(3), channel(1)


def photometric_jitter(
    image: torch.Tensor,
    brightness: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    contrast: torch.Tensor,
    permutation: Optional[torch.Tensor] = None,
    *,
    clamp: bool = False,
) -> torch.Tensor:
    """Jitter RGB ``image (B, 3, H, W)`` with per-image parameters of shape ``(B,)``.

    Per pixel: to HSV; ``v += brightness``; ``s *= saturation``; ``h = (h + hue) mod 1``
    (hue in turns); ``v *= contrast``; back to RGB; ``out[:, c] = rgb[permutation[c]]``;
    clamp to [0, 1] if ``clamp``. Half inputs are computed in float32.
    """
    check_photometric_jitter(image, brightness, saturation, hue, contrast, permutation)
    ct = torch.float64 if image.dtype == torch.float64 else torch.float32
    x = image.to(ct)

    def per_image(p: torch.Tensor) -> torch.Tensor:
        return p.to(ct).view(-1, 1, 1)

    h, s, v = rgb_to_hsv(x[:, 0], x[:, 1], x[:, 2])
    v = v + per_image(brightness)
    s = s * per_image(saturation)
    h = torch.remainder(h + per_image(hue), 1.0)
    v = v * per_image(contrast)
    rgb = torch.stack(hsv_to_rgb(h, s, v), dim=1)
    if permutation is not None:
        idx = permutation.view(-1, 3, 1, 1).expand_as(rgb)
        rgb = torch.gather(rgb, 1, idx)
    if clamp:
        rgb = rgb.clamp(0, 1)
    out = rgb.to(image.dtype)
    if image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
