"""Compile Triton launches for an NVIDIA GPU target on a machine without a GPU (nothing runs).

Used by ``tests/triton_compile_check.py`` (the interpreter accepts code the compiler rejects) and
``benchmarks/kernel_resources.py`` (registers and spills of the compiled kernels). Triton ships
``ptxas``, so each launch is compiled down to a cubin.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch


class _TargetOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target, launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only(arch: int, on_compiled: Callable[[str, object], None],
                 on_failed: Optional[Callable[[str, BaseException], None]] = None) -> Iterator[None]:
    """Within the context every ``kernel[grid](...)`` launch is compiled for ``sm_<arch>`` and not run;
    ``on_compiled(kernel_name, compiled_kernel)`` sees each result (``.asm["cubin"]``, ``.metadata``),
    ``on_failed(kernel_name, exception)`` each compilation that raised (the launch then re-raises).
    Host code after a launch then reads uninitialized buffers. Raises RuntimeError under
    TRITON_INTERPRET=1 (the kernels are interpreter objects then, not compilable)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_only: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        try:
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except BaseException as e:
            if on_failed is not None:
                on_failed(self.fn.__name__, e)
            raise
        on_compiled(self.fn.__name__, kernel)
        return kernel

    previous = getattr(driver, "_active", None)  # None until a real driver was needed (there is none without a GPU)
    driver.set_active(_TargetOnlyDriver(arch))
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original_run
        driver._active = previous
