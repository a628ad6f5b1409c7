// Python module famevil_fast._C: build facts. The operators register themselves with
// TORCH_LIBRARY in their own translation units.
#include <torch/extension.h>

namespace {

bool built_with_cuda() {
#ifdef FAMEVIL_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "famevil_fast compiled operators (CPU always, CUDA when built with it)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA sources were compiled in");
  m.def("built_with_openmp", &built_with_openmp,
        "True when compiled with OpenMP: the CPU kernels' at::parallel_for uses several threads");
}
