// add_rms_norm_fp8 launcher: yq, y_scale = row-wise e4m3 quantization of
// RMSNorm(x + residual) * weight (computed in float32, never rounded to the input dtype).
#include <cmath>

#include "add_rms_norm.cuh"

namespace llama_kernels {

cudaError_t add_rms_norm_fp8(const void* x, const void* residual, const void* weight, void* yq,
                             float* y_scale, void* residual_out, int64_t rows, int64_t hidden,
                             float eps, float scale_ub, int dtype, cudaStream_t stream,
                             const char** why) {
  const char* bad = rmsnorm::check_args(x, residual, weight, yq, y_scale, residual_out, rows,
                                        hidden, dtype, /*fp8_out=*/true);
  if (why != nullptr) *why = bad;
  if (bad != nullptr) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  // scale_ub <= 0, NaN or inf means "no upper bound": min(amax, +inf) == amax.
  if (!(scale_ub > 0.0f) || std::isinf(scale_ub)) scale_ub = INFINITY;
  const int r = static_cast<int>(rows), h = static_cast<int>(hidden);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return rmsnorm::launch<float, true>(x, residual, weight, nullptr, yq, y_scale,
                                          residual_out, r, h, eps, scale_ub, stream);
    case DType::kFloat16:
      return rmsnorm::launch<__half, true>(x, residual, weight, nullptr, yq, y_scale,
                                           residual_out, r, h, eps, scale_ub, stream);
    case DType::kBFloat16:
      return rmsnorm::launch<__nv_bfloat16, true>(x, residual, weight, nullptr, yq, y_scale,
                                                  residual_out, r, h, eps, scale_ub, stream);
  }
  return cudaErrorInvalidValue;  // unreachable: check_args rejected the dtype
}

}  // namespace llama_kernels
