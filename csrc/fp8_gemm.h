// Host-side launchers of the FP8 GEMM (e4m3 x e4m3 -> bf16/fp16) and of the deterministic
// split-K reduction it shares with the INT4 GEMM.
//
// Plain C++ / CUDA runtime API only (no torch, no pybind11): raw device pointers, shapes and a
// cudaStream_t in, a cudaError_t out (with *why set on a rejected argument, nothing launched).
//
// Semantics (row-major, K contiguous in both operands: xq [M, K], wq [N, K] = nn.Linear layout):
//   acc[m, n] = sum_k float(xq[m, k]) * float(wq[n, k])          (float32 tensor-core accumulation)
//   y[m, n]   = round_out(acc[m, n] * xs(m) * ws(n) + bias(n))
//   xs(m) = x_scale[m] if x_scale_rows else x_scale[0]; ws(n) likewise; bias(n) = 0 when absent.
//
// Split-K (split_k > 1): split s of K writes its raw float32 partial sums to
// workspace[s, M, N]; a second kernel adds the partials in the fixed order s = 0, 1, ... and
// applies the epilogue, so repeated runs are bit-identical (no atomics anywhere).
//
// Supported (anything else: cudaErrorInvalidValue and *why, before any CUDA call):
//   M >= 0 (M == 0 is a no-op), N > 0 a multiple of 8, K > 0 a multiple of 16, M, N, K < 2^31;
//   xq, wq, workspace 16-byte aligned; y 4-byte aligned; scales 4-byte aligned, non-null;
//   bias aligned to its element size; config one of Fp8GemmConfig; 1 <= split_k <= kMaxSplitK;
//   workspace non-null when split_k > 1 (float32 [split_k, M, N]).
// The kernel needs sm_89 or newer (e4m3 mma.sync); the sm_80 build holds a stub that traps, and
// the Python side refuses to call it below compute capability 8.9. Config kFp8Sm90 additionally
// needs split_k == 1, y 16-byte aligned and, at launch, a compute capability 9.0 device whose
// loaded code is the sm_90a kernel (cudaErrorInvalidDevice / InvalidDeviceFunction and *why
// otherwise; checked on the host before launching).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace llama_kernels {

// Whitelisted tile configurations of the FP8 kernels (python/gemm_configs.py mirrors it).
// 0-2, the mma.sync kernel (sm_89+): 4 warps per block, 32 output columns per warp (128 per
// block), K walked in 64-byte steps; they differ in the rows of M per block and in the register
// pipeline depth. 3, the Hopper kernel (csrc/fp8_gemm_sm90.cu, sm_90a only): wgmma fed by TMA,
// 128 x 128 tiles, persistent; split_k must be 1 and the device compute capability 9.0.
enum Fp8GemmConfig : int {
  kFp8M16 = 0,   // 16 rows per block, 4 register stages (decode, M <= 16)
  kFp8M32 = 1,   // 32 rows per block, 3 register stages (decode, M <= 32)
  kFp8M64 = 2,   // 64 rows per block, 2 register stages (M > 32; large M loops over 64-row tiles)
  kFp8Sm90 = 3,  // Hopper wgmma + TMA, 128 x 128 x 128 tiles, 4 stages (prefill, M > 64)
  kFp8NumConfigs = 4,
};

// Largest split of K (the float32 partials of more splits cost more than the weight stream).
constexpr int kMaxSplitK = 64;

// bias_dtype: -1 = no bias, else a DType code (0 float32, 1 float16, 2 bfloat16).
// out_dtype: 1 float16 or 2 bfloat16.
cudaError_t fp8_gemm(const void* xq, const float* x_scale, bool x_scale_rows, const void* wq,
                     const float* w_scale, bool w_scale_rows, const void* bias, int bias_dtype,
                     void* y, int out_dtype, float* workspace, int64_t M, int64_t N, int64_t K,
                     int config, int split_k, cudaStream_t stream, const char** why = nullptr);

// nullptr when config kFp8Sm90 can run on the current device, else why not (not compute
// capability 9.0, or the code loaded for the device is not the sm_90a kernel: a build without
// 90a, or older PTX JIT-compiled). Checked once per device; no kernel is launched.
const char* fp8_gemm_sm90_unavailable();

// y[m, n] = round_out(sum_s workspace[s, m, n] * xs(m) * ws(n) + bias(n)), summed in order of s.
// Null x_scale / w_scale mean 1. N a multiple of 4; workspace 16-byte aligned; y 4-byte aligned.
cudaError_t gemm_splitk_reduce(const float* workspace, int split_k, const float* x_scale,
                               bool x_scale_rows, const float* w_scale, bool w_scale_rows,
                               const void* bias, int bias_dtype, void* y, int out_dtype,
                               int64_t M, int64_t N, cudaStream_t stream,
                               const char** why = nullptr);

}  // namespace llama_kernels
