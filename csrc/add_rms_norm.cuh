// Fused add + RMSNorm kernel (optional row-wise FP8 e4m3 output) and its
// template launcher. Included by add_rms_norm.cu (y in T) and
// add_rms_norm_fp8.cu (yq in e4m3) so the two families compile in parallel.
//
// Design: one thread block per row; each thread owns kVecsPerThread 16-byte
// vectors of the row (strided by blockDim.x so every warp access is coalesced)
// and keeps them in registers from the load, through the block reduction(s), to
// the store: the row's bytes are read once and written once.
#pragma once

#include <cmath>
#include <cstdint>

#include "add_rms_norm.h"
#include "common.cuh"

namespace llama_kernels {
namespace rmsnorm {

// Most threads per block; with kMaxVecsPerThread this bounds hidden (see add_rms_norm.h).
constexpr int kMaxThreads = 512;
// Most 16-byte vectors per thread (template values 1, 2, 4, 8).
constexpr int kMaxVecsPerThread = 8;
// Smallest amax used for the FP8 scale (matches the reference's 1/(448*512)).
constexpr float kMinAmax = static_cast<float>(1.0 / (448.0 * 512.0));

template <typename T,           // element type of x / residual / weight / y / residual_out
          int kVecsPerThread,   // 16-byte vectors of the row held in registers per thread
          bool kFp8Out>         // true: write yq (e4m3) + y_scale; false: write y in T
__global__ void __launch_bounds__(kMaxThreads)
    add_rms_norm_kernel(const uint4* x,             // [rows, nvec] 16-byte vectors of T
                        const uint4* residual,      // [rows, nvec] or nullptr (r = x)
                        const uint4* weight,        // [nvec]
                        uint4* y,                   // [rows, nvec] (kFp8Out == false)
                        uint8_t* yq,                // [rows, hidden] e4m3 bytes (kFp8Out)
                        float* y_scale,             // [rows] (kFp8Out)
                        uint4* residual_out,        // [rows, nvec] or nullptr (not written)
                        int hidden,                 // elements per row, multiple of kElems
                        float eps,                  // added to mean(r^2)
                        float scale_ub) {           // FP8 amax upper bound (+inf: none)
  using Tr = VecTraits<T>;
  constexpr int kElems = Tr::kElems;
  // One buffer per block reduction (block_reduce needs distinct buffers, no extra barrier).
  __shared__ float s_sum[kMaxThreads / kWarpSize];
  __shared__ float s_max[kMaxThreads / kWarpSize];

  const int nvec = hidden / kElems;
  const int64_t row_vec = static_cast<int64_t>(blockIdx.x) * nvec;
  const bool has_residual = residual != nullptr;

  // r: the (rounded) residual sum in T, w: the weight in T; both stay packed in
  // registers (4 x 32-bit per vector) until the output is written.
  uint4 r[kVecsPerThread];
  uint4 w[kVecsPerThread];
  {
    uint4 res[kVecsPerThread];
    // Issue every activation load of the row before any arithmetic (maximum bytes in flight).
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      r[i] = res[i] = make_uint4(0u, 0u, 0u, 0u);  // zeros add nothing to the sums
      if (v < nvec) {
        r[i] = x[row_vec + v];
        if (has_residual) res[i] = residual[row_vec + v];
      }
    }
    if (has_residual) {
#pragma unroll
      for (int i = 0; i < kVecsPerThread; ++i) {
        float a[kElems], b[kElems];
        Tr::to_float(r[i], a);
        Tr::to_float(res[i], b);
#pragma unroll
        for (int e = 0; e < kElems; ++e) a[e] += b[e];
        r[i] = Tr::from_float(a);  // round to T: the statistics use the stored residual
      }
    }
  }
  float sum_sq = 0.0f;
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (residual_out != nullptr && v < nvec) residual_out[row_vec + v] = r[i];
    float a[kElems];
    Tr::to_float(r[i], a);
#pragma unroll
    for (int e = 0; e < kElems; ++e) sum_sq += a[e] * a[e];
  }
  // The weight (L2-resident, shared by all rows) is loaded only now, so its
  // registers are not live during the activation loads; the block reduction
  // hides its latency.
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    w[i] = v < nvec ? __ldg(weight + v) : make_uint4(0u, 0u, 0u, 0u);
  }
  sum_sq = block_reduce<false>(sum_sq, s_sum);
  const float inv_rms = rsqrtf(sum_sq / static_cast<float>(hidden) + eps);

  if constexpr (!kFp8Out) {
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < nvec) {
        float a[kElems], b[kElems];
        Tr::to_float(r[i], a);
        Tr::to_float(w[i], b);
#pragma unroll
        for (int e = 0; e < kElems; ++e) a[e] = a[e] * inv_rms * b[e];
        y[row_vec + v] = Tr::from_float(a);
      }
    }
  } else {
    // Pass 1 over registers: row amax of yf (out-of-range slots are zeros -> 0).
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      float a[kElems], b[kElems];
      Tr::to_float(r[i], a);
      Tr::to_float(w[i], b);
#pragma unroll
      for (int e = 0; e < kElems; ++e) amax = fmaxf(amax, fabsf(a[e] * inv_rms * b[e]));
    }
    amax = block_reduce<true>(amax, s_max);
    // Make r and w opaque so pass 2 recomputes yf from the packed registers
    // instead of keeping pass 1's kVecsPerThread * kElems floats live (spills at 8).
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      asm volatile("" : "+r"(r[i].x), "+r"(r[i].y), "+r"(r[i].z), "+r"(r[i].w));
      asm volatile("" : "+r"(w[i].x), "+r"(w[i].y), "+r"(w[i].z), "+r"(w[i].w));
    }
    amax = fminf(amax, scale_ub);
    const float scale = fmaxf(amax, kMinAmax) / kFp8E4M3Max;  // IEEE division, as the reference
    if (threadIdx.x == 0) y_scale[blockIdx.x] = scale;

    // Pass 2: quantize. kElems bytes of e4m3 per 16-byte input vector.
    uint8_t* yq_row = yq + static_cast<int64_t>(blockIdx.x) * hidden;
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < nvec) {
        float a[kElems], b[kElems];
        Tr::to_float(r[i], a);
        Tr::to_float(w[i], b);
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          // y / scale with IEEE division, as the reference (y * (1 / scale) rounds differently
          // near the e4m3 rounding boundaries); fmaxf/fminf also map a NaN to a finite value.
          a[e] = fminf(fmaxf(__fdiv_rn(a[e] * inv_rms * b[e], scale), -kFp8E4M3Max), kFp8E4M3Max);
        }
        if constexpr (kElems == 8) {
          const uint2 q = make_uint2(float4_to_e4m3x4(a[0], a[1], a[2], a[3]),
                                     float4_to_e4m3x4(a[4], a[5], a[6], a[7]));
          reinterpret_cast<uint2*>(yq_row)[v] = q;  // 8-byte store
        } else {
          reinterpret_cast<uint32_t*>(yq_row)[v] = float4_to_e4m3x4(a[0], a[1], a[2], a[3]);
        }
      }
    }
  }
}

// Why: the one place that decides whether a configuration can be launched; a
// non-null result is the reason it cannot (the launcher then returns
// cudaErrorInvalidValue without touching the GPU).
inline const char* check_args(const void* x, const void* residual, const void* weight,
                              const void* y, const void* y_scale, const void* residual_out,
                              int64_t rows, int64_t hidden, int dtype, bool fp8_out) {
  int elem_bytes;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: elem_bytes = 4; break;
    case DType::kFloat16:
    case DType::kBFloat16: elem_bytes = 2; break;
    default: return "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)";
  }
  if (rows < 0) return "rows must be >= 0";
  if (rows > INT32_MAX) return "rows must be < 2^31";
  if (hidden <= 0) return "hidden must be positive";
  if (hidden % 8 != 0) return "hidden must be a multiple of 8";
  if (elem_bytes == 2 && hidden > kMaxHidden16) return "hidden must be <= 32768 for float16/bfloat16";
  if (elem_bytes == 4 && hidden > kMaxHiddenFp32) return "hidden must be <= 16384 for float32";
  if (rows == 0) return nullptr;  // nothing is read or written
  auto misaligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a != 0; };
  if (x == nullptr) return "x must not be null";
  if (weight == nullptr) return "weight must not be null";
  if (y == nullptr) return fp8_out ? "yq must not be null" : "y must not be null";
  if (fp8_out && y_scale == nullptr) return "y_scale must not be null";
  if (misaligned(x, 16)) return "x must be 16-byte aligned";
  if (misaligned(residual, 16)) return "residual must be 16-byte aligned";
  if (misaligned(weight, 16)) return "weight must be 16-byte aligned";
  if (misaligned(residual_out, 16)) return "residual_out must be 16-byte aligned";
  if (!fp8_out && misaligned(y, 16)) return "y must be 16-byte aligned";
  if (fp8_out && misaligned(y, 16 / elem_bytes)) {
    return elem_bytes == 2 ? "yq must be 8-byte aligned" : "yq must be 4-byte aligned";
  }
  if (fp8_out && misaligned(y_scale, 4)) return "y_scale must be 4-byte aligned";
  return nullptr;
}

// Why: the block shape is a function of hidden only: the fewest vectors per
// thread (1, 2, 4, 8) that cover the row with <= kMaxThreads threads, and the
// thread count rounded up to whole warps (block_reduce needs full warps).
inline void pick_block(int nvec, int* vecs_per_thread, int* threads) {
  int vpt = 1;
  while (vpt < kMaxVecsPerThread && (nvec + vpt - 1) / vpt > kMaxThreads) vpt *= 2;
  *vecs_per_thread = vpt;
  *threads = ((nvec + vpt - 1) / vpt + kWarpSize - 1) / kWarpSize * kWarpSize;
}

// Host launcher for one (T, output kind); arguments already validated by check_args.
template <typename T,       // element type (float, __half, __nv_bfloat16)
          bool kFp8Out>     // output kind, see add_rms_norm_kernel
cudaError_t launch(const void* x, const void* residual, const void* weight, void* y, void* yq,
                   float* y_scale, void* residual_out, int rows, int hidden, float eps,
                   float scale_ub, cudaStream_t stream) {
  const int nvec = hidden / VecTraits<T>::kElems;
  int vpt, threads;
  pick_block(nvec, &vpt, &threads);
  const auto* xv = static_cast<const uint4*>(x);
  const auto* rv = static_cast<const uint4*>(residual);
  const auto* wv = static_cast<const uint4*>(weight);
  auto* yv = static_cast<uint4*>(y);
  auto* qv = static_cast<uint8_t*>(yq);
  auto* ov = static_cast<uint4*>(residual_out);
  const dim3 grid(static_cast<unsigned>(rows));
  const dim3 block(static_cast<unsigned>(threads));
  switch (vpt) {
#define LLAMA_KERNELS_RMSNORM_CASE(VPT)                                                     \
  case VPT:                                                                                 \
    add_rms_norm_kernel<T, VPT, kFp8Out>                                                    \
        <<<grid, block, 0, stream>>>(xv, rv, wv, yv, qv, y_scale, ov, hidden, eps, scale_ub); \
    break;
    LLAMA_KERNELS_RMSNORM_CASE(1)
    LLAMA_KERNELS_RMSNORM_CASE(2)
    LLAMA_KERNELS_RMSNORM_CASE(4)
    LLAMA_KERNELS_RMSNORM_CASE(8)
#undef LLAMA_KERNELS_RMSNORM_CASE
    default: return cudaErrorInvalidValue;  // unreachable: pick_block returns 1, 2, 4 or 8
  }
  return cudaGetLastError();
}

}  // namespace rmsnorm
}  // namespace llama_kernels
