"""cuda backend: fused add + RMSNorm (+FP8 output) around csrc/add_rms_norm.h."""

from __future__ import annotations

import torch

from .. import backends
from .common import DTYPE_CODE, NoKernelError, check_aligned, ext, ptr, stream

_MAX_NORM_HIDDEN = {torch.float32: 16384, torch.float16: 32768, torch.bfloat16: 32768}  # csrc/add_rms_norm.h


def _check_norm(op: str, x, residual, weight) -> None:
    hidden, limit = x.shape[-1], _MAX_NORM_HIDDEN[x.dtype]
    if hidden % 8:
        raise NoKernelError(f"{op}: hidden={hidden} must be a multiple of 8 (the cuda kernel reads 16-byte vectors)")
    if hidden > limit:
        raise NoKernelError(f"{op}: hidden={hidden} is above the cuda kernel's limit of {limit} for {x.dtype}; "
                            "use backend='triton'")  # fmt: skip
    check_aligned(op, x=x, residual=residual, weight=weight)


@torch.library.custom_op("llama_kernels::rms_norm_cuda", mutates_args=(), device_types="cuda")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm("rms_norm", x, None, weight)
    y = torch.empty_like(x)
    rows, hidden = x.shape
    ext().add_rms_norm(ptr(x), 0, ptr(weight), ptr(y), 0, rows, hidden, eps, DTYPE_CODE[x.dtype], stream(x))
    return y


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("llama_kernels::add_rms_norm_cuda", mutates_args=(), device_types="cuda")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm("add_rms_norm", x, residual, weight)
    y, residual_out = torch.empty_like(x), torch.empty_like(x)
    rows, hidden = x.shape
    ext().add_rms_norm(
        ptr(x), ptr(residual), ptr(weight), ptr(y), ptr(residual_out),
        rows, hidden, eps, DTYPE_CODE[x.dtype], stream(x),
    )  # fmt: skip
    return y, residual_out


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("llama_kernels::add_rms_norm_fp8_cuda", mutates_args=(), device_types="cuda")
def add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_norm("add_rms_norm_fp8", x, residual, weight)
    rows, hidden = x.shape
    yq = torch.empty(rows, hidden, dtype=torch.float8_e4m3fn, device=x.device)
    y_scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    residual_out = torch.empty_like(x)
    ext().add_rms_norm_fp8(
        ptr(x), ptr(residual), ptr(weight), ptr(yq), ptr(y_scale), ptr(residual_out),
        rows, hidden, eps, -1.0 if scale_ub is None else scale_ub, DTYPE_CODE[x.dtype], stream(x),
    )  # fmt: skip
    return yq, y_scale, residual_out


@add_rms_norm_fp8.register_fake
def _(x, residual, weight, eps, scale_ub=None):
    rows, hidden = x.shape
    return (
        x.new_empty(rows, hidden, dtype=torch.float8_e4m3fn),
        x.new_empty(rows, dtype=torch.float32),
        torch.empty_like(x),
    )


backends.register("rms_norm", "cuda", rms_norm)
backends.register("add_rms_norm", "cuda", add_rms_norm)
backends.register("add_rms_norm_fp8", "cuda", add_rms_norm_fp8)
