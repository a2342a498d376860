// Numbers and shapes as text for error messages, without a std::ostream.
//
// Pass show(x) instead of an integer, a float or an IntArrayRef to TORCH_CHECK* (c10::str inserts
// its arguments into a std::ostringstream). On the lent H100/H200 machines (PyTorch 2.11, g++ from
// /opt/gcc) the extension's link put libstdc++'s stream instantiations into _C.so itself (weak
// std::ostream::_M_insert<long>, <double>, ... that no object file defines; -Bsymbolic-functions
// binds calls to them), and inserting a number into a stream then crashed the process (SIGSEGV) in
// the C++ and the CUDA sources alike, instead of raising; strings, dtypes and devices inserted fine.
// std::to_string and snprintf do not go through a stream. The text is c10's: "[2, 3, 4]", "5".
// tests/test_error_messages_source.py checks every TORCH_CHECK in csrc/.
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
