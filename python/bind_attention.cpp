// Bindings of the rotary + cache-write and decode-attention launchers
// (csrc/rope_cache.h, csrc/decode_attention.h).
#include "add_rms_norm.h"  // dtype_name
#include "binding.h"
#include "decode_attention.h"
#include "rope_cache.h"

namespace py = pybind11;
namespace lk = llama_kernels;

namespace llama_kernels::binding {

namespace {
std::string dtype_str(int dtype) {
  const char* name = lk::dtype_name(dtype);
  return name ? std::string(name) : std::to_string(dtype);
}

std::string cache_str(int dtype, bool cache_fp8) {
  return cache_fp8 ? std::string("float8_e4m3fn") : dtype_str(dtype);
}
}  // namespace

void bind_attention(py::module_& m) {
  m.def(
      "rope_and_cache",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t positions,
         bool positions_int64, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t k_cache,
         std::uintptr_t v_cache, std::uintptr_t slot_mapping, bool slots_int64,
         std::uintptr_t k_scale, std::uintptr_t v_scale, std::uintptr_t q_out,
         std::uintptr_t k_out, int64_t num_tokens, int64_t num_q_heads, int64_t num_kv_heads,
         int64_t head_dim, int dtype, bool cache_fp8, bool interleaved, std::uintptr_t stream) {
        const char* why = nullptr;
        const cudaError_t err = lk::rope_and_cache(
            ptr(q), ptr(k), ptr(v), ptr(positions), positions_int64, ptr<float>(cos),
            ptr<float>(sin), ptr(k_cache), ptr(v_cache), ptr(slot_mapping), slots_int64,
            ptr<float>(k_scale), ptr<float>(v_scale), ptr(q_out), ptr(k_out), num_tokens,
            num_q_heads, num_kv_heads, head_dim, dtype, cache_fp8, interleaved,
            ptr<CUstream_st>(stream), &why);
        check(err, "rope_and_cache",
              "tokens=" + std::to_string(num_tokens) + ", q_heads=" + std::to_string(num_q_heads) +
                  ", kv_heads=" + std::to_string(num_kv_heads) + ", head_dim=" +
                  std::to_string(head_dim) + ", dtype=" + dtype_str(dtype) +
                  ", cache=" + cache_str(dtype, cache_fp8),
              why);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("positions"), py::arg("positions_int64"),
      py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("slot_mapping"), py::arg("slots_int64"), py::arg("k_scale"), py::arg("v_scale"),
      py::arg("q_out"), py::arg("k_out"), py::arg("num_tokens"), py::arg("num_q_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("dtype"), py::arg("cache_fp8"),
      py::arg("interleaved"), py::arg("stream"),
      "q_out, k_out = rotary(q), rotary(k); k_cache/v_cache[slot] = k_out, v (slot < 0: skipped).");

  m.def("decode_attention_split_tokens", &lk::decode_attention_split_tokens, py::arg("len"),
        py::arg("num_splits"), "Tokens per split of a sequence of len live tokens (the device's rule).");
  m.def("decode_attention_num_splits", &lk::decode_attention_num_splits, py::arg("batch"),
        py::arg("num_kv_heads"), py::arg("max_len"), py::arg("num_sms"),
        "Splits per (sequence, KV head) decode_attention uses for these shapes (>= 1).");

  m.def(
      "decode_attention",
      [](std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
         std::uintptr_t block_table, std::uintptr_t seq_lens, std::uintptr_t k_scale,
         std::uintptr_t v_scale, std::uintptr_t out, std::uintptr_t partial, std::uintptr_t lse,
         int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t block_size, int64_t max_blocks, int64_t num_splits, float sm_scale, int dtype,
         bool cache_fp8, std::uintptr_t stream) {
        const char* why = nullptr;
        const cudaError_t err = lk::decode_attention(
            ptr(q), ptr(k_cache), ptr(v_cache), ptr<int32_t>(block_table), ptr<int32_t>(seq_lens),
            ptr<float>(k_scale), ptr<float>(v_scale), ptr(out), ptr<float>(partial),
            ptr<float>(lse), batch, num_q_heads, num_kv_heads, head_dim, block_size, max_blocks,
            num_splits, sm_scale, dtype, cache_fp8, ptr<CUstream_st>(stream), &why);
        check(err, "decode_attention",
              "batch=" + std::to_string(batch) + ", q_heads=" + std::to_string(num_q_heads) +
                  ", kv_heads=" + std::to_string(num_kv_heads) + ", head_dim=" +
                  std::to_string(head_dim) + ", block_size=" + std::to_string(block_size) +
                  ", max_blocks=" + std::to_string(max_blocks) + ", splits=" +
                  std::to_string(num_splits) + ", dtype=" + dtype_str(dtype) +
                  ", cache=" + cache_str(dtype, cache_fp8),
              why);
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"),
      py::arg("seq_lens"), py::arg("k_scale"), py::arg("v_scale"), py::arg("out"),
      py::arg("partial"), py::arg("lse"), py::arg("batch"), py::arg("num_q_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
      py::arg("max_blocks"), py::arg("num_splits"), py::arg("sm_scale"), py::arg("dtype"),
      py::arg("cache_fp8"), py::arg("stream"),
      "out = split-KV GQA decode attention over the paged cache (partial/lse: float32 workspace).");
}

}  // namespace llama_kernels::binding
