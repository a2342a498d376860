"""The KL statistics in one sweep over the classes (``kl_pixel_online_loaded`` in
``csrc/include/tpswarp/kl.h``), the per-pixel code of the CUDA kernels, checked on the CPU.

With ``TPSWARP_KL_ONE_SWEEP=1`` the C++ CPU kernels' scalar paths (float64, strided layouts,
``size=``) take that code instead of their two sweeps; the masked and warped KL test files then run
again for the ``cpp`` backend in a subprocess. The tests here order the classes so that the maxima
of the student and of the teacher grow at every class, at none after the first, or at every other
one (the rescaling of the running sums): they run in both modes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tpswarp
from tpswarp import reference
from tpswarp.testing import assert_close, ordered_logits, quadrant_points

F64 = torch.float64
ORDERS = [("ascending", "descending"), ("descending", "ascending"), ("zigzag", "ascending"), ("zigzag", "zigzag")]
HERE = os.path.dirname(os.path.abspath(__file__))


def _pair(shape_s, shape_t, orders, teacher_is_logits):
    s = ordered_logits(shape_s, orders[0], seed=0)
    t = ordered_logits(shape_t, orders[1], seed=1)
    return s, (t if teacher_is_logits else torch.softmax(t / 8.0, dim=1))


def _check(fn, ref, inputs, dtype):
    leaves = [x.to(dtype).detach().requires_grad_() for x in inputs]
    ref_leaves = [x.detach().to(F64).requires_grad_() for x in leaves]
    out, expected = fn(*leaves), ref(*ref_leaves)
    assert_close(out, expected.to(out.dtype), dtype=dtype)
    grads = torch.autograd.grad(out, leaves)
    ref_grads = torch.autograd.grad(expected, ref_leaves)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r.to(g.dtype), grad=True, dtype=dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["float64", "channels_last"])
@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("orders", ORDERS)
def test_masked_kl_ordered_maxima(backend, orders, teacher_is_logits, channels_last):
    s, t = _pair((2, 37, 3, 5), (2, 37, 3, 5), orders, teacher_is_logits)
    if channels_last:  # float32 in a strided layout: the scalar path too
        s = s.float().contiguous(memory_format=torch.channels_last)
        t = t.float().contiguous(memory_format=torch.channels_last)
    kw = dict(teacher_is_logits=teacher_is_logits)
    _check(lambda a, b: tpswarp.masked_kl_div(a, b, **kw), lambda a, b: reference.masked_kl_div(a, b, **kw),
           (s, t), s.dtype)


@pytest.mark.parametrize("size", [None, (6, 8)])
@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("orders", ORDERS)
def test_warped_kl_ordered_maxima(backend, orders, teacher_is_logits, size):
    s, t = _pair((2, 37, 4, 5), (2, 37, 5, 6), orders, teacher_is_logits)
    src = quadrant_points(2, dtype=F64)
    params = reference.tps_solve(src, src + 0.1 * torch.randn(src.shape, generator=torch.Generator().manual_seed(2),
                                                              dtype=F64))
    kw = dict(teacher_is_logits=teacher_is_logits, size=size)
    _check(lambda a, b: tpswarp.warped_kl_div(a, b, src, params, **kw),
           lambda a, b: reference.warped_kl_div(a, b, src, params, **kw), (s, t), F64)


@pytest.mark.skipif(os.environ.get("TPSWARP_KL_ONE_SWEEP") == "1", reason="already the one-sweep run")
def test_kl_test_files_pass_with_one_sweep_statistics():
    if not tpswarp.backends()["extension"]["built"]:
        pytest.skip("C++ extension not built")
    env = dict(os.environ, TPSWARP_KL_ONE_SWEEP="1", TPSWARP_TEST_BACKENDS="cpp")
    env.pop("TRITON_INTERPRET", None)
    files = ["test_masked_kl_div.py", "test_warped_kl_div.py", "test_kl_size.py", "test_kl_one_sweep.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += [os.path.join(HERE, f) for f in files]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(HERE))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert " passed" in result.stdout
