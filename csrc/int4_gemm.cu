// int4_gemm launcher: argument checks, the whitelisted configurations, split-K reduction.
#include "int4_gemm.cuh"

namespace llama_kernels {

namespace {

template <typename T, int kMTiles, int kStages>
cudaError_t launch_int4(const void* x, const void* qpacked, const void* scale_zero, float* partial,
                        const gemm::Epilogue& e, int M, int N, int K, int group_size, int split_k,
                        cudaStream_t stream) {
  using namespace int4gemm;
  constexpr int kSmem = kStages * stage_bytes<kMTiles>();
  auto kernel = int4_gemm_kernel<T, kMTiles, kStages>;
  // More than the default 48 KiB of dynamic shared memory needs an opt-in (all configurations
  // stay below the 99 KiB per block of sm_89).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  const int steps = (K + kStepK - 1) / kStepK;
  const int per_split = (steps + split_k - 1) / split_k;
  const dim3 grid((N + kBlockN - 1) / kBlockN, split_k, (M + 16 * kMTiles - 1) / (16 * kMTiles));
  if (grid.z > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<grid, kThreads, kSmem, stream>>>(
      static_cast<const T*>(x), static_cast<const uint4*>(qpacked),
      static_cast<const uint4*>(scale_zero), partial, e, M, N, K, group_size, per_split);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_int4(int config, const void* x, const void* qpacked, const void* scale_zero,
                          float* partial, const gemm::Epilogue& e, int M, int N, int K,
                          int group_size, int split_k, cudaStream_t stream) {
  switch (static_cast<Int4GemmConfig>(config)) {
    case kInt4M16:
      return launch_int4<T, 1, 4>(x, qpacked, scale_zero, partial, e, M, N, K, group_size, split_k, stream);
    case kInt4M64:
      return launch_int4<T, 4, 3>(x, qpacked, scale_zero, partial, e, M, N, K, group_size, split_k, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

bool misaligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a != 0; }

}  // namespace

cudaError_t int4_gemm(const void* x, const void* qpacked, const void* scale_zero, void* y,
                      float* workspace, int64_t M, int64_t N, int64_t K, int64_t group_size,
                      int dtype, int config, int split_k, cudaStream_t stream, const char** why) {
  const char* bad = nullptr;
  if (M < 0 || N <= 0 || K <= 0 || M >= (int64_t{1} << 31) || N >= (int64_t{1} << 31) ||
      K >= (int64_t{1} << 31)) {
    bad = "M must be >= 0 and N, K > 0, all below 2^31";
  } else if (K % 16) {
    bad = "no kernel for this shape: K must be a multiple of 16";
  } else if (N % 32) {
    bad = "no kernel for this shape: N must be a multiple of 32";
  } else if (group_size <= 0 || K % group_size || (group_size % 32 && group_size != K)) {
    bad = "no kernel for this shape: group_size must divide K and be a multiple of 32 (or equal K)";
  } else if (dtype != static_cast<int>(DType::kFloat16) &&
             dtype != static_cast<int>(DType::kBFloat16)) {
    bad = "dtype must be 1 (float16) or 2 (bfloat16)";
  } else if (config < 0 || config >= kInt4NumConfigs) {
    bad = "config must be 0 (m16) or 1 (m64)";
  } else if (split_k < 1 || split_k > kMaxSplitK) {
    bad = "split_k must be in [1, 64]";
  } else if (x == nullptr || qpacked == nullptr || scale_zero == nullptr || y == nullptr) {
    bad = "x, qpacked, scale_zero and y must not be null";
  } else if (misaligned(x, 16) || misaligned(qpacked, 16) || misaligned(scale_zero, 16)) {
    bad = "x, qpacked and scale_zero must be 16-byte aligned";
  } else if (misaligned(y, 4)) {
    bad = "y must be 4-byte aligned";
  } else if (split_k > 1 && (workspace == nullptr || misaligned(workspace, 16))) {
    bad = "workspace must be non-null and 16-byte aligned when split_k > 1";
  }
  if (why != nullptr) *why = bad;
  if (bad != nullptr) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;

  const gemm::Epilogue e{nullptr, nullptr, nullptr, y, -1, dtype, false, false};
  float* partial = split_k > 1 ? workspace : nullptr;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const int gs = static_cast<int>(group_size);
  const cudaError_t err =
      dtype == static_cast<int>(DType::kFloat16)
          ? dispatch_int4<__half>(config, x, qpacked, scale_zero, partial, e, m, n, k, gs, split_k, stream)
          : dispatch_int4<__nv_bfloat16>(config, x, qpacked, scale_zero, partial, e, m, n, k, gs, split_k, stream);
  if (err != cudaSuccess || split_k == 1) return err;
  return gemm_splitk_reduce(workspace, split_k, nullptr, false, nullptr, false, nullptr, -1, y,
                            dtype, M, N, stream, why);
}

}  // namespace llama_kernels
