// Fused rotary embedding of q and k + paged KV-cache write of k_rot and v (see rope_cache.h).
//
// Design: one thread block per token handles all of its heads, so the token's position, slot
// and cos/sin row are read once. The work of a token is a flat list of items, strided over the
// block's threads:
//   * rotation items, (Hq + Hkv) heads x (D/16 or D/8): non-interleaved, an item is 8 rotary
//     pairs (i..i+7, i+D/2..i+D/2+7) = two 16-byte vectors of the head + two float4 of cos and
//     of sin; interleaved, an item is one 16-byte vector (4 pairs) + one float4 of cos and sin.
//     A k item also stores its rotated values to the cache when the slot is >= 0;
//   * v items (only when the slot is >= 0), Hkv heads x D/8 vectors: a 16-byte copy (or an
//     8-byte FP8 quantized store) into v_cache.
// Every global access is a 16-byte vector (8 bytes for an FP8 cache row chunk).
#include <cstdint>

#include "add_rms_norm.h"  // DType
#include "common.cuh"
#include "rope_cache.h"

namespace llama_kernels {
namespace rope {

constexpr int kThreads = 128;  // per token; 4 warps cover Llama's 48 heads x 8 items in 3 rounds

// Why: positions and slots come as int32 or int64 tensors; one kernel reads both widths.
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i]
              : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Why: the rotation with separate IEEE roundings (no FMA contraction), so q_rot / k_rot and
// the cache are bit-identical to the float32 reference (x1 * c - x2 * s in torch).
__device__ __forceinline__ void rotate(float x1, float x2, float c, float s, float& o1, float& o2) {
  o1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
  o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

// Why: one 8-element chunk of a cache row in the cache's format: 16 bytes of T, or 8 bytes
// of e4m3 = satfinite(clamp(x / scale)) (IEEE division, as the reference; never NaN).
template <typename T, bool kFp8Cache>
__device__ __forceinline__ void store_cache(void* cache, int64_t elem, const float (&f)[8],
                                            float scale) {
  if constexpr (kFp8Cache) {
    float a[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] = fminf(fmaxf(f[e] / scale, -kFp8E4M3Max), kFp8E4M3Max);
    const uint2 qv = make_uint2(float4_to_e4m3x4(a[0], a[1], a[2], a[3]),
                                float4_to_e4m3x4(a[4], a[5], a[6], a[7]));
    *reinterpret_cast<uint2*>(static_cast<uint8_t*>(cache) + elem) = qv;
  } else {
    *reinterpret_cast<uint4*>(static_cast<T*>(cache) + elem) = VecTraits<T>::from_float(f);
  }
}

template <typename T,           // element type of q, k, v, q_out, k_out (and a non-FP8 cache)
          bool kInterleaved,    // rotary pairs (2i, 2i+1) instead of (i, i + D/2)
          bool kFp8Cache>       // caches are e4m3 with per-KV-head float32 scales
__global__ void __launch_bounds__(kThreads)
    rope_cache_kernel(const T* __restrict__ q,            // [T, Hq, D]
                      const T* __restrict__ k,            // [T, Hkv, D]
                      const T* __restrict__ v,            // [T, Hkv, D]
                      const void* __restrict__ positions, // [T] int32 / int64
                      const float* __restrict__ cos_tab,  // [P, D/2]
                      const float* __restrict__ sin_tab,  // [P, D/2]
                      void* __restrict__ k_cache,         // [slots, Hkv, D] T or e4m3
                      void* __restrict__ v_cache,         // [slots, Hkv, D] T or e4m3
                      const void* __restrict__ slots,     // [T] int32 / int64, < 0: skip
                      const float* __restrict__ k_scale,  // [Hkv] (kFp8Cache)
                      const float* __restrict__ v_scale,  // [Hkv] (kFp8Cache)
                      T* __restrict__ q_out,              // [T, Hq, D]
                      T* __restrict__ k_out,              // [T, Hkv, D]
                      int num_q_heads, int num_kv_heads, int head_dim, bool pos64, bool slot64) {
  using Tr = VecTraits<T>;
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int64_t pos = load_index(positions, pos64, t);
  const int64_t slot = load_index(slots, slot64, t);
  const float* c_row = cos_tab + pos * half;
  const float* s_row = sin_tab + pos * half;
  const int items_per_head = kInterleaved ? head_dim / 8 : head_dim / 16;
  const int rot_items = (num_q_heads + num_kv_heads) * items_per_head;
  const int v_items = slot >= 0 ? num_kv_heads * (head_dim / 8) : 0;

  for (int i = threadIdx.x; i < rot_items + v_items; i += kThreads) {
    if (i < rot_items) {
      const int head = i / items_per_head;
      const int j = i - head * items_per_head;
      const bool is_k = head >= num_q_heads;
      const int kh = head - num_q_heads;
      const int64_t row = is_k ? (t * num_kv_heads + kh) * head_dim : (t * num_q_heads + head) * head_dim;
      const T* src = (is_k ? k : q) + row;
      T* dst = (is_k ? k_out : q_out) + row;
      const bool to_cache = is_k && slot >= 0;
      const int64_t cache_row = (slot * num_kv_heads + kh) * head_dim;
      const float scale = (kFp8Cache && to_cache) ? k_scale[kh] : 1.0f;
      if constexpr (kInterleaved) {
        float x[8], o[8];
        Tr::to_float(*reinterpret_cast<const uint4*>(src + 8 * j), x);
        const float4 c = reinterpret_cast<const float4*>(c_row)[j];
        const float4 s = reinterpret_cast<const float4*>(s_row)[j];
        rotate(x[0], x[1], c.x, s.x, o[0], o[1]);
        rotate(x[2], x[3], c.y, s.y, o[2], o[3]);
        rotate(x[4], x[5], c.z, s.z, o[4], o[5]);
        rotate(x[6], x[7], c.w, s.w, o[6], o[7]);
        *reinterpret_cast<uint4*>(dst + 8 * j) = Tr::from_float(o);
        if (to_cache) store_cache<T, kFp8Cache>(k_cache, cache_row + 8 * j, o, scale);
      } else {
        float x1[8], x2[8], o1[8], o2[8], c[8], s[8];
        Tr::to_float(*reinterpret_cast<const uint4*>(src + 8 * j), x1);
        Tr::to_float(*reinterpret_cast<const uint4*>(src + half + 8 * j), x2);
        const float4 c0 = reinterpret_cast<const float4*>(c_row)[2 * j];
        const float4 c1 = reinterpret_cast<const float4*>(c_row)[2 * j + 1];
        const float4 s0 = reinterpret_cast<const float4*>(s_row)[2 * j];
        const float4 s1 = reinterpret_cast<const float4*>(s_row)[2 * j + 1];
        c[0] = c0.x; c[1] = c0.y; c[2] = c0.z; c[3] = c0.w;
        c[4] = c1.x; c[5] = c1.y; c[6] = c1.z; c[7] = c1.w;
        s[0] = s0.x; s[1] = s0.y; s[2] = s0.z; s[3] = s0.w;
        s[4] = s1.x; s[5] = s1.y; s[6] = s1.z; s[7] = s1.w;
#pragma unroll
        for (int e = 0; e < 8; ++e) rotate(x1[e], x2[e], c[e], s[e], o1[e], o2[e]);
        *reinterpret_cast<uint4*>(dst + 8 * j) = Tr::from_float(o1);
        *reinterpret_cast<uint4*>(dst + half + 8 * j) = Tr::from_float(o2);
        if (to_cache) {
          store_cache<T, kFp8Cache>(k_cache, cache_row + 8 * j, o1, scale);
          store_cache<T, kFp8Cache>(k_cache, cache_row + half + 8 * j, o2, scale);
        }
      }
    } else {
      const int vi = i - rot_items;
      const int kh = vi / (head_dim / 8);
      const int j = vi - kh * (head_dim / 8);
      float x[8];
      Tr::to_float(*reinterpret_cast<const uint4*>(v + (t * num_kv_heads + kh) * head_dim + 8 * j), x);
      const float scale = kFp8Cache ? v_scale[kh] : 1.0f;
      store_cache<T, kFp8Cache>(v_cache, (slot * num_kv_heads + kh) * head_dim + 8 * j, x, scale);
    }
  }
}

// Why: the one place that decides whether a configuration can be launched; a non-null result
// is the reason it cannot (returned as cudaErrorInvalidValue without touching the GPU).
inline const char* check_args(const void* q, const void* k, const void* v, const void* positions,
                              bool pos64, const float* cos, const float* sin, const void* k_cache,
                              const void* v_cache, const void* slots, bool slot64,
                              const float* k_scale, const float* v_scale, const void* q_out,
                              const void* k_out, int64_t num_tokens, int64_t num_q_heads,
                              int64_t num_kv_heads, int64_t head_dim, int dtype, bool cache_fp8) {
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16)) {
    return "dtype must be 1 (float16) or 2 (bfloat16)";
  }
  if (head_dim != 64 && head_dim != 128) return "head_dim must be 64 or 128";
  if (num_tokens < 0) return "num_tokens must be >= 0";
  if (num_tokens > INT32_MAX) return "num_tokens must be < 2^31";
  if (num_kv_heads <= 0 || num_q_heads <= 0) return "num_q_heads and num_kv_heads must be positive";
  if (num_q_heads % num_kv_heads != 0) return "num_q_heads must be a multiple of num_kv_heads";
  if ((num_q_heads + num_kv_heads) * head_dim > (int64_t{1} << 24)) return "too many heads";
  if (num_tokens == 0) return nullptr;  // nothing is read or written
  auto misaligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a != 0; };
  const void* needed[] = {q, k, v, positions, cos, sin, k_cache, v_cache, slots, q_out, k_out};
  for (const void* p : needed) {
    if (p == nullptr) return "q, k, v, positions, cos, sin, caches, slot_mapping, q_out, k_out must not be null";
  }
  if (misaligned(q, 16) || misaligned(k, 16) || misaligned(v, 16)) return "q, k, v must be 16-byte aligned";
  if (misaligned(q_out, 16) || misaligned(k_out, 16)) return "q_out, k_out must be 16-byte aligned";
  if (misaligned(cos, 16) || misaligned(sin, 16)) return "cos, sin must be 16-byte aligned";
  if (misaligned(k_cache, 16) || misaligned(v_cache, 16)) return "k_cache, v_cache must be 16-byte aligned";
  if (misaligned(positions, pos64 ? 8 : 4)) return "positions must be aligned to its element size";
  if (misaligned(slots, slot64 ? 8 : 4)) return "slot_mapping must be aligned to its element size";
  if (cache_fp8) {
    if (k_scale == nullptr || v_scale == nullptr) return "k_scale and v_scale are required for an FP8 cache";
    if (misaligned(k_scale, 4) || misaligned(v_scale, 4)) return "k_scale, v_scale must be 4-byte aligned";
  }
  return nullptr;
}

template <typename T,          // element type (__half, __nv_bfloat16)
          bool kInterleaved,   // see rope_cache_kernel
          bool kFp8Cache>      // see rope_cache_kernel
cudaError_t launch(const void* q, const void* k, const void* v, const void* positions, bool pos64,
                   const float* cos, const float* sin, void* k_cache, void* v_cache,
                   const void* slots, bool slot64, const float* k_scale, const float* v_scale,
                   void* q_out, void* k_out, int num_tokens, int hq, int hkv, int d,
                   cudaStream_t stream) {
  rope_cache_kernel<T, kInterleaved, kFp8Cache><<<num_tokens, kThreads, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), positions, cos,
      sin, k_cache, v_cache, slots, k_scale, v_scale, static_cast<T*>(q_out), static_cast<T*>(k_out),
      hq, hkv, d, pos64, slot64);
  return cudaGetLastError();
}

template <typename T>  // element type; dispatches the layout and the cache format
cudaError_t launch_t(bool interleaved, bool fp8, const void* q, const void* k, const void* v,
                     const void* positions, bool pos64, const float* cos, const float* sin,
                     void* k_cache, void* v_cache, const void* slots, bool slot64,
                     const float* k_scale, const float* v_scale, void* q_out, void* k_out,
                     int num_tokens, int hq, int hkv, int d, cudaStream_t stream) {
#define LLAMA_KERNELS_ROPE_LAUNCH(IL, F8)                                                        \
  return launch<T, IL, F8>(q, k, v, positions, pos64, cos, sin, k_cache, v_cache, slots, slot64, \
                           k_scale, v_scale, q_out, k_out, num_tokens, hq, hkv, d, stream)
  if (interleaved) {
    if (fp8) LLAMA_KERNELS_ROPE_LAUNCH(true, true);
    LLAMA_KERNELS_ROPE_LAUNCH(true, false);
  }
  if (fp8) LLAMA_KERNELS_ROPE_LAUNCH(false, true);
  LLAMA_KERNELS_ROPE_LAUNCH(false, false);
#undef LLAMA_KERNELS_ROPE_LAUNCH
}

}  // namespace rope

cudaError_t rope_and_cache(const void* q, const void* k, const void* v, const void* positions,
                           bool positions_int64, const float* cos, const float* sin,
                           void* k_cache, void* v_cache, const void* slot_mapping,
                           bool slots_int64, const float* k_scale, const float* v_scale,
                           void* q_out, void* k_out, int64_t num_tokens, int64_t num_q_heads,
                           int64_t num_kv_heads, int64_t head_dim, int dtype, bool cache_fp8,
                           bool interleaved, cudaStream_t stream, const char** why) {
  const char* bad = rope::check_args(q, k, v, positions, positions_int64, cos, sin, k_cache,
                                     v_cache, slot_mapping, slots_int64, k_scale, v_scale, q_out,
                                     k_out, num_tokens, num_q_heads, num_kv_heads, head_dim, dtype,
                                     cache_fp8);
  if (why != nullptr) *why = bad;
  if (bad != nullptr) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const int n = static_cast<int>(num_tokens), hq = static_cast<int>(num_q_heads),
            hkv = static_cast<int>(num_kv_heads), d = static_cast<int>(head_dim);
  if (dtype == static_cast<int>(DType::kBFloat16)) {
    return rope::launch_t<__nv_bfloat16>(interleaved, cache_fp8, q, k, v, positions,
                                         positions_int64, cos, sin, k_cache, v_cache, slot_mapping,
                                         slots_int64, k_scale, v_scale, q_out, k_out, n, hq, hkv,
                                         d, stream);
  }
  return rope::launch_t<__half>(interleaved, cache_fp8, q, k, v, positions, positions_int64, cos,
                                sin, k_cache, v_cache, slot_mapping, slots_int64, k_scale, v_scale,
                                q_out, k_out, n, hq, hkv, d, stream);
}

}  // namespace llama_kernels
