"""Shared plumbing of the cuda backend: the extension, raw pointers, streams, alignment checks.

Each op of the backend allocates its outputs, checks what only the kernel cares about (16-byte
alignment, sizes), and passes raw pointers, shapes and the current stream to ``_C``. The ops are
torch.library custom ops, so torch.compile and CUDA graphs treat each as a single op; they are
registered whether or not ``_C`` was built, and calling one without it raises the build's reason.
"""

from __future__ import annotations

import torch

from .. import backends
from ..backends import NoKernelError  # noqa: F401  (the backend's "no kernel for this shape" error)

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc's DType enum
ALIGN = 16  # bytes: the kernels use 16-byte vector loads and stores


def ext():
    """llama_kernels._C, or BackendUnavailableError with the reason it is missing."""
    module, reason = backends.cuda_extension()
    if module is None:
        raise backends.BackendUnavailableError(reason)
    return module


def ptr(t: torch.Tensor | None) -> int:
    """Device address of a tensor, 0 for an absent one (the kernels' convention)."""
    return 0 if t is None else t.data_ptr()


def check_aligned(op: str, align: int = ALIGN, **tensors: torch.Tensor | None) -> None:
    """Raise NoKernelError naming the first tensor whose data pointer is not `align`-byte aligned
    (absent tensors and meta tensors, which have no address, pass)."""
    for name, t in tensors.items():
        if t is None or t.device.type == "meta":
            continue
        if t.data_ptr() % align:
            raise NoKernelError(
                f"{op}: argument '{name}' has data pointer {t.data_ptr():#x}, not {align}-byte aligned; "
                "the cuda kernel needs aligned rows (pass a fresh or .clone()d tensor)"
            )


def stream(t: torch.Tensor) -> int:
    """The caller's current stream on t's device, as the int the kernels take."""
    return torch.cuda.current_stream(t.device).cuda_stream
