"""Reference TPS evaluation."""
from __future__ import annotations

import torch

from .._validation import check_tps_transform
from ._tps_math import compute_dtype, tps_evaluate


def tps_transform(points: torch.Tensor, src: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Evaluate the TPS map at ``points (B, m, 2)`` given ``src (B, n, 2)`` and
    ``params (B, n + 3, 2)``. Returns ``(B, m, 2)`` in the promoted dtype of the inputs,
    computed in float32 at least."""
    check_tps_transform(points, src, params)
    ct = compute_dtype(points, src, params)
    out_dtype = torch.promote_types(torch.promote_types(points.dtype, src.dtype), params.dtype)
    return tps_evaluate(points.to(ct), src.to(ct), params.to(ct)).to(out_dtype)
