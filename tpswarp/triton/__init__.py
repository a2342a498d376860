"""Triton kernels: the GPU path when tpswarp is installed without a CUDA toolkit.

Importing this package (done by ``tpswarp.ops`` when Triton is installed) registers a
``"triton"`` backend for every op (``tpswarp._backend.register_python_backend``).
``tpswarp/_backend.py`` selects it on CUDA when no compiled CUDA kernel exists, when forced
with ``TPSWARP_BACKEND=triton`` / ``tpswarp.set_backend("triton")``, and on CPU tensors only
under ``TRITON_INTERPRET=1`` (Triton's interpreter, which the CPU tests use).

| op | Triton kernels |
|---|---|
| ``masked_kl_div`` | forward + backward (``masked_kl_div.py``) |
| ``photometric_jitter`` | forward + backward (``photometric_jitter.py``) |
| ``tps_warp`` | forward + backward (``tps_warp.py``) |
| ``warped_kl_div`` | forward + backward (``warped_kl_div.py``) |
| ``tps_solve``, ``tps_transform`` | none: a few dozen flops per batch item or point, so the |
|  | "triton" backend serves them with the reference (PyTorch ops on the same device). |

The KL kernels give each thread its own pixels and sweep the classes one at a time, with the
statistics online in one sweep (running maxima): per-pixel sums over the classes never cross
threads (``python benchmarks/kernel_resources.py`` lists the barriers and shuffles of every kernel
compiled for sm_90, no GPU needed).

``size=(H, W)`` of ``masked_kl_div`` / ``warped_kl_div`` (``_resize.py``, the taps of
``csrc/include/tpswarp/upsample.h``): the low-resolution student and teacher are read through the
bilinear taps of ``F.interpolate(mode="bilinear", align_corners=False)``, so no B x C x H x W
tensor is allocated (for ``warped_kl_div`` the warp samples the resized teacher: a bilinear of
bilinears). Backward: pass 1 writes per-output-pixel statistics (O(B*H*W)), pass 2 gathers each
low-resolution pixel's gradient over the output pixels that read it (deterministic, no atomics):
the student and teacher gradients of ``masked_kl_div`` and the student gradient of
``warped_kl_div``. The teacher/src/params gradients of ``warped_kl_div`` with ``size`` are NOT
native: they compose through the reference VJP (F.interpolate + the reference warp; on CUDA its
interpolate backward uses atomics).

How torch.compile sees them: the kernels are launched directly from the Python kernels
registered for the ``tpswarp::*`` ops (not through ``torch.library.triton_op``). The public
ops are schema-defined custom ops whose implementation is chosen per backend by registering
dispatch-key kernels, so under ``torch.compile`` each op is one opaque call traced through its
fake kernel, whichever backend serves it; ``triton_op`` would only let Inductor inline the
kernels if the compiled graph called a ``triton_op`` directly.

Determinism: reductions (loss sums, the mean's denominator, gradients w.r.t. the TPS and
photometric parameters) use per-program partial buffers summed by torch in a fixed order.
The image/teacher gradients of ``tps_warp`` and ``warped_kl_div`` are scatters: float atomics
by default, and under ``torch.use_deterministic_algorithms(True)`` per-tap contributions summed
with ``index_add_`` (deterministic in that mode).
"""
from .. import _backend
from . import masked_kl_div  # noqa: F401
from . import photometric_jitter  # noqa: F401
from . import tps_warp  # noqa: F401
from . import warped_kl_div  # noqa: F401

for _op in ("tps_solve", "tps_transform"):
    if (_op, "reference") in _backend._python_kernels:
        _backend.register_python_backend(_op, "triton", *_backend._python_kernels[(_op, "reference")])
del _op
