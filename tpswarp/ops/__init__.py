"""The public ops: schemas, fake kernels, autograd and docstrings. Importing this module
registers everything with ``torch.ops.tpswarp`` and chooses the backends."""
from . import _common  # noqa: F401  (defines the schemas when the extension is absent)
from .masked_kl_div import masked_kl_div
from .photometric_jitter import photometric_jitter
from .tps_solve import tps_solve
from .tps_transform import tps_transform
from .tps_warp import tps_warp
from .warped_kl_div import warped_kl_div

__all__ = ["tps_solve", "tps_transform", "tps_warp", "photometric_jitter", "masked_kl_div", "warped_kl_div"]

try:  # Triton kernels register the "triton" backend when Triton is installed
    import triton as _triton  # noqa: F401
except ImportError:
    pass
else:
    from .. import triton as _triton_kernels  # noqa: F401
