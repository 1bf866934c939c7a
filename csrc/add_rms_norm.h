// Host-side launchers for the fused add + RMSNorm kernels (optional FP8 output).
//
// Plain C++ / CUDA runtime API only (no torch, no pybind11): raw device
// pointers, shapes and a cudaStream_t in, a cudaError_t out. The Python binding
// turns a non-success code into an exception.
//
// Semantics, per row of `hidden` contiguous elements (row stride == hidden):
//   r  = round_T(float(x) + float(residual))     (r = x when residual == nullptr)
//   residual_out = r                              (skipped when residual_out == nullptr)
//   inv = rsqrt(mean(float(r)^2) + eps)           (float32 statistics of the rounded r)
//   yf  = float(r) * inv * float(weight)          (float32)
//   add_rms_norm:      y = round_T(yf)
//   add_rms_norm_fp8:  amax = min(max|yf|, scale_ub); scale = max(amax, 1/(448*512)) / 448
//                      yq = e4m3fn_satfinite(clamp(yf / scale, -448, 448)); y_scale[row] = scale
//
// In-place use is allowed: y may alias x and residual_out may alias residual
// (each element is read and written by the same thread, reads first).
//
// Supported: dtype float32 / float16 / bfloat16; hidden a positive multiple of 8,
// hidden <= kMaxHidden16 (16-bit types) or kMaxHiddenFp32 (float32); all
// T pointers 16-byte aligned, yq aligned to 16/sizeof(T) bytes, y_scale to 4.
// Anything else returns cudaErrorInvalidValue (and sets *why, if given) without
// launching; rows == 0 is a successful no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace llama_kernels {

// Activation dtype codes shared with Python (the binding passes them through).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest supported hidden size: 512 threads x 8 vectors of 16 bytes per row.
constexpr int64_t kMaxHidden16 = 32768;   // float16 / bfloat16
constexpr int64_t kMaxHiddenFp32 = 16384;  // float32

// Name of a dtype code ("float32", "float16", "bfloat16"), nullptr if unknown.
const char* dtype_name(int dtype);

cudaError_t add_rms_norm(const void* x, const void* residual, const void* weight, void* y,
                         void* residual_out, int64_t rows, int64_t hidden, float eps, int dtype,
                         cudaStream_t stream, const char** why = nullptr);

cudaError_t add_rms_norm_fp8(const void* x, const void* residual, const void* weight, void* yq,
                             float* y_scale, void* residual_out, int64_t rows, int64_t hidden,
                             float eps, float scale_ub, int dtype, cudaStream_t stream,
                             const char** why = nullptr);

}  // namespace llama_kernels
