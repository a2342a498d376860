"""Pure-PyTorch reference implementations of every tpswarp op: the executable spec.

They are differentiable through autograd, validate their arguments like the public ops,
and are the fallback backend when the compiled extension is absent.
"""
from .masked_kl_div import masked_kl_div
from .photometric_jitter import photometric_jitter
from .tps_solve import tps_solve
from .tps_transform import tps_transform
from .tps_warp import tps_warp
from .warped_kl_div import warped_kl_div

__all__ = ["tps_solve", "tps_transform", "tps_warp", "photometric_jitter", "masked_kl_div", "warped_kl_div"]
