// FP8 (e4m3 x e4m3) GEMM kernel for decode-sized M (and, tiled over M, any M on sm_89), plus the
// epilogue helpers shared with the INT4 GEMM (the split-K reduction kernel is in fp8_gemm.cu).
//
// Design (memory-bound decode: the weight must stream from HBM once, at full bandwidth):
//  * No shared memory. Each warp owns 32 output columns (4 n8 tiles) and all 16*kMTiles rows of
//    its block; both operands go straight from global memory into mma fragments with one 16-byte
//    load per thread per row: thread (g = lane/4, t = lane%4) loads bytes [16t, 16t+16) of a
//    64-byte K step of weight row g of each n8 tile, and of activation rows g and g+8 of each
//    m16 tile. A dot product may visit K in any order as long as both operands use the same one,
//    so the 16 bytes are fed to two m16n8k32 MMAs as: MMA h (0, 1) takes word 2h as the
//    fragment's k = 4t..4t+3 and word 2h+1 as k = 16+4t..16+4t+3 (a0/a2 and b0/b1 below).
//  * kStages register buffers: the loads of step i + kStages - 1 are issued before the MMAs of
//    step i, so every thread keeps (kStages - 1) x (4 + 2 kMTiles) 16-byte loads in flight. The
//    weight is read with ld.global.nc.L1::no_allocate (streamed once, no L1 pollution); the small
//    activation is read through L1 (all 4 warps of a block and every block re-read it).
//  * Split-K across blocks (grid.y) so that N/128 column blocks x splits fill every SM; partial
//    sums go to a float32 workspace and a second kernel reduces them in a fixed order.
//  * Epilogue: acc * x_scale(m) * w_scale(n) + bias(n), rounded to bf16/fp16, stored as pairs.
//
// SASS (cuobjdump -sass of the built module, nvcc 13.0): on sm_89 every m16n8k32 e4m3 MMA is one
// native `QMMA.16832.F32.E4M3.E4M3`; on sm_90a the same PTX is lowered to F2FP conversions of
// the e4m3 operands to f16 plus `HMMA.16816.F32` instructions (Hopper has native FP8 only in
// wgmma/QGMMA). That is fine here: at decode sizes the kernel waits on the weight stream, not on
// the tensor cores; a compute-bound Hopper prefill GEMM needs wgmma (not part of this file).
#pragma once

#include <cstdint>

#include "add_rms_norm.h"  // DType codes shared with Python
#include "common.cuh"
#include "fp8_gemm.h"

namespace llama_kernels {
namespace gemm {

// Epilogue description shared by the fused (split_k == 1) path and the split-K reduction.
struct Epilogue {
  const float* x_scale;  // [M] (x_scale_rows) or [1]; nullptr = 1
  const float* w_scale;  // [N] (w_scale_rows) or [1]; nullptr = 1
  const void* bias;      // [N] in bias_dtype, or nullptr
  void* y;               // [M, N] in out_dtype
  int bias_dtype;        // DType code of bias (ignored when bias == nullptr)
  int out_dtype;         // DType::kFloat16 or DType::kBFloat16
  bool x_scale_rows;     // x_scale has one value per row of M
  bool w_scale_rows;     // w_scale has one value per column of N
};

// Why: the dtype of bias is a runtime code so that one kernel instance serves all three.
__device__ __forceinline__ float load_bias(const void* bias, int dtype, int n) {
  if (dtype == static_cast<int>(DType::kFloat32)) return static_cast<const float*>(bias)[n];
  if (dtype == static_cast<int>(DType::kFloat16)) {
    return __half2float(static_cast<const __half*>(bias)[n]);
  }
  return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[n]);
}

// Why: applies scale and bias to two adjacent columns (n, n + 1) of row m, in the reference's
// operation order ((acc * xs) * ws + bias, float32), and stores them as one 4-byte pair.
__device__ __forceinline__ void epilogue_pair(const Epilogue& e, int m, int n, int N, float a0,
                                              float a1) {
  const float xs = e.x_scale == nullptr ? 1.0f : e.x_scale[e.x_scale_rows ? m : 0];
  float ws0 = 1.0f, ws1 = 1.0f;
  if (e.w_scale != nullptr) {
    ws0 = e.w_scale[e.w_scale_rows ? n : 0];
    ws1 = e.w_scale[e.w_scale_rows ? n + 1 : 0];
  }
  float v0 = a0 * xs * ws0, v1 = a1 * xs * ws1;
  if (e.bias != nullptr) {
    v0 += load_bias(e.bias, e.bias_dtype, n);
    v1 += load_bias(e.bias, e.bias_dtype, n + 1);
  }
  const size_t idx = static_cast<size_t>(m) * N + n;  // even: the pair is 4-byte aligned
  if (e.out_dtype == static_cast<int>(DType::kFloat16)) {
    reinterpret_cast<__half2*>(static_cast<__half*>(e.y) + idx)[0] =
        __float22half2_rn(make_float2(v0, v1));
  } else {
    reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(e.y) + idx)[0] =
        __float22bfloat162_rn(make_float2(v0, v1));
  }
}

}  // namespace gemm

// The Hopper wgmma + TMA kernel of config kFp8Sm90 (csrc/fp8_gemm_sm90.cu); called by fp8_gemm()
// after its argument checks (M > 0, split_k == 1). Refuses (with *why) any device other than
// compute capability 9.0.
cudaError_t fp8_gemm_sm90(const void* xq, const void* wq, const gemm::Epilogue& e, int64_t M,
                          int64_t N, int64_t K, cudaStream_t stream, const char** why);

namespace fp8gemm {

constexpr int kWarps = 4;                        // warps per block
constexpr int kThreads = kWarps * kWarpSize;     // threads per block
constexpr int kNTiles = 4;                       // n8 tiles per warp (32 columns)
constexpr int kBlockN = kWarps * kNTiles * 8;    // 128 output columns per block
constexpr int kStepK = 64;                       // bytes (= e4m3 values) of K per pipeline step

// Why: the weight is read exactly once; L1::no_allocate keeps it from evicting the activations
// that every warp re-reads, and L2::256B prefetches the rest of the row's 256-byte segment.
__device__ __forceinline__ uint4 ldg_stream(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Why: one m16n8k32 e4m3 tensor-core MMA, accumulating in float32 in place (sm_89+ PTX).
__device__ __forceinline__ void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

template <int kMTiles,  // m16 tiles per block (rows of M per block = 16 * kMTiles)
          int kStages>  // register buffers of the load pipeline (loads in flight = kStages - 1)
__global__ void __launch_bounds__(kThreads)
    fp8_gemm_kernel(const uint8_t* __restrict__ xq,  // [M, K] e4m3
                    const uint8_t* __restrict__ wq,  // [N, K] e4m3
                    float* __restrict__ partial,     // [split_k, M, N] float32, or nullptr: fused epilogue
                    gemm::Epilogue epi,              // scales, bias, output (fused path)
                    int M, int N, int K,
                    int steps_per_split) {           // 64-byte K steps handled by each blockIdx.y
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  constexpr int kARows = 2 * kMTiles;  // activation rows per thread: g and g + 8 of each m16 tile
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int n_warp = blockIdx.x * kBlockN + warp * (kNTiles * 8);
  const int m_block = blockIdx.z * (16 * kMTiles);
  const int steps = (K + kStepK - 1) / kStepK;
  const int s_begin = blockIdx.y * steps_per_split;
  const int s_end = min(s_begin + steps_per_split, steps);

  // Row base pointers (already offset by this thread's 16 bytes); invalid rows read nothing.
  const uint8_t* wrow[kNTiles];
  bool wok[kNTiles];
#pragma unroll
  for (int i = 0; i < kNTiles; ++i) {
    const int n = n_warp + i * 8 + g;
    wok[i] = n < N;
    wrow[i] = wq + static_cast<size_t>(wok[i] ? n : 0) * K + t * 16;
  }
  const uint8_t* xrow[kARows];
  bool xok[kARows];
#pragma unroll
  for (int j = 0; j < kARows; ++j) {
    const int m = m_block + (j / 2) * 16 + (j % 2) * 8 + g;
    xok[j] = m < M;
    xrow[j] = xq + static_cast<size_t>(xok[j] ? m : 0) * K + t * 16;
  }

  uint4 wb[kStages][kNTiles];
  uint4 xb[kStages][kARows];
  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < kNTiles; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][i][r] = 0.0f;

  // Loads K step `step` into register stage `st` (zeros past this split's range or past K).
  auto load = [&](int st, int step) {
    const int k = step * kStepK + t * 16;
    const bool in = step < s_end && k < K;  // K % 16 == 0: a 16-byte piece is all in or all out
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) {
      wb[st][i] = make_uint4(0, 0, 0, 0);
      if (in && wok[i]) wb[st][i] = ldg_stream(wrow[i] + k);
    }
#pragma unroll
    for (int j = 0; j < kARows; ++j) {
      xb[st][j] = make_uint4(0, 0, 0, 0);
      if (in && xok[j]) xb[st][j] = __ldg(reinterpret_cast<const uint4*>(xrow[j] + k));
    }
  };
  // Two MMAs per (m16, n8) tile pair: h = 0 uses words x/y, h = 1 words z/w (see the file comment).
  auto compute = [&](int st) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const uint4 lo = xb[st][2 * mt], hi = xb[st][2 * mt + 1];  // rows g, g + 8
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        const uint4 b = wb[st][i];
        mma_e4m3(acc[mt][i], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
        mma_e4m3(acc[mt][i], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
      }
    }
  };

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) load(st, s_begin + st);
  for (int step = s_begin; step < s_end; step += kStages) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      // Refill the stage consumed one step ago, then compute on the oldest one. Steps past s_end
      // load zeros, so the last partial round of kStages adds nothing.
      load((st + kStages - 1) % kStages, step + st + kStages - 1);
      compute(st);
    }
  }

  // Accumulator fragment: acc[..][0..1] = row g, columns 2t, 2t+1; acc[..][2..3] = row g + 8.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) {
      const int n = n_warp + i * 8 + 2 * t;
      if (n >= N) continue;  // N % 8 == 0: the whole n8 tile is in or out
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m_block + mt * 16 + h * 8 + g;
        if (m >= M) continue;
        const float a0 = acc[mt][i][2 * h], a1 = acc[mt][i][2 * h + 1];
        if (partial != nullptr) {
          const size_t idx = (static_cast<size_t>(blockIdx.y) * M + m) * N + n;
          *reinterpret_cast<float2*>(partial + idx) = make_float2(a0, a1);
        } else {
          gemm::epilogue_pair(epi, m, n, N, a0, a1);
        }
      }
    }
  }
#else
  __trap();  // built for an architecture without e4m3 MMA (the launcher is never called there)
#endif
}

}  // namespace fp8gemm
}  // namespace llama_kernels
