// tpswarp._C: importing it registers the kernels; the module itself only reports how it was built.
#include <pybind11/pybind11.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
#ifdef TPSWARP_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(TPSWARP_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::string(TORCH_VERSION_BUILT);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "tpswarp compiled kernels (registered with torch.ops.tpswarp on import)";
  m.def("build_info", &build_info, "How the extension was built: CUDA, architectures, OpenMP, torch version.");
}
