"""Triton FP8 (e4m3) GEMM with row-wise or per-tensor scales: the triton backend of ops.fp8_gemm.

y[m, n] = sum_k xq[m, k] wq[n, k] * x_scale[m] * w_scale[n] (+ bias[n]), accumulated in float32
by tl.dot on e4m3 operands (wgmma on Hopper, mma on Ada). Ampere (sm_80) has no e4m3: there the
kernel reads the e4m3 bytes as uint8 and moves their bits into fp16 fields (exact, value x 2^-8),
and fp16 tensor cores compute the same exact products (the bytes read are the same). One kernel
serves both regimes; the configuration (gemm_configs) decides how it runs:

- decode (M <= 64): one BLOCK_M tile covers M, and SPLIT_K > 1 splits K so that N tiles x
  splits fill the GPU, one program per (tile, split). Each split writes its float32 partial to a
  workspace [SPLIT_K, M, N]; ``splitk_reduce_kernel`` sums the partials in split order and
  applies the epilogue. No atomics, so results are bit-reproducible.
- prefill: SPLIT_K = 1, persistent programs (grid = number of SMs) walking the output tiles in
  GROUP_M-grouped order for L2 reuse, epilogue fused.

The tile walk, epilogue and split-K reduction are shared with int4_gemm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from .gemm_configs import DECODE_MAX_M, GemmConfig, get_config, gpu_of, num_sms
from .norm import fp8_as_codes, fp8_bits

# Epilogue scale modes (X_SCALE / W_SCALE): none, per-tensor (0-d), row-wise ([M] / [N]).
NO_SCALE, TENSOR_SCALE, ROW_SCALE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
NO_EPILOGUE = dict(x_scale_ptr=None, w_scale_ptr=None, bias_ptr=None, X_SCALE=NO_SCALE.value,
                   W_SCALE=NO_SCALE.value, HAS_BIAS=False)  # fmt: skip
_REDUCE_BLOCK = 1024  # outputs per program of the split-K reduction


@triton.jit
def tile_coords(t, tiles_m, tiles_n, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    """(pid_m, pid_n, split) of work item t; GROUP_M row tiles sweep the columns together (L2 reuse)."""
    tile = t // SPLIT_K
    width = GROUP_M * tiles_n
    first_m = (tile // width) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % width) % rows, (tile % width) // rows, t % SPLIT_K


@triton.jit
def epilogue(acc, m, n, M, N, out_ptr, x_scale_ptr, w_scale_ptr, bias_ptr,
             X_SCALE: tl.constexpr, W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """out[m, n] = acc * x_scale * w_scale (+ bias), in the reference's order; m, n broadcast to acc."""
    mask = (m < M) & (n < N)
    if X_SCALE == TENSOR_SCALE:
        acc = acc * tl.load(x_scale_ptr)
    elif X_SCALE == ROW_SCALE:
        acc = acc * tl.load(x_scale_ptr + m, mask=m < M, other=0.0)
    if W_SCALE == TENSOR_SCALE:
        acc = acc * tl.load(w_scale_ptr)
    elif W_SCALE == ROW_SCALE:
        acc = acc * tl.load(w_scale_ptr + n, mask=n < N, other=0.0)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * N + n, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def splitk_reduce_kernel(ws_ptr, out_ptr, M, N, x_scale_ptr, w_scale_ptr, bias_ptr,
                         X_SCALE: tl.constexpr,  # epilogue scale modes, as in `epilogue`
                         W_SCALE: tl.constexpr,
                         HAS_BIAS: tl.constexpr,  # add bias[N]
                         SPLIT_K: tl.constexpr,  # partials in the workspace ws_ptr [SPLIT_K, M, N] float32
                         BLOCK: tl.constexpr):  # flat outputs per program  # fmt: skip
    """out = epilogue(sum of the SPLIT_K partials, in split order); out [M, N] bf16/fp16."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < M * N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: bit-reproducible
        acc += tl.load(ws_ptr + s * M * N + offs, mask=valid, other=0.0)
    m = tl.where(valid, offs // N, M)  # out-of-range outputs get m = M: masked in the epilogue
    epilogue(acc, m, offs % N, M, N, out_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, X_SCALE, W_SCALE, HAS_BIAS)


def run_gemm(kernel, args: tuple, kwargs: dict, out: torch.Tensor, k: int, cfg: GemmConfig, epi: dict) -> torch.Tensor:
    """Launch `kernel`(*args, dst, M, N, K, **kwargs, <cfg>) into out [M, N], and with split-K the
    reduction (epilogue `epi`) of its float32 partials."""
    m, n = out.shape
    if m == 0 or n == 0:
        return out
    total = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n) * cfg.split_k
    dst = out if cfg.split_k == 1 else torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=out.device)
    programs = total if m <= DECODE_MAX_M else min(total, num_sms(out.device))  # prefill: persistent
    with backends.on_device(out):
        kernel[(programs,)](
            *args, dst, m, n, k, **kwargs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, SPLIT_K=cfg.split_k, EVEN_K=k % cfg.block_k == 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if cfg.split_k > 1:
            splitk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
                dst, out, m, n, **epi, SPLIT_K=cfg.split_k, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return out


@triton.jit
def e4m3_as_f16(code):
    """e4m3 codes (uint8) -> float16 holding the value x 2^-8, exactly (subnormals included): the sign,
    exponent and mantissa bits moved into fp16's fields (exponent biases 7 and 15)."""
    c = code.to(tl.uint16)
    return (((c & 0x80) << 8) | ((c & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, x_scale_ptr, w_scale_ptr, bias_ptr,
    X_SCALE: tl.constexpr,  # x_scale: TENSOR_SCALE (0-d) or ROW_SCALE ([M])
    W_SCALE: tl.constexpr,  # w_scale: TENSOR_SCALE (0-d) or ROW_SCALE ([N])
    HAS_BIAS: tl.constexpr,  # add bias [N] (float32, bf16 or fp16)
    BLOCK_M: tl.constexpr,  # output tile rows (>= 16 for tl.dot)
    BLOCK_N: tl.constexpr,  # output tile columns
    BLOCK_K: tl.constexpr,  # K step of the main loop
    GROUP_M: tl.constexpr,  # row tiles per L2 group in the tile walk
    SPLIT_K: tl.constexpr,  # > 1: write float32 partials to out_ptr = workspace [SPLIT_K, M, N], no epilogue
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask
    AS_F16: tl.constexpr,  # x and w are e4m3 codes (uint8), multiplied as float16 (GPUs without e4m3)
):  # fmt: skip
    """out [M, N] = epilogue(x [M, K] @ w [N, K].T), x and w e4m3 with rows of K contiguous."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    offs_k = tl.arange(0, BLOCK_K)
    for t in range(tl.program_id(0), tiles_m * tiles_n * SPLIT_K, tl.num_programs(0)):  # persistent
        pid_m, pid_n, split = tile_coords(t, tiles_m, tiles_n, GROUP_M, SPLIT_K)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows/columns past M/N wrap around, so loads need no mask; their outputs are not stored.
        rows = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
        cols = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
        k_lo = split * per_split
        k_hi = tl.minimum(k_lo + per_split, k_tiles)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + (k_lo * BLOCK_K + offs_k)[None, :]
        w_ptrs = w_ptr + cols[None, :].to(tl.int64) * K + (k_lo * BLOCK_K + offs_k)[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kt in range(k_lo, k_hi):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_left = K - kt * BLOCK_K
                x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if AS_F16:
                x, w = e4m3_as_f16(x), e4m3_as_f16(w)
            # Hopper's wgmma accumulates e4m3 products in reduced precision; promote them to the float32
            # accumulator every K step (as CUTLASS without fast accumulation and DeepGEMM do), so that
            # prefill tiles (wgmma) sum like decode tiles (mma) and the reference.
            acc = tl.dot(x, w, acc, max_num_imprecise_acc=BLOCK_K)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if AS_F16:
            acc = acc * 65536.0  # both operands were scaled by 2^-8
        if SPLIT_K == 1:
            epilogue(acc, offs_m[:, None], offs_n[None, :], M, N, out_ptr, x_scale_ptr, w_scale_ptr, bias_ptr,
                     X_SCALE, W_SCALE, HAS_BIAS)  # fmt: skip
        else:
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(out_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


def _scale_mode(scale: torch.Tensor) -> int:
    return (ROW_SCALE if scale.dim() else TENSOR_SCALE).value


def launch(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """The FP8 GEMM with an explicit configuration (default: gemm_configs.get_config); the benchmark's entry.

    xq [M, K], wq [N, K] float8_e4m3fn, contiguous, K % 16 == 0; x_scale float32 [M] or 0-d;
    w_scale float32 [N] or 0-d; bias [N] float or None. Returns y [M, N] in out_dtype (bf16/fp16).
    """
    m, k = xq.shape
    n = wq.shape[0]
    cfg = config or get_config("fp8_gemm", m, n, k, gpu_of(xq.device))
    epi = dict(x_scale_ptr=x_scale, w_scale_ptr=w_scale, bias_ptr=bias, HAS_BIAS=bias is not None,
               X_SCALE=_scale_mode(x_scale), W_SCALE=_scale_mode(w_scale))  # fmt: skip
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    as_f16 = fp8_as_codes(xq.device)
    if as_f16:
        xq, wq = fp8_bits(xq), fp8_bits(wq)
    return run_gemm(_fp8_gemm_kernel, (xq, wq), dict(epi, AS_F16=as_f16), out, k, cfg, epi)


@torch.library.custom_op("llama_kernels::fp8_gemm_triton", mutates_args=())
def fp8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Triton backend of ops.fp8_gemm (arguments validated there): y [M, N] in out_dtype."""
    return launch(xq, x_scale, wq, w_scale, out_dtype, bias)


@fp8_gemm.register_fake
def _(xq, x_scale, wq, w_scale, out_dtype, bias):
    return xq.new_empty(xq.shape[0], wq.shape[0], dtype=out_dtype)


backends.register(
    "fp8_gemm", "triton", fp8_gemm, min_capability=(8, 0),
    instead="the FP8 GEMM needs Ampere (sm_80) or newer; use int4_gemm or a bf16 linear",
)  # fmt: skip
