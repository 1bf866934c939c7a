"""Triton flash-style paged prefill attention: one launch for a packed chunk of new tokens of
several sequences, each attending causally to its whole paged KV cache.

``_prefill_kernel``, grid (query tiles, Hkv): one program takes one tile of ``TOKENS`` consecutive
new tokens of one sequence and one KV head, with all ``GROUP`` query heads of that KV head folded
into the rows of the tile (row r is token r // GROUP, head r % GROUP, as FlashInfer does), so each
K/V tile read serves the whole group and the dots have M = BLOCK_M rows for any group size. It
walks the sequence's cache in tiles of BLOCK_N tokens through the block table with an online
softmax in float32 (no [T, T] score matrix), and stops at the tile's last causal position:
tiles entirely before the tile's first position run without a mask, the few on the diagonal
with one.

Tiles never straddle two sequences. Which sequence and tile a program takes comes from a
tile -> sequence map built by a few torch ops on the device (cumulative tile counts and a
searchsorted), so a call needs no host sync: the grid is an upper bound on the number of tiles,
``(T + B * (TOKENS - 1)) // TOKENS``, and programs past the last tile return at once. Within a
sequence the last (longest) tiles are launched first, so the short ones fill the tail.

FP8 e4m3 caches are decoded with integer ops (the fp16 of value / 256, exact) rather than
Triton's float8 conversion, which exists only on sm_89+: the kernel runs on sm_80 too.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .. import backends
from .attention import HEAD_DIMS, LOG2E, _interpreted
from .norm import EMULATE_CASTS, round_to

FP8 = torch.float8_e4m3fn
_FP8_UNIT = tl.constexpr(256.0)  # _e4m3_as_f16 yields value / 256: the scales carry the factor back


@triton.jit
def _e4m3_as_f16(x):
    # e4m3 bits (uint8) -> fp16 holding value / 256, exactly: e4m3's exponent (bias 7) and mantissa
    # shifted into fp16's fields (bias 15) scale every value, subnormals included, by 2^-8.
    u = x.to(tl.uint16)
    return (((u & 0x7F) << 7) | ((u & 0x80) << 8)).to(tl.float16, bitcast=True)


@triton.jit
def _load_kv(ptr, offs, mask, dtype: tl.constexpr, IS_FP8: tl.constexpr):
    x = tl.load(ptr + offs, mask=mask, other=0)
    if IS_FP8:
        x = _e4m3_as_f16(x)
    return x.to(dtype)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, t0, pos, kv_end, b, kv_head, k_ptr, v_ptr, table_ptr, qk_scale, num_kv_heads,
                 max_blocks, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_FP8: tl.constexpr, CAUSAL_MASK: tl.constexpr):  # fmt: skip
    """One online-softmax step over cache tokens [t0, t0 + BLOCK_N) (those < kv_end)."""
    t = t0 + tl.arange(0, BLOCK_N)
    valid = t < kv_end
    block = tl.load(table_ptr + b * max_blocks + t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    rows = (block * BLOCK_SIZE + t % BLOCK_SIZE) * num_kv_heads + kv_head  # int64: caches may pass 2^31
    kv_offs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k = _load_kv(k_ptr, kv_offs, valid[:, None], q.dtype, IS_FP8)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
    if CAUSAL_MASK:
        s = tl.where(t[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = _load_kv(v_ptr, kv_offs, valid[:, None], q.dtype, IS_FP8)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D] bf16/fp16/fp32
    k_ptr,  # [num_blocks, block_size, Hkv, D]; uint8 (the e4m3 bits) when IS_FP8
    v_ptr,  # same shape and dtype as k
    table_ptr,  # [B, max_blocks] int32
    lens_ptr,  # [B] int32: seq_lens
    qlens_ptr,  # [B] int32: query_lens
    q_start_ptr,  # [B] int32: first row of each sequence in q (exclusive cumsum of query_lens)
    tile_start_ptr,  # [B] int32: first query tile of each sequence (exclusive cumsum of tiles)
    tile_seq_ptr,  # [max_tiles] int32: the sequence of each query tile, B past the last tile
    k_scale_ptr,  # [Hkv] float32 (read only when IS_FP8)
    v_scale_ptr,  # [Hkv] float32 (read only when IS_FP8)
    out_ptr,  # [T, Hq, D] in q's dtype
    qk_scale,  # softmax scale * log2(e): logits in base 2 (exp2 is one instruction)
    num_tokens,  # T
    num_seqs,  # B
    num_kv_heads,
    max_blocks,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,  # D: 64 or 128
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # rows per tile (query tokens x group heads), a power of two >= 16
    BLOCK_N: tl.constexpr,  # cache tokens per KV tile
    IS_FP8: tl.constexpr,  # e4m3 caches, dequantized by the per-head k_scale / v_scale
    DOT_F32: tl.constexpr,  # dots in float32: a cache of another 16-bit dtype, or bf16 under the interpreter
    EMULATE_CASTS: tl.constexpr,  # round the bf16 output to nearest even in integer ops (interpreter)
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per tile
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.load(tile_seq_ptr + tile)
    if b >= num_seqs:
        return
    seq_len = tl.load(lens_ptr + b)
    q_len = tl.load(qlens_ptr + b)
    q_first = tl.load(q_start_ptr + b)
    tiles = (q_len + TOKENS - 1) // TOKENS
    first = (tiles - 1 - (tile - tl.load(tile_start_ptr + b))) * TOKENS  # last tiles first
    last = tl.minimum(first + TOKENS, q_len) - 1  # the tile's last new token

    r = tl.arange(0, BLOCK_M)
    tok = tl.minimum(first + r // GROUP, last)  # padding rows repeat the last token: finite softmax
    row_ok = (r < TOKENS * GROUP) & (first + r // GROUP <= last) & (q_first + tok < num_tokens)
    pos = seq_len - q_len + tok  # absolute position of each row's token
    num_q_heads = num_kv_heads * GROUP
    q_rows = (q_first + tok).to(tl.int64) * num_q_heads + kv_head * GROUP + r % GROUP
    offs = q_rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    q = tl.load(q_ptr + offs, mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    if IS_FP8:  # one K scale per program: fold it (and the decode unit) into the logit scale
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head) * _FP8_UNIT

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    pos_first = seq_len - q_len + first
    kv_end = seq_len - q_len + last + 1  # no row sees a token at or past this
    full_end = (pos_first + 1) // BLOCK_N * BLOCK_N  # tiles before it are visible to every row
    for t0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, t0, pos, kv_end, b, kv_head, k_ptr, v_ptr, table_ptr,
                                     qk_scale, num_kv_heads, max_blocks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, IS_FP8,
                                     False)  # fmt: skip
    # The first masked tile holds token full_end <= every row's position, so m_i is finite after it.
    for t0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, t0, pos, kv_end, b, kv_head, k_ptr, v_ptr, table_ptr,
                                     qk_scale, num_kv_heads, max_blocks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, IS_FP8,
                                     True)  # fmt: skip

    acc = acc / l_i[:, None]
    if IS_FP8:
        acc = acc * (tl.load(v_scale_ptr + kv_head) * _FP8_UNIT)
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty, EMULATE_CASTS), mask=row_ok[:, None])


def tile_config(
    group: int, d: int, dtype: torch.dtype, fp8: bool, capability: tuple[int, int] | None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for dots in `dtype` over a cache that is FP8 or
    not, on a GPU of `capability` (None: the interpreter, which takes Hopper's). Rows are query
    tokens x group heads, at least the group.

    Chosen so that ptxas spills nothing with triton 3.6 and 3.9: 128 x 64 tiles on 8 warps with
    wgmma (sm_90); before Hopper D 128 fits only 64 x 32 tiles on 4 warps in two stages, 64 x 16
    with the FP8 decode; float32 (a test dtype) takes 64 rows, its ieee dots needing twice the
    registers.
    """
    if dtype == torch.float32:
        block_m, block_n, warps, stages = 64, 64, 4, 2
    elif capability is not None and capability < (9, 0) and d == 128:
        block_m, block_n, warps, stages = 64, 16 if fp8 else 32, 4, 2
    else:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    return max(block_m, triton.next_power_of_2(group)), block_n, warps, stages


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel launch; arguments as ``ops.paged_prefill_attention`` (which checks them), D 64 or 128.
    Returns out [T, Hq, D] in q's dtype."""
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"paged_prefill_attention: the triton kernel supports head_dim D in {HEAD_DIMS}, got D={d}")
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    group = hq // hkv
    is_fp8 = k_cache.dtype == FP8
    dot_f32 = (not is_fp8 and k_cache.dtype != q.dtype) or (q.dtype == torch.bfloat16 and _interpreted())
    capability = backends.device_capability(backends.device_index(q.device)) if q.is_cuda else None
    dot_dtype = torch.float32 if dot_f32 else q.dtype
    block_m, block_n, num_warps, num_stages = tile_config(group, d, dot_dtype, is_fp8, capability)
    tokens = block_m // group
    max_tiles = (t + batch * (tokens - 1)) // tokens  # sum of ceil(query_lens / tokens) is at most this
    if max_tiles == 0:
        return out
    # The tile -> sequence map, on the device (no host sync).
    tiles = (query_lens + tokens - 1) // tokens  # [B]
    tiles_end = torch.cumsum(tiles, 0, dtype=torch.int32)  # [B]
    tile_seq = torch.searchsorted(tiles_end, torch.arange(max_tiles, dtype=torch.int32, device=q.device),
                                  right=True).int()  # [max_tiles]  # fmt: skip
    q_start = torch.cumsum(query_lens, 0, dtype=torch.int32) - query_lens  # [B]
    k, v = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if is_fp8 else (k_cache, v_cache)
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _prefill_kernel[(max_tiles, hkv)](
            q, k, v, block_table, seq_lens, query_lens, q_start, tiles_end - tiles, tile_seq,
            k_scale if is_fp8 else out, v_scale if is_fp8 else out,  # placeholders, never read
            out, sm_scale * LOG2E, t, batch, hkv, block_table.shape[1],
            GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, IS_FP8=is_fp8,
            DOT_F32=dot_f32, EMULATE_CASTS=EMULATE_CASTS, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return out


@torch.library.custom_op("llama_kernels::paged_prefill_attention_triton", mutates_args=())
def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return paged_prefill_attention_triton(q, k_cache, v_cache, block_table, seq_lens, query_lens, scale, k_scale,
                                          v_scale)  # fmt: skip


@paged_prefill_attention.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, query_lens, scale=None, k_scale=None, v_scale=None):
    return torch.empty_like(q)


backends.register("paged_prefill_attention", "triton", paged_prefill_attention)
