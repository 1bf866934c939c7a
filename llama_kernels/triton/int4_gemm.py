"""Triton weight-only INT4 GEMM: the triton backend of ops.int4_gemm.

y = x @ W.T with W[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k // group_size, x bf16/fp16.
Each K step loads the packed words qweight[n, k/8] once ([BLOCK_N, BLOCK_K/8] int32), expands
their 8 nibbles in registers, applies the group's zero point and scale in float32 (as the
reference does), rounds W to x's dtype and feeds tl.dot (fp32 accumulation). A word's 8 values
always share one group (group_size is a multiple of 8, or K), so scales and zeros are read per word.

Regimes and the deterministic split-K reduction are those of fp8_gemm (same tile walk and
reduction kernel); gemm_configs holds the configurations.

perm (GPTQ act-order): x's columns are gathered (x.index_select(1, perm)) before the kernel: one
extra read and write of x [M, K], small next to the weight for decode and next to the M*N*K
work for prefill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from ..int4 import Int4Weight
from .fp8_gemm import NO_EPILOGUE, NO_SCALE, epilogue, run_gemm, tile_coords
from .gemm_configs import GemmConfig, get_config, gpu_of


@triton.jit
def _int4_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K,
    GROUP_SIZE: tl.constexpr,  # K values per scale/zero group (K itself when per-channel)
    HAS_ZEROS: tl.constexpr,  # zeros uint8 [N, K // GROUP_SIZE]; else symmetric (zero point 8)
    BLOCK_M: tl.constexpr,  # output tile rows (>= 16 for tl.dot)
    BLOCK_N: tl.constexpr,  # output tile columns
    BLOCK_K: tl.constexpr,  # K step of the main loop (a multiple of 16)
    GROUP_M: tl.constexpr,  # row tiles per L2 group in the tile walk
    SPLIT_K: tl.constexpr,  # > 1: write float32 partials to out_ptr = workspace [SPLIT_K, M, N]
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask
    DOT_F32: tl.constexpr,  # upcast the dot operands: the CPU interpreter's tl.dot misreads bf16 (raw bits)
):  # fmt: skip
    """out [M, N] = x [M, K] @ dequantize(qweight [N, K/8], scales, zeros).T, in x's dtype."""
    KW: tl.constexpr = BLOCK_K // 8  # packed words per row and K step
    words_per_row = K // 8
    groups_per_row = K // GROUP_SIZE
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, KW)
    shifts = tl.arange(0, 8) * 4
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
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kt in range(k_lo, k_hi):
            word = kt * KW + offs_w  # [KW] word index along the row
            if GROUP_SIZE % BLOCK_K == 0:  # the K step lies in one group (and EVEN_K holds): one per column
                group = (cols * groups_per_row + kt * BLOCK_K // GROUP_SIZE)[:, None]  # [BLOCK_N, 1]
            else:
                group = cols[:, None] * groups_per_row + (word * 8 // GROUP_SIZE)[None, :]  # [BLOCK_N, KW]
            w_ptrs = qweight_ptr + cols[:, None] * words_per_row + word[None, :]
            if EVEN_K:
                x = tl.load(x_ptrs)
                packed = tl.load(w_ptrs)
                s = tl.load(scales_ptr + group)
                z = tl.load(zeros_ptr + group) if HAS_ZEROS else 8
            else:  # masked words give q = 0 and s = 0, so w = 0
                in_k = word[None, :] < words_per_row
                x = tl.load(x_ptrs, mask=offs_k[None, :] < K - kt * BLOCK_K, other=0.0)
                packed = tl.load(w_ptrs, mask=in_k, other=0)
                s = tl.load(scales_ptr + group, mask=in_k, other=0.0)
                z = tl.load(zeros_ptr + group, mask=in_k, other=0) if HAS_ZEROS else 8
            if HAS_ZEROS:
                z = z.to(tl.int32)[:, :, None]
            q = (packed[:, :, None] >> shifts[None, None, :]) & 15  # [BLOCK_N, KW, 8]; nibble i is k = 8 word + i
            w = ((q - z).to(tl.float32) * s.to(tl.float32)[:, :, None]).to(x.dtype)  # (q - z) * s, as the reference
            w = tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)))  # [BLOCK_K, BLOCK_N]
            if DOT_F32:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
        if SPLIT_K == 1:
            epilogue(acc, offs_m[:, None], offs_n[None, :], M, N, out_ptr, None, None, None, NO_SCALE, NO_SCALE, False)
        else:
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(out_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    perm: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """The INT4 GEMM with an explicit configuration (default: gemm_configs.get_config); the benchmark's entry.

    x [M, K] bf16/fp16; qweight int32 [N, K // 8]; scales fp16/bf16/fp32 [N, K // group_size];
    zeros uint8 [N, K // group_size] or None (symmetric); perm int64 [K] or None.
    Returns y = x[:, perm] @ W.T [M, N] in x's dtype.
    """
    m, k = x.shape
    n = qweight.shape[0]
    if perm is not None:
        x = x.index_select(1, perm)
    cfg = config or get_config("int4_gemm", m, n, k, gpu_of(x.device))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (x, qweight.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous())
    meta = dict(GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None,
                DOT_F32=x.device.type == "cpu" and x.dtype == torch.bfloat16)  # fmt: skip
    return run_gemm(_int4_gemm_kernel, args, meta, out, k, cfg, NO_EPILOGUE)


@torch.library.custom_op("llama_kernels::int4_gemm_triton", mutates_args=())
def _int4_gemm_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    perm: torch.Tensor | None,
) -> torch.Tensor:
    return launch(x, qweight, scales, zeros, group_size, perm)


@_int4_gemm_op.register_fake
def _(x, qweight, scales, zeros, group_size, perm):
    return x.new_empty(x.shape[0], qweight.shape[0])


def int4_gemm(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """Triton backend of ops.int4_gemm (validated there): x [M, K] bf16/fp16, w [N, K] -> y [M, N] in x's dtype."""
    return _int4_gemm_op(x, w.qweight, w.scales, w.zeros, w.group_size, w.perm)


backends.register("int4_gemm", "triton", int4_gemm)
