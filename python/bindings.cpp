// pybind11 bindings of the llama_kernels CUDA launchers: module llama_kernels._C.
//
// Thin by design: pointers arrive as Python ints (tensor.data_ptr(), 0 = absent),
// the stream as an int (torch.cuda.current_stream().cuda_stream); no torch here.
// The only logic is turning a launcher's cudaError_t into a RuntimeError whose
// message names the kernel and the shapes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "binding.h"

#ifndef LLAMA_KERNELS_CUDA_ARCHS
#error "LLAMA_KERNELS_CUDA_ARCHS (comma-separated SASS archs, e.g. \"80,89,90a\") must be defined by CMake"
#endif

namespace py = pybind11;

namespace {

std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  const std::string s = LLAMA_KERNELS_CUDA_ARCHS;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llama_kernels CUDA kernels (raw device pointers as ints; see csrc/)";
  llama_kernels::binding::bind_norm(m);
  llama_kernels::binding::bind_gemm(m);
  llama_kernels::binding::bind_attention(m);
  m.def("compiled_archs", &compiled_archs, "SASS architectures in this build, e.g. ['80', '89', '90a'].");

  m.def(
      "cuda_runtime_version",
      []() {
        int v = 0;
        const cudaError_t err = cudaRuntimeGetVersion(&v);
        if (err != cudaSuccess) {
          throw std::runtime_error(std::string("cuda_runtime_version: ") + cudaGetErrorString(err));
        }
        return v;
      },
      "cudaRuntimeGetVersion() of the statically linked CUDA runtime (e.g. 13000).");
}
