"""cuda backend: rotary embedding of q and k fused with the paged KV-cache write, around
csrc/rope_cache.h (one block per token, all heads, 16-byte accesses)."""

from __future__ import annotations

import torch

from .. import backends
from .common import DTYPE_CODE, NoKernelError, check_aligned, ext, ptr, stream

FP8 = torch.float8_e4m3fn
DTYPES = (torch.bfloat16, torch.float16)  # q / k / v (and a non-FP8 cache)
HEAD_DIMS = (64, 128)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    """What only the cuda kernel needs beyond ``ops.rope_and_cache``'s checks; raises NoKernelError
    (a ValueError) before anything is launched (runs on shapes, dtypes and addresses only)."""
    op = "rope_and_cache"
    if q.dtype not in DTYPES:
        raise NoKernelError(f"{op}: the cuda kernel supports q/k/v dtype bfloat16 or float16, got {q.dtype}; "
                            "use backend='triton'")  # fmt: skip
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise NoKernelError(f"{op}: the cuda kernel supports head_dim D in {HEAD_DIMS}, got D={d}; use backend='triton'")
    if k_cache.dtype not in (q.dtype, FP8):
        raise NoKernelError(f"{op}: the cuda kernel needs a {q.dtype} or float8_e4m3fn cache, got {k_cache.dtype}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.dtype not in INDEX_DTYPES:
            raise NoKernelError(f"{op}: argument '{name}' must be int32 or int64 for the cuda kernel, got {t.dtype}")
    if q.shape[0] >= 2**31:
        raise NoKernelError(f"{op}: the cuda kernel takes fewer than 2^31 tokens, got {q.shape[0]}")
    check_aligned(op, q=q, k=k, v=v, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache)


@torch.library.custom_op(
    "llama_kernels::rope_and_cache_cuda", mutates_args=("k_cache", "v_cache"), device_types="cuda"
)
def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    t, hq, d = q.shape
    if t == 0:
        return q_out, k_out
    fp8 = k_cache.dtype == FP8
    ext().rope_and_cache(
        ptr(q), ptr(k), ptr(v), ptr(positions), positions.dtype == torch.int64, ptr(cos), ptr(sin),
        ptr(k_cache), ptr(v_cache), ptr(slot_mapping), slot_mapping.dtype == torch.int64,
        ptr(k_scale) if fp8 else 0, ptr(v_scale) if fp8 else 0, ptr(q_out), ptr(k_out),
        t, hq, k.shape[1], d, DTYPE_CODE[q.dtype], fp8, interleaved, stream(q),
    )  # fmt: skip
    return q_out, k_out


@rope_and_cache.register_fake
def _(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None, interleaved=False):
    return torch.empty_like(q), torch.empty_like(k)


backends.register("rope_and_cache", "cuda", rope_and_cache)
