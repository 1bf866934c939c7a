"""cuda backend: split-KV (flash-decoding) GQA decode attention over the paged KV cache, around
csrc/decode_attention.h.

The number of splits comes from ``_C.decode_attention_num_splits`` (batch, KV heads, the length
bound ``max_blocks * block_size`` and the SM count: never the values of seq_lens, so a call needs
no host sync and can be captured in a CUDA graph); the kernel divides each sequence's live length
seq_lens[b] (read on the device, clamped to the table's capacity) among those splits, so a short
sequence in a long-context table still uses every split. The float32 workspace for the partial
outputs and their log-sum-exp is allocated here, and only when there is more than one split.
"""

from __future__ import annotations

import math

import torch

from .. import backends
from .common import DTYPE_CODE, NoKernelError, check_aligned, ext, ptr, stream

FP8 = torch.float8_e4m3fn
DTYPES = (torch.bfloat16, torch.float16)  # q / out (and a non-FP8 cache)
HEAD_DIMS = (64, 128)  # csrc DISPATCH_HEAD_DIM
BLOCK_SIZES = (16, 32, 64)  # tokens per cache block
MAX_GROUP = 16  # csrc DISPATCH_GROUP_SIZE: query heads per KV head, 1..16
MAX_GRID_DIM = 65535  # batch and KV heads are grid dimensions z and y


def check_decode_attention(q, k_cache, v_cache, block_table, seq_lens) -> None:
    """What only the cuda kernel needs beyond ``ops.decode_attention``'s checks; raises NoKernelError
    (a ValueError) before anything is launched (runs on shapes, dtypes and addresses only)."""
    op = "decode_attention"
    if q.dtype not in DTYPES:
        raise NoKernelError(f"{op}: the cuda kernel supports q dtype bfloat16 or float16, got {q.dtype}; "
                            "use backend='triton'")  # fmt: skip
    if k_cache.dtype not in (q.dtype, FP8):
        raise NoKernelError(f"{op}: the cuda kernel needs a {q.dtype} (q's dtype) or float8_e4m3fn cache, "
                            f"got {k_cache.dtype}; use backend='triton'")  # fmt: skip
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if d not in HEAD_DIMS:
        raise NoKernelError(f"{op}: the cuda kernel supports head_dim D in {HEAD_DIMS}, got D={d}; use backend='triton'")
    if block_size not in BLOCK_SIZES:
        raise NoKernelError(f"{op}: the cuda kernel supports block_size in {BLOCK_SIZES}, got block_size={block_size}; "
                            "use backend='triton'")  # fmt: skip
    group = hq // hkv
    if not 1 <= group <= MAX_GROUP:
        raise NoKernelError(f"{op}: the cuda kernel supports group sizes Hq / Hkv in 1..{MAX_GROUP}, got "
                            f"{hq} / {hkv} = {group}; use backend='triton'")  # fmt: skip
    if b > MAX_GRID_DIM or hkv > MAX_GRID_DIM:
        raise NoKernelError(f"{op}: the cuda kernel supports batch and Hkv up to {MAX_GRID_DIM}, got {b} and {hkv}")
    if block_table.shape[1] * block_size >= 2**31 - 2**24:
        raise NoKernelError(f"{op}: the cuda kernel needs max_blocks * block_size < 2^31")
    check_aligned(op, q=q, k_cache=k_cache, v_cache=v_cache)


def num_splits(batch: int, kv_heads: int, max_len: int, num_sms: int) -> int:
    """Splits per (sequence, KV head) for these shapes (the C++ policy, csrc/decode_attention.h)."""
    return ext().decode_attention_num_splits(batch, kv_heads, max_len, num_sms)


@torch.library.custom_op("llama_kernels::decode_attention_cuda", mutates_args=(), device_types="cuda")
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    check_decode_attention(q, k_cache, v_cache, block_table, seq_lens)
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    if b == 0:
        return out
    max_blocks = block_table.shape[1]
    C = ext()
    sms = backends.sm_count(backends.device_index(q.device))
    splits = C.decode_attention_num_splits(b, hkv, max_blocks * block_size, sms)
    part = lse = None
    if splits > 1:
        part = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    fp8 = k_cache.dtype == FP8
    C.decode_attention(
        ptr(q), ptr(k_cache), ptr(v_cache), ptr(block_table), ptr(seq_lens),
        ptr(k_scale) if fp8 else 0, ptr(v_scale) if fp8 else 0, ptr(out), ptr(part), ptr(lse),
        b, hq, hkv, d, block_size, max_blocks, splits, 1.0 / math.sqrt(d) if scale is None else scale,
        DTYPE_CODE[q.dtype], fp8, stream(q),
    )  # fmt: skip
    return out


@decode_attention.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale=None, k_scale=None, v_scale=None):
    return torch.empty_like(q)


backends.register("decode_attention", "cuda", decode_attention, min_capability=(8, 0),
                  instead="cp.async, ldmatrix and bf16 mma.sync need sm_80; use backend='triton'")
