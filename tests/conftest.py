"""Shared fixtures: every op test runs once per backend available on this machine's CPU."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

import tpswarp

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def cpu_backends() -> list[str]:
    """Backends that can serve CPU tensors here: the reference always; the compiled C++
    kernels when built; Triton only under TRITON_INTERPRET=1."""
    names = ["reference"]
    if tpswarp.backends()["extension"]["built"]:
        names.append("cpp")
    if os.environ.get("TRITON_INTERPRET") == "1" and tpswarp.backends()["triton"]:
        names.append("triton")
    only = os.environ.get("TPSWARP_TEST_BACKENDS")
    if only:
        names = [n for n in names if n in only.split(",")]
    return names


@pytest.fixture(params=cpu_backends())
def backend(request):
    """Name of the backend serving ``tpswarp.<op>`` inside the test."""
    with tpswarp.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
