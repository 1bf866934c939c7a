"""Triton flash-style paged attention of one forward pass's new tokens: prefill chunks and decode
rows of several sequences in one launch (plus one merge launch), each token attending causally to
its sequence's paged KV cache, following the step's work plan (``attention_plan``).

``_item_kernel``, grid (max_items * Hkv,): one program takes one work item of the plan (a query
tile of one sequence over one KV chunk) and one KV head; program p runs item p // Hkv, so the
launch order is the plan's, longest item first, across all heads. All ``GROUP`` query heads of
the KV head are folded into the rows of the tile (row r is token r // GROUP, head r % GROUP, as
FlashInfer does), so each K/V tile read serves the whole group and the dots have M rows for any
group size: ``BLOCK_M`` rows for prefill tiles, ``SMALL_M`` (the group padded to a power of two
>= 16) for tiles of a few tokens, decode rows among them, which so do not pay for 128 rows. It
walks the item's KV range in tiles of BLOCK_N tokens through the block table with an online
softmax in float32: tiles entirely before the tile's first position run without a mask, the few
on the diagonal with one. An item that is its tile's only chunk writes ``out``; the chunks of a
split tile write a partial output and its log2-sum-exp2 to a workspace, and ``_merge_kernel``,
grid (max_merges * Hkv * BLOCK_M / MERGE_M,), combines them into ``out``, MERGE_M rows per program.

The grids depend only on shapes and the SM count (the plan's bounds), never on the values in
seq_lens and query_lens: a call needs no host sync; slots past the plan's items return at once.

FP8 e4m3 caches are decoded with integer ops (the fp16 of value / 256, exact) rather than
Triton's float8 conversion, which exists only on sm_89+: the kernel runs on sm_80 too. The decoded
tiles feed mma.sync from registers (sm_80/89, and decode-row tiles on sm_90); Hopper's prefill tiles
store them to shared memory, wgmma's B operand (FP8_TRANSPOSED: the variant that avoids it, off).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import backends
from ..attention_workspace import HOPPER_TILE_ROWS, programs, tile_rows, workspace_shapes
from . import attention_plan
from .attention import HEAD_DIMS, LOG2E, MIN_SPLIT_TOKENS, _interpreted, _sm_count
from .attention_plan import AttentionPlan
from .norm import EMULATE_CASTS, round_to

FP8 = torch.float8_e4m3fn
_FP8_UNIT = tl.constexpr(256.0)  # _e4m3_as_f16 yields value / 256: the scales carry the factor back
ITEM_FIELDS = tl.constexpr(attention_plan.ITEM_FIELDS)
# Prefill tiles over an e4m3 cache in transposed space on sm_90 (S^T = K Q^T, O^T += V^T P^T: the decoded K
# and V^T are wgmma's register A operands, so they never go to shared memory; see _attend_tile_t). Off: in
# the compiled loop (triton 3.6 and 3.9) the round trip it removes (8 16-byte shared stores per thread per
# 64 KV tokens) comes back as more: P^T through shared memory, V^T gathered byte by byte from the cp.async
# stage (96 shared loads), softmax reductions across the warps that split the KV axis (108-192 shuffles,
# shared exchanges, 8-19 barriers): 2.2-2.5x the PTX per query row x key of today's loop. Turn on only after
# a GPU timing shows it faster. sm_89 (and sm_90's decode-row tiles, mma.sync) already feed the decoded
# tiles to the dots from registers.
FP8_TRANSPOSED = False
TRANSPOSED_ROWS = 64  # rows of a transposed prefill tile: the query axis is wgmma's N (128 rows spill)
MERGE_M = 32  # rows per merge program: its [rows, D] float32 accumulator and partial fit in registers


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
def _field(fields, i: tl.constexpr):
    # Element i of a small vector (an item's fields, loaded at once) as a scalar.
    return tl.sum(tl.where(tl.arange(0, fields.shape[0]) == i, fields, 0), 0)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, t0, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr, qk_scale, num_kv_heads,
                 max_blocks, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_FP8: tl.constexpr, CAUSAL_MASK: tl.constexpr):  # fmt: skip
    """One online-softmax step over cache tokens [t0, t0 + BLOCK_N) (those < kv_hi)."""
    t = t0 + tl.arange(0, BLOCK_N)
    valid = t < kv_hi
    block = tl.load(table_ptr + b * max_blocks + t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    rows = (block * BLOCK_SIZE + t % BLOCK_SIZE) * num_kv_heads + kv_head  # int64: caches may pass 2^31
    kv_offs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k = _load_kv(k_ptr, kv_offs, valid[:, None], q.dtype, IS_FP8)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [M, BLOCK_N], base-2 logits
    if CAUSAL_MASK:
        s = tl.where((t[None, :] <= pos[:, None]) & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet: no -inf - -inf
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    v = _load_kv(v_ptr, kv_offs, valid[:, None], q.dtype, IS_FP8)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_tile_t(q_t, acc_t, m_i, l_i, t0, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr, qk_scale, num_kv_heads,
                   max_blocks, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL_MASK: tl.constexpr):  # fmt: skip
    """_attend_tile in transposed space, for e4m3 caches under wgmma: S^T = K Q^T and O^T += V^T P^T, so
    the decoded K and V^T are the dots' A operands, taken from registers (B, Q^T and P^T, must be in
    shared memory: the decoded tiles then never go there). q_t [D, M], acc_t [D, M]."""
    t = t0 + tl.arange(0, BLOCK_N)
    valid = t < kv_hi
    block = tl.load(table_ptr + b * max_blocks + t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    rows = (block * BLOCK_SIZE + t % BLOCK_SIZE) * num_kv_heads + kv_head
    d = tl.arange(0, HEAD_DIM)
    k = _load_kv(k_ptr, rows[:, None] * HEAD_DIM + d[None, :], valid[:, None], q_t.dtype, True)  # [N, D]
    s = tl.dot(k, q_t, input_precision="ieee") * qk_scale  # [N, M]: S^T, base-2 logits
    if CAUSAL_MASK:
        s = tl.where((t[:, None] <= pos[None, :]) & valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[None, :])  # [N, M]: P^T
    v_t = _load_kv(v_ptr, d[:, None] + rows[None, :] * HEAD_DIM, valid[None, :], q_t.dtype, True)  # [D, N]
    acc_t = acc_t * alpha[None, :] + tl.dot(v_t, p.to(q_t.dtype), input_precision="ieee")
    return acc_t, m_new, l_i * alpha + tl.sum(p, 0)


@triton.jit
def _attend_range(q, acc, m_i, l_i, lo, hi, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr, qk_scale, num_kv_heads,
                  max_blocks, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_FP8: tl.constexpr, CAUSAL_MASK: tl.constexpr, TRANSPOSED: tl.constexpr,
                  INTERPRETED: tl.constexpr):  # fmt: skip
    """The online softmax over the KV tiles starting at lo, lo + BLOCK_N, ... below hi."""
    if INTERPRETED:  # while loops: Triton 3.6's interpreter cannot take a loaded scalar as a range() bound
        t0 = lo  # (int() of a 1-element array, refused by numpy >= 2.4); compiled, range() pipelines
        while t0 < hi:
            acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, t0, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr,
                                         qk_scale, num_kv_heads, max_blocks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, IS_FP8,
                                         CAUSAL_MASK, TRANSPOSED)  # fmt: skip
            t0 += BLOCK_N
    else:
        for t0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_step(q, acc, m_i, l_i, t0, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr,
                                         qk_scale, num_kv_heads, max_blocks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, IS_FP8,
                                         CAUSAL_MASK, TRANSPOSED)  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _attend_step(q, acc, m_i, l_i, t0, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr, qk_scale, num_kv_heads,
                 max_blocks, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_FP8: tl.constexpr, CAUSAL_MASK: tl.constexpr, TRANSPOSED: tl.constexpr):  # fmt: skip
    if TRANSPOSED:
        return _attend_tile_t(q, acc, m_i, l_i, t0, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr, qk_scale,
                              num_kv_heads, max_blocks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CAUSAL_MASK)  # fmt: skip
    else:
        return _attend_tile(q, acc, m_i, l_i, t0, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr, qk_scale,
                            num_kv_heads, max_blocks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, IS_FP8, CAUSAL_MASK)  # fmt: skip


@triton.jit
def _attend_item(q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, part_ptr, lse_ptr, qk_scale, v_mul, b, row0, ntok, pos0,
                 kv_lo, kv_hi, slot, kv_head, num_tokens, num_kv_heads, max_blocks, GROUP: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, M: tl.constexpr, PART_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, IS_FP8: tl.constexpr, DOT_F32: tl.constexpr, TRANSPOSED: tl.constexpr,
                 EMULATE_CASTS: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    """One work item with M rows (>= ntok * GROUP): out rows, or its partial in slot `slot`."""
    r = tl.arange(0, M)
    tok = tl.minimum(r // GROUP, ntok - 1)  # padding rows repeat the last token: finite softmax
    row_ok = (r < M // GROUP * GROUP) & (r // GROUP < ntok) & (row0 + tok < num_tokens)
    pos = pos0 + tok  # absolute position of each row's token
    q_rows = (row0 + tok).to(tl.int64) * (num_kv_heads * GROUP) + kv_head * GROUP + r % GROUP
    d = tl.arange(0, HEAD_DIM)
    offs = q_rows[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + offs, mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    full_end = tl.minimum((pos0 + 1) // BLOCK_N * BLOCK_N, kv_hi)  # tiles before it: visible to every row
    mask_from = tl.maximum(kv_lo, full_end)
    if TRANSPOSED:
        q = tl.trans(q)  # [D, M]
        acc = tl.zeros([HEAD_DIM, M], tl.float32)
    else:
        acc = tl.zeros([M, HEAD_DIM], tl.float32)
    acc, m_i, l_i = _attend_range(q, acc, m_i, l_i, kv_lo, full_end, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr,
                                  qk_scale, num_kv_heads, max_blocks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, IS_FP8, False,
                                  TRANSPOSED, INTERPRETED)  # fmt: skip
    acc, m_i, l_i = _attend_range(q, acc, m_i, l_i, mask_from, kv_hi, pos, kv_hi, b, kv_head, k_ptr, v_ptr, table_ptr,
                                  qk_scale, num_kv_heads, max_blocks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, IS_FP8, True,
                                  TRANSPOSED, INTERPRETED)  # fmt: skip
    if TRANSPOSED:
        acc = tl.trans(acc)

    # The first chunk holds token 0, seen by every row: there l_i > 0. A later chunk may start past a
    # row's position: l_i = 0, lse = -inf, and the merge gives it no weight.
    acc = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0) * v_mul
    if slot < 0:
        tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty, EMULATE_CASTS), mask=row_ok[:, None])
    else:
        part_row = (slot * num_kv_heads + kv_head) * PART_M + r
        tl.store(part_ptr + part_row[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(lse_ptr + part_row, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _item_kernel(
    q_ptr,  # [T, Hq, D] bf16/fp16/fp32
    k_ptr,  # [num_blocks, block_size, Hkv, D]; uint8 (the e4m3 bits) when IS_FP8
    v_ptr,  # same shape and dtype as k
    table_ptr,  # [B, max_blocks] int32
    items_ptr,  # [max_items, ITEM_FIELDS] int32: AttentionPlan.items
    k_scale_ptr,  # [Hkv] float32 (read only when IS_FP8)
    v_scale_ptr,  # [Hkv] float32 (read only when IS_FP8)
    out_ptr,  # [T, Hq, D] in q's dtype
    part_ptr,  # [max_slots, Hkv, BLOCK_M, D] float32: partial outputs of split tiles
    lse_ptr,  # [max_slots, Hkv, BLOCK_M] float32: their log2-sum-exp2
    qk_scale,  # softmax scale * log2(e): logits in base 2 (exp2 is one instruction)
    num_tokens,  # T
    num_kv_heads,
    max_blocks,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,  # D: 64 or 128
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # rows per prefill tile (query tokens x group heads), a power of two >= 16
    SMALL_M: tl.constexpr,  # rows for tiles of at most SMALL_M // GROUP tokens (decode rows): <= BLOCK_M
    BLOCK_N: tl.constexpr,  # cache tokens per KV tile
    IS_FP8: tl.constexpr,  # e4m3 caches, dequantized by the per-head k_scale / v_scale
    DOT_F32: tl.constexpr,  # dots in float32: a cache of another 16-bit dtype, or bf16 under the interpreter
    TRANSPOSED: tl.constexpr,  # BLOCK_M tiles in transposed space (_attend_tile_t): e4m3 caches under wgmma
    EMULATE_CASTS: tl.constexpr,  # round the bf16 output to nearest even in integer ops (interpreter)
    INTERPRETED: tl.constexpr,  # under the interpreter: loops bounded by loaded values run as while loops
):
    item = tl.program_id(0) // num_kv_heads
    kv_head = tl.program_id(0) % num_kv_heads
    fields = tl.load(items_ptr + item * ITEM_FIELDS + tl.arange(0, ITEM_FIELDS))  # one 32-byte load
    b = _field(fields, 0)
    if b < 0:  # past the plan's items
        return
    row0 = _field(fields, 1)
    ntok = _field(fields, 2)
    pos0 = _field(fields, 3)
    kv_lo = _field(fields, 4)
    kv_hi = _field(fields, 5)
    slot = _field(fields, 6)
    v_mul = 1.0
    if IS_FP8:  # one scale per program: K's (and the decode unit) folded into the logit scale, V's into the output
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head) * _FP8_UNIT
        v_mul = tl.load(v_scale_ptr + kv_head) * _FP8_UNIT
    # Tiles of a few tokens (decode rows) take SMALL_M rows: M = BLOCK_M would multiply their dots' work.
    if SMALL_M < BLOCK_M and ntok * GROUP <= SMALL_M:
        _attend_item(q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, part_ptr, lse_ptr, qk_scale, v_mul, b, row0, ntok,
                     pos0, kv_lo, kv_hi, slot, kv_head, num_tokens, num_kv_heads, max_blocks, GROUP, HEAD_DIM,
                     BLOCK_SIZE, SMALL_M, BLOCK_M, BLOCK_N, IS_FP8, DOT_F32, False, EMULATE_CASTS,
                     INTERPRETED)  # fmt: skip
    else:
        _attend_item(q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, part_ptr, lse_ptr, qk_scale, v_mul, b, row0, ntok,
                     pos0, kv_lo, kv_hi, slot, kv_head, num_tokens, num_kv_heads, max_blocks, GROUP, HEAD_DIM,
                     BLOCK_SIZE, BLOCK_M, BLOCK_M, BLOCK_N, IS_FP8, DOT_F32, TRANSPOSED, EMULATE_CASTS,
                     INTERPRETED)  # fmt: skip


@triton.jit
def _merge_slot(acc, l_sum, m, slot, part_ptr, lse_ptr, kv_head, num_kv_heads, r, d, row_ok, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr):  # fmt: skip
    """Fold the partial output in `slot` into the running (acc, l_sum, m), weighted by its log2-sum-exp2."""
    part_row = (slot * num_kv_heads + kv_head) * BLOCK_M + r
    lse = tl.load(lse_ptr + part_row, mask=row_ok, other=float("-inf"))
    m_new = tl.maximum(m, lse)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing yet: no -inf - -inf
    alpha = tl.exp2(m - m_ref)
    w = tl.exp2(lse - m_ref)
    part = tl.load(part_ptr + part_row[:, None] * HEAD_DIM + d[None, :], mask=(w > 0)[:, None], other=0.0)
    return acc * alpha[:, None] + w[:, None] * part, l_sum * alpha + w, m_new


@triton.jit
def _merge_kernel(
    merges_ptr,  # [max_merges, 4] int32: AttentionPlan.merges
    part_ptr,  # [max_slots, Hkv, BLOCK_M, D] float32
    lse_ptr,  # [max_slots, Hkv, BLOCK_M] float32
    out_ptr,  # [T, Hq, D] in q's dtype
    num_tokens,
    num_kv_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of a tile (the workspace's)
    MERGE_M: tl.constexpr,  # rows per program: BLOCK_M // MERGE_M programs per tile and head
    EMULATE_CASTS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    row_blocks: tl.constexpr = BLOCK_M // MERGE_M
    merge = pid // (num_kv_heads * row_blocks)
    kv_head = pid // row_blocks % num_kv_heads
    fields = tl.load(merges_ptr + merge * 4 + tl.arange(0, 4))
    slots = _field(fields, 3)
    ntok = _field(fields, 1)
    if slots > 0 and (pid % row_blocks) * MERGE_M < ntok * GROUP:
        row0 = _field(fields, 0)
        slot0 = _field(fields, 2)
        r = (pid % row_blocks) * MERGE_M + tl.arange(0, MERGE_M)  # rows of the tile
        d = tl.arange(0, HEAD_DIM)
        tok = tl.minimum(r // GROUP, ntok - 1)
        row_ok = (r < BLOCK_M // GROUP * GROUP) & (r // GROUP < ntok) & (row0 + tok < num_tokens)
        m = tl.full([MERGE_M], float("-inf"), tl.float32)
        l_sum = tl.zeros([MERGE_M], tl.float32)
        acc = tl.zeros([MERGE_M, HEAD_DIM], tl.float32)
        if INTERPRETED:  # see _attend_item
            s = slot0
            while s < slot0 + slots:
                acc, l_sum, m = _merge_slot(acc, l_sum, m, s, part_ptr, lse_ptr, kv_head, num_kv_heads, r, d, row_ok,
                                            HEAD_DIM, BLOCK_M)  # fmt: skip
                s += 1
        else:
            for s in range(slot0, slot0 + slots):
                acc, l_sum, m = _merge_slot(acc, l_sum, m, s, part_ptr, lse_ptr, kv_head, num_kv_heads, r, d, row_ok,
                                            HEAD_DIM, BLOCK_M)  # fmt: skip
        q_rows = (row0 + tok).to(tl.int64) * (num_kv_heads * GROUP) + kv_head * GROUP + r % GROUP
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + d[None, :], round_to(out, out_ptr.dtype.element_ty,
                 EMULATE_CASTS), mask=row_ok[:, None])  # fmt: skip


class TileConfig(NamedTuple):
    """How one call's kernels are instantiated (see tile_config)."""

    block_m: int  # rows of a prefill tile (query tokens x group heads)
    small_m: int  # rows of a tile of a few tokens (decode rows): the group padded to a power of two >= 16
    block_n: int  # cache tokens per KV tile
    num_warps: int
    num_stages: int
    dot_f32: bool  # the dots run in float32
    transposed: bool  # prefill tiles in transposed space (_attend_tile_t): see FP8_TRANSPOSED


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
        block_m, block_n, warps, stages = HOPPER_TILE_ROWS, 64, 8, 3
    return tile_rows(block_m, group), block_n, warps, stages


def small_rows(group: int, block_m: int) -> int:
    """Rows of a tile of a few tokens: the group padded to a power of two >= 16 (tl.dot's smallest M)."""
    return min(block_m, max(16, triton.next_power_of_2(group)))


def call_config(q_dtype: torch.dtype, group: int, d: int, cache_dtype: torch.dtype,
                capability: tuple[int, int] | None) -> TileConfig:  # fmt: skip
    """The TileConfig of a call with q of q_dtype over a cache of cache_dtype on a GPU of capability
    (None: the interpreter)."""
    is_fp8 = cache_dtype == FP8
    dot_f32 = (not is_fp8 and cache_dtype != q_dtype) or (q_dtype == torch.bfloat16 and capability is None)
    if (FP8_TRANSPOSED and is_fp8 and q_dtype != torch.float32 and group <= TRANSPOSED_ROWS
            and (capability is None or capability >= (9, 0))):  # fmt: skip
        # 64 x 128 tiles on 8 warps, two stages: no spills with triton 3.6 and 3.9 (128-row tiles spill)
        return TileConfig(TRANSPOSED_ROWS, small_rows(group, TRANSPOSED_ROWS), 128, 8, 2, dot_f32, True)
    block_m, block_n, warps, stages = tile_config(group, d, torch.float32 if dot_f32 else q_dtype, is_fp8, capability)
    return TileConfig(block_m, small_rows(group, block_m), block_n, warps, stages, dot_f32, False)


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type == "cuda" and not _interpreted():
        return backends.device_capability(backends.device_index(device))
    return None


def make_plan(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    num_sms: int | None = None,
    min_chunk: int = MIN_SPLIT_TOKENS,
) -> AttentionPlan:
    """The work plan (attention_plan.build_plan) of a call of paged_prefill_attention with these
    arguments: query tiles of this kernel's configuration, KV chunks of at least min_chunk tokens
    (rounded to whole KV tiles), spread over two waves of num_sms SMs (None: the device's; CPU_SMS
    under the interpreter) shared by the KV heads."""
    hkv = k_cache.shape[2]
    cfg = call_config(q.dtype, q.shape[1] // hkv, q.shape[2], k_cache.dtype, _capability(q.device))
    num_programs = programs(num_sms or _sm_count(q.device), hkv)
    return attention_plan.build_plan(seq_lens, query_lens, q.shape[0], block_table.shape[1] * k_cache.shape[1],
                                     cfg.block_m // (q.shape[1] // hkv), cfg.block_n, num_programs,
                                     triton.cdiv(min_chunk, cfg.block_n) * cfg.block_n)  # fmt: skip


class Balance(NamedTuple):
    """How a step's plan spreads over a GPU's SMs (see balance); work in KV tokens."""

    work: list[int]  # KV tokens of each program, in launch order (items x KV heads, longest first)
    num_sms: int
    largest: int  # the longest program
    mean: float  # total work / num_sms: each SM's share of a perfect spread
    makespan: int  # most work one SM gets when each takes the next program as it finishes one

    @property
    def ratio(self) -> float:
        """largest / mean: at most 1 only when no program is longer than an SM's share."""
        return self.largest / self.mean


def balance(
    seq_lens: list[int],
    query_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    num_sms: int,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    cache_dtype: torch.dtype = torch.bfloat16,
    capability: tuple[int, int] = (9, 0),
    block_size: int = 16,
    min_chunk: int = MIN_SPLIT_TOKENS,
) -> Balance:
    """The work per program of the plan this kernel makes for a step of these shapes on a GPU of
    num_sms SMs and this capability: a CPU computation (the plan is built on CPU tensors)."""
    group = num_q_heads // num_kv_heads
    cfg = call_config(dtype, group, head_dim, cache_dtype, capability)
    capacity = triton.cdiv(max(seq_lens), block_size) * block_size
    plan = attention_plan.build_plan(
        torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(query_lens, dtype=torch.int32), sum(query_lens),
        capacity, cfg.block_m // group, cfg.block_n, programs(num_sms, num_kv_heads),
        triton.cdiv(min_chunk, cfg.block_n) * cfg.block_n,
    )  # fmt: skip
    live = plan.items[:, attention_plan.SEQ] >= 0
    per_item = (plan.items[live, attention_plan.KV_HI] - plan.items[live, attention_plan.KV_LO]).tolist()
    work = [w for w in per_item for _ in range(num_kv_heads)]
    sms = [0] * num_sms  # greedy list scheduling: the next program to the SM that frees first
    for w in work:
        sms[sms.index(min(sms))] += w
    return Balance(work, num_sms, max(work), sum(work) / num_sms, max(sms))


def run_plan(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    items: torch.Tensor,
    merges: torch.Tensor,
    max_slots: int,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The two launches executing a plan (its items, merges and max_slots, made by make_plan for
    these shapes); other arguments as ``ops.paged_prefill_attention``. Returns out [T, Hq, D]."""
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    group = hq // hkv
    cfg = call_config(q.dtype, group, d, k_cache.dtype, _capability(q.device))
    out = torch.empty_like(q)
    if t == 0:
        return out
    is_fp8 = k_cache.dtype == FP8
    k, v = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if is_fp8 else (k_cache, v_cache)
    part, lse = (torch.empty(shape, dtype=torch.float32, device=q.device)
                 for shape in workspace_shapes(max_slots, hkv, cfg.block_m, d))  # fmt: skip
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale
    with backends.on_device(q):
        _item_kernel[(items.shape[0] * hkv,)](
            q, k, v, block_table, items, k_scale if is_fp8 else out, v_scale if is_fp8 else out,  # placeholders
            out, part, lse, sm_scale * LOG2E, t, hkv, block_table.shape[1],
            GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, SMALL_M=cfg.small_m,
            BLOCK_N=cfg.block_n, IS_FP8=is_fp8, DOT_F32=cfg.dot_f32, TRANSPOSED=cfg.transposed,
            EMULATE_CASTS=EMULATE_CASTS,
            INTERPRETED=_interpreted(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        _merge_kernel[(merges.shape[0] * hkv * (cfg.block_m // MERGE_M),)](
            merges, part, lse, out, t, hkv, GROUP=group, HEAD_DIM=d, BLOCK_M=cfg.block_m, MERGE_M=MERGE_M,
            EMULATE_CASTS=EMULATE_CASTS, INTERPRETED=_interpreted(), num_warps=4,
        )  # fmt: skip
    return out


@torch.library.custom_op("llama_kernels::paged_attention_plan_triton", mutates_args=())
def planned_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    items: torch.Tensor,
    merges: torch.Tensor,
    max_slots: int,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return run_plan(q, k_cache, v_cache, block_table, items, merges, max_slots, scale, k_scale, v_scale)


@planned_attention.register_fake
def _(q, k_cache, v_cache, block_table, items, merges, max_slots, scale=None, k_scale=None, v_scale=None):
    return torch.empty_like(q)


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
    plans: dict | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """The triton backend of ``ops.paged_prefill_attention`` (which checks the arguments), D 64 or 128.

    The plan comes from `plans` (a step's memo, AttentionBatch.plans) when it holds one for these
    seq_lens / query_lens tensors and this configuration, else it is built (and stored there):
    once per forward pass, not per layer. `plan` (tests) forces one made by make_plan.
    """
    d = q.shape[2]
    if d not in HEAD_DIMS:
        raise ValueError(f"paged_prefill_attention: the triton kernel supports head_dim D in {HEAD_DIMS}, got D={d}")
    if q.shape[0] == 0:  # no tokens (and possibly no sequences): nothing to plan
        return torch.empty_like(q)
    if plan is None:
        key = ("triton", q.dtype, tuple(q.shape), tuple(k_cache.shape[1:]), k_cache.dtype, block_table.shape[1],
               q.device)  # everything make_plan reads but the values  # fmt: skip
        entry = plans.get(key) if plans is not None else None
        if entry is None or entry[0] is not seq_lens or entry[1] is not query_lens:
            entry = (seq_lens, query_lens, make_plan(q, k_cache, block_table, seq_lens, query_lens))
            if plans is not None:
                plans[key] = entry
        plan = entry[2]
    return planned_attention(q, k_cache, v_cache, block_table, plan.items, plan.merges, plan.max_slots, scale,
                             k_scale, v_scale)  # fmt: skip


backends.register("paged_prefill_attention", "triton", paged_prefill_attention)
