"""The work plan of one forward pass's paged attention: prefill chunks and decode rows together,
cut into work items of about equal length, built once per step and read by every layer's launch.

A work item is (sequence, query tile, KV chunk): up to ``tile_tokens`` consecutive new tokens of
one sequence (a decode row is a tile of one token) over a contiguous range of its cache tokens.
The KV chunk length is one number per step, ``chunk = max(min_chunk, total / programs)`` rounded
up to whole ``block_n`` tiles, where total is the step's KV work (the causal KV length summed over
its query tiles) and ``programs`` the programs one wave of the GPU runs per KV head: a tile of
kv tokens (a decode row at 128K, a chunk over a long prefix) is split into round(kv / chunk)
equal chunks (so no item exceeds 1.5 chunks), whose partial outputs the merge combines by their
log-sum-exp (as the split-KV decode kernel's merge does). Items are ordered longest first, so the
short ones fill the tail.

Everything is computed by torch ops on the device from seq_lens and query_lens, into tensors
whose sizes depend only on shapes (T, B, the SM count), never on values: building a plan needs
no host sync and can be captured in a CUDA graph. The bounds (``chunk >= total / programs``):
- items <= programs + query tiles, as each tile has at most kv / chunk + 1/2 chunks;
- partial slots (items of split tiles) < 2 * programs, as a split tile (kv >= 1.5 chunk) has at
  most kv / chunk + 1/2 < 2 * kv / chunk chunks;
- split tiles < programs, each holding more than chunk of the total.

Cost unit: KV tokens per item (a program's loads of K and V; every item reads whole tiles).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..attention_workspace import partial_slots

# Columns of AttentionPlan.items (an eighth pads a row to 32 bytes: one load per item)
SEQ, ROW0, NTOK, POS0, KV_LO, KV_HI, SLOT = range(7)
ITEM_FIELDS = 8
# Columns of AttentionPlan.merges
M_ROW0, M_NTOK, M_SLOT0, M_SLOTS = range(4)


class AttentionPlan(NamedTuple):
    """The work items of one step (see the module doc); int32 tensors on the step's device."""

    # [max_items, ITEM_FIELDS]: per item, longest first: sequence (-1: no item), first row of q, tokens (rows of
    # the tile), position of its first token, KV range [kv_lo, kv_hi), partial slot (-1: writes out)
    items: torch.Tensor
    # [max_merges, 4]: per split query tile: first row of q, tokens, first partial slot, slots (0: none)
    merges: torch.Tensor
    chunk: torch.Tensor  # [] int32: the step's KV chunk length (a multiple of block_n)
    max_slots: int  # partial slots a kernel's workspace needs (attention_workspace.partial_slots)
    tile_tokens: int  # new tokens per query tile
    block_n: int  # KV tokens per kernel tile: chunk boundaries are multiples of it


def _cdiv(a: torch.Tensor | int, b: torch.Tensor | int):
    return (a + b - 1) // b


def build_plan(
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    num_tokens: int,
    capacity: int,
    tile_tokens: int,
    block_n: int,
    programs: int,
    min_chunk: int,
) -> AttentionPlan:
    """The plan of a step: seq_lens, query_lens [B] int32 (as ops.paged_prefill_attention takes
    them), num_tokens T = sum(query_lens), capacity the block table's tokens per sequence (longer
    seq_lens are clamped to it: no kernel reads past the table), tile_tokens new tokens per query
    tile, block_n KV tokens per kernel tile, programs the programs one wave runs per KV head,
    min_chunk the shortest KV chunk worth splitting off (a multiple of block_n)."""
    dev, i32 = seq_lens.device, torch.int32
    batch = seq_lens.shape[0]
    seq = seq_lens.clamp(max=capacity)
    qlen = query_lens
    prefix = (seq - qlen).clamp(min=0)  # cached tokens before the new ones
    # Query tiles: sequence b has ceil(qlen / tile_tokens) of them; T + B (tile_tokens - 1) bounds the sum.
    tiles = _cdiv(qlen, tile_tokens)  # [B]
    tiles_end = torch.cumsum(tiles, 0, dtype=i32)
    max_tiles = max(1, (num_tokens + batch * (tile_tokens - 1)) // tile_tokens)
    tile = torch.arange(max_tiles, dtype=i32, device=dev)
    tile_seq = torch.searchsorted(tiles_end, tile, right=True).to(i32)  # B past the last tile
    live = tile_seq < batch
    b = tile_seq.clamp(max=max(batch - 1, 0))
    first = (tile - (tiles_end - tiles)[b]) * tile_tokens  # first new token of the tile in its sequence
    ntok = torch.minimum(qlen[b] - first, torch.full_like(first, tile_tokens))
    pos0 = prefix[b] + first
    kv = torch.where(live, torch.minimum(pos0 + ntok, seq[b]), 0)  # causal KV length of the tile
    row0 = (torch.cumsum(qlen, 0, dtype=i32) - qlen)[b] + first
    # The chunk: at least the step's work over `programs`, so that no item is much above the mean.
    total = kv.sum(dtype=torch.int64)
    chunk = torch.clamp(_cdiv(_cdiv(total, programs), block_n) * block_n, min=min_chunk).to(i32)
    # Chunks per tile: kv / chunk rounded to nearest (at least 1; 0 for no tile), so a tile of 2.1
    # chunks takes 2 (items <= 1.5 chunk) rather than 3 (a third wave of short items).
    n = torch.where(kv > 0, ((kv + chunk // 2) // chunk).clamp(min=1), 0)
    clen = (_cdiv(_cdiv(kv, n.clamp(min=1)), block_n) * block_n).clamp(min=block_n)  # equal, whole tiles
    n = _cdiv(kv, clen)  # whole tiles may leave fewer chunks than asked, never an empty one
    # Items: tile t has n[t] of them, consecutive.
    items_end = torch.cumsum(n, 0, dtype=i32)
    max_items = programs + max_tiles
    item = torch.arange(max_items, dtype=i32, device=dev)
    item_tile = torch.searchsorted(items_end, item, right=True).to(i32)
    item_live = item_tile < max_tiles
    t = item_tile.clamp(max=max_tiles - 1)
    c = item - (items_end - n)[t]  # chunk index within its tile
    kv_lo = c * clen[t]
    kv_hi = torch.minimum(kv_lo + clen[t], kv[t])
    split = n > 1
    split_n = torch.where(split, n, 0)
    slot0 = torch.cumsum(split_n, 0, dtype=i32) - split_n  # first partial slot of each split tile
    slot = torch.where(split[t], slot0[t] + c, -1)
    items = torch.stack([torch.where(item_live, b[t], -1), row0[t], ntok[t], pos0[t], kv_lo, kv_hi, slot,
                         torch.zeros_like(slot)], dim=1)  # fmt: skip
    cost = torch.where(item_live, kv_hi - kv_lo, -1)
    order = torch.sort(cost, descending=True, stable=True).indices  # longest first
    items = items[order]
    # One merge per split tile; the others land in a dropped last column.
    max_merges = programs
    dest = torch.where(split, torch.cumsum(split, 0, dtype=i32) - 1, max_merges).long()
    merges = torch.zeros(max_merges + 1, 4, dtype=i32, device=dev)
    merges.index_copy_(0, dest, torch.stack([row0, ntok, slot0, split_n], dim=1))
    return AttentionPlan(items, merges[:max_merges], chunk, partial_slots(programs), tile_tokens, block_n)
