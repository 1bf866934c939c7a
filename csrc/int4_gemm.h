// Host-side launcher of the weight-only INT4 GEMM (x bf16/fp16 [M, K] times a repacked INT4 weight).
//
// Plain C++ / CUDA runtime API only; raw device pointers in, a cudaError_t out (*why set on a
// rejected argument, nothing launched).
//
// Semantics: y[m, n] = round_T(sum_k x[m, k] * W[n, k]) with float32 accumulation, where
//   W[n, k] = round_T((q[n, k] - z[n, k / G]) * round_T(s[n, k / G]))
// i.e. the dequantized weight is formed in registers in the activation dtype T (one rounding,
// exactly as if W were materialized in T), q in 0..15, z the zero point (8 when symmetric).
//
// The weight must first be repacked (once, at load time) by llama_kernels.cuda.int4_gemm.repack_int4
// into the two tensors below. Tile layout (Kp = K rounded up to a multiple of 32, nt = n / 32,
// kc = k / 32, lane = 4 * g + t with g, t in 0..7, 0..3):
//   qpacked: int32 [N / 32, Kp / 32, 32 lanes, 4]: word i of lane (g, t) of tile (nt, kc) holds the
//     8 values q[32 nt + 8 i + g, 32 kc + 8 t + o], o = 0..7, value o in nibble kNibblePos[o] =
//     {0, 4, 1, 5, 2, 6, 3, 7}[o]. A warp's 512 bytes for one (nt, kc) are contiguous, so each
//     thread fetches everything its four n8 MMA tiles need for 32 values of K with one 16-byte
//     load, and the nibble order makes (q >> 4r) & 0x000f000f the pair (o = 2r, o = 2r + 1),
//     i.e. exactly one mma.m16n8k16 B-fragment register after the magic-number conversion.
//     K positions >= K are zero nibbles.
//   scale_zero: T [K / G, N / 32, 8 (g), 8]: entries 0..3 are s[32 nt + 8 i + g, group] for
//     i = 0..3 (rounded to T), entries 4..7 are (M + z) for the same columns, with M the magic
//     bias of the conversion (1024 for float16, 128 for bfloat16); one 16-byte load per thread
//     and group. Per-channel weights have K / G == 1.
//
// Supported (else cudaErrorInvalidValue): M >= 0 (0: no-op), N > 0 a multiple of 32, K > 0 a
// multiple of 16, G a multiple of 32 dividing K or G == K; dtype 1 (float16) or 2 (bfloat16);
// x, qpacked, scale_zero, workspace 16-byte aligned, y 4-byte aligned; config one of
// Int4GemmConfig; 1 <= split_k <= 64; workspace float32 [split_k, M, N] when split_k > 1.
// Needs sm_80 or newer (cp.async, bf16 mma.sync).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace llama_kernels {

// Whitelisted tile configurations of the INT4 kernel (python gemm_configs.py mirrors it). All:
// 4 warps, 128 output columns per block (32 per warp), 128 values of K per pipeline stage.
enum Int4GemmConfig : int {
  kInt4M16 = 0,  // 16 rows per block, 4 cp.async stages (decode, M <= 16)
  kInt4M64 = 1,  // 64 rows per block, 3 cp.async stages (M > 16; large M loops over 64-row tiles)
  kInt4NumConfigs = 2,
};

cudaError_t int4_gemm(const void* x, const void* qpacked, const void* scale_zero, void* y,
                      float* workspace, int64_t M, int64_t N, int64_t K, int64_t group_size,
                      int dtype, int config, int split_k, cudaStream_t stream,
                      const char** why = nullptr);

}  // namespace llama_kernels
