"""cuda backend of ops.fp8_gemm: the mma.sync e4m3 kernel of csrc/fp8_gemm.h (sm_89 and newer).

Decode-oriented configs 0-2: the weight is streamed once with 16-byte loads, K is split across
SMs with a deterministic float32 reduction, and scales / bias are applied in the epilogue; tiled
over M they serve any M. On Hopper (compute capability 9.0, sm_90a build) M > 64 goes to config 3,
the wgmma + TMA kernel of csrc/fp8_gemm_sm90.cu (persistent, warp-specialized, no split-K), once
its 128 x 128 tiles are at least as many as the SMs (below that, split-K config 2 fills the GPU).
Configuration per call: gemm_configs.choose. Below sm_89 the backend refuses with the capability.
"""

from __future__ import annotations

import functools

import torch

from .. import backends
from .common import DTYPE_CODE, NoKernelError, check_aligned, ext, ptr, stream
from .gemm_configs import SM90_CONFIG, Choice, check_fp8_shape, choose, default_choice

FP8 = torch.float8_e4m3fn


def plan(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
    capability: tuple[int, int] = (9, 0),
    sms: int = 132,
) -> Choice:
    """Every check the kernel needs beyond ops.fp8_gemm's, then the configuration; raises
    NoKernelError (a ValueError) for an unsupported shape or alignment. Needs no GPU."""
    m, k = xq.shape
    n = wq.shape[0]
    check_fp8_shape(m, n, k)
    if out_dtype not in (torch.float16, torch.bfloat16):
        raise NoKernelError(f"fp8_gemm: out_dtype={out_dtype}; the cuda kernel writes float16 or bfloat16")
    check_aligned("fp8_gemm", 16, xq=xq, wq=wq)
    check_aligned("fp8_gemm", 4, x_scale=x_scale, w_scale=w_scale)
    if bias is not None:
        check_aligned("fp8_gemm", bias.element_size(), bias=bias)
    return choose("fp8_gemm", capability, m, n, k, sms)


@functools.cache
def sm90_unavailable(index: int) -> str | None:
    """None when the sm_90a wgmma kernel (config 3) can run on CUDA device `index`, else why not:
    the extension checks the device and that the code loaded for it is the real sm_90a kernel (not
    the trapping stub of a build without 90a); asked once per device, before any launch."""
    with torch.cuda.device(index):
        return ext().fp8_gemm_sm90_unavailable()


def launch(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    choice: Choice | None = None,
) -> torch.Tensor:
    """The kernel with an explicit (config, split_k) (default: the dispatch table); the benchmark's entry."""
    dev = xq.device
    index = backends.device_index(dev)
    sms = backends.sm_count(index)
    planned = plan(xq, x_scale, wq, w_scale, out_dtype, bias, backends.device_capability(index), sms)
    m, k = xq.shape
    n = wq.shape[0]
    if (choice or planned).config == SM90_CONFIG:
        why = sm90_unavailable(index)
        if why is not None and choice is not None:
            raise NoKernelError(f"fp8_gemm: {why}")
        if why is not None:  # e.g. a build whose sm_90a code did not load here: the mma.sync path
            planned = default_choice("fp8_gemm", m, n, k, sms)
    choice = choice or planned
    y = torch.empty(m, n, dtype=out_dtype, device=dev)
    ws = torch.empty(choice.split_k, m, n, dtype=torch.float32, device=dev) if choice.split_k > 1 else None
    ext().fp8_gemm(
        ptr(xq), ptr(x_scale), x_scale.dim() == 1, ptr(wq), ptr(w_scale), w_scale.dim() == 1,
        ptr(bias), -1 if bias is None else DTYPE_CODE[bias.dtype], ptr(y), DTYPE_CODE[out_dtype], ptr(ws),
        m, n, k, choice.config, choice.split_k, stream(xq),
    )  # fmt: skip
    return y


@torch.library.custom_op("llama_kernels::fp8_gemm_cuda", mutates_args=(), device_types="cuda")
def fp8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """cuda backend of ops.fp8_gemm (arguments validated there): y [M, N] in out_dtype."""
    return launch(xq, x_scale, wq, w_scale, out_dtype, bias)


@fp8_gemm.register_fake
def _(xq, x_scale, wq, w_scale, out_dtype, bias):
    return xq.new_empty(xq.shape[0], wq.shape[0], dtype=out_dtype)


backends.register(
    "fp8_gemm", "cuda", fp8_gemm, min_capability=(8, 9), instead="use int4_gemm or a bf16 linear",
)  # fmt: skip

__all__ = ["fp8_gemm", "launch", "plan", "NoKernelError"]
