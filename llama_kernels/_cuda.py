"""The cuda backend: torch.library custom ops around the kernels in ``llama_kernels._C``.

Each op allocates its outputs, checks what only the kernel cares about (16-byte alignment,
sizes), and passes raw pointers, shapes and the current stream to ``_C``. Registering them as
custom ops lets torch.compile and CUDA graphs treat each as a single op. The ops are
registered whether or not ``_C`` was built; calling one without it raises the build's reason.
"""

from __future__ import annotations

import torch

from . import backends
from ._validate import multiple_of

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ALIGN = 16  # bytes: the kernels use 16-byte vector loads and stores
_MAX_NORM_HIDDEN = {torch.float32: 16384, torch.float16: 32768, torch.bfloat16: 32768}  # csrc/add_rms_norm.h


def _ext():
    ext, reason = backends.cuda_extension()
    if ext is None:
        raise backends.BackendUnavailableError(reason)
    return ext


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check_aligned(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.data_ptr() % _ALIGN:
            raise ValueError(
                f"{op}: argument '{name}' has data pointer {t.data_ptr():#x}, not {_ALIGN}-byte aligned; "
                "the cuda kernel needs aligned rows (pass a fresh or .clone()d tensor)"
            )


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _check_norm(op: str, x, residual, weight) -> None:
    hidden, limit = x.shape[-1], _MAX_NORM_HIDDEN[x.dtype]
    multiple_of(op, "hidden", hidden, 8, "the cuda kernel reads 16-byte vectors")
    if hidden > limit:
        raise ValueError(f"{op}: hidden={hidden} is above the cuda kernel's limit of {limit} for {x.dtype}; "
                         "use backend='triton'")  # fmt: skip
    _check_aligned(op, x=x, residual=residual, weight=weight)


@torch.library.custom_op("llama_kernels::rms_norm_cuda", mutates_args=(), device_types="cuda")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm("rms_norm", x, None, weight)
    y = torch.empty_like(x)
    rows, hidden = x.shape
    _ext().add_rms_norm(_ptr(x), 0, _ptr(weight), _ptr(y), 0, rows, hidden, eps, _DTYPE_CODE[x.dtype], _stream(x))
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
    _ext().add_rms_norm(
        _ptr(x), _ptr(residual), _ptr(weight), _ptr(y), _ptr(residual_out),
        rows, hidden, eps, _DTYPE_CODE[x.dtype], _stream(x),
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
    _ext().add_rms_norm_fp8(
        _ptr(x), _ptr(residual), _ptr(weight), _ptr(yq), _ptr(y_scale), _ptr(residual_out),
        rows, hidden, eps, -1.0 if scale_ub is None else scale_ub, _DTYPE_CODE[x.dtype], _stream(x),
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
