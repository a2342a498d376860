"""pixel_to_normalized_gpu_form (csrc/include/tpswarp/tps.h), the GPU kernels' division-free normalized
pixel coordinate, equals the division it replaces bit for bit: every pixel of every axis of 1 to 4096
pixels, both conventions, float and double. The header is compiled on its own with the system C++
compiler (it needs only <cmath>), so what runs is the function the kernels include."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include "tpswarp/tps.h"

// The reference's operations, one rounding each (no contraction: compiled with -ffp-contract=off).
template <typename acc> acc divided(int64_t i, int64_t size, bool align) {
  if (align) return size > 1 ? acc(2) * acc(i) / acc(size - 1) - acc(1) : acc(0);
  return (acc(2) * acc(i) + acc(1)) / acc(size) - acc(1);
}

template <typename acc> long mismatches(int64_t max_size) {
  long bad = 0;
  for (int64_t size = 1; size <= max_size; ++size)
    for (int align = 0; align < 2; ++align)
      for (int64_t i = 0; i < size; ++i) {
        const acc a = tpswarp::pixel_to_normalized_gpu_form<acc>(i, size, align != 0);
        const acc b = divided<acc>(i, size, align != 0);
        if (std::memcmp(&a, &b, sizeof(acc)) != 0 && bad++ < 5)
          std::printf("size %lld i %lld align %d: %.17g != %.17g\n", (long long)size, (long long)i, align,
                      double(a), double(b));
      }
  return bad;
}

int main() {
  const long bad = mismatches<float>(4096) + mismatches<double>(1024);
  std::printf("mismatches %ld\n", bad);
  return bad != 0;
}
"""


def compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
def test_pixel_to_normalized_gpu_form_is_the_division(tmp_path):
    src = tmp_path / "check.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "check"
    # -ffp-contract=off: `a * y` rounds on its own, as the kernels' separate multiply does
    subprocess.run([compiler(), "-O2", "-std=c++17", "-ffp-contract=off", "-I", os.path.join(ROOT, "csrc", "include"),
                    str(src), "-o", str(exe), "-lm"], check=True, capture_output=True, text=True, timeout=300)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mismatches 0" in result.stdout
