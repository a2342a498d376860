"""Op registration and backend choice: backends(), set_backend/use_backend, the
TPSWARP_BACKEND variable, schemas, and the package without the compiled extension."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import tpswarp
from tpswarp import _backend
from tpswarp._schemas import PUBLIC_OPS, SCHEMAS

REPO = Path(tpswarp.__file__).resolve().parent.parent
OP_NAMES = ["tps_solve", "tps_transform", "tps_warp", "photometric_jitter", "masked_kl_div", "warped_kl_div"]


def _run_python(code: str, **env_overrides) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root (the source tree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TPSWARP_BACKEND", "TPSWARP_NO_EXT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def restore_backend():
    previous = tpswarp.get_backend()
    yield
    tpswarp.set_backend(previous)


def _expected_default(op: str, device: str) -> str:
    native = _backend._native_kernels()[(op, device)]
    if native:
        return "cpp"
    if device == "cuda" and _backend.triton_available() and (op, "triton") in _backend._python_kernels:
        return "triton"
    return "reference"


# --------------------------------------------------------------------------------------
# the public surface
# --------------------------------------------------------------------------------------
def test_public_names():
    assert sorted(PUBLIC_OPS) == sorted(OP_NAMES)
    for name in OP_NAMES:
        assert callable(getattr(tpswarp, name))
        assert callable(getattr(tpswarp.reference, name))
        assert name in tpswarp.__all__
        assert hasattr(torch.ops.tpswarp, name)
        assert hasattr(torch.ops.tpswarp, f"_{name}_backward")
    for name in ("PhTPS", "PhTPSParams", "backends", "set_backend", "get_backend", "use_backend", "reference"):
        assert hasattr(tpswarp, name) and name in tpswarp.__all__


def test_backends_report():
    info = tpswarp.backends()
    assert set(info) >= {"extension", "triton", "forced", "selected"}
    assert isinstance(info["extension"]["built"], bool)
    assert isinstance(info["triton"], bool)
    assert set(info["selected"]) == {"cpu", "cuda"}
    for device in ("cpu", "cuda"):
        assert set(info["selected"][device]) == set(OP_NAMES)
        assert set(info["selected"][device].values()) <= set(_backend.BACKENDS)
    if not info["extension"]["built"]:
        assert info["extension"]["error"]
        assert set(info["selected"]["cpu"].values()) == {"reference"}
    # a copy: mutating it changes nothing
    info["selected"]["cpu"]["tps_warp"] = "bogus"
    assert tpswarp.backends()["selected"]["cpu"]["tps_warp"] != "bogus"


def test_default_choice(restore_backend):
    tpswarp.set_backend(None)
    info = tpswarp.backends()
    assert info["forced"] is None and tpswarp.get_backend() is None
    for op in OP_NAMES:
        assert info["selected"]["cpu"][op] == _expected_default(op, "cpu"), op
        assert info["selected"]["cuda"][op] == _expected_default(op, "cuda"), op


# --------------------------------------------------------------------------------------
# set_backend / use_backend
# --------------------------------------------------------------------------------------
def test_set_backend_reference(restore_backend):
    tpswarp.set_backend("reference")
    assert tpswarp.get_backend() == "reference"
    info = tpswarp.backends()
    assert info["forced"] == "reference"
    assert set(info["selected"]["cpu"].values()) == {"reference"}
    assert set(info["selected"]["cuda"].values()) == {"reference"}
    # the ops still work and agree with the reference
    s, t = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(tpswarp.masked_kl_div(s, t), tpswarp.reference.masked_kl_div(s, t))


def test_set_backend_rejects_unknown(restore_backend):
    tpswarp.set_backend("reference")
    with pytest.raises(ValueError, match="unknown backend"):
        tpswarp.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        tpswarp.set_backend("Reference")
    # a failed call leaves the choice alone
    assert tpswarp.get_backend() == "reference"
    assert set(tpswarp.backends()["selected"]["cpu"].values()) == {"reference"}


def test_use_backend_restores(restore_backend):
    tpswarp.set_backend(None)
    with tpswarp.use_backend("reference"):
        assert tpswarp.get_backend() == "reference"
        with tpswarp.use_backend(None):
            assert tpswarp.get_backend() is None
        assert tpswarp.get_backend() == "reference"
    assert tpswarp.get_backend() is None
    # also when the body raises
    with pytest.raises(RuntimeError, match="boom"):
        with tpswarp.use_backend("reference"):
            raise RuntimeError("boom")
    assert tpswarp.get_backend() is None
    assert tpswarp.backends()["selected"]["cpu"] == {op: _expected_default(op, "cpu") for op in OP_NAMES}


def test_forcing_cpp_without_kernel_warns_and_falls_back(restore_backend):
    missing = [op for op in OP_NAMES if not _backend._native_kernels()[(op, "cpu")]]
    if not missing:
        pytest.skip("the extension has a CPU kernel for every op")
    with pytest.warns(UserWarning, match="'cpp' forced"):
        tpswarp.set_backend("cpp")
    selected = tpswarp.backends()["selected"]["cpu"]
    for op in OP_NAMES:
        assert selected[op] == ("reference" if op in missing else "cpp"), op
    s, t = torch.randn(2, 3, 4), torch.rand(2, 3, 4)
    torch.testing.assert_close(tpswarp.masked_kl_div(s, t), tpswarp.reference.masked_kl_div(s, t))


def test_forcing_triton_on_cpu_uses_reference(restore_backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CUDA-side fallbacks may warn; the CPU side must not matter
        tpswarp.set_backend("triton")
    assert tpswarp.get_backend() == "triton"
    assert set(tpswarp.backends()["selected"]["cpu"].values()) == {"reference"}


def test_initial_backend_reads_environment(monkeypatch):
    for value, expected in (("reference", "reference"), (" cpp ", "cpp"), ("triton", "triton"), ("", None)):
        monkeypatch.setenv("TPSWARP_BACKEND", value)
        assert _backend.initial_backend() == expected
    monkeypatch.delenv("TPSWARP_BACKEND")
    assert _backend.initial_backend() is None
    monkeypatch.setenv("TPSWARP_BACKEND", "fast")
    with pytest.raises(ValueError, match="TPSWARP_BACKEND"):
        _backend.initial_backend()


def test_environment_variable_in_subprocess():
    bad = _run_python("import tpswarp", TPSWARP_BACKEND="fastest")
    assert bad.returncode != 0
    assert "ValueError" in bad.stderr and "TPSWARP_BACKEND" in bad.stderr and "fastest" in bad.stderr

    # ``import tpswarp`` as the first import of a fresh interpreter (torch not imported
    # before it) must also load the extension exactly when this process did.
    good = _run_python("""
        import json, tpswarp
        info = tpswarp.backends()
        print(json.dumps({"forced": tpswarp.get_backend(), "cpu": sorted(set(info["selected"]["cpu"].values())),
                          "extension": info["extension"]}))
    """, TPSWARP_BACKEND="reference")
    assert good.returncode == 0, good.stderr
    child = json.loads(good.stdout.strip().splitlines()[-1])
    assert child["forced"] == "reference" and child["cpu"] == ["reference"]
    here = tpswarp.backends()["extension"]
    assert child["extension"]["built"] == here["built"], f"fresh interpreter: {child['extension']}; here: {here}"


# --------------------------------------------------------------------------------------
# schemas
# --------------------------------------------------------------------------------------
def test_schemas_match_table():
    helpers = {"_masked_kl_div_with_grad", "_warped_kl_div_with_grad",  # loss and student gradient in one pass
               "_masked_kl_div_with_stats", "_masked_kl_div_backward_stats",  # statistics kept for the backward
               "_warped_kl_div_with_stats", "_warped_kl_div_backward_stats"}
    assert set(SCHEMAS) == set(PUBLIC_OPS) | {f"_{op}_backward" for op in PUBLIC_OPS} | helpers
    for name, schema in SCHEMAS.items():
        assert schema.startswith(name + "(")
        registered = str(getattr(torch.ops.tpswarp, name).default._schema)
        assert registered == "tpswarp::" + schema, name


# --------------------------------------------------------------------------------------
# without the compiled extension
# --------------------------------------------------------------------------------------
NO_EXT_SCRIPT = """
    import json
    import torch
    import tpswarp
    from tpswarp._schemas import SCHEMAS
    from tpswarp.testing import random_tps

    info = tpswarp.backends()
    assert info["extension"]["built"] is False, info
    assert "TPSWARP_NO_EXT" in info["extension"]["error"], info
    assert set(info["selected"]["cpu"].values()) == {"reference"}, info
    schemas = {n: str(getattr(torch.ops.tpswarp, n).default._schema) for n in SCHEMAS}

    torch.manual_seed(0)
    R = tpswarp.reference
    src, dst, _ = random_tps(2)
    params = tpswarp.tps_solve(src, dst)
    torch.testing.assert_close(params, R.tps_solve(src, dst))
    pts = torch.rand(2, 5, 2) * 2 - 1
    torch.testing.assert_close(tpswarp.tps_transform(pts, src, params), R.tps_transform(pts, src, params))
    img = torch.rand(2, 3, 6, 7, requires_grad=True)
    out, valid = tpswarp.tps_warp(img, src, params)
    ref_out, ref_valid = R.tps_warp(img, src, params)
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(valid, ref_valid)
    b, s, h, c = torch.rand(4, 2)
    jit = tpswarp.photometric_jitter(img, b, s + 0.5, h, c + 0.5, torch.tensor([[2, 0, 1], [0, 1, 2]]))
    student = torch.randn(2, 4, 6, 7, requires_grad=True)
    teacher = torch.randn(2, 4, 6, 7).softmax(1)
    loss = (tpswarp.masked_kl_div(student, teacher) + tpswarp.warped_kl_div(student, teacher, src, params)
            + jit.mean() + out.mean())
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(img.grad).all()
    m = tpswarp.PhTPS()
    x_s, lab, v, p = m(torch.rand(3, 6, 7), torch.zeros(6, 7, dtype=torch.long),
                       generator=torch.Generator().manual_seed(0))
    assert x_s.shape == (3, 6, 7) and lab.shape == (6, 7)
    print(json.dumps(schemas))
"""


def test_package_works_without_extension():
    out = _run_python(NO_EXT_SCRIPT, TPSWARP_NO_EXT="1")
    assert out.returncode == 0, out.stderr
    schemas = json.loads(out.stdout.strip().splitlines()[-1])
    # the Python-defined schemas (no extension) are the table's
    for name, schema in SCHEMAS.items():
        assert schemas[name] == "tpswarp::" + schema, name


def _grads_of(op_name, backend, mode_cls=None):
    from tpswarp.testing import random_tps
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64)
    src, dst, params = random_tps(2, generator=g, dtype=torch.float64)
    params.requires_grad_(True)
    jit = [torch.rand(2, generator=g, dtype=torch.float64) + 0.5 for _ in range(4)]
    calls = {
        "masked_kl_div": lambda: tpswarp.masked_kl_div(s, t),
        "warped_kl_div": lambda: tpswarp.warped_kl_div(s, t, src, params),
        "tps_warp": lambda: tpswarp.tps_warp(s, src, params)[0].square().sum(),
        "photometric_jitter": lambda: tpswarp.photometric_jitter(s.sigmoid(), *jit).square().sum(),
        "tps_solve": lambda: tpswarp.tps_solve(src, dst + params.sum() * 0).square().sum(),
    }
    with tpswarp.use_backend(backend), (mode_cls() if mode_cls else contextlib.nullcontext()):
        loss = calls[op_name]()
        return torch.autograd.grad(loss, (s, params), allow_unused=True)


@pytest.mark.parametrize("op_name", ["masked_kl_div", "warped_kl_div", "tps_warp", "photometric_jitter", "tps_solve"])
def test_reference_backward_under_a_dispatch_mode(op_name):
    """The reference backend differentiates its forward with autograd inside the backward op; under a
    TorchDispatchMode (memory trackers, FLOP counters) that op runs below the autograd keys."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    plain = _grads_of(op_name, "reference")
    moded = _grads_of(op_name, "reference", Recorder)
    assert any(op_name in name for name in seen)
    for a, b in zip(plain, moded):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
