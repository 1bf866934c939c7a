"""Triton RMSNorm (plain, fused residual add, fused FP8 output) and row-wise FP8 quantization.

One program per row. A row of up to MAX_BLOCK elements is held in registers: one read of x
(and residual), one write of each output. Longer rows loop over CHUNK-element chunks and read
their inputs again for each later pass (statistics, then amax for FP8, then the output).
Statistics are float32; residual_out is rounded to the input dtype before them, and the FP8
outputs quantize the float32 normalized row, as ``llama_kernels.reference`` documents.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import backends
from ..reference import FP8_MAX, FP8_MIN_SCALE

FP8 = torch.float8_e4m3fn
MAX_BLOCK = 16384  # longest row kept in registers (Llama 3 405B's hidden size)
CHUNK = 4096  # chunk size of the looping path for longer rows
FP8_PTX_NEEDS = (8, 9)  # cvt.rn.satfinite.e4m3x2.f32 exists from sm_89; sm_80 rounds in integer arithmetic
_FP8_MAX = tl.constexpr(FP8_MAX)  # jit functions read globals only as constexprs
_FP8_MIN_SCALE = tl.constexpr(FP8_MIN_SCALE)
# The Triton interpreter truncates float32 -> bfloat16 and rounds float32 -> float8e4nv half-up
# with a broken carry; under it the kernels round to nearest even themselves (as the GPU does).
EMULATE_CASTS = os.environ.get("TRITON_INTERPRET") == "1"


def fp8_ptx(device: torch.device) -> bool:
    """Whether kernels on `device` convert float32 to e4m3 with cvt.rn.satfinite.e4m3x2.f32 (sm_89+),
    else in integer arithmetic (sm_80, the interpreter). Never with Triton's own float8e4nv cast:
    Triton 3.6 lowers it on sm_89 as cvt.rz.f16.f32 then f16 -> e4m3, rounding twice."""
    if device.type != "cuda" or EMULATE_CASTS:
        return False
    return backends.device_capability(backends.device_index(device)) >= FP8_PTX_NEEDS


def fp8_as_codes(device: torch.device) -> bool:
    """Whether kernels on `device` read e4m3 tensors as uint8 codes and decode them in integer
    arithmetic: on GPUs without an e4m3 type (sm_80), where Triton refuses to compile float8e4nv."""
    return device.type == "cuda" and not fp8_ptx(device)


def fp8_bits(t: torch.Tensor) -> torch.Tensor:
    """A float8_e4m3fn tensor as the uint8 codes the kernels read and write (no fp8 type reaches
    Triton, so the kernels also build for sm_80, which has none)."""
    return t.view(torch.uint8)


def config(n: int) -> tuple[int, int, int]:
    """(BLOCK, NUM_CHUNKS, num_warps) for rows of n elements, as dispatch launches them."""
    block = triton.next_power_of_2(n)
    if block > MAX_BLOCK:
        return CHUNK, triton.cdiv(n, CHUNK), 8
    return block, 1, min(max(block // 512, 4), 32)  # 16 elements a thread (8 below 2048)


@triton.jit
def _bf16_rne(x):
    # float32 -> bfloat16 rounded to nearest even in integer arithmetic (for the interpreter).
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e4m3_rne(y):
    # float32 in [-448, 448] -> e4m3 code (uint8) rounded to nearest even in integer arithmetic.
    bits = y.to(tl.uint32, bitcast=True)
    a = tl.abs(y)
    abits = a.to(tl.uint32, bitcast=True)
    abits += 0x7FFFF + ((abits >> 20) & 1)  # round the mantissa to 3 bits
    normal = (abits >> 20) - (120 << 3)  # rebias the exponent from 127 to 7
    subnormal = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)  # multiples of 2^-9, rounded to even
    code = tl.where(a < 0.015625, subnormal, normal) | ((bits >> 31) << 7)
    return code.to(tl.uint8)


@triton.jit
def _e4m3_ptx(y):
    # float32 -> e4m3 code (uint8), one rounding to nearest even, saturating; four values per asm
    # (cvt packs two codes into 16 bits: the first source operand goes to the upper byte).
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 lo, hi;
        cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
        cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
        mov.b32 $0, {lo, hi};
        }""",
        "=r,r,r,r,r",
        [y],
        dtype=tl.uint8,
        is_pure=True,
        pack=4,
    )


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_CASTS: tl.constexpr):
    """float32 x -> dtype, rounded to nearest even also under the interpreter."""
    if EMULATE_CASTS and dtype == tl.bfloat16:
        return _bf16_rne(x)
    return x.to(dtype)


@triton.jit
def saturate_fp8(y, FP8_PTX: tl.constexpr):
    """float32 y -> e4m3 code (uint8, stored through a uint8 view: fp8_bits), clamped to +-448 first so
    that out-of-range values saturate (never NaN), rounded once to nearest even on every GPU and
    Triton version (see fp8_ptx)."""
    y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
    if FP8_PTX:
        return _e4m3_ptx(y)
    return _e4m3_rne(y)


@triton.jit
def _residual_out(X, R, RES_OUT, offs, mask, HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
                  EMULATE_CASTS: tl.constexpr):  # fmt: skip
    # x + residual rounded to the input dtype (the reference's order), returned as float32.
    r = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = r.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        r = round_to(r, X.dtype.element_ty, EMULATE_CASTS)
    if STORE_RESIDUAL:
        tl.store(RES_OUT + offs, r, mask=mask)
    return r.to(tl.float32)


@triton.jit
def _fp8_scale(amax, scale_ub, HAS_UB: tl.constexpr):
    # max(min(amax, scale_ub), FP8_MIN_SCALE) / 448, as reference._fp8_row_scale.
    if HAS_UB:
        amax = tl.minimum(amax, scale_ub)
    return tl.maximum(amax, _FP8_MIN_SCALE) / _FP8_MAX


@triton.jit
def _rms_norm_kernel(
    X, R, W, Y, RES_OUT, Y_SCALE, N, eps, scale_ub,
    HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, HAS_UB: tl.constexpr,
    BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, EMULATE_CASTS: tl.constexpr, FP8_PTX: tl.constexpr,
):  # fmt: skip
    # Y: y in x's dtype, or e4m3 codes (uint8) when FP8_OUT.
    row = tl.program_id(0)
    start = row.to(tl.int64) * N
    X += start
    R += start
    Y += start
    RES_OUT += start
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < N
        r = _residual_out(X, R, RES_OUT, cols, mask, HAS_RESIDUAL, STORE_RESIDUAL, EMULATE_CASTS)
        inv = tl.rsqrt(tl.sum(r * r, axis=0) / N + eps)
        y = r * inv * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if FP8_OUT:
            scale = _fp8_scale(tl.max(tl.abs(y), axis=0), scale_ub, HAS_UB)
            tl.store(Y_SCALE + row, scale)
            tl.store(Y + cols, saturate_fp8(y / scale, FP8_PTX), mask=mask)
        else:
            tl.store(Y + cols, round_to(y, Y.dtype.element_ty, EMULATE_CASTS), mask=mask)
    else:
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            r = _residual_out(X, R, RES_OUT, offs, offs < N, HAS_RESIDUAL, STORE_RESIDUAL, EMULATE_CASTS)
            sq += r * r
        inv = tl.rsqrt(tl.sum(sq, axis=0) / N + eps)
        if FP8_OUT:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                offs = c * BLOCK + cols
                mask = offs < N
                r = _residual_out(X, R, RES_OUT, offs, mask, HAS_RESIDUAL, False, EMULATE_CASTS)
                amax = tl.maximum(amax, tl.abs(r * inv * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)))
            scale = _fp8_scale(tl.max(amax, axis=0), scale_ub, HAS_UB)
            tl.store(Y_SCALE + row, scale)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < N
            r = _residual_out(X, R, RES_OUT, offs, mask, HAS_RESIDUAL, False, EMULATE_CASTS)
            y = r * inv * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            if FP8_OUT:
                tl.store(Y + offs, saturate_fp8(y / scale, FP8_PTX), mask=mask)
            else:
                tl.store(Y + offs, round_to(y, Y.dtype.element_ty, EMULATE_CASTS), mask=mask)


@triton.jit
def _quantize_fp8_kernel(
    X, XQ, SCALE, N, scale_ub,
    HAS_UB: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, FP8_PTX: tl.constexpr,
):
    # XQ: e4m3 codes (uint8)
    row = tl.program_id(0)
    start = row.to(tl.int64) * N
    X += start
    XQ += start
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        scale = _fp8_scale(tl.max(tl.abs(x), axis=0), scale_ub, HAS_UB)
        tl.store(XQ + cols, saturate_fp8(x / scale, FP8_PTX), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            amax = tl.maximum(amax, tl.abs(tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)))
        scale = _fp8_scale(tl.max(amax, axis=0), scale_ub, HAS_UB)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < N
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(XQ + offs, saturate_fp8(x / scale, FP8_PTX), mask=mask)
    tl.store(SCALE + row, scale)


def _launch_norm(x, residual, weight, eps, y, residual_out=None, y_scale=None, scale_ub=None) -> None:
    """Run _rms_norm_kernel on x [M, N]; unused pointer arguments get x as a placeholder."""
    rows, n = x.shape
    if rows == 0:
        return
    block, chunks, warps = config(n)
    with backends.on_device(x):
        _rms_norm_kernel[(rows,)](
            x, x if residual is None else residual, weight, y if y_scale is None else fp8_bits(y),
            x if residual_out is None else residual_out, x if y_scale is None else y_scale,
            n, eps, 0.0 if scale_ub is None else scale_ub,
            HAS_RESIDUAL=residual is not None, STORE_RESIDUAL=residual_out is not None,
            FP8_OUT=y_scale is not None, HAS_UB=scale_ub is not None, BLOCK=block, NUM_CHUNKS=chunks,
            EMULATE_CASTS=EMULATE_CASTS, FP8_PTX=fp8_ptx(x.device), num_warps=warps,
        )  # fmt: skip


@torch.library.custom_op("llama_kernels::rms_norm_triton", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight. x [M, H] bf16/fp16/fp32, weight [H]; y [M, H] in x's dtype."""
    y = torch.empty_like(x)
    _launch_norm(x, None, weight, eps, y)
    return y


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("llama_kernels::add_rms_norm_triton", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [M, H] (residual may be None), weight [H], one dtype -> (y, residual_out), [M, H] each."""
    y, residual_out = torch.empty_like(x), torch.empty_like(x)
    _launch_norm(x, residual, weight, eps, y, residual_out)
    return y, residual_out


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("llama_kernels::add_rms_norm_fp8_triton", mutates_args=())
def add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [M, H] (residual may be None), weight [H] ->
    (yq [M, H] float8_e4m3fn, y_scale [M] float32, residual_out [M, H] in x's dtype)."""
    yq = torch.empty(x.shape, dtype=FP8, device=x.device)
    y_scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    residual_out = torch.empty_like(x)
    _launch_norm(x, residual, weight, eps, yq, residual_out, y_scale, scale_ub)
    return yq, y_scale, residual_out


@add_rms_norm_fp8.register_fake
def _(x, residual, weight, eps, scale_ub=None):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], dtype=torch.float32), torch.empty_like(x)


@torch.library.custom_op("llama_kernels::quantize_fp8_triton", mutates_args=())
def quantize_fp8(x: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16/fp32 -> (xq [M, K] float8_e4m3fn, scale [M] float32), row-wise dynamic scales."""
    rows, n = x.shape
    xq = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block, chunks, warps = config(n)
        with backends.on_device(x):
            _quantize_fp8_kernel[(rows,)](
                x, fp8_bits(xq), scale, n, 0.0 if scale_ub is None else scale_ub, HAS_UB=scale_ub is not None,
                BLOCK=block, NUM_CHUNKS=chunks, FP8_PTX=fp8_ptx(x.device), num_warps=warps,
            )  # fmt: skip
    return xq, scale


@quantize_fp8.register_fake
def _(x, scale_ub=None):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], dtype=torch.float32)


backends.register("rms_norm", "triton", rms_norm)
backends.register("add_rms_norm", "triton", add_rms_norm)
backends.register("add_rms_norm_fp8", "triton", add_rms_norm_fp8)
backends.register("quantize_fp8", "triton", quantize_fp8)
