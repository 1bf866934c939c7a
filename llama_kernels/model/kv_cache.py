"""The paged KV cache (allocated once) and the per-step attention metadata that indexes it.

Each layer has a K and a V tensor [num_blocks, block_size, Hkv, D]. A sequence owns a row of
the block table: its token t lives in block block_table[b, t // block_size] at offset
t % block_size, i.e. in slot block * block_size + offset. Blocks are handed out per batch by
:meth:`KVCache.allocate` after :meth:`KVCache.reset`.

FP8 caches (float8_e4m3fn) store x / scale with one float32 scale per KV head and layer. The
scales come from the first prefill after a reset, without calibration data: per head,
FP8_KV_HEADROOM x the amax of v, and for k the largest norm of a rotary pair (i, i + D/2) of the
pre-RoPE keys, which bounds every rotated component at any position. Values that later exceed
the headroom saturate at +-448 * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import FP8_MAX

FP8 = torch.float8_e4m3fn
FP8_KV_HEADROOM = 2.0  # FP8 scales cover this multiple of the amax seen in the calibrating prefill


@dataclass
class AttentionBatch:
    """Where the tokens of one forward pass sit in their sequences and in the cache.

    Prefill: the prompts are packed one after another (prefill_lens says how many tokens each has,
    all starting at position 0). Decode: one token per sequence, attending to its whole cache row.
    """

    positions: torch.Tensor  # [T] int64: position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: cache slot that receives each token's k and v
    prefill_lens: list[int] | None = None  # prefill: tokens of each packed sequence (sum = T); None in decode
    block_table: torch.Tensor | None = None  # decode: [B, max_blocks] int32 block ids of each sequence
    seq_lens: torch.Tensor | None = None  # decode: [B] int32 tokens in each sequence's cache, the new one included

    @property
    def is_prefill(self) -> bool:
        return self.prefill_lens is not None


class KVCache:
    """Paged K/V storage for every layer, allocated once.

    Args:
        num_layers: L. num_blocks, block_size: the pool holds num_blocks * block_size tokens.
        num_kv_heads, head_dim: Hkv, D.
        dtype: float32/bfloat16/float16, or float8_e4m3fn (per-head scales, see the module doc).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, FP8):
            raise ValueError(f"KVCache: dtype={dtype}; expected float32, bfloat16, float16 or float8_e4m3fn")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size  # tokens per block
        self.num_blocks = num_blocks  # blocks in the pool
        self.dtype = dtype  # storage dtype
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x [N, S, Hkv, D]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x [N, S, Hkv, D]
        fp8 = dtype == FP8
        ones = (lambda: torch.ones(num_kv_heads, dtype=torch.float32, device=device)) if fp8 else (lambda: None)
        self.k_scale = [ones() for _ in range(num_layers)]  # L x [Hkv] float32 (FP8 only, else None)
        self.v_scale = [ones() for _ in range(num_layers)]  # L x [Hkv] float32 (FP8 only, else None)
        self._calibrated = [not fp8] * num_layers  # FP8 scales set since the last reset, per layer
        self._next_block = 0  # first block not handed out since the last reset

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V that one cached token occupies across all layers."""
        k = self.k[0]
        return 2 * len(self.k) * k.shape[2] * k.shape[3] * k.element_size()

    def reset(self) -> None:
        """Forget every sequence: all blocks free, FP8 scales to be set by the next prefill."""
        self._next_block = 0
        self._calibrated = [self.dtype != FP8] * len(self.k)

    def allocate(self, lengths: list[int]) -> torch.Tensor:
        """Blocks for sequences of at most lengths[b] tokens; returns the block table [B, max_blocks] int32.

        Unused entries point at block 0 (never read: seq_lens bounds every read).
        """
        counts = [-(-n // self.block_size) for n in lengths]
        if self._next_block + sum(counts) > self.num_blocks:
            raise ValueError(
                f"KVCache: {sum(counts)} blocks of {self.block_size} tokens needed for lengths {lengths}, "
                f"{self.num_blocks - self._next_block} free; reset() the cache or allocate a larger one"
            )
        table = torch.zeros(len(lengths), max(counts, default=0), dtype=torch.int32)
        for b, n in enumerate(counts):
            table[b, :n] = torch.arange(self._next_block, self._next_block + n, dtype=torch.int32)
            self._next_block += n
        return table.to(self.k[0].device)

    def slots(self, block_table: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Cache slots [T] int64 of tokens at positions [T] of the sequences block_table[rows [T]]."""
        blocks = block_table[rows, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    def scales(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) [Hkv] float32 of a layer (None, None unless FP8).

        The first call after a reset sets them from this pass's pre-RoPE k and v [T, Hkv, D].
        """
        if not self._calibrated[layer]:
            half = k.shape[-1] // 2
            kf, vf = k.float(), v.float()
            pair_norm = torch.sqrt(kf[..., :half] ** 2 + kf[..., half:] ** 2)  # bounds |k_rot| at every position
            k_amax, v_amax = pair_norm.amax(dim=(0, 2)), vf.abs().amax(dim=(0, 2))  # [Hkv]
            self.k_scale[layer].copy_((k_amax * FP8_KV_HEADROOM).clamp(min=1e-6) / FP8_MAX)
            self.v_scale[layer].copy_((v_amax * FP8_KV_HEADROOM).clamp(min=1e-6) / FP8_MAX)
            self._calibrated[layer] = True
        return self.k_scale[layer], self.v_scale[layer]
