// add_rms_norm launcher: y = RMSNorm(x + residual) * weight, in the input dtype.
#include "add_rms_norm.cuh"

namespace llama_kernels {

const char* dtype_name(int dtype) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return nullptr;
}

cudaError_t add_rms_norm(const void* x, const void* residual, const void* weight, void* y,
                         void* residual_out, int64_t rows, int64_t hidden, float eps, int dtype,
                         cudaStream_t stream, const char** why) {
  const char* bad =
      rmsnorm::check_args(x, residual, weight, y, nullptr, residual_out, rows, hidden, dtype,
                          /*fp8_out=*/false);
  if (why != nullptr) *why = bad;
  if (bad != nullptr) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int r = static_cast<int>(rows), h = static_cast<int>(hidden);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return rmsnorm::launch<float, false>(x, residual, weight, y, nullptr, nullptr,
                                           residual_out, r, h, eps, 0.0f, stream);
    case DType::kFloat16:
      return rmsnorm::launch<__half, false>(x, residual, weight, y, nullptr, nullptr,
                                            residual_out, r, h, eps, 0.0f, stream);
    case DType::kBFloat16:
      return rmsnorm::launch<__nv_bfloat16, false>(x, residual, weight, y, nullptr, nullptr,
                                                   residual_out, r, h, eps, 0.0f, stream);
  }
  return cudaErrorInvalidValue;  // unreachable: check_args rejected the dtype
}

}  // namespace llama_kernels
