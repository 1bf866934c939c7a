// Host-side launchers of the split-KV (flash-decoding) GQA decode attention over a paged cache.
//
// Plain C++ / CUDA runtime API only (no torch, no pybind11): raw device pointers, shapes and a
// cudaStream_t in, a cudaError_t out.
//
// Semantics (one new query token per sequence; query head h reads KV head h / group):
//   out[b, h] = softmax_t(sm_scale * q[b, h] . K[b, t]) @ V[b, t],  t < seq_lens[b]
//   K[b, t] = k_cache[block_table[b, t / block_size], t % block_size, h / group]
//             (times k_scale[h / group] for an FP8 cache; V likewise with v_scale)
// computed as num_splits (chosen by decode_attention_num_splits from shapes only, never from
// the values of seq_lens: a fixed grid, CUDA-graph safe) contiguous token ranges per (sequence,
// KV head) whose partial outputs and log2-sum-exp2 go to the float32 workspace and are merged by
// a second kernel; with num_splits == 1 the split kernel writes out directly and no workspace is
// needed. Each sequence's ranges divide its live length seq_lens[b] (read on the device, clamped
// to max_blocks * block_size), not the table's capacity, so a short sequence in a long-context
// table still spreads over the splits; splits beyond its tokens exit at once.
//
// Layouts, all contiguous: q, out [B, Hq, D] in T; caches [num_blocks, block_size, Hkv, D] in T
// or e4m3; block_table [B, max_blocks] int32; seq_lens [B] int32 (a length of 0 gives zeros, one
// over max_blocks * block_size is clamped to it);
// k_scale, v_scale [Hkv] float32 (FP8 only); partial [B, Hq, num_splits, D] float32,
// lse [B, Hq, num_splits] float32.
//
// Supported (anything else returns cudaErrorInvalidValue and sets *why, without launching):
// T = float16 / bfloat16; cache T or e4m3; head_dim 64 or 128; group = Hq / Hkv in 1..16;
// block_size 16, 32 or 64; B and Hkv <= 65535; 16-byte aligned q, out, caches, partial.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace llama_kernels {

// Tokens per shared-memory tile of the split kernel; every split but the last is a multiple.
constexpr int kDecodeTileTokens = 64;
// A split is never shorter than this many tokens of the length bound (fixed costs dominate).
constexpr int kDecodeMinSplitTokens = 256;

// Splits per (sequence, KV head): about two waves of blocks over num_sms, each split at least
// kDecodeMinSplitTokens of max_len (= max_blocks * block_size, the bound on seq_lens), >= 1.
int decode_attention_num_splits(int64_t batch, int64_t num_kv_heads, int64_t max_len, int num_sms);

// Tokens per split of a sequence with `len` live tokens over `num_splits` splits (the split
// kernel computes it on the device from seq_lens[b]): split s covers [s * n, min((s + 1) * n, len)).
int decode_attention_split_tokens(int len, int num_splits);

cudaError_t decode_attention(const void* q, const void* k_cache, const void* v_cache,
                             const int32_t* block_table, const int32_t* seq_lens,
                             const float* k_scale, const float* v_scale, void* out,
                             float* partial, float* lse, int64_t batch, int64_t num_q_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             int64_t max_blocks, int64_t num_splits, float sm_scale, int dtype,
                             bool cache_fp8, cudaStream_t stream, const char** why = nullptr);

}  // namespace llama_kernels
