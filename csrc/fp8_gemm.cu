// fp8_gemm launcher (whitelisted configurations, argument checks) and the split-K reduction that
// the FP8 and INT4 GEMMs share.
#include "fp8_gemm.cuh"

namespace llama_kernels {
namespace gemm {

// Deterministic split-K reduction: one thread per 4 consecutive outputs; partials are added in
// the order s = 0 .. split_k - 1 (float4 loads, N % 4 == 0), then the shared epilogue.
__global__ void __launch_bounds__(256)
    splitk_reduce_kernel(const float4* __restrict__ partial,  // [split_k, M, N / 4]
                         int split_k, int M, int N, Epilogue e) {
  const int64_t quads = static_cast<int64_t>(M) * (N / 4);
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= quads) return;
  float4 s = partial[q];
  for (int i = 1; i < split_k; ++i) {
    const float4 p = partial[static_cast<int64_t>(i) * quads + q];
    s.x += p.x;
    s.y += p.y;
    s.z += p.z;
    s.w += p.w;
  }
  const int m = static_cast<int>(q / (N / 4));
  const int n = static_cast<int>(q % (N / 4)) * 4;
  epilogue_pair(e, m, n, N, s.x, s.y);
  epilogue_pair(e, m, n + 2, N, s.z, s.w);
}

namespace {

bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

int dtype_size(int dtype) { return dtype == static_cast<int>(DType::kFloat32) ? 4 : 2; }

bool valid_out_dtype(int d) {
  return d == static_cast<int>(DType::kFloat16) || d == static_cast<int>(DType::kBFloat16);
}

bool valid_bias_dtype(int d) { return d >= 0 && d <= 2; }

}  // namespace

// Checks shared by both launchers' epilogue arguments; nullptr when fine.
const char* check_epilogue(const float* x_scale, const float* w_scale, const void* bias,
                           int bias_dtype, const void* y, int out_dtype, bool scales_required) {
  if (!valid_out_dtype(out_dtype)) return "out_dtype must be 1 (float16) or 2 (bfloat16)";
  if (y == nullptr) return "y must not be null";
  if (!aligned(y, 4)) return "y must be 4-byte aligned";
  if (scales_required && (x_scale == nullptr || w_scale == nullptr)) {
    return "x_scale and w_scale must not be null";
  }
  if (!aligned(x_scale, 4) || !aligned(w_scale, 4)) return "scales must be 4-byte aligned";
  if (bias != nullptr) {
    if (!valid_bias_dtype(bias_dtype)) {
      return "bias_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)";
    }
    if (!aligned(bias, dtype_size(bias_dtype))) return "bias must be aligned to its element size";
  }
  return nullptr;
}

}  // namespace gemm

cudaError_t gemm_splitk_reduce(const float* workspace, int split_k, const float* x_scale,
                               bool x_scale_rows, const float* w_scale, bool w_scale_rows,
                               const void* bias, int bias_dtype, void* y, int out_dtype,
                               int64_t M, int64_t N, cudaStream_t stream, const char** why) {
  const char* bad = nullptr;
  if (M < 0 || N <= 0 || M >= (int64_t{1} << 31) || N >= (int64_t{1} << 31)) {
    bad = "M must be >= 0 and N > 0, both below 2^31";
  } else if (N % 4) {
    bad = "N must be a multiple of 4";
  } else if (split_k < 1 || split_k > kMaxSplitK) {
    bad = "split_k must be in [1, 64]";
  } else if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16) {
    bad = "workspace must be non-null and 16-byte aligned";
  } else {
    bad = gemm::check_epilogue(x_scale, w_scale, bias, bias_dtype, y, out_dtype, false);
  }
  if (why != nullptr) *why = bad;
  if (bad != nullptr) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const gemm::Epilogue e{x_scale, w_scale, bias,         y,
                         bias_dtype, out_dtype, x_scale_rows, w_scale_rows};
  const int64_t quads = M * (N / 4);
  const int threads = 256;
  gemm::splitk_reduce_kernel<<<static_cast<unsigned>((quads + threads - 1) / threads), threads, 0,
                               stream>>>(reinterpret_cast<const float4*>(workspace), split_k,
                                         static_cast<int>(M), static_cast<int>(N), e);
  return cudaGetLastError();
}

namespace {

template <int kMTiles, int kStages>
cudaError_t launch_fp8(const void* xq, const void* wq, float* partial, const gemm::Epilogue& e,
                       int M, int N, int K, int split_k, cudaStream_t stream) {
  using namespace fp8gemm;
  const int steps = (K + kStepK - 1) / kStepK;
  const int per_split = (steps + split_k - 1) / split_k;
  const dim3 grid((N + kBlockN - 1) / kBlockN, split_k, (M + 16 * kMTiles - 1) / (16 * kMTiles));
  if (grid.z > 65535) return cudaErrorInvalidConfiguration;
  fp8_gemm_kernel<kMTiles, kStages><<<grid, kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(xq), static_cast<const uint8_t*>(wq), partial, e, M, N, K,
      per_split);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fp8_gemm(const void* xq, const float* x_scale, bool x_scale_rows, const void* wq,
                     const float* w_scale, bool w_scale_rows, const void* bias, int bias_dtype,
                     void* y, int out_dtype, float* workspace, int64_t M, int64_t N, int64_t K,
                     int config, int split_k, cudaStream_t stream, const char** why) {
  const char* bad = nullptr;
  if (M < 0 || N <= 0 || K <= 0 || M >= (int64_t{1} << 31) || N >= (int64_t{1} << 31) ||
      K >= (int64_t{1} << 31)) {
    bad = "M must be >= 0 and N, K > 0, all below 2^31";
  } else if (K % 16) {
    bad = "no kernel for this shape: K must be a multiple of 16";
  } else if (N % 8) {
    bad = "no kernel for this shape: N must be a multiple of 8";
  } else if (config < 0 || config >= kFp8NumConfigs) {
    bad = "config must be 0 (m16), 1 (m32), 2 (m64) or 3 (sm90 wgmma)";
  } else if (split_k < 1 || split_k > kMaxSplitK) {
    bad = "split_k must be in [1, 64]";
  } else if (config == kFp8Sm90 && split_k != 1) {
    bad = "config 3 (sm90 wgmma) needs split_k == 1";
  } else if (xq == nullptr || wq == nullptr) {
    bad = "xq and wq must not be null";
  } else if (reinterpret_cast<uintptr_t>(xq) % 16 || reinterpret_cast<uintptr_t>(wq) % 16) {
    bad = "xq and wq must be 16-byte aligned";
  } else if (split_k > 1 && (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16)) {
    bad = "workspace must be non-null and 16-byte aligned when split_k > 1";
  } else {
    bad = gemm::check_epilogue(x_scale, w_scale, bias, bias_dtype, y, out_dtype, true);
    if (bad == nullptr && config == kFp8Sm90 && reinterpret_cast<uintptr_t>(y) % 16) {
      bad = "config 3 (sm90 wgmma) needs y 16-byte aligned";  // 16-byte row-segment stores
    }
  }
  if (why != nullptr) *why = bad;
  if (bad != nullptr) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;

  const gemm::Epilogue e{x_scale, w_scale, bias,         y,
                         bias_dtype, out_dtype, x_scale_rows, w_scale_rows};
  if (config == kFp8Sm90) return fp8_gemm_sm90(xq, wq, e, M, N, K, stream, why);
  float* partial = split_k > 1 ? workspace : nullptr;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  cudaError_t err = cudaErrorInvalidValue;
  switch (static_cast<Fp8GemmConfig>(config)) {
    case kFp8M16: err = launch_fp8<1, 4>(xq, wq, partial, e, m, n, k, split_k, stream); break;
    case kFp8M32: err = launch_fp8<2, 3>(xq, wq, partial, e, m, n, k, split_k, stream); break;
    case kFp8M64: err = launch_fp8<4, 2>(xq, wq, partial, e, m, n, k, split_k, stream); break;
    default: break;
  }
  if (err != cudaSuccess || split_k == 1) return err;
  return gemm_splitk_reduce(workspace, split_k, x_scale, x_scale_rows, w_scale, w_scale_rows,
                            bias, bias_dtype, y, out_dtype, M, N, stream, why);
}

}  // namespace llama_kernels
