// Bindings of the fused add + RMSNorm launchers (csrc/add_rms_norm.h).
#include "add_rms_norm.h"
#include "binding.h"

namespace py = pybind11;
namespace lk = llama_kernels;

namespace llama_kernels::binding {

namespace {
// "rows=3, hidden=577, dtype=bfloat16"
std::string norm_shapes(int64_t rows, int64_t hidden, int dtype) {
  const char* name = lk::dtype_name(dtype);
  return "rows=" + std::to_string(rows) + ", hidden=" + std::to_string(hidden) +
         ", dtype=" + (name ? std::string(name) : std::to_string(dtype));
}
}  // namespace

void bind_norm(py::module_& m) {
  m.def(
      "add_rms_norm",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t y,
         std::uintptr_t residual_out, int64_t rows, int64_t hidden, float eps, int dtype,
         std::uintptr_t stream) {
        const char* why = nullptr;
        const cudaError_t err =
            lk::add_rms_norm(ptr(x), ptr(residual), ptr(weight), ptr(y), ptr(residual_out), rows,
                             hidden, eps, dtype, ptr<CUstream_st>(stream), &why);
        check(err, "add_rms_norm", norm_shapes(rows, hidden, dtype), why);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("y"),
      py::arg("residual_out"), py::arg("rows"), py::arg("hidden"), py::arg("eps"),
      py::arg("dtype"), py::arg("stream"),
      "y = rmsnorm(x + residual) * weight; residual_out = x + residual (0 = absent).");

  m.def(
      "add_rms_norm_fp8",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t yq,
         std::uintptr_t y_scale, std::uintptr_t residual_out, int64_t rows, int64_t hidden,
         float eps, float scale_ub, int dtype, std::uintptr_t stream) {
        const char* why = nullptr;
        const cudaError_t err = lk::add_rms_norm_fp8(
            ptr(x), ptr(residual), ptr(weight), ptr(yq), ptr<float>(y_scale), ptr(residual_out),
            rows, hidden, eps, scale_ub, dtype, ptr<CUstream_st>(stream), &why);
        check(err, "add_rms_norm_fp8", norm_shapes(rows, hidden, dtype), why);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("yq"), py::arg("y_scale"),
      py::arg("residual_out"), py::arg("rows"), py::arg("hidden"), py::arg("eps"),
      py::arg("scale_ub"), py::arg("dtype"), py::arg("stream"),
      "yq (e4m3), y_scale (float32 per row) = row-wise FP8 of rmsnorm(x + residual) * weight.");
}

}  // namespace llama_kernels::binding
