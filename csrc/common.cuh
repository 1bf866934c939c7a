// Device-side building blocks shared by the llama_kernels CUDA kernels.
//
// Plain CUDA only: raw pointers, no torch, no pybind11. Everything here is
// header-only and force-inlined so each kernel keeps its data in registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>  // device printf of checked builds (below)

namespace llama_kernels {

constexpr int kWarpSize = 32;

// Largest finite float8 e4m3fn magnitude; FP8 quantization maps the row amax onto it.
constexpr float kFp8E4M3Max = 448.0f;

// Why: a value-preserving reinterpretation of 32-bit register contents (a packed
// half2/bfloat162 <-> uint32) without strict-aliasing UB; compiles to nothing.
template <typename To, typename From>
__device__ __forceinline__ To bit_cast_dev(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_dev: size mismatch");
  To to;
  __builtin_memcpy(&to, &from, sizeof(To));
  return to;
}

// ---------------------------------------------------------------------------- checked builds
// A checked build (CMake option / env LLAMA_KERNELS_CHECKED=1) bounds every software spin wait
// (the mbarrier waits of the TMA/wgmma pipeline): a wait still unfinished after
// LLAMA_KERNELS_SPIN_TIMEOUT_MS of wall time prints which kernel, barrier and stage hung and
// traps, so a wrong byte count or a lost arrive becomes a launch error instead of a hang that
// takes the process (and every later check) with it. A normal build compiles none of this.
// Checked builds are for fault containment, not timing: the printf is a call, and ptxas serializes
// the wgmmas of a kernel that holds a call (warning C7510).
#ifndef LLAMA_KERNELS_CHECKED
#define LLAMA_KERNELS_CHECKED 0
#endif
#ifndef LLAMA_KERNELS_SPIN_TIMEOUT_MS
#define LLAMA_KERNELS_SPIN_TIMEOUT_MS 2000  // far above any legitimate wait (microseconds)
#endif

#if LLAMA_KERNELS_CHECKED
// Why: one report per module; the first thread to time out prints, the others never trap
// themselves (a trap racing the printf could lose the message): they idle until its trap.
static __device__ unsigned int g_spin_hang_reported = 0;

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Why: cold and never returning, so the hot spin loop keeps no live values across a call.
__device__ __noinline__ __attribute__((noreturn)) void spin_hang(const char* kernel, const char* barrier,
                                                                 int stage, unsigned parity) {
  if (atomicExch(&g_spin_hang_reported, 1u) == 0) {
    printf("llama_kernels CHECKED: %s: spin wait on %s[%d] (parity %u) exceeded %d ms in block %d "
           "thread %d: trapping\n",
           kernel, barrier, stage, parity, LLAMA_KERNELS_SPIN_TIMEOUT_MS, static_cast<int>(blockIdx.x),
           static_cast<int>(threadIdx.x));
    __threadfence_system();
    __trap();
  }
  for (;;) __nanosleep(1000000);
}

// Why: the bound of one spin wait: start the clock at the first failed try, then compare.
struct SpinBound {
  uint64_t start = 0;
  __device__ __forceinline__ void check(const char* kernel, const char* barrier, int stage,
                                        unsigned parity) {
    const uint64_t now = global_timer_ns();
    if (start == 0) {
      start = now;
    } else if (now - start > uint64_t{LLAMA_KERNELS_SPIN_TIMEOUT_MS} * 1000000u) {
      spin_hang(kernel, barrier, stage, parity);
    }
  }
};
#endif

// One 16-byte vector (a uint4, moved with a single LDG.128/STG.128) holds
// kElems values of T. VecTraits<T> converts such a vector to and from float32
// so that all arithmetic happens in float32 while memory traffic stays in T.
template <typename T>
struct VecTraits;

template <>
struct VecTraits<float> {
  static constexpr int kElems = 4;  // 4 x fp32 = 16 bytes
  static constexpr const char* kName = "float32";

  // Why: fp32 needs no conversion; the reinterpretation keeps the generic kernel code.
  __device__ __forceinline__ static void to_float(const uint4& v, float (&f)[kElems]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  // Why: inverse of to_float (exact for fp32).
  __device__ __forceinline__ static uint4 from_float(const float (&f)[kElems]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};

template <>
struct VecTraits<__half> {
  static constexpr int kElems = 8;  // 8 x fp16 = 16 bytes
  static constexpr const char* kName = "float16";

  // Why: half2 -> float2 converts two values per instruction; exact (fp16 is a subset of fp32).
  __device__ __forceinline__ static void to_float(const uint4& v, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 p = __half22float2(bit_cast_dev<__half2>(w[i]));
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
  // Why: round-to-nearest-even back to fp16, matching torch's float -> half cast.
  __device__ __forceinline__ static uint4 from_float(const float (&f)[kElems]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = bit_cast_dev<uint32_t>(__float22half2_rn(make_float2(f[2 * i], f[2 * i + 1])));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct VecTraits<__nv_bfloat16> {
  static constexpr int kElems = 8;  // 8 x bf16 = 16 bytes
  static constexpr const char* kName = "bfloat16";

  // Why: bf16 -> fp32 is a 16-bit shift; exact.
  __device__ __forceinline__ static void to_float(const uint4& v, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 p = __bfloat1622float2(bit_cast_dev<__nv_bfloat162>(w[i]));
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
  // Why: round-to-nearest-even back to bf16 (one F2FP.BF16.PACK_AB per pair on sm_80+),
  // matching torch's float -> bfloat16 cast.
  __device__ __forceinline__ static uint4 from_float(const float (&f)[kElems]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = bit_cast_dev<uint32_t>(__float22bfloat162_rn(make_float2(f[2 * i], f[2 * i + 1])));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// Why: butterfly (xor) shuffles leave the full warp sum in every lane, so no broadcast is needed.
__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Why: same butterfly as warp_reduce_sum, for the FP8 row amax.
__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Why: one block-wide reduction = warp shuffles + one shared-memory exchange +
// one __syncthreads; every warp then re-reduces the per-warp partials itself, so
// all threads get the result without a second barrier. `smem` must hold
// blockDim.x / 32 floats and must not be reused by a later reduction in the
// same kernel (give each reduction its own buffer). blockDim.x must be a
// multiple of 32.
template <bool kMax>  // true: max-reduction; false: sum-reduction
__device__ __forceinline__ float block_reduce(float v, float* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = kMax ? warp_reduce_max(v) : warp_reduce_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < num_warps ? smem[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? warp_reduce_max(v) : warp_reduce_sum(v);
}

// Why: convert 4 floats to 4 saturated e4m3fn bytes with two packed converts
// (one F2FP...E4M3 per pair on sm_89+; software emulation on sm_80).
// SATFINITE clamps out-of-range values to +-448 instead of producing NaN.
__device__ __forceinline__ uint32_t float4_to_e4m3x4(float a, float b, float c, float d) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

}  // namespace llama_kernels
