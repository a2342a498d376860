"""Public op ``tpswarp.photometric_jitter``."""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import register_python_backend
from .._validation import check_photometric_jitter
from ..reference.photometric_jitter import photometric_jitter as reference_photometric_jitter
from ._common import empty_like_format, gradient_or_none, reference_vjp


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
    """The paper's HSV photometric jitter with one set of parameters per image.

    Per pixel, in this order: ``(h, s, v) = rgb_to_hsv(rgb)``; ``v += brightness``;
    ``s *= saturation``; ``h = (h + hue) mod 1`` (hue in turns: ±36° is ±0.1);
    ``v *= contrast``; back to RGB (no clamping of ``s`` or ``v``);
    ``out[:, c] = rgb[permutation[c]]``; clamp to ``[0, 1]`` if ``clamp``.

    Args:
        image: ``(B, 3, H, W)`` RGB, nominally in ``[0, 1]``; channels_last is kept.
        brightness, saturation, hue, contrast: ``(B,)`` floats.
        permutation: ``(B, 3)`` int64, each row a permutation of ``0, 1, 2``; None = identity.
        clamp: clamp the result to ``[0, 1]``.

    Returns:
        ``(B, 3, H, W)`` of ``image``'s dtype (half computed in float32). Differentiable
        w.r.t. ``image`` and the four float parameters.
    """
    check_photometric_jitter(image, brightness, saturation, hue, contrast, permutation, check_values=False)
    return torch.ops.tpswarp.photometric_jitter(image, brightness, saturation, hue, contrast, permutation, bool(clamp))


@torch.library.register_fake("tpswarp::photometric_jitter")
def _fake(image, brightness, saturation, hue, contrast, permutation=None, clamp=False):
    return empty_like_format(image, image.shape)


@torch.library.register_fake("tpswarp::_photometric_jitter_backward")
def _fake_backward(grad_out, image, brightness, saturation, hue, contrast, permutation, clamp, output_mask):
    g_image = empty_like_format(image, image.shape) if output_mask[0] else image.new_empty(0)
    params = (brightness, saturation, hue, contrast)
    return (g_image, *(p.new_empty(p.shape if need else (0,)) for p, need in zip(params, output_mask[1:])))


def _setup_context(ctx, inputs, output):
    *tensors, clamp = inputs
    ctx.save_for_backward(*tensors[:5])
    ctx.permutation = tensors[5]
    ctx.clamp = clamp


def _backward(ctx, grad_out):
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = torch.ops.tpswarp._photometric_jitter_backward(
        grad_out, *ctx.saved_tensors, ctx.permutation, ctx.clamp, needs
    )
    return (*(gradient_or_none(g, n) for g, n in zip(grads, needs)), None, None)


torch.library.register_autograd("tpswarp::photometric_jitter", _backward, setup_context=_setup_context)


def _reference_forward(image, brightness, saturation, hue, contrast, permutation=None, clamp=False):
    return reference_photometric_jitter(image, brightness, saturation, hue, contrast, permutation, clamp=clamp)


def _reference_backward(grad_out, image, brightness, saturation, hue, contrast, permutation, clamp, output_mask):
    def jitter(i, b, s, h, c):
        return reference_photometric_jitter(i, b, s, h, c, permutation, clamp=clamp)

    return reference_vjp(jitter, (image, brightness, saturation, hue, contrast), grad_out, output_mask)


register_python_backend("photometric_jitter", "reference", _reference_forward, _reference_backward)
