// Weight-only INT4 GEMM kernel (Marlin-style: repacked weight, cp.async pipeline, lop3 dequant,
// bf16/fp16 mma.sync m16n8k16), sm_80 and newer. Layout of the repacked weight: int4_gemm.h.
//
// Design:
//  * Block = 4 warps = 128 output columns x 16*kMTiles rows; each warp owns one 32-column tile of
//    the repacked weight and streams it along K. grid = (N/128 column blocks, split_k, M tiles).
//  * Pipeline: kStages shared-memory stages of 128 values of K each, filled with 16-byte
//    cp.async.cg (L2 only): per stage every lane copies its own 4 x 16 bytes of the weight (the
//    bytes it will dequantize itself, so the weight needs no swizzle) and the block copies the
//    activation tile [16*kMTiles, 128] once for all 4 warps (rows padded to 320 bytes so the
//    16-byte fragment reads of 8 rows x 4 threads are bank-conflict free), and the group scales /
//    zeros of the stage's chunks (16 bytes per chunk and lane group g: one cp.async per lane), so
//    the compute phase reads them from shared memory instead of waiting on a global load. Rows >= M
//    and K positions >= K are zero-filled by cp.async (src-size 0), so tails need no other masking.
//  * Dequantization in registers: for a word q of 8 nibbles, lop3((q >> 4r) & 0x000f000f | MAGIC)
//    builds two 16-bit floats MAGIC + v (0x6400 = 1024 in fp16; 0x4300 = 128 in bf16, whose 7
//    mantissa bits still hold v exactly); subtracting (MAGIC + z) is exact and gives v - z, and
//    one multiplication by the group scale rounds once: W = round_T((v - z) * s).
//  * The activation fragment of thread (g, t) for 32 values of K is one 16-byte shared load of
//    K positions 8t..8t+7 per row; K is visited in the same permuted order as the weight's
//    nibble order (see int4_gemm.h), which the dot product does not notice.
//  * Split-K over grid.y with float32 partials and the shared deterministic reduction kernel.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "fp8_gemm.cuh"  // gemm::Epilogue / epilogue_pair (shared epilogue store)
#include "int4_gemm.h"

namespace llama_kernels {
namespace int4gemm {

constexpr int kWarps = 4;                                  // warps per block
constexpr int kThreads = kWarps * kWarpSize;               // threads per block
constexpr int kBlockN = kWarps * 32;                       // output columns per block
constexpr int kStepK = 128;                                // K values per pipeline stage
constexpr int kChunks = kStepK / 32;                       // 32-value K chunks per stage
constexpr int kXPitch = kStepK * 2 + 64;                   // smem bytes per activation row
constexpr int kWStageBytes = kWarps * kChunks * 32 * 16;   // weight bytes per stage (8 KiB)
constexpr int kSzStageBytes = kWarps * kChunks * 8 * 16;   // scale/zero bytes per stage (2 KiB)

template <int kMTiles>
constexpr int stage_bytes() {
  return kWStageBytes + kSzStageBytes + 16 * kMTiles * kXPitch;
}

// Per-dtype constants: the magic exponent of the int4 -> float conversion.
template <typename T>
struct Int4Traits;
template <>
struct Int4Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0 twice: 1024 + v is exact
};
template <>
struct Int4Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0 twice: 128 + v is exact
};

// Why: (a & b) | c in one LOP3 instruction (the compiler does not always fuse it).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"((0xf0 & 0xcc) | 0xaa));
  return d;
}

// Why: turns nibbles r and r + 4 of q into the two T values (v - z) * s of one B-fragment
// register; zz2 = (MAGIC + z) twice, s2 = s twice, both packed T pairs.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t q_shifted, uint32_t zz2, uint32_t s2) {
  using T2 = typename Int4Traits<T>::T2;
  const uint32_t v = and_or(q_shifted, 0x000f000fu, Int4Traits<T>::kMagic);
  const T2 w = __hmul2(__hsub2(bit_cast_dev<T2>(v), bit_cast_dev<T2>(zz2)), bit_cast_dev<T2>(s2));
  return bit_cast_dev<uint32_t>(w);
}

// Why: one m16n8k16 tensor-core MMA with float32 accumulation, for T = half or bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Why: 16-byte global -> shared copy that bypasses L1; pred false zero-fills the destination
// (src-size 0 reads nothing, so src only has to be some valid address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem),
               "r"(src_size));
}

// Why: closes the group of cp.async issued since the last commit (one group per stage).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

// Why: waits until at most kPending committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

template <typename T,   // activation / output dtype: __half or __nv_bfloat16
          int kMTiles,  // m16 tiles per block (rows of M per block = 16 * kMTiles)
          int kStages>  // shared-memory pipeline stages (cp.async groups in flight = kStages - 1)
__global__ void __launch_bounds__(kThreads)
    int4_gemm_kernel(const T* __restrict__ x,               // [M, K]
                     const uint4* __restrict__ qpacked,     // [N/32, Kp/32, 32, 4] int32 (int4_gemm.h)
                     const uint4* __restrict__ scale_zero,  // [K/G, N/32, 8, 8] T (int4_gemm.h)
                     float* __restrict__ partial,           // [split_k, M, N] or nullptr: fused store
                     gemm::Epilogue epi,                    // output (no scales, no bias)
                     int M, int N, int K, int group_size,
                     int steps_per_split) {                 // 128-value K steps per blockIdx.y
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int kRows = 16 * kMTiles;
  constexpr int kStageBytes = stage_bytes<kMTiles>();
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int n_tiles = N / 32;
  const int nt = blockIdx.x * kWarps + warp;  // this warp's 32-column tile
  const bool warp_ok = nt < n_tiles;
  const int nt_safe = warp_ok ? nt : 0;
  const int kc_total = (K + 31) / 32;
  const int steps = (K + kStepK - 1) / kStepK;
  const int s_begin = blockIdx.y * steps_per_split;
  const int iters = max(min(s_begin + steps_per_split, steps) - s_begin, 0);
  const int m_block = blockIdx.z * kRows;
  const int ngroups = K / group_size;
  const uint4* wsrc = qpacked + static_cast<size_t>(nt_safe) * kc_total * 32 + lane;
  const uint4* szsrc = scale_zero + static_cast<size_t>(nt_safe) * 8;  // + group * (N/32) * 8 + g

  // Issues the cp.async copies of K step `step` into stage `slot`.
  auto load_stage = [&](int slot, int step) {
    uint8_t* st = smem + slot * kStageBytes;
    uint4* w_s = reinterpret_cast<uint4*>(st) + warp * (kChunks * 32) + lane;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int kc = step * kChunks + c;
      const bool ok = warp_ok && kc < kc_total;
      cp_async16(w_s + c * 32, ok ? wsrc + static_cast<size_t>(kc) * 32 : qpacked, ok);
    }
    {  // lane (c, gg) = (lane / 8, lane % 8): the scales / zeros of chunk c for lane group gg
      const int c = lane / 8, gg = lane % 8;
      const int kc = step * kChunks + c;
      const bool ok = warp_ok && kc < kc_total;
      const int grp = min(kc * 32 / group_size, ngroups - 1);  // a chunk never straddles groups
      uint4* sz_s = reinterpret_cast<uint4*>(st + kWStageBytes) + warp * (kChunks * 8) + lane;
      cp_async16(sz_s, ok ? szsrc + static_cast<size_t>(grp) * n_tiles * 8 + gg : scale_zero, ok);
    }
    uint8_t* x_s = st + kWStageBytes + kSzStageBytes;
#pragma unroll
    for (int i = 0; i < kRows * 16 / kThreads; ++i) {
      const int p = threadIdx.x + i * kThreads;
      const int row = p / 16, piece = p % 16;
      const int m = m_block + row, k = step * kStepK + piece * 8;
      const bool ok = m < M && k < K;  // K % 8 == 0: a 16-byte piece is all in or all out
      cp_async16(x_s + row * kXPitch + piece * 16, ok ? x + static_cast<size_t>(m) * K + k : x, ok);
    }
  };

  float acc[kMTiles][4][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][i][r] = 0.0f;

  // MMAs of stage `slot`: per 32-value chunk, dequantize this thread's 4 words
  // (one per n8 tile) into 4 B-fragment registers each and multiply with every m16 tile.
  auto compute = [&](int slot) {
    const uint8_t* st = smem + slot * kStageBytes;
    const uint4* w_s = reinterpret_cast<const uint4*>(st) + warp * (kChunks * 32) + lane;
    const uint4* sz_s = reinterpret_cast<const uint4*>(st + kWStageBytes) + warp * (kChunks * 8) + g;
    const uint8_t* x_s = st + kWStageBytes + kSzStageBytes;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const uint4 sz = sz_s[c * 8];  // the 4 lanes of group g read the same 16 bytes (broadcast)
      const uint4 wv = w_s[c * 32];
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
      uint32_t b[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t sel = (i & 1) ? 0x3232u : 0x1010u;  // broadcast the high / low T of a pair
        const uint32_t s2 = __byte_perm(i < 2 ? sz.x : sz.y, 0, sel);
        const uint32_t zz2 = __byte_perm(i < 2 ? sz.z : sz.w, 0, sel);
#pragma unroll
        for (int r = 0; r < 4; ++r) b[i][r] = dequant_pair<T>(words[i] >> (4 * r), zz2, s2);
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const uint8_t* xr = x_s + (mt * 16 + g) * kXPitch + c * 64 + t * 16;
        const uint4 lo = *reinterpret_cast<const uint4*>(xr);                // row g
        const uint4 hi = *reinterpret_cast<const uint4*>(xr + 8 * kXPitch);  // row g + 8
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          mma_16816<T>(acc[mt][i], lo.x, hi.x, lo.y, hi.y, b[i][0], b[i][1]);
          mma_16816<T>(acc[mt][i], lo.z, hi.z, lo.w, hi.w, b[i][2], b[i][3]);
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iters) load_stage(s, s_begin + s);
    cp_async_commit();  // always commit, so the group count per iteration is uniform
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();  // stage it has landed (this thread's copies) ...
    __syncthreads();               // ... and everybody's; stage it - 1 is no longer read
    const int next = it + kStages - 1;
    if (next < iters) load_stage(next % kStages, s_begin + next);
    cp_async_commit();
    compute(it % kStages);
  }
  cp_async_wait<0>();

  if (!warp_ok) return;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = nt * 32 + i * 8 + 2 * t;
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
}

}  // namespace int4gemm
}  // namespace llama_kernels
