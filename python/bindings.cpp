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

#include "add_rms_norm.h"

#ifndef LLAMA_KERNELS_CUDA_ARCHS
#error "LLAMA_KERNELS_CUDA_ARCHS (comma-separated SASS archs, e.g. \"80,89,90a\") must be defined by CMake"
#endif

namespace py = pybind11;
namespace lk = llama_kernels;

namespace {

template <typename T = void>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// "add_rms_norm_fp8: invalid argument (rows=3, hidden=577, dtype=bfloat16): hidden must be ..."
void check(cudaError_t err, const char* kernel, int64_t rows, int64_t hidden, int dtype,
           const char* why) {
  if (err == cudaSuccess) return;
  const char* name = lk::dtype_name(dtype);
  std::string msg = std::string(kernel) + ": " + cudaGetErrorString(err) + " (rows=" +
                    std::to_string(rows) + ", hidden=" + std::to_string(hidden) +
                    ", dtype=" + (name ? std::string(name) : std::to_string(dtype)) + ")";
  if (why != nullptr) msg += std::string(": ") + why;
  throw std::runtime_error(msg);
}

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

  m.def(
      "add_rms_norm",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t y,
         std::uintptr_t residual_out, int64_t rows, int64_t hidden, float eps, int dtype,
         std::uintptr_t stream) {
        const char* why = nullptr;
        const cudaError_t err =
            lk::add_rms_norm(ptr(x), ptr(residual), ptr(weight), ptr(y), ptr(residual_out), rows,
                             hidden, eps, dtype, ptr<CUstream_st>(stream), &why);
        check(err, "add_rms_norm", rows, hidden, dtype, why);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("y"),
      py::arg("residual_out"), py::arg("rows"), py::arg("hidden"), py::arg("eps"),
      py::arg("dtype"), py::arg("stream"),
      "y = rmsnorm(x + residual) * weight; residual_out = x + residual (0 = absent).");

  m.def(
      "add_rms_norm_fp8",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t yq,
         std::uintptr_t y_scale, std::uintptr_t residual_out, int64_t rows, int64_t hidden,
         float eps, float scale_ub, int dtype, std::uintptr_t stream) {
        const char* why = nullptr;
        const cudaError_t err = lk::add_rms_norm_fp8(
            ptr(x), ptr(residual), ptr(weight), ptr(yq), ptr<float>(y_scale), ptr(residual_out),
            rows, hidden, eps, scale_ub, dtype, ptr<CUstream_st>(stream), &why);
        check(err, "add_rms_norm_fp8", rows, hidden, dtype, why);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("yq"), py::arg("y_scale"),
      py::arg("residual_out"), py::arg("rows"), py::arg("hidden"), py::arg("eps"),
      py::arg("scale_ub"), py::arg("dtype"), py::arg("stream"),
      "yq (e4m3), y_scale (float32 per row) = row-wise FP8 of rmsnorm(x + residual) * weight.");

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
