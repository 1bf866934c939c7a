// Host-side launcher of the fused rotary embedding + paged KV-cache write.
//
// Plain C++ / CUDA runtime API only (no torch, no pybind11): raw device
// pointers, shapes and a cudaStream_t in, a cudaError_t out.
//
// Semantics, per token t (p = positions[t], s = slot_mapping[t], c/sn = cos/sin[p, :]):
//   pairs (i, i + D/2) (interleaved = false) or (2i, 2i + 1) (interleaved = true), i < D/2:
//     out1 = x1 * c[i] - x2 * sn[i];  out2 = x2 * c[i] + x1 * sn[i]   (float32, no FMA
//     contraction: the same roundings as the float32 reference)
//   q_out[t] = round_T(rot(q[t])), k_out[t] = round_T(rot(k[t]))
//   if s >= 0: k_cache[s] = store(rot(k[t]), k_scale), v_cache[s] = store(v[t], v_scale)
//     store(x, scale) = round_T(x) for a T cache, e4m3_satfinite(clamp(x / scale, +-448)) for FP8
//   where k_cache[s] is the [Hkv, D] row of flat slot s = block * block_size + offset of the
//   [num_blocks, block_size, Hkv, D] cache (so block_size does not enter the address).
//
// Supported: T = float16 / bfloat16 (q, k, v, q_out, k_out, and a non-FP8 cache); head_dim 64
// or 128; positions and slot_mapping int32 or int64; all q/k/v/out/cache/cos/sin pointers
// 16-byte aligned (rows are contiguous). Anything else returns cudaErrorInvalidValue (and
// sets *why) without launching; num_tokens == 0 is a successful no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace llama_kernels {

cudaError_t rope_and_cache(const void* q, const void* k, const void* v, const void* positions,
                           bool positions_int64, const float* cos, const float* sin,
                           void* k_cache, void* v_cache, const void* slot_mapping,
                           bool slots_int64, const float* k_scale, const float* v_scale,
                           void* q_out, void* k_out, int64_t num_tokens, int64_t num_q_heads,
                           int64_t num_kv_heads, int64_t head_dim, int dtype, bool cache_fp8,
                           bool interleaved, cudaStream_t stream, const char** why = nullptr);

}  // namespace llama_kernels
