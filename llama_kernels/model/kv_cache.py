"""The paged KV cache (allocated once) and the per-step attention metadata that indexes it.

Each layer has a K and a V tensor [num_blocks, block_size, Hkv, D]. A sequence owns a row of
the block table: its token t lives in block block_table[b, t // block_size] at offset
t % block_size, i.e. in slot block * block_size + offset. Which blocks a sequence owns is the
engine's business (llama_kernels.engine.block_allocator); the cache only stores.

FP8 caches (float8_e4m3fn) store x / scale with one float32 scale per KV head and layer, fixed
before any sequence is written: from the checkpoint when it carries them (set_scales, see
llama_kernels.loader.kv_scales), else the engine runs one calibration pass at start-up (a fixed
built-in text, see llama_kernels.engine.runner.ModelRunner.calibrate) with `calibrating` set; each
layer's scales come from that pass: per head, FP8_KV_HEADROOM x the amax of v, and for k the
largest norm of a rotary pair (i, i + D/2) of the pre-RoPE keys, which bounds every rotated
component at any position. They are never re-derived from a user's prompt. Values that later
exceed the headroom saturate at +-448 * scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..reference import FP8_MAX

FP8 = torch.float8_e4m3fn
FP8_KV_HEADROOM = 2.0  # FP8 scales cover this multiple of the amax seen in the calibration pass
MIN_KV_SCALE = 1e-6 / FP8_MAX  # smallest FP8 scale (a zero scale would turn x / scale into NaN)


@dataclass
class AttentionBatch:
    """Where the T tokens of one forward pass sit in their B sequences and in the cache.

    The tokens of each sequence are packed one sequence after another; sequence b contributes its
    last query_lens[b] tokens of seq_lens[b] (the earlier ones are already in the cache). A decode
    step (query_lens None) has exactly one token per sequence and runs ops.decode_attention; any
    other pass (prefill chunks, possibly mixed with one-token decodes) runs ops.paged_prefill_attention.
    """

    positions: torch.Tensor  # [T] int64: position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: cache slot that receives each token's k and v (-1: none)
    block_table: torch.Tensor  # [B, W] int32: block ids of each sequence (unused entries: any valid id)
    seq_lens: torch.Tensor  # [B] int32: tokens of each sequence in the cache after this pass
    query_lens: torch.Tensor | None = None  # [B] int32: new tokens of each sequence (sum T); None: decode
    # the attention kernel's work plan of this pass, built by its first layer and reused by the others
    # (ops.paged_prefill_attention's `plans`): a fresh batch per forward pass, and its tensors unchanged
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_decode(self) -> bool:
        return self.query_lens is None


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
        self.calibrated = not fp8  # FP8 scales fixed (by a calibration pass or from a checkpoint)
        self.calibrating = False  # set by the calibration pass: scales() derives each layer's from its k and v

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V that one cached token occupies across all layers."""
        k = self.k[0]
        return 2 * len(self.k) * k.shape[2] * k.shape[3] * k.element_size()

    def slots(self, block_table: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Cache slots [T] int64 of tokens at positions [T] of the sequences block_table[rows [T]]."""
        blocks = block_table[rows, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    def set_scales(self, k_scale: list[torch.Tensor], v_scale: list[torch.Tensor]) -> None:
        """Fix the FP8 scales to given ones (from a checkpoint): L x [Hkv] float32 each; no calibration follows."""
        heads = self.k[0].shape[2]
        if self.dtype != FP8 or len(k_scale) != len(self.k) or len(v_scale) != len(self.k) or any(
                tuple(s.shape) != (heads,) for s in k_scale + v_scale):  # fmt: skip
            raise ValueError(f"KVCache.set_scales: expected {len(self.k)} k and v scales of shape [{heads}] for an "
                             f"FP8 cache; got {len(k_scale)} and {len(v_scale)} for a {self.dtype} cache")  # fmt: skip
        for mine, given in zip(self.k_scale + self.v_scale, k_scale + v_scale):
            mine.copy_(given.clamp(min=MIN_KV_SCALE))
        self.calibrated = True

    def scales(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) [Hkv] float32 of a layer (None, None unless FP8).

        During the calibration pass they are set from this pass's pre-RoPE k and v [T, Hkv, D].
        """
        if self.calibrating:
            half = k.shape[-1] // 2
            kf, vf = k.float(), v.float()
            pair_norm = torch.sqrt(kf[..., :half] ** 2 + kf[..., half:] ** 2)  # bounds |k_rot| at every position
            k_amax, v_amax = pair_norm.amax(dim=(0, 2)), vf.abs().amax(dim=(0, 2))  # [Hkv]
            self.k_scale[layer].copy_((k_amax * FP8_KV_HEADROOM).clamp(min=1e-6) / FP8_MAX)
            self.v_scale[layer].copy_((v_amax * FP8_KV_HEADROOM).clamp(min=1e-6) / FP8_MAX)
        return self.k_scale[layer], self.v_scale[layer]
