// Split-KV (flash-decoding) GQA decode attention kernels over a paged KV cache.
//
// decode_split_kernel: grid (num_splits, Hkv, B), 4 warps. A block takes one sequence, one KV
// head and one split (a contiguous token range of the sequence's live length seq_lens[b], read
// on the device: split_tokens) with every query head of that KV head's group,
// so each K and V byte of the split is read from HBM once. The split is walked in tiles of
// kTileN = 64 tokens; each tile's K and V rows (looked up through the block table, one row =
// D contiguous elements of one token and KV head) are staged into shared memory by cp.async
// (16-byte, zero-filled past the end) in a 2-stage pipeline: tile i+1 is in flight while tile
// i is computed. Warp w owns tokens 16w..16w+15 of every tile and keeps its own online-softmax
// state (row max m, row sum l, output accumulator) in registers:
//   S[16 x 16]  = Q[16 x D] . K^T        mma.sync m16n8k16 (A = Q fragments held in registers,
//                                        B = K via ldmatrix), float32 accumulate
//   P = exp2(S * scale*log2e - m)        online softmax in float32
//   O[16 x D] += P . V                   mma.sync m16n8k16 (A = P re-packed from the S
//                                        accumulators, B = V via ldmatrix.trans)
// The 4 warps' states are combined through shared memory at the end; the block then writes the
// normalized output (num_splits == 1) or a float32 partial and its log2-sum-exp2 for
// decode_merge_kernel.
//
// Why tensor cores for every group size (the query heads of a group are the 16-row M tile,
// padded with zero rows for groups < 16) instead of a CUDA-core path for small groups: decode
// is bound by HBM bandwidth. At 16 rows the mma work is 2 x 16 x D flop per K/V row pair of
// 4 x D bytes (bf16), i.e. 16 flop/byte, against ~300 dense-bf16 flop per HBM byte on an H100
// (~150 on an A100), so even a group of 1 (15 of 16 rows wasted) leaves the tensor cores idle
// most of the time, while a CUDA-core dot product would spend 32x more issue slots on FMAs and
// shuffles. One code path also means one set of instantiations to compile and test.
//
// FP8 caches: the e4m3 rows are staged as bytes (half the traffic), then each warp converts
// its own 16 tokens to a 16-bit (q's dtype) tile in shared memory, exact since every e4m3 value
// is a bf16/fp16 value (hardware convert on sm_89+, a bit move and one multiply on sm_80), and
// the mma path is unchanged. k_scale is folded into the logit scale,
// v_scale multiplies the output once.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "decode_attention.h"

namespace llama_kernels {
namespace decode {

constexpr int kWarps = 4;                       // warps per block of the split kernel
constexpr int kThreads = kWarps * kWarpSize;    // threads per block of the split kernel
constexpr int kWarpTokens = 16;                 // tokens per warp per tile: the k of the P.V mma
constexpr int kTileN = kDecodeTileTokens;       // tokens per staged tile
constexpr int kRows = 16;                       // mma M tile: query heads of the group, padded
constexpr int kStages = 2;                      // cp.async pipeline depth
constexpr int kPad = 16;                        // bytes after each staged row: ldmatrix's 8
                                                // row addresses then hit 8 distinct bank quads
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kTileN == kWarps * kWarpTokens, "each warp owns 16 tokens of a tile");

// Why: cp.async and ldmatrix take 32-bit shared-state-space addresses.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Why: 16-byte global -> shared copy that bypasses registers and L1 (.cg) and overlaps with
// compute; src-size 0 zero-fills the destination, so masked-out rows are zeros, never stale
// NaN (0 * NaN in P.V would poison the output).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// Why: closes the group of cp.async issued for one tile (the unit cp_async_wait counts).
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Why: waits until at most kPending tile groups are still in flight.
template <int kPending>  // groups allowed to remain outstanding
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Why: four 8x8 16-bit tiles from shared memory straight into mma B fragments (non-transposed:
// rows are tokens, which is the col-major B of Q.K^T).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Why: transposed variant for V (rows are tokens = the k dimension of P.V).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Why: one m16n8k16 tensor-core product d += a . b with float32 accumulation.
template <typename T>  // __nv_bfloat16 or __half: the A/B element type
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Why: two floats -> one packed T pair (round to nearest even), the lower half the first.
template <typename T>  // __nv_bfloat16 or __half
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return bit_cast_dev<uint32_t>(__floats2bfloat162_rn(lo, hi));
  } else {
    return bit_cast_dev<uint32_t>(__floats2half2_rn(lo, hi));
  }
}

// Why: two e4m3 bytes -> two fp16 (low half from the low byte). sm_89+ has a hardware convert;
// below it the library falls back to a slow per-byte routine, so there the bits are moved
// instead: sign to bit 15, the 7 exponent / mantissa bits to bits 13..7, i.e. the fp16 value
// 2^-8 times the e4m3 value (exponent bias 15 instead of 7, e4m3 subnormals becoming fp16
// subnormals), then one exact multiply by 256. Exact for every finite e4m3 value.
__device__ __forceinline__ __half2_raw e4m3x2_to_half2(uint32_t two) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  const uint32_t bits = ((two & 0x80u) << 8) | ((two & 0x7Fu) << 7) | ((two & 0x8000u) << 16) |
                        ((two & 0x7F00u) << 15);
  const __half2 h = __hmul2(bit_cast_dev<__half2>(bits), __half2(__float2half_rn(256.0f), __float2half_rn(256.0f)));
  return static_cast<__half2_raw>(h);
#else
  return __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
#endif
}

// Why: two e4m3 bytes -> a packed T pair; exact (e4m3 values are fp16 and bf16 values).
template <typename T>  // __nv_bfloat16 or __half
__device__ __forceinline__ uint32_t e4m3x2_to(uint32_t two) {
  const __half2_raw h = e4m3x2_to_half2(two);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return bit_cast_dev<uint32_t>(__float22bfloat162_rn(__half22float2(__half2(h))));
  } else {
    return bit_cast_dev<uint32_t>(h);
  }
}

// Why: 16 e4m3 bytes (one staged chunk) -> 16 T values (two 16-byte vectors).
template <typename T>  // __nv_bfloat16 or __half
__device__ __forceinline__ void e4m3x16_to(const uint4& in, uint4& lo, uint4& hi) {
  lo = make_uint4(e4m3x2_to<T>(in.x & 0xffffu), e4m3x2_to<T>(in.x >> 16),
                  e4m3x2_to<T>(in.y & 0xffffu), e4m3x2_to<T>(in.y >> 16));
  hi = make_uint4(e4m3x2_to<T>(in.z & 0xffffu), e4m3x2_to<T>(in.z >> 16),
                  e4m3x2_to<T>(in.w & 0xffffu), e4m3x2_to<T>(in.w >> 16));
}

// Tokens per split of a sequence of `len` live tokens: an equal share of the num_splits splits,
// at least kDecodeMinSplitTokens (fixed costs dominate shorter splits), a multiple of kTileN.
__host__ __device__ __forceinline__ int split_tokens(int len, int num_splits) {
  int share = (len + num_splits - 1) / num_splits;
  share = share > kDecodeMinSplitTokens ? share : kDecodeMinSplitTokens;
  return (share + kTileN - 1) / kTileN * kTileN;
}

// Dynamic shared memory of one split-kernel instantiation, in bytes.
template <int kHeadDim,  // D
          bool kFp8>     // e4m3 cache
constexpr int split_smem_bytes() {
  constexpr int row = kHeadDim * (kFp8 ? 1 : 2) + kPad;
  constexpr int stages = kStages * 2 * kTileN * row;
  constexpr int conv = kFp8 ? kWarps * 2 * kWarpTokens * (kHeadDim * 2 + kPad) : 0;
  constexpr int merge = (kWarps * kRows * kHeadDim + 2 * kWarps * kRows) * 4;
  return stages + conv > merge ? stages + conv : merge;
}

template <typename T,      // q / out element type (__nv_bfloat16, __half); the mma input type
          int kHeadDim,    // D: 64 or 128
          bool kFp8>       // caches are e4m3 with per-KV-head float32 scales
// __maxnreg__: without it ptxas caps the D = 64 FP8 variants at 96 registers and spills; 128
// (D = 64) and 168 (D = 128) still let 3 blocks share an SM's register file.
__global__ void __launch_bounds__(kThreads) __maxnreg__(kHeadDim == 64 ? 128 : 168)
    decode_split_kernel(const T* __restrict__ q,                // [B, Hq, D]
                        const uint8_t* __restrict__ k_cache,    // [blocks, bs, Hkv, D] T / e4m3
                        const uint8_t* __restrict__ v_cache,    // same
                        const int32_t* __restrict__ block_table,// [B, max_blocks]
                        const int32_t* __restrict__ seq_lens,   // [B]
                        const float* __restrict__ k_scale,      // [Hkv] (kFp8)
                        const float* __restrict__ v_scale,      // [Hkv] (kFp8)
                        T* __restrict__ out,                    // [B, Hq, D] (num_splits == 1)
                        float* __restrict__ partial,            // [B, Hq, S, D] (num_splits > 1)
                        float* __restrict__ lse,                // [B, Hq, S]    (num_splits > 1)
                        int group,          // query heads per KV head, 1..kRows
                        int num_kv_heads,   // Hkv
                        int bs_log2,        // log2(block_size)
                        int max_blocks,     // block_table row length
                        int num_splits,     // S
                        float qk_scale) {   // sm_scale * log2(e)
  constexpr int kElemBytes = kFp8 ? 1 : 2;
  constexpr int kRowBytes = kHeadDim * kElemBytes + kPad;  // staged row stride
  constexpr int kChunks = kHeadDim * kElemBytes / 16;      // 16-byte chunks per row
  constexpr int kTileBytes = kTileN * kRowBytes;           // one staged K (or V) tile
  constexpr int kRow16 = kHeadDim * 2 + kPad;              // row stride of the 16-bit tiles
  constexpr int kKSteps = kHeadDim / 16;                   // k steps of Q.K^T
  constexpr int kDBlocks = kHeadDim / 8;                   // n blocks of P.V
  static_assert((kTileN * kChunks) % kThreads == 0, "whole chunks per thread");

  extern __shared__ __align__(16) uint8_t smem[];
  const int split = blockIdx.x;
  const int kvh = blockIdx.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int num_q_heads = num_kv_heads * group;
  const int64_t q_row0 = static_cast<int64_t>(b) * num_q_heads + static_cast<int64_t>(kvh) * group;
  // The live length, clamped to the table's capacity (an over-long length never reads past the
  // row), and this split's share of it: the grid is fixed by the shapes (graph-safe), the work
  // follows seq_lens[b] (splits past the live tokens exit at once).
  const int len = min(max(seq_lens[b], 0), max_blocks << bs_log2);
  const int split_len = split_tokens(len, num_splits);
  const int start = split * split_len;
  const int end = min(start + split_len, len);

  if (start >= end) {  // an empty split: nothing to attend to
    for (int r = threadIdx.x; r < group; r += kThreads) {
      if (num_splits == 1) {  // a zero-length sequence (outside the contract): zeros
        for (int d = 0; d < kHeadDim; d += 2) {
          *reinterpret_cast<uint32_t*>(out + (q_row0 + r) * kHeadDim + d) = pack2<T>(0.0f, 0.0f);
        }
      } else {  // weight 0 in the merge, which then never reads this split's partial
        lse[(q_row0 + r) * num_splits + split] = -INFINITY;
      }
    }
    return;
  }

  // Q as mma A fragments for all k steps: a0/a2 row lane/4, a1/a3 row lane/4 + 8; a0/a1 at
  // columns 2*(lane%4) + {0,1} of the k step, a2/a3 eight columns further. Rows >= group: 0.
  const int r0 = lane / 4;
  const int r1 = r0 + 8;
  const int cq = (lane % 4) * 2;
  uint32_t qf[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = ks * 16 + h * 8 + cq;
      qf[ks][2 * h] = r0 < group ? *reinterpret_cast<const uint32_t*>(q + (q_row0 + r0) * kHeadDim + col) : 0u;
      qf[ks][2 * h + 1] = r1 < group ? *reinterpret_cast<const uint32_t*>(q + (q_row0 + r1) * kHeadDim + col) : 0u;
    }
  }
  const float scale_log2 = kFp8 ? qk_scale * k_scale[kvh] : qk_scale;

  const int32_t* table = block_table + static_cast<int64_t>(b) * max_blocks;
  const int bs_mask = (1 << bs_log2) - 1;
  // Issues the cp.async of one tile's K and V rows into a stage (tokens >= end: zero-filled).
  auto load_tile = [&](int tile_start, int stage) {
    uint8_t* sk = smem + stage * 2 * kTileBytes;
    uint8_t* sv = sk + kTileBytes;
#pragma unroll
    for (int i = 0; i < kTileN * kChunks / kThreads; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int tok = tile_start + row;
      const bool valid = tok < end;
      int64_t off = 0;  // a valid address for the zero-fill case
      if (valid) {
        const int64_t page = table[tok >> bs_log2];
        off = (((page << bs_log2) + (tok & bs_mask)) * num_kv_heads + kvh) * (kHeadDim * kElemBytes) + ch * 16;
      }
      cp_async16(smem_u32(sk + row * kRowBytes + ch * 16), k_cache + off, valid);
      cp_async16(smem_u32(sv + row * kRowBytes + ch * 16), v_cache + off, valid);
    }
  };

  float m[2] = {-INFINITY, -INFINITY};  // running max of rows r0, r1 (log2 units)
  float l[2] = {0.0f, 0.0f};            // running sum of this thread's columns of rows r0, r1
  float acc[kDBlocks][4];               // O rows r0 (0, 1) and r1 (2, 3), columns nd*8 + cq
#pragma unroll
  for (int nd = 0; nd < kDBlocks; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;

  // ldmatrix row addresses: lane l feeds row l%8 of 8x8 matrix l/8.
  const int mat = lane / 8;
  const int k_row = (mat >= 2 ? 8 : 0) + lane % 8;   // K: matrices (tok 0-7 | 8-15) x (d lo | hi)
  const int k_col = (mat & 1) * 8;
  const int v_row = (mat & 1) * 8 + lane % 8;        // V: matrices (d lo | hi) x (tok 0-7 | 8-15)
  const int v_col = (mat >= 2 ? 8 : 0);
  uint8_t* conv = smem + kStages * 2 * kTileBytes + warp * 2 * kWarpTokens * kRow16;  // kFp8 only

  const int num_tiles = (end - start + kTileN - 1) / kTileN;
  load_tile(start, 0);
  cp_async_commit();
  for (int it = 0; it < num_tiles; ++it) {
    if (it + 1 < num_tiles) load_tile(start + (it + 1) * kTileN, (it + 1) % kStages);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<1>();
    __syncthreads();

    const uint8_t* sk = smem + (it % kStages) * 2 * kTileBytes + warp * kWarpTokens * kRowBytes;
    const uint8_t* sv = sk + kTileBytes;
    const uint8_t* k16 = sk;
    const uint8_t* v16 = sv;
    if constexpr (kFp8) {  // this warp's 16 tokens of K and V -> 16-bit tiles
#pragma unroll
      for (int i = 0; i < kWarpTokens * kChunks / kWarpSize; ++i) {
        const int c = lane + i * kWarpSize;
        const int row = c / kChunks;
        const int ch = c % kChunks;
        // A quarter warp's 16-byte stores must cover all 32 banks: with D = 128 its 8 lanes are
        // chunks 0-7 of one row, 32 bytes apart, so chunks 4-7 store their high half first
        // (a 2-way bank conflict otherwise). For D = 64 (ch < 4) the order is unchanged.
        const bool swap = (ch & 4) != 0;
        uint4 lo, hi;
        uint8_t* dk = conv + row * kRow16 + ch * 32;
        uint8_t* dv = conv + (kWarpTokens + row) * kRow16 + ch * 32;
        e4m3x16_to<T>(*reinterpret_cast<const uint4*>(sk + row * kRowBytes + ch * 16), lo, hi);
        *reinterpret_cast<uint4*>(dk + (swap ? 16 : 0)) = swap ? hi : lo;
        *reinterpret_cast<uint4*>(dk + (swap ? 0 : 16)) = swap ? lo : hi;
        e4m3x16_to<T>(*reinterpret_cast<const uint4*>(sv + row * kRowBytes + ch * 16), lo, hi);
        *reinterpret_cast<uint4*>(dv + (swap ? 16 : 0)) = swap ? hi : lo;
        *reinterpret_cast<uint4*>(dv + (swap ? 0 : 16)) = swap ? lo : hi;
      }
      __syncwarp();
      k16 = conv;
      v16 = conv + kWarpTokens * kRow16;
    }

    // S = Q . K^T for this warp's 16 tokens: s[nb] holds tokens nb*8 + cq + {0, 1}.
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const uint32_t k_addr = smem_u32(k16 + k_row * kRow16 + k_col * 2);
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t kb[4];
      ldmatrix_x4(kb, k_addr + ks * 32);
      mma_16816<T>(s[0], qf[ks], kb[0], kb[1]);
      mma_16816<T>(s[1], qf[ks], kb[2], kb[3]);
    }

    // Online softmax (base 2). Tokens >= end get -inf: p = 0 for them.
    const int tok0 = start + it * kTileN + warp * kWarpTokens + cq;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = tok0 + nb * 8 + (e & 1) < end;
        s[nb][e] = valid ? s[nb][e] * scale_log2 : -INFINITY;
        mx[e / 2] = fmaxf(mx[e / 2], s[nb][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));  // the 4 lanes of a row
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;  // no -inf - -inf while all masked
      alpha[h] = exp2f(m[h] - m_ref);
      m[h] = m_new;
      mx[h] = m_ref;
    }
    float rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nb][e] = exp2f(s[nb][e] - mx[e / 2]);
        rs[e / 2] += s[nb][e];
      }
    }
    l[0] = l[0] * alpha[0] + rs[0];
    l[1] = l[1] * alpha[1] + rs[1];
#pragma unroll
    for (int nd = 0; nd < kDBlocks; ++nd) {
      acc[nd][0] *= alpha[0];
      acc[nd][1] *= alpha[0];
      acc[nd][2] *= alpha[1];
      acc[nd][3] *= alpha[1];
    }

    // O += P . V: P's A fragment is the S accumulator layout re-packed to T.
    const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                            pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
    const uint32_t v_addr = smem_u32(v16 + v_row * kRow16 + v_col * 2);
#pragma unroll
    for (int nd = 0; nd < kDBlocks; nd += 2) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_addr + nd * 16);
      mma_16816<T>(acc[nd], pa, vb[0], vb[1]);
      mma_16816<T>(acc[nd + 1], pa, vb[2], vb[3]);
    }
    __syncthreads();  // every warp is done with this stage (and conv) before it is refilled
  }
  cp_async_wait<0>();  // only empty groups remain; the stages are reused below
  __syncthreads();

  // Combine the 4 warps: s_acc [kWarps][kRows][D], s_m / s_l [kWarps][kRows].
  float* s_acc = reinterpret_cast<float*>(smem);
  float* s_m = s_acc + kWarps * kRows * kHeadDim;
  float* s_l = s_m + kWarps * kRows;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  if (lane % 4 == 0) {
    s_m[warp * kRows + r0] = m[0];
    s_m[warp * kRows + r1] = m[1];
    s_l[warp * kRows + r0] = l[0];
    s_l[warp * kRows + r1] = l[1];
  }
  __syncthreads();
  float f[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = h == 0 ? r0 : r1;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, s_m[w * kRows + r]);
    f[h] = exp2f(m[h] - (mm == -INFINITY ? 0.0f : mm));  // 0 for a warp that saw no token
  }
#pragma unroll
  for (int nd = 0; nd < kDBlocks; ++nd) {
    float* row0 = s_acc + (warp * kRows + r0) * kHeadDim + nd * 8 + cq;
    float* row1 = s_acc + (warp * kRows + r1) * kHeadDim + nd * 8 + cq;
    *reinterpret_cast<float2*>(row0) = make_float2(acc[nd][0] * f[0], acc[nd][1] * f[0]);
    *reinterpret_cast<float2*>(row1) = make_float2(acc[nd][2] * f[1], acc[nd][3] * f[1]);
  }
  __syncthreads();

  const float vs = kFp8 ? v_scale[kvh] : 1.0f;
  for (int idx = threadIdx.x; idx < group * (kHeadDim / 4); idx += kThreads) {
    const int r = idx / (kHeadDim / 4);
    const int d = (idx % (kHeadDim / 4)) * 4;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, s_m[w * kRows + r]);
    const float m_ref = mm == -INFINITY ? 0.0f : mm;
    float sum_l = 0.0f;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sum_l += s_l[w * kRows + r] * exp2f(s_m[w * kRows + r] - m_ref);
      const float4 a = *reinterpret_cast<const float4*>(s_acc + (w * kRows + r) * kHeadDim + d);
      o.x += a.x;
      o.y += a.y;
      o.z += a.z;
      o.w += a.w;
    }
    const float inv = sum_l > 0.0f ? vs / sum_l : 0.0f;
    o = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
    const int64_t qrow = q_row0 + r;
    if (num_splits == 1) {
      *reinterpret_cast<uint2*>(out + qrow * kHeadDim + d) =
          make_uint2(pack2<T>(o.x, o.y), pack2<T>(o.z, o.w));
    } else {
      const int64_t prow = qrow * num_splits + split;
      *reinterpret_cast<float4*>(partial + prow * kHeadDim + d) = o;
      if (d == 0) lse[prow] = sum_l > 0.0f ? m_ref + log2f(sum_l) : -INFINITY;
    }
  }
}

template <typename T>  // out element type (__nv_bfloat16, __half)
__global__ void __launch_bounds__(32)
    decode_merge_kernel(const float* __restrict__ partial,  // [B * Hq, S, D]
                        const float* __restrict__ lse,      // [B * Hq, S], -inf: empty split
                        T* __restrict__ out,                // [B * Hq, D]
                        int num_splits,                     // S
                        int head_dim) {                     // D = 4 * blockDim.x
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x * 4;
  const float* lr = lse + row * num_splits;
  float mm = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mm = fmaxf(mm, lr[s]);
  float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float sum_w = 0.0f;
  if (mm != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(lr[s] - mm);
      if (w > 0.0f) {  // never reads an empty split's (unwritten) partial
        const float4 p = *reinterpret_cast<const float4*>(partial + (row * num_splits + s) * head_dim + d);
        o.x += w * p.x;
        o.y += w * p.y;
        o.z += w * p.z;
        o.w += w * p.w;
        sum_w += w;
      }
    }
  }
  const float inv = sum_w > 0.0f ? 1.0f / sum_w : 0.0f;  // all empty (length 0): zeros
  *reinterpret_cast<uint2*>(out + row * head_dim + d) =
      make_uint2(pack2<T>(o.x * inv, o.y * inv), pack2<T>(o.z * inv, o.w * inv));
}

}  // namespace decode
}  // namespace llama_kernels
