"""tpswarp: thin-plate-spline warps, HSV photometric jitter and masked dense KL as fused,
autograd-aware ``torch.ops.tpswarp.*`` ops, and the PhTPS perturbation model of one-way
consistency for semi-supervised semantic segmentation."""
from . import _extension  # noqa: F401  (loads tpswarp._C when built)
from ._backend import backends, get_backend, set_backend, use_backend
from .ops import masked_kl_div, photometric_jitter, tps_solve, tps_transform, tps_warp, warped_kl_div
from . import reference  # noqa: E402
from .perturb import PhTPS, PhTPSParams  # noqa: E402
from ._backend import initial_backend as _initial_backend

set_backend(_initial_backend())

__version__ = "0.1.0"

__all__ = [
    "tps_solve", "tps_transform", "tps_warp", "photometric_jitter", "masked_kl_div", "warped_kl_div",
    "PhTPS", "PhTPSParams", "backends", "set_backend", "get_backend", "use_backend", "reference",
]
