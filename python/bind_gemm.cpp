// Bindings of the GEMM launchers (csrc/fp8_gemm.h, csrc/int4_gemm.h).
#include <string>

#include "binding.h"
#include "fp8_gemm.h"
#include "int4_gemm.h"

namespace py = pybind11;
namespace lk = llama_kernels;

namespace llama_kernels::binding {

namespace {
// "M=3, N=4096, K=4096, config=0, split_k=4"
std::string gemm_shapes(int64_t M, int64_t N, int64_t K, int config, int split_k) {
  return "M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K) +
         ", config=" + std::to_string(config) + ", split_k=" + std::to_string(split_k);
}
}  // namespace

void bind_gemm(py::module_& m) {
  m.def(
      "fp8_gemm",
      [](std::uintptr_t xq, std::uintptr_t x_scale, bool x_scale_rows, std::uintptr_t wq,
         std::uintptr_t w_scale, bool w_scale_rows, std::uintptr_t bias, int bias_dtype,
         std::uintptr_t y, int out_dtype, std::uintptr_t workspace, int64_t M, int64_t N,
         int64_t K, int config, int split_k, std::uintptr_t stream) {
        const char* why = nullptr;
        const cudaError_t err = lk::fp8_gemm(
            ptr(xq), ptr<const float>(x_scale), x_scale_rows, ptr(wq), ptr<const float>(w_scale),
            w_scale_rows, ptr(bias), bias_dtype, ptr(y), out_dtype, ptr<float>(workspace), M, N, K,
            config, split_k, ptr<CUstream_st>(stream), &why);
        check(err, "fp8_gemm", gemm_shapes(M, N, K, config, split_k), why);
      },
      py::arg("xq"), py::arg("x_scale"), py::arg("x_scale_rows"), py::arg("wq"),
      py::arg("w_scale"), py::arg("w_scale_rows"), py::arg("bias"), py::arg("bias_dtype"),
      py::arg("y"), py::arg("out_dtype"), py::arg("workspace"), py::arg("M"), py::arg("N"),
      py::arg("K"), py::arg("config"), py::arg("split_k"), py::arg("stream"),
      "y = (xq @ wq.T) * x_scale * w_scale + bias (e4m3 in, bf16/fp16 out; 0 = absent).");

  m.def(
      "fp8_gemm_sm90_unavailable",
      []() -> py::object {
        const char* why = lk::fp8_gemm_sm90_unavailable();
        return why == nullptr ? py::object(py::none()) : py::object(py::str(why));
      },
      "None when fp8_gemm config 3 (sm_90a wgmma) can run on the current device, else why not.");

  m.def(
      "int4_gemm",
      [](std::uintptr_t x, std::uintptr_t qpacked, std::uintptr_t scale_zero, std::uintptr_t y,
         std::uintptr_t workspace, int64_t M, int64_t N, int64_t K, int64_t group_size, int dtype,
         int config, int split_k, std::uintptr_t stream) {
        const char* why = nullptr;
        const cudaError_t err = lk::int4_gemm(ptr(x), ptr(qpacked), ptr(scale_zero), ptr(y),
                                              ptr<float>(workspace), M, N, K, group_size, dtype,
                                              config, split_k, ptr<CUstream_st>(stream), &why);
        check(err, "int4_gemm", gemm_shapes(M, N, K, config, split_k), why);
      },
      py::arg("x"), py::arg("qpacked"), py::arg("scale_zero"), py::arg("y"), py::arg("workspace"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("dtype"),
      py::arg("config"), py::arg("split_k"), py::arg("stream"),
      "y = x @ W.T with W the repacked INT4 weight (see llama_kernels.cuda.int4_gemm.repack_int4).");
}

}  // namespace llama_kernels::binding
