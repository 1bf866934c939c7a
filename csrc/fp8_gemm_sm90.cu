// Hopper (sm_90a) large-M FP8 GEMM: wgmma e4m3 x e4m3 -> f32, fed by TMA through an mbarrier
// pipeline; config kFp8Sm90 of fp8_gemm (csrc/fp8_gemm.h), reached through fp8_gemm_sm90().
//
// Design (compute-bound prefill; M > 64):
//  * CTA tile 128 (M) x 128 (N), K walked in 128-byte blocks (128 e4m3 = one 128B swizzle row).
//    Both operands are K-major (xq [M, K], wq [N, K]), which is the only layout wgmma accepts
//    for 8-bit types, so both go to shared memory unchanged.
//  * Warp specialization, 3 warpgroups (384 threads): warpgroup 0 is the producer (one thread
//    issues the TMA copies `cp.async.bulk.tensor.2d` with 128B swizzle into a kStages-deep ring
//    of A/B stages); warpgroups 1 and 2 are consumers, each owns 64 rows of the tile and issues
//    4 x `wgmma.mma_async m64n128k32 .e4m3.e4m3` per K block into a fresh accumulator, then adds it
//    to the tile's float32 total (promotion every 128 of K: the FP8 tensor-core accumulation is
//    of reduced precision). 2 x 64 f32 registers per thread.
//    `setmaxnreg` gives the producer 40 registers and the consumers 232.
//  * Pipeline: full[s] (count 1, expect_tx of the stage's bytes; TMA completes it) and empty[s]
//    (count 8: lane 0 of each consumer warp, once the wgmmas reading stage s are complete, which
//    each consumer waits for before promoting; the two consumers interleave on the tensor cores).
//  * Persistent: grid = min(tiles, SMs); CTA b walks tiles b, b + grid, ... in grouped order
//    (kGroupM M tiles share each column of N tiles so that the weight tiles stay in L2). The
//    producer runs ahead into the next tile while the consumers run the epilogue.
//  * Epilogue: total * x_scale(m) * w_scale(n) + bias(n), rounded to bf16/fp16 (the arithmetic
//    of gemm::epilogue_pair, shared with the mma.sync kernel, so both paths round identically;
//    scales and bias are loaded once per row / column pair instead of once per pair), staged in
//    shared memory per consumer and stored as coalesced 16-byte row segments with row / column
//    masks (y must be 16-byte aligned for this config). Out-of-range rows / columns / K are
//    zero-filled by TMA, so M, N (N % 8 == 0) and K (K % 16 == 0, the TMA stride rule) are free.
//  * Deterministic: every output is one CTA's fixed-order sum (no split-K, no atomics).
//
// Only the sm_90a build holds the kernel; other architectures get a trapping stub, which is never
// launched: the launcher checks, once per device, that the device is compute capability 9.0 and
// that the code loaded for it is the sm_90a kernel (fp8_gemm_sm90_unavailable(); Python asks it
// before choosing config 3). Device queries, that check, cudaFuncSetAttribute and the TMA
// descriptors (per device, base address and shape) are cached instead of redone per launch. The TMA descriptors
// are encoded on the host with cuTensorMapEncodeTiled, obtained through the runtime's
// cudaGetDriverEntryPointByVersion at the first launch (no libcuda link; importing _C stays
// free of driver calls).
#include <cuda.h>  // CUtensorMap and the cuTensorMapEncodeTiled types only (no driver link)
#include <cudaTypedefs.h>

#include <cstring>
#include <mutex>

#include "fp8_gemm.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LK_SM90A 1
#else
#define LK_SM90A 0
#endif

namespace llama_kernels {
namespace fp8sm90 {

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 128;  // bytes = e4m3 values per K block (the 128B swizzle width)
constexpr int kStages = 4;
constexpr int kGroupM = 8;    // M tiles per group of the tile order
constexpr int kConsumers = 2;  // consumer warpgroups (64 rows each)
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kTileA = kBlockM * kBlockK;  // bytes per stage
constexpr int kTileB = kBlockN * kBlockK;
constexpr int kAccRegs = kBlockN / 2;      // m64n128 f32 accumulators per thread
// Epilogue staging of one consumer's 64 x 128 output tile (16-bit values): rows padded by 16
// bytes, so the 4-byte writes of a warp (8 rows x 4 columns) hit 32 distinct banks and the
// 16-byte reads of a quarter warp (128 contiguous bytes of one row) are conflict-free.
constexpr int kOutPitch = kBlockN * 2 + 16;
constexpr int kOutTile = 64 * kOutPitch;
// A ring, B ring, one output staging tile per consumer, full[kStages], empty[kStages], plus
// 1 KiB to align the ring (128B swizzle atoms are 1024 bytes and the wgmma descriptors assume
// 1024-byte aligned stages).
constexpr int kSmemBytes = kStages * (kTileA + kTileB) + kConsumers * kOutTile + 2 * kStages * 8 + 1024;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Why: the mbarrier / TMA / wgmma primitives, as raw PTX (sm_90a only; empty elsewhere).
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if LK_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
#endif
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
#if LK_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if LK_SM90A
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
#endif
}

// Why: spins until the phase of parity `parity` of the barrier has completed; in a checked build
// (common.cuh) a wait past the bound prints `barrier`[`stage`] of this kernel and traps.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity, const char* barrier,
                                          int stage) {
#if LK_SM90A
#if LLAMA_KERNELS_CHECKED
  SpinBound bound;
#endif
  uint32_t done = 0;
  for (;;) {
    asm volatile(
        "{\n .reg .pred p;\n"
        " mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    if (done) break;
#if LLAMA_KERNELS_CHECKED
    bound.check("fp8_gemm_sm90_kernel", barrier, stage, parity);
#endif
  }
#endif
}

// Why: one 2D TMA box (kBlockK x 128 rows) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar,
                                            int c0, int c1) {
#if LK_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
#endif
}

__device__ __forceinline__ void prefetch_tmap(const CUtensorMap* map) {
#if LK_SM90A
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

// Why: explicit shared-memory accesses by 32-bit address: the stage pointers come from integer
// alignment arithmetic, through which the compiler loses the address space (generic ST/LD).
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// Why: a barrier among the 128 threads of one consumer warpgroup only (barrier 1 + consumer;
// 0 is __syncthreads), around its epilogue staging tile.
__device__ __forceinline__ void warpgroup_barrier(int consumer) {
#if LK_SM90A
  // Immediate ids: with a register id ptxas reserves all 16 hardware barriers.
  if (consumer == 0) {
    asm volatile("bar.sync 1, 128;" ::: "memory");
  } else {
    asm volatile("bar.sync 2, 128;" ::: "memory");
  }
#endif
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#if LK_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
#endif
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#if LK_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
#endif
}

// Why: shared-memory matrix descriptor of a K-major, 128B-swizzled tile whose rows are 128
// bytes: start >> 4 (bits 0-13), leading offset unused for swizzled K-major (1), stride offset
// = 8 rows x 128 B = 1024 B between core-matrix groups (bits 32-45), layout SWIZZLE_128B (1 at
// bits 62-63). Advancing K by 32 bytes inside the swizzle atom = adding 2 to the start field.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = smem_u32(p);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if LK_SM90A
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if LK_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
template <int kN>
__device__ __forceinline__ void wgmma_wait() {
#if LK_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kN) : "memory");
#endif
}

// Why: keeps the compiler from moving accumulator reads / writes across the asynchronous
// wgmma (the registers are live in the tensor core between issue and wait).
__device__ __forceinline__ void fence_acc(float (&d)[kAccRegs]) {
#pragma unroll
  for (int i = 0; i < kAccRegs; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Why: d (+)= A[64 x 32] * B[128 x 32]^T, both e4m3 from shared memory; scale_d = 0 overwrites.
__device__ __forceinline__ void wgmma_m64n128k32(float (&d)[kAccRegs], uint64_t da, uint64_t db,
                                                 int scale_d) {
#if LK_SM90A
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n}"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
        "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
#endif
}

// Why: grouped tile order: kGroupM consecutive M tiles sweep the N tiles together, so the
// weight tiles they share are read from L2 instead of HBM.
__device__ __forceinline__ void tile_coords(int tile, int m_tiles, int n_tiles, int& mt, int& nt) {
  const int per_group = kGroupM * n_tiles;
  const int group = tile / per_group;
  const int first_m = group * kGroupM;
  const int rows = min(m_tiles - first_m, kGroupM);
  const int in_group = tile % per_group;
  mt = first_m + in_group % rows;
  nt = in_group / rows;
}

__global__ void __launch_bounds__(kThreads, 1)
    fp8_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tmap_x,  // xq [M, K] e4m3
                         const __grid_constant__ CUtensorMap tmap_w,  // wq [N, K] e4m3
                         gemm::Epilogue epi, int M, int N, int K) {
#if LK_SM90A
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* ring_a = smem;
  uint8_t* ring_b = smem + kStages * kTileA;
  uint8_t* out_tiles = ring_b + kStages * kTileB;  // [kConsumers][64 rows][kOutPitch bytes]
  uint64_t* full = reinterpret_cast<uint64_t*>(out_tiles + kConsumers * kOutTile);
  uint64_t* empty = full + kStages;

  const int wg = threadIdx.x / 128;
  const int m_tiles = (M + kBlockM - 1) / kBlockM;
  const int n_tiles = (N + kBlockN - 1) / kBlockN;
  const int tiles = m_tiles * n_tiles;
  const int k_blocks = (K + kBlockK - 1) / kBlockK;

  if (threadIdx.x == 0) {
    prefetch_tmap(&tmap_x);
    prefetch_tmap(&tmap_w);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers * 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer warpgroup: one thread streams A and B stages with TMA ----
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int mt, nt;
        tile_coords(tile, m_tiles, n_tiles, mt, nt);
        for (int kb = 0; kb < k_blocks; ++kb) {
          mbar_wait(&empty[stage], phase ^ 1, "empty", stage);  // the first pass through the ring does not wait
          mbar_expect_tx(&full[stage], kTileA + kTileB);
          tma_load_2d(ring_a + stage * kTileA, &tmap_x, &full[stage], kb * kBlockK, mt * kBlockM);
          tma_load_2d(ring_b + stage * kTileB, &tmap_w, &full[stage], kb * kBlockK, nt * kBlockN);
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    // ---- consumer warpgroups: wgmma over 64 rows each, epilogue from registers ----
    setmaxnreg_inc<232>();
    const int c = wg - 1;                 // rows [64c, 64c + 64) of the tile
    const int t = threadIdx.x % 128;
    const int warp = t / 32, lane = t % 32;
    float acc[kAccRegs];    // one K block's products, accumulated by the tensor cores
    float total[kAccRegs];  // the tile's sum over K, promoted from acc in IEEE float32
    int stage = 0;
    uint32_t phase = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int mt, nt;
      tile_coords(tile, m_tiles, n_tiles, mt, nt);
#pragma unroll
      for (int i = 0; i < kAccRegs; ++i) total[i] = 0.0f;
      for (int kb = 0; kb < k_blocks; ++kb) {
        mbar_wait(&full[stage], phase, "full", stage);
        const uint64_t da = smem_desc(ring_a + stage * kTileA + c * 64 * kBlockK);
        const uint64_t db = smem_desc(ring_b + stage * kTileB);
        fence_acc(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockK / 32; ++kk) {
          // +32 bytes of K = +2 in the descriptor's 16-byte address field; each K block starts
          // a fresh accumulator (scale_d = 0)
          wgmma_m64n128k32(acc, da + 2 * kk, db + 2 * kk, kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        fence_acc(acc);
        wgmma_wait<0>();  // this K block's wgmmas are done: its stage is free, acc is readable
        fence_acc(acc);
        if (lane == 0) mbar_arrive(&empty[stage]);
        // Promotion every kBlockK (128) of K: the FP8 wgmma accumulates with reduced precision
        // (as CUTLASS's non-fast-accum mainloops, DeepGEMM and FlashAttention-3 note), so the
        // chain through all of K is summed here in full float32 instead. The other consumer
        // warpgroup's wgmmas keep the tensor cores busy meanwhile.
#pragma unroll
        for (int i = 0; i < kAccRegs; ++i) total[i] += acc[i];
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }

      // Accumulator layout of m64nN: register 4j + 2h + e of thread (warp, lane) holds row
      // 16 warp + 8 h + lane / 4, column 8 j + 2 (lane % 4) + e. The row scales are loaded once
      // per tile, the column scales and bias once per column pair; the arithmetic is
      // gemm::epilogue_pair's ((acc * xs) * ws + bias, float32, then one rounding). The rounded
      // pairs go to this consumer's staging tile, then out as 16-byte row segments (coalesced
      // stores of whole 32-byte sectors instead of 4-byte pairs spread over 8 rows).
      const uint32_t stage_out = smem_u32(out_tiles + c * kOutTile);
      const int lrow = warp * 16 + lane / 4;  // row within the consumer's 64
      const int lcol = 2 * (lane % 4);
      const int row0 = mt * kBlockM + c * 64 + lrow;
      const int col0 = nt * kBlockN + lcol;
      float xs[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = min(row0 + 8 * h, M - 1);
        xs[h] = epi.x_scale[epi.x_scale_rows ? m : 0];
      }
      const bool half_out = epi.out_dtype == static_cast<int>(DType::kFloat16);
      warpgroup_barrier(c);  // the previous tile's staging reads are done
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        const int n = min(col0 + 8 * j, N - 2);  // past N: computed, staged, never stored
        const float ws0 = epi.w_scale[epi.w_scale_rows ? n : 0];
        const float ws1 = epi.w_scale[epi.w_scale_rows ? n + 1 : 0];
        float b0 = 0.0f, b1 = 0.0f;
        if (epi.bias != nullptr) {
          b0 = gemm::load_bias(epi.bias, epi.bias_dtype, n);
          b1 = gemm::load_bias(epi.bias, epi.bias_dtype, n + 1);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v0 = total[4 * j + 2 * h] * xs[h] * ws0, v1 = total[4 * j + 2 * h + 1] * xs[h] * ws1;
          if (epi.bias != nullptr) {
            v0 += b0;
            v1 += b1;
          }
          uint32_t packed;
          if (half_out) {
            packed = bit_cast_dev<uint32_t>(__float22half2_rn(make_float2(v0, v1)));
          } else {
            packed = bit_cast_dev<uint32_t>(__float22bfloat162_rn(make_float2(v0, v1)));
          }
          st_shared_u32(stage_out + (lrow + 8 * h) * kOutPitch + (lcol + 8 * j) * 2, packed);
        }
      }
      warpgroup_barrier(c);  // the whole 64 x 128 tile is staged
      // 64 rows x 16 segments of 8 values: segment v = t + 128 i, row v / 16, columns 8 (v % 16).
      // N % 8 == 0, so a segment is all in or all out; y is 16-byte aligned (checked at launch).
#pragma unroll
      for (int i = 0; i < 64 * 16 / 128; ++i) {
        const int v = t + 128 * i;
        const int r = v / 16, seg = v % 16;
        const int m = mt * kBlockM + c * 64 + r;
        const int n = nt * kBlockN + seg * 8;
        if (m < M && n < N) {
          const uint4 val = ld_shared_v4(stage_out + r * kOutPitch + seg * 16);
          *reinterpret_cast<uint4*>(static_cast<uint16_t*>(epi.y) + static_cast<size_t>(m) * N + n) = val;
        }
      }
    }
  }
#else
  __trap();  // not sm_90a: the launcher never launches this build (see fp8_gemm_sm90())
#endif
}

// ---------------------------------------------------------------------------- host side

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// Why: the driver entry point is looked up once, on the first launch (never at import).
EncodeTiled encode_tiled_fn() {
  static EncodeTiled fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess) {
      fn = reinterpret_cast<EncodeTiled>(p);
    }
  });
  return fn;
}

// Why: a [rows, K] e4m3 row-major operand as 128 x kBlockK boxes with 128B swizzle; boxes past
// the edges are zero-filled (that is what makes ragged M, N and K free).
bool make_tmap(EncodeTiled encode, CUtensorMap* map, const void* base, int64_t rows, int64_t K) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K)};  // bytes; K % 16 == 0
  const cuuint32_t box[2] = {kBlockK, 128};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides,
                box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
         CUDA_SUCCESS;
}

// Why: host work done once per device instead of on every launch: the device queries, the check
// that real sm_90a code of the kernel was loaded, and cudaFuncSetAttribute.
struct DeviceState {
  bool ready = false;
  const char* why = nullptr;  // set when the kernel cannot run on this device
  cudaError_t err = cudaSuccess;
  int sms = 0;
};

constexpr int kMaxDevices = 64;

// Why: which code the runtime loaded for the device decides whether the real kernel exists. The
// sm_90a SASS was compiled from compute_90a PTX (ptxVersion 90) and holds the whole kernel (far
// more than 32 registers per thread); a plain sm_90 build or older PTX JIT-compiled for the device
// (ptxVersion 80/89) holds only the __trap() stub, which must never be launched.
const char* check_loaded_code(const cudaFuncAttributes& attr) {
#ifdef LLAMA_KERNELS_CUDA_ARCHS
  if (std::strstr("," LLAMA_KERNELS_CUDA_ARCHS ",", ",90a,") == nullptr) {
    return "config 3 (sm90 wgmma): this build holds no sm_90a code (LLAMA_KERNELS_CUDA_ARCHS lacks 90a)";
  }
#endif
  if (attr.binaryVersion != 90 || attr.ptxVersion != 90 || attr.numRegs < 32) {
    return "config 3 (sm90 wgmma): the code loaded for this GPU is not the sm_90a kernel (a build "
           "without 90a, JIT-compiled from older PTX)";
  }
  return nullptr;
}

const DeviceState& device_state(int dev) {
  static DeviceState states[kMaxDevices];
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  DeviceState& st = states[dev];
  if (st.ready) return st;
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&st.sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) {
    st.err = err;  // not cached: a later call may succeed
    return st;
  }
  st.err = cudaSuccess;
  if (major != 9 || minor != 0) {
    st.why = "config 3 (sm90 wgmma) needs a compute capability 9.0 GPU";
    st.err = cudaErrorInvalidDevice;
  } else {
    cudaFuncAttributes attr{};
    st.err = cudaFuncGetAttributes(&attr, fp8_gemm_sm90_kernel);
    if (st.err == cudaSuccess && (st.why = check_loaded_code(attr)) != nullptr) {
      st.err = cudaErrorInvalidDeviceFunction;
    }
    if (st.err == cudaSuccess) {
      st.err = cudaFuncSetAttribute(fp8_gemm_sm90_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    }
    if (st.err == cudaSuccess && encode_tiled_fn() == nullptr) {
      st.why = "cuTensorMapEncodeTiled is not available from the CUDA driver";
      st.err = cudaErrorNotSupported;
    }
  }
  st.ready = true;
  return st;
}

// Why: the TMA descriptors of recent operands, per device, base address and shape (the weight's
// is the same on every call; the caching allocator hands activations the same few addresses).
// A descriptor holds nothing but these, so a hit is valid even if the memory was reallocated.
struct TmapKey {
  int dev;
  const void* base;
  int64_t rows, K;
  bool operator==(const TmapKey& o) const {
    return dev == o.dev && base == o.base && rows == o.rows && K == o.K;
  }
};

bool cached_tmap(int dev, CUtensorMap* out, const void* base, int64_t rows, int64_t K) {
  constexpr int kEntries = 64;
  static TmapKey keys[kEntries];
  static CUtensorMap maps[kEntries];
  static int used = 0, next = 0;
  static std::mutex mu;
  const TmapKey key{dev, base, rows, K};
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < used; ++i) {
    if (keys[i] == key) {
      *out = maps[i];
      return true;
    }
  }
  if (!make_tmap(encode_tiled_fn(), out, base, rows, K)) return false;
  keys[next] = key;
  maps[next] = *out;
  next = (next + 1) % kEntries;  // round robin: the oldest entry goes first
  if (used < kEntries) ++used;
  return true;
}

}  // namespace fp8sm90

const char* fp8_gemm_sm90_unavailable() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return "config 3 (sm90 wgmma): no CUDA device";
  if (dev < 0 || dev >= fp8sm90::kMaxDevices) return "config 3 (sm90 wgmma): device index out of range";
  const fp8sm90::DeviceState& st = fp8sm90::device_state(dev);
  if (st.err == cudaSuccess) return nullptr;
  return st.why != nullptr ? st.why : cudaGetErrorString(st.err);
}

// Arguments were validated by fp8_gemm() (y 16-byte aligned among them); M > 0.
cudaError_t fp8_gemm_sm90(const void* xq, const void* wq, const gemm::Epilogue& e, int64_t M,
                          int64_t N, int64_t K, cudaStream_t stream, const char** why) {
  using namespace fp8sm90;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  const DeviceState& st = device_state(dev);
  if (st.err != cudaSuccess) {  // never launch the __trap() stub
    if (why != nullptr && st.why != nullptr) *why = st.why;
    return st.err;
  }
  const int64_t tiles = ((M + kBlockM - 1) / kBlockM) * ((N + kBlockN - 1) / kBlockN);
  if (tiles >= (int64_t{1} << 31)) {
    if (why != nullptr) *why = "config 3 (sm90 wgmma): more than 2^31 output tiles";
    return cudaErrorInvalidValue;
  }
  CUtensorMap tx, tw;
  if (!cached_tmap(dev, &tx, xq, M, K) || !cached_tmap(dev, &tw, wq, N, K)) {
    if (why != nullptr) *why = "cuTensorMapEncodeTiled rejected the operands";
    return cudaErrorInvalidValue;
  }
  const int grid = static_cast<int>(tiles < st.sms ? tiles : st.sms);
  fp8_gemm_sm90_kernel<<<grid, kThreads, kSmemBytes, stream>>>(
      tx, tw, e, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K));
  return cudaGetLastError();
}

}  // namespace llama_kernels
