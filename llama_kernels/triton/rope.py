"""Triton rotary embedding of q and k fused with the paged KV-cache write of k_rot and v.

One program per token handles all its heads, a tile of heads at a time: it gathers the token's
cos/sin row once, rotates every q and k head in float32, writes q_rot and k_rot, and stores
k_rot and v at the token's cache slot (skipped for a negative slot). A head is handled as two
halves of D/2 elements, the two members of each rotary pair: (i, i + D/2), or (2i, 2i + 1)
when interleaved; v is copied through the same two halves. Any even D up to MAX_HEAD_DIM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from .norm import EMULATE_CASTS, FP8, fp8_bits, fp8_ptx, round_to, saturate_fp8

MAX_HEAD_DIM = 512  # largest D tiled here (real models use up to 256)
TILE = 1024  # elements per half-head tile: BLOCK_H * BLOCK_HALF
NUM_WARPS = 4


def config(n_heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_HALF) for n_heads heads of head_dim, as dispatch launches them."""
    block_half = triton.next_power_of_2(head_dim // 2)
    return min(triton.next_power_of_2(n_heads), max(1, TILE // block_half)), block_half


@triton.jit
def _store_cache(CACHE, offs, mask, x, FP8_CACHE: tl.constexpr, EMULATE_CASTS: tl.constexpr,
                 FP8_PTX: tl.constexpr):  # fmt: skip
    # A float32 half-head tile (already divided by the scale for FP8) in the cache's dtype (e4m3 codes
    # through a uint8 view for FP8).
    if FP8_CACHE:
        tl.store(CACHE + offs, saturate_fp8(x, FP8_PTX), mask=mask)
    else:
        tl.store(CACHE + offs, round_to(x, CACHE.dtype.element_ty, EMULATE_CASTS), mask=mask)


@triton.jit
def _rope_and_cache_kernel(
    Q, K, V, POS, COS, SIN, K_CACHE, V_CACHE, SLOTS, K_SCALE, V_SCALE, Q_OUT, K_OUT,
    HQ, HKV, D, HALF,
    INTERLEAVED: tl.constexpr, FP8_CACHE: tl.constexpr, EMULATE_CASTS: tl.constexpr, FP8_PTX: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    c = tl.load(COS + pos * HALF + cols, mask=col_mask, other=0.0)[None, :]
    s = tl.load(SIN + pos * HALF + cols, mask=col_mask, other=0.0)[None, :]
    if INTERLEAVED:
        first, second = 2 * cols[None, :], 2 * cols[None, :] + 1
    else:
        first, second = cols[None, :], cols[None, :] + HALF

    for h0 in range(0, HQ, BLOCK_HQ):
        h = h0 + tl.arange(0, BLOCK_HQ)[:, None]
        mask = (h < HQ) & col_mask[None, :]
        row = (t * HQ + h) * D
        x1 = tl.load(Q + row + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(Q + row + second, mask=mask, other=0.0).to(tl.float32)
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        tl.store(Q_OUT + row + first, round_to(o1, Q_OUT.dtype.element_ty, EMULATE_CASTS), mask=mask)
        tl.store(Q_OUT + row + second, round_to(o2, Q_OUT.dtype.element_ty, EMULATE_CASTS), mask=mask)

    for h0 in range(0, HKV, BLOCK_HKV):
        h = h0 + tl.arange(0, BLOCK_HKV)[:, None]
        mask = (h < HKV) & col_mask[None, :]
        row = (t * HKV + h) * D
        x1 = tl.load(K + row + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(K + row + second, mask=mask, other=0.0).to(tl.float32)
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        tl.store(K_OUT + row + first, round_to(o1, K_OUT.dtype.element_ty, EMULATE_CASTS), mask=mask)
        tl.store(K_OUT + row + second, round_to(o2, K_OUT.dtype.element_ty, EMULATE_CASTS), mask=mask)
        if slot >= 0:
            cache_row = (slot * HKV + h) * D
            v1 = tl.load(V + row + first, mask=mask, other=0.0).to(tl.float32)
            v2 = tl.load(V + row + second, mask=mask, other=0.0).to(tl.float32)
            if FP8_CACHE:
                k_scale = tl.load(K_SCALE + h, mask=h < HKV, other=1.0)
                v_scale = tl.load(V_SCALE + h, mask=h < HKV, other=1.0)
                o1, o2, v1, v2 = o1 / k_scale, o2 / k_scale, v1 / v_scale, v2 / v_scale
            _store_cache(K_CACHE, cache_row + first, mask, o1, FP8_CACHE, EMULATE_CASTS, FP8_PTX)
            _store_cache(K_CACHE, cache_row + second, mask, o2, FP8_CACHE, EMULATE_CASTS, FP8_PTX)
            _store_cache(V_CACHE, cache_row + first, mask, v1, FP8_CACHE, EMULATE_CASTS, FP8_PTX)
            _store_cache(V_CACHE, cache_row + second, mask, v2, FP8_CACHE, EMULATE_CASTS, FP8_PTX)


@torch.library.custom_op("llama_kernels::rope_and_cache_triton", mutates_args=("k_cache", "v_cache"))
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
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by the cos/sin [P, D/2] float32 rows at positions [T];
    write k_rot and v [T, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D] at
    slot_mapping [T] (negative = skip); FP8 caches store x / k_scale|v_scale [Hkv], saturated.
    Any even D up to MAX_HEAD_DIM. Returns (q_rot, k_rot) in q's dtype, freshly allocated.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"rope_and_cache: the triton kernel supports head_dim D <= {MAX_HEAD_DIM}; got D={d}")
    fp8_cache = k_cache.dtype == FP8
    if fp8_cache:  # written as e4m3 codes, on every GPU from sm_80
        k_cache, v_cache = fp8_bits(k_cache), fp8_bits(v_cache)
    q_rot, k_rot = torch.empty_like(q), torch.empty_like(k)
    if t:
        block_hq, block_half = config(hq, d)
        block_hkv, _ = config(hkv, d)
        with backends.on_device(q):
            _rope_and_cache_kernel[(t,)](
                q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                cos if k_scale is None else k_scale, cos if v_scale is None else v_scale,  # placeholders: unread
                q_rot, k_rot, hq, hkv, d, d // 2,
                INTERLEAVED=interleaved, FP8_CACHE=fp8_cache, EMULATE_CASTS=EMULATE_CASTS, FP8_PTX=fp8_ptx(q.device),
                BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half, num_warps=NUM_WARPS,
            )  # fmt: skip
    return q_rot, k_rot


@rope_and_cache.register_fake
def _(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None, interleaved=False):
    return torch.empty_like(q), torch.empty_like(k)


backends.register("rope_and_cache", "triton", rope_and_cache)
