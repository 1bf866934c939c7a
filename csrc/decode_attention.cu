// decode_attention launchers: argument checks, split policy, dispatch (see decode_attention.h).
//
// Instantiations (kept short for compile time): decode_split_kernel<T, D, fp8> for
// T in {bf16, fp16} x D in {64, 128} x cache in {T, e4m3} = 8, decode_merge_kernel<T> = 2.
// Group size (1..16) and block size (16, 32, 64) are runtime values: every group shares the
// 16-row mma tile and a block size only changes the table lookup (a shift and a mask).
#include <cstdint>

#include "add_rms_norm.h"  // DType
#include "decode_attention.cuh"

namespace llama_kernels {

// FlashInfer-style whitelist of group sizes: binds the constexpr ROWS (the padded mma M tile
// the group runs in) and runs the body, or returns a named error for an unsupported group.
// Every group in 1..16 maps to the one 16-row tile today; a smaller tile for small groups
// would be added here.
#define LLAMA_KERNELS_DISPATCH_GROUP_SIZE(group, ROWS, ...)                              \
  switch (group) {                                                                      \
    case 1: case 2: case 3: case 4: case 5: case 6: case 7: case 8:                     \
    case 9: case 10: case 11: case 12: case 13: case 14: case 15: case 16: {            \
      constexpr int ROWS = decode::kRows;                                               \
      __VA_ARGS__                                                                       \
    }                                                                                   \
    default:                                                                            \
      return fail(why, "DISPATCH_GROUP_SIZE: group size num_q_heads / num_kv_heads "    \
                       "must be in 1..16");                                             \
  }

// Head-dim whitelist: binds the constexpr HEAD_DIM or returns a named error.
#define LLAMA_KERNELS_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM, ...)                         \
  switch (head_dim) {                                                                   \
    case 64: {                                                                          \
      constexpr int HEAD_DIM = 64;                                                      \
      __VA_ARGS__                                                                       \
    }                                                                                   \
    case 128: {                                                                         \
      constexpr int HEAD_DIM = 128;                                                     \
      __VA_ARGS__                                                                       \
    }                                                                                   \
    default:                                                                            \
      return fail(why, "DISPATCH_HEAD_DIM: head_dim must be 64 or 128");                \
  }

namespace {

// Why: sets the reason and returns the error in one expression (for the dispatch macros).
cudaError_t fail(const char** why, const char* reason) {
  if (why != nullptr) *why = reason;
  return cudaErrorInvalidValue;
}

int log2_block_size(int64_t block_size) {
  switch (block_size) {
    case 16: return 4;
    case 32: return 5;
    case 64: return 6;
    default: return -1;
  }
}

// Why: the one place that decides whether a configuration can be launched (group size and
// head dim are checked by the dispatch macros, also before any CUDA call).
const char* check_args(const void* q, const void* k_cache, const void* v_cache,
                       const int32_t* block_table, const int32_t* seq_lens, const float* k_scale,
                       const float* v_scale, const void* out, const float* partial,
                       const float* lse, int64_t batch, int64_t hq, int64_t hkv,
                       int64_t block_size, int64_t max_blocks, int64_t num_splits, int dtype,
                       bool cache_fp8) {
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16)) {
    return "dtype must be 1 (float16) or 2 (bfloat16)";
  }
  if (log2_block_size(block_size) < 0) return "block_size must be 16, 32 or 64";
  if (batch < 0 || batch > 65535) return "batch must be in 0..65535";
  if (hkv <= 0 || hkv > 65535) return "num_kv_heads must be in 1..65535";
  if (hq <= 0 || hq % hkv != 0) return "num_q_heads must be a positive multiple of num_kv_heads";
  if (max_blocks <= 0) return "max_blocks must be positive";
  if (num_splits <= 0 || num_splits > 65536) return "num_splits must be in 1..65536";
  if (max_blocks * block_size + num_splits * (kDecodeTileTokens + kDecodeMinSplitTokens) > INT32_MAX) {
    return "max_blocks * block_size must be < 2^31";
  }
  if (batch == 0) return nullptr;  // nothing is read or written
  auto misaligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a != 0; };
  if (!q || !k_cache || !v_cache || !block_table || !seq_lens || !out) {
    return "q, k_cache, v_cache, block_table, seq_lens and out must not be null";
  }
  if (misaligned(q, 16) || misaligned(out, 16)) return "q and out must be 16-byte aligned";
  if (misaligned(k_cache, 16) || misaligned(v_cache, 16)) return "k_cache and v_cache must be 16-byte aligned";
  if (misaligned(block_table, 4) || misaligned(seq_lens, 4)) return "block_table and seq_lens must be 4-byte aligned";
  if (cache_fp8 && (!k_scale || !v_scale)) return "k_scale and v_scale are required for an FP8 cache";
  if (cache_fp8 && (misaligned(k_scale, 4) || misaligned(v_scale, 4))) return "k_scale and v_scale must be 4-byte aligned";
  if (num_splits > 1) {
    if (!partial || !lse) return "partial and lse workspaces are required when num_splits > 1";
    if (misaligned(partial, 16) || misaligned(lse, 4)) return "partial must be 16-byte and lse 4-byte aligned";
  }
  return nullptr;
}

template <typename T,      // q / out element type
          int kHeadDim,    // D
          bool kFp8>       // e4m3 cache
cudaError_t launch(const void* q, const void* k_cache, const void* v_cache,
                   const int32_t* block_table, const int32_t* seq_lens, const float* k_scale,
                   const float* v_scale, void* out, float* partial, float* lse, int batch,
                   int hq, int hkv, int bs_log2, int max_blocks, int num_splits,
                   float qk_scale, cudaStream_t stream) {
  constexpr int smem = decode::split_smem_bytes<kHeadDim, kFp8>();
  auto* kernel = decode::decode_split_kernel<T, kHeadDim, kFp8>;
  // Above 48 KiB dynamic shared memory needs the opt-in (a host-side attribute; fine during
  // graph capture). Set on every call: cheap, and correct for every device of the process.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(num_splits), static_cast<unsigned>(hkv), static_cast<unsigned>(batch));
  kernel<<<grid, decode::kThreads, smem, stream>>>(
      static_cast<const T*>(q), static_cast<const uint8_t*>(k_cache),
      static_cast<const uint8_t*>(v_cache), block_table, seq_lens, k_scale, v_scale,
      static_cast<T*>(out), partial, lse, hq / hkv, hkv, bs_log2, max_blocks, num_splits,
      qk_scale);
  err = cudaGetLastError();
  if (err != cudaSuccess || num_splits == 1) return err;
  decode::decode_merge_kernel<T><<<static_cast<unsigned>(batch) * hq, kHeadDim / 4, 0, stream>>>(
      partial, lse, static_cast<T*>(out), num_splits, kHeadDim);
  return cudaGetLastError();
}

template <int kHeadDim>  // D; dispatches q's dtype and the cache format
cudaError_t launch_dtype(bool bf16, bool fp8, const void* q, const void* k_cache,
                         const void* v_cache, const int32_t* block_table, const int32_t* seq_lens,
                         const float* k_scale, const float* v_scale, void* out, float* partial,
                         float* lse, int batch, int hq, int hkv, int bs_log2, int max_blocks,
                         int num_splits, float qk_scale, cudaStream_t stream) {
#define LLAMA_KERNELS_DECODE_LAUNCH(T, FP8)                                                   \
  return launch<T, kHeadDim, FP8>(q, k_cache, v_cache, block_table, seq_lens, k_scale,        \
                                  v_scale, out, partial, lse, batch, hq, hkv, bs_log2,        \
                                  max_blocks, num_splits, qk_scale, stream)
  if (bf16 && fp8) LLAMA_KERNELS_DECODE_LAUNCH(__nv_bfloat16, true);
  if (bf16) LLAMA_KERNELS_DECODE_LAUNCH(__nv_bfloat16, false);
  if (fp8) LLAMA_KERNELS_DECODE_LAUNCH(__half, true);
  LLAMA_KERNELS_DECODE_LAUNCH(__half, false);
#undef LLAMA_KERNELS_DECODE_LAUNCH
}

}  // namespace

int decode_attention_num_splits(int64_t batch, int64_t num_kv_heads, int64_t max_len, int num_sms) {
  const int64_t units = batch * num_kv_heads > 1 ? batch * num_kv_heads : 1;
  const int64_t sms = num_sms > 1 ? num_sms : 1;
  const int64_t waves = (2 * sms + units - 1) / units;
  const int64_t by_len = max_len / kDecodeMinSplitTokens;
  int64_t n = waves < by_len ? waves : by_len;
  if (n > 65536) n = 65536;
  return n > 1 ? static_cast<int>(n) : 1;
}

int decode_attention_split_tokens(int len, int num_splits) {
  return decode::split_tokens(len, num_splits);
}

cudaError_t decode_attention(const void* q, const void* k_cache, const void* v_cache,
                             const int32_t* block_table, const int32_t* seq_lens,
                             const float* k_scale, const float* v_scale, void* out,
                             float* partial, float* lse, int64_t batch, int64_t num_q_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             int64_t max_blocks, int64_t num_splits, float sm_scale, int dtype,
                             bool cache_fp8, cudaStream_t stream, const char** why) {
  const char* bad = check_args(q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out,
                               partial, lse, batch, num_q_heads, num_kv_heads, block_size,
                               max_blocks, num_splits, dtype, cache_fp8);
  if (why != nullptr) *why = bad;
  if (bad != nullptr) return cudaErrorInvalidValue;
  const int64_t group = num_q_heads / num_kv_heads;
  const float qk_scale = sm_scale * decode::kLog2e;
  const int bs_log2 = log2_block_size(block_size);
  const bool bf16 = dtype == static_cast<int>(DType::kBFloat16);
  const int b = static_cast<int>(batch), hq = static_cast<int>(num_q_heads),
            hkv = static_cast<int>(num_kv_heads), mb = static_cast<int>(max_blocks),
            ns = static_cast<int>(num_splits);
  LLAMA_KERNELS_DISPATCH_GROUP_SIZE(group, kRowsTile, {
    static_assert(kRowsTile == decode::kRows, "one 16-row tile for every group");
    LLAMA_KERNELS_DISPATCH_HEAD_DIM(head_dim, kHeadDim, {
      if (batch == 0) return cudaSuccess;
      return launch_dtype<kHeadDim>(bf16, cache_fp8, q, k_cache, v_cache, block_table, seq_lens,
                                    k_scale, v_scale, out, partial, lse, b, hq, hkv, bs_log2, mb,
                                    ns, qk_scale, stream);
    })
  })
}

}  // namespace llama_kernels
