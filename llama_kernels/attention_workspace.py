"""The sizes of the triton prefill attention plan's workspace (llama_kernels.triton.attention_plan
and prefill_attention): programs per KV head, partial slots, and the float32 partial outputs and
log2-sum-exp2s of split query tiles.

Pure arithmetic with no torch or triton import, so that the memory planner (llama_kernels.plan)
counts the workspace with the formula the kernel allocates by, without loading either.
"""

from __future__ import annotations

import math

WAVES = 2  # programs per SM a step's plan aims at (see programs)
HOPPER_TILE_ROWS = 128  # rows of a prefill tile (query tokens x group heads) on sm_90: the most any config uses
F32 = 4  # bytes


def programs(num_sms: int, num_kv_heads: int) -> int:
    """Programs per KV head a step's work is spread over: two waves of the SMs (the short items of the
    second fill the first's tail; one wave leaves 1.4x the mean on one SM where tiles split unevenly)."""
    return WAVES * max(1, num_sms // num_kv_heads)


def partial_slots(num_programs: int) -> int:
    """Partial-output slots a plan over num_programs programs per KV head can fill (at most; see
    attention_plan's bounds)."""
    return 2 * num_programs


def tile_rows(base: int, group: int) -> int:
    """Rows of a prefill tile: `base`, or the group padded to a power of two when larger (a tile holds
    at least one token's heads)."""
    return max(base, 1 << (group - 1).bit_length())


def workspace_shapes(slots: int, num_kv_heads: int, rows: int, head_dim: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of the float32 workspace: partial outputs [slots, Hkv, rows, D] and their log2-sum-exp2
    [slots, Hkv, rows]."""
    return (slots, num_kv_heads, rows, head_dim), (slots, num_kv_heads, rows)


def workspace_bytes(num_sms: int, num_kv_heads: int, rows: int, head_dim: int) -> int:
    """Bytes of the workspace of a plan for a GPU of num_sms SMs with tiles of `rows` rows:
    partial_slots(programs) x Hkv x rows x (D + 1) float32; ~34 MB at 132 SMs, 8 KV heads, 128 x 128."""
    slots = partial_slots(programs(num_sms, num_kv_heads))
    return sum(F32 * math.prod(shape) for shape in workspace_shapes(slots, num_kv_heads, rows, head_dim))
