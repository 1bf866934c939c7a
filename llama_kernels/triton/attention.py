"""Triton split-KV (flash-decoding) GQA decode attention over a paged KV cache.

Two kernels:

* ``_split_kernel``, grid (Hkv * group_chunks, B, num_splits): one program takes one sequence,
  one KV head and one split (a contiguous range of ``split_len`` tokens), with all the query
  heads of that KV head's group (up to ``BLOCK_G``), so each K/V byte is read once per group.
  It walks the split in tiles of ``BLOCK_N`` tokens, finds each token's physical block through
  the block table, runs an online softmax in float32 and writes a partial output and its
  log2-sum-exp2.
* ``_merge_kernel``, grid (B * Hq,): combines one head's partial outputs, weighted by their
  log2-sum-exp2, into ``out`` in q's dtype.

The number of splits depends only on shapes and the SM count (never on the values in
``seq_lens``), so a call needs no host sync and can be captured in a CUDA graph; splits past a
short sequence's end are empty and contribute nothing.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .. import backends

FP8 = torch.float8_e4m3fn
HEAD_DIMS = (64, 128)
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (q load, partial write, merge read) dominates
CPU_SMS = 4  # "SM count" under the interpreter: small, so the CPU tests still see several splits
BLOCK_N = 64  # tokens per tile
BLOCK_S = 16  # splits per merge tile
LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(
    q_ptr,  # [B, Hq, D]; float32 whenever the cache is 16-bit of another dtype
    k_ptr,  # [num_blocks, block_size, Hkv, D]
    v_ptr,  # same shape and dtype as k
    table_ptr,  # [B, max_blocks] int32
    lens_ptr,  # [B] int32
    k_scale_ptr,  # [Hkv] float32 (read only when IS_FP8)
    v_scale_ptr,  # [Hkv] float32 (read only when IS_FP8)
    part_ptr,  # [B, Hq, num_splits, D] float32 out: softmax(q k^T) v of the split's tokens
    lse_ptr,  # [B, Hq, num_splits] float32 out: log2 sum exp2 of the split's scaled logits
    qk_scale,  # softmax scale * log2(e): logits are kept in base 2 (exp2 is one instruction)
    split_len,  # tokens per split, a multiple of BLOCK_N
    num_splits,
    num_kv_heads,
    max_blocks,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,  # D: 64 or 128
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_G: tl.constexpr,  # query heads per program: a power of two >= 16, tl.dot's smallest M
    BLOCK_N: tl.constexpr,  # tokens per tile
    IS_FP8: tl.constexpr,  # e4m3 caches, dequantized by the per-head k_scale / v_scale
):
    # All tensors are contiguous (ops checks), so offsets are computed from the shapes: rows of
    # HEAD_DIM elements are then provably aligned and load as 16-byte vectors.
    chunks = (GROUP + BLOCK_G - 1) // BLOCK_G  # programs per KV head
    kv_head = tl.program_id(0) // chunks
    b = tl.program_id(1)
    split = tl.program_id(2)
    g = (tl.program_id(0) % chunks) * BLOCK_G + tl.arange(0, BLOCK_G)
    in_group = g < GROUP
    heads = kv_head * GROUP + g
    num_q_heads = num_kv_heads * GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (b * num_q_heads + heads)[:, None] * HEAD_DIM + d[None, :], mask=in_group[:, None], other=0.0)
    if IS_FP8:  # K's scale is one number per program: fold it into the logit scale
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)

    start = split * split_len
    end = tl.minimum(start + split_len, tl.load(lens_ptr + b))
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    # Every tile starts with a valid token, so m_i is finite after the first one (no -inf - -inf).
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        block = tl.load(table_ptr + b * max_blocks + t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = (block * BLOCK_SIZE + t % BLOCK_SIZE) * num_kv_heads + kv_head  # int64: caches may pass 2^31
        kv_offs = rows[:, None] * HEAD_DIM + d[None, :]
        # e4m3 values are exact in bf16/fp16/fp32, so the dot runs in q's dtype without rounding K or V.
        k = tl.load(k_ptr + kv_offs, mask=valid[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_offs, mask=valid[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
        m_i = m_new

    if IS_FP8:
        acc = acc * tl.load(v_scale_ptr + kv_head)
    row = (b * num_q_heads + heads) * num_splits + split
    # An empty split (l_i = 0) stores only lse = -inf; the merge never reads its partial.
    tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None],
             mask=(in_group & (l_i > 0))[:, None])  # fmt: skip
    tl.store(lse_ptr + row, m_i + tl.log2(l_i), mask=in_group)


@triton.jit
def _merge_kernel(
    part_ptr,  # [B * Hq, num_splits, D] float32
    lse_ptr,  # [B * Hq, num_splits] float32, -inf for empty splits
    out_ptr,  # [B * Hq, D] in q's dtype
    num_splits,
    HEAD_DIM: tl.constexpr,  # D: 64 or 128
    BLOCK_S: tl.constexpr,  # splits per tile; any number of splits is merged tile by tile
):
    row = tl.program_id(0)
    d = tl.arange(0, HEAD_DIM)
    m_max = tl.full([], float("-inf"), tl.float32)
    l_sum = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
        m_new = tl.maximum(m_max, tl.max(lse, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: avoid -inf - -inf
        alpha = tl.exp2(m_max - m_ref)
        w = tl.exp2(lse - m_ref)
        part = tl.load(part_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                       mask=(w > 0)[:, None], other=0.0)  # fmt: skip
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        l_sum = l_sum * alpha + tl.sum(w, 0)
        m_max = m_new
    # l_sum = 0 only for seq_len 0 (outside the contract; CUDA-graph padding): zeros, like the reference.
    out = tl.where(l_sum > 0, acc / l_sum, 0.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def num_splits(batch: int, kv_heads: int, max_len: int, num_sms: int) -> int:
    """Splits per (sequence, KV head): about two waves of programs over the SMs, each split at
    least MIN_SPLIT_TOKENS of the max_len upper bound, and at least one."""
    waves = triton.cdiv(2 * num_sms, max(batch * kv_heads, 1))
    return max(1, min(waves, max_len // MIN_SPLIT_TOKENS))


def _sm_count(device: torch.device) -> int:
    return backends.sm_count(backends.device_index(device)) if device.type == "cuda" else CPU_SMS


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def group_block(group: int) -> int:
    """Query heads per program: the whole group, padded to a power of two >= 16 so that q k^T and
    p v run as tl.dot on tensor cores (M >= 16), for every group size.

    Decode is memory-bound: 16 rows need 16 flop per bf16 cache byte, against the ~300 an H100's
    tensor cores deliver per byte of HBM bandwidth, so padding a small group costs nothing, while a
    broadcast-multiply-reduce would hold a [G, BLOCK_N, D] product in registers. Capped at 64 to
    bound registers: larger groups take several programs per KV head.
    """
    return min(max(16, triton.next_power_of_2(group)), 64)


def decode_attention_splits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Split-KV decode attention; ``splits`` None picks :func:`num_splits`.

    q [B, Hq, D] bf16/fp16/fp32; k_cache, v_cache [num_blocks, block_size, Hkv, D] bf16/fp16/fp32
    or float8_e4m3fn with k_scale/v_scale float32 [Hkv]; block_table [B, max_blocks] int32;
    seq_lens [B] int32 in [1, max_blocks * block_size]; D 64 or 128. All contiguous, one device
    (``ops.decode_attention`` checks). Returns out [B, Hq, D] in q's dtype.
    """
    batch, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"decode_attention: the triton kernel supports head_dim D in {HEAD_DIMS}, got D={d}")
    group = hq // hkv
    block_g = group_block(group)
    chunks = triton.cdiv(group, block_g)
    max_len = block_table.shape[1] * block_size  # seq_lens' upper bound, known without a sync
    if splits is None:
        splits = num_splits(batch, hkv * chunks, max_len, _sm_count(q.device))
    split_len = triton.cdiv(triton.cdiv(max_len, splits), BLOCK_N) * BLOCK_N
    is_fp8 = k_cache.dtype == FP8
    # tl.dot takes one input dtype, q's: a 16-bit cache of another dtype meets q in float32 (exact for
    # both). Under the interpreter bf16 goes through float32 too: its tl.dot multiplies bf16 bit patterns.
    same = k_cache.dtype in (q.dtype, FP8) and not (q.dtype == torch.bfloat16 and _interpreted())
    q_dot = q if same else q.float()
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale

    out = torch.empty_like(q)
    part = torch.empty(batch, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, splits, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _split_kernel[(hkv * chunks, batch, splits)](
            q_dot, k_cache, v_cache, block_table, seq_lens,
            k_scale if is_fp8 else lse, v_scale if is_fp8 else lse,  # placeholders, never read
            part, lse, sm_scale * LOG2E, split_len, splits, hkv, block_table.shape[1],
            GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_G=block_g, BLOCK_N=BLOCK_N, IS_FP8=is_fp8,
        )  # fmt: skip
        _merge_kernel[(batch * hq,)](part, lse, out, splits, HEAD_DIM=d, BLOCK_S=BLOCK_S)
    return out


@torch.library.custom_op("llama_kernels::decode_attention_triton", mutates_args=())
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
    return decode_attention_splits(q, k_cache, v_cache, block_table, seq_lens, scale, k_scale, v_scale)


@decode_attention.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale=None, k_scale=None, v_scale=None):
    return torch.empty_like(q)


backends.register("decode_attention", "triton", decode_attention)
