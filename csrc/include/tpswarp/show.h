// Numbers and shapes as text for error messages, for code that nvcc compiles too.
//
// Pass show(x) instead of an integer, a float or an IntArrayRef to TORCH_CHECK* in any header
// or source a .cu file includes. c10::str inserts its arguments into a std::ostream, and in host
// code built by nvcc 13 with GCC 13's libstdc++ the numeric insertion (std::ostream::_M_insert<long>)
// is instantiated inside the extension; that copy crashed (SIGSEGV instead of the error) on the
// H100/H200 machines. Strings, ScalarType and Device insert fine; std::to_string and snprintf do not
// go through a stream at all. The text is the same as c10's: "[2, 3, 4]", "5", "0.5".
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace tpswarp {

template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0> inline std::string show(T v) {
  return std::to_string(v);
}

inline std::string show(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

inline std::string show(c10::ArrayRef<int64_t> values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(values[i]);
  }
  return s + "]";
}

}  // namespace tpswarp
