// Run-time choice of the CPU kernels' AVX2 versions (x86 with GCC or clang): the target attribute
// of those functions and the feature test, shared by every CPU kernel that has an AVX2 version.
#pragma once

#include <cstdlib>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define TPSWARP_X86_MULTIVERSION 1
#define TPSWARP_TARGET_AVX2 __attribute__((target("avx2,fma")))
// Small AVX2 helpers: forced inline (GCC does not inline a plain `inline` target function everywhere).
#define TPSWARP_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline
#else
#define TPSWARP_X86_MULTIVERSION 0
#define TPSWARP_TARGET_AVX2
#endif

namespace tpswarp {
namespace cpu {

// AVX2+FMA available (and not disabled with TPSWARP_NO_AVX2=1, which tests use to run the
// baseline-ISA code on an AVX2 machine). Read once.
inline bool cpu_has_avx2() {
#if TPSWARP_X86_MULTIVERSION
  static const bool has = [] {
    const char* off = std::getenv("TPSWARP_NO_AVX2");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace tpswarp
