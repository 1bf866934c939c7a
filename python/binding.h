// Shared helpers of the binding files: raw addresses to pointers, launcher errors to exceptions.
#pragma once

#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace llama_kernels::binding {

// Why: Python passes device addresses as ints (tensor.data_ptr(), 0 = absent).
template <typename T = void>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Why: one message format for every kernel: "<kernel>: <CUDA error> (<shapes>): <why>".
inline void check(cudaError_t err, const char* kernel, const std::string& shapes, const char* why) {
  if (err == cudaSuccess) return;
  std::string msg = std::string(kernel) + ": " + cudaGetErrorString(err) + " (" + shapes + ")";
  if (why != nullptr) msg += std::string(": ") + why;
  throw std::runtime_error(msg);
}

// Each kernel family registers its functions on the module (one bind_*.cpp file each).
void bind_norm(pybind11::module_& m);
void bind_gemm(pybind11::module_& m);
void bind_attention(pybind11::module_& m);

}  // namespace llama_kernels::binding
