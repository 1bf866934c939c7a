"""PyTorch reference for every op in the contract: the definition every backend must match.

Math is float32 (float64 where a test asks for it through the inputs); outputs are cast to the
dtype the op documents. Kernels may reorder sums, but not the roundings described here:
- add_rms_norm rounds the residual to the input dtype before taking statistics from it;
- the FP8 variants quantize the float32 normalized value (never rounded to bf16 first);
- FP8 casts saturate at +-448 (``clamp`` before the cast: torch's cast would give NaN).

These functions do no validation: ``llama_kernels.ops`` validates, then calls them as the
``torch`` backend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .int4 import Int4Weight, int4_linear_reference, quantize_int4

__all__ = [
    "FP8_MAX",
    "FP8_MIN_SCALE",
    "quantize_fp8",
    "fp8_gemm",
    "quantize_int4",
    "int4_gemm",
    "rms_norm",
    "add_rms_norm",
    "add_rms_norm_fp8",
    "rope_inv_freq",
    "rope_cos_sin",
    "rope_and_cache",
    "decode_attention",
    "paged_prefill_attention",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # floor on amax: keeps x / scale finite for all-zero rows


def _saturate_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _fp8_row_scale(amax: torch.Tensor, scale_ub: float | None) -> torch.Tensor:
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    return amax.clamp(min=FP8_MIN_SCALE) / FP8_MAX


def quantize_fp8(x: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise dynamic FP8 quantization.

    x [M, K] bf16/fp16/fp32 -> (xq [M, K] float8_e4m3fn, scale [M] float32) with
    scale = max(min(amax|x_row|, scale_ub), 1/(448*512)) / 448 and xq = clamp(x / scale, +-448).
    """
    xf = x.float()
    scale = _fp8_row_scale(xf.abs().amax(dim=-1), scale_ub)
    return _saturate_fp8(xf / scale.unsqueeze(-1)), scale


def fp8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[m, n] = sum_k xq[m, k] wq[n, k] * x_scale[m] * w_scale[n] (+ bias[n]).

    xq [M, K] e4m3, wq [N, K] e4m3; x_scale [M] or 0-d, w_scale [N] or 0-d, float32;
    bias [N] (any float dtype) or None; y [M, N] in out_dtype. Accumulation in float32.
    A CPU weight prepared at load by :func:`prepare_fp8_cpu` is multiplied as its int8 requantization
    instead (lossy: see there), the sum rounded to bfloat16 once before the scales.
    """
    xs = x_scale.float().reshape(-1, 1)  # [M, 1] or [1, 1]: never 0-d, so that a bfloat16 acc becomes float32
    ws = w_scale.float().reshape(1, -1)  # [1, N] or [1, 1]
    prepared = getattr(wq, _CPU_FP8_ATTR, None) if xq.device.type == "cpu" else None
    if prepared is None:
        acc = xq.float() @ wq.float().t()
    else:
        acc, int8_scale = _cpu_int8_matmul(_e4m3_to_bf16(xq), *prepared)
        if int8_scale is not None:
            ws = ws * int8_scale
    y = acc * xs * ws
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int4_gemm(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """y = x @ dequantize(w).T. x [M, K] bf16/fp16; w an Int4Weight of shape [N, K]; y [M, N] in x's dtype.

    A CPU weight prepared at load by :func:`prepare_int4_cpu` runs PyTorch's CPU INT4 kernel instead
    below CPU_INT4_DEQUANT_ROWS rows, and above, for bfloat16 x, a bfloat16 matmul of the weight
    dequantized to bfloat16 for the call (for the activation dtype it was prepared for)."""
    packed = w.__dict__.get(_CPU_INT4_ATTR)
    if packed is None or packed.dtype != x.dtype or x.device.type != "cpu":
        return int4_linear_reference(x, w)
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    if packed.q_minus_z is not None and x.shape[0] >= CPU_INT4_DEQUANT_ROWS:
        n, k = w.shape
        weight = torch.mul(packed.q_minus_z.view(n, k // w.group_size, w.group_size), packed.scales)  # -> bf16
        return F.linear(x, weight.view(n, k))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed.weight, w.group_size,
                                                      packed.scale_zeros)  # fmt: skip


# --- the torch backend on the CPU: load-time layouts for PyTorch's CPU kernels -----------------------
# fp8_gemm and int4_gemm above dequantize the whole weight to float32 on every call: on a CPU that is
# 5-30x the time of a float32 linear of the same shape. Once per weight, at load (ops.prepare_fp8 /
# ops.prepare_int4, when the torch backend is selected for a CPU weight), these attach to the weight
# the layouts PyTorch's CPU kernels read; the two ops then use them. The weight itself is kept, so that
# every backend (and the definitions) can still read it: LLAMA_KERNELS_BACKEND may change after load.
# Weights they do not prepare (another device, a shape the kernels lack) run the definitions.
# Which kernel runs depends on the rows M (1 thread, SmolLM2's 1536 x 576, weights in cache): the
# weight-only int4/int8 kernels cost ~20 us per row, so they win for decode; a bfloat16 matmul
# (AMX/AVX512-BF16) of the weight converted to bfloat16 for the call costs ~120 (int8) or ~300 (int4
# with group scales) us for the conversion and then ~2 us per row, so it wins from ~13 (int8) and ~28
# (int4) rows measured (prefill): at 64 rows, 906 us against float32's 1178 and the INT4 kernel's 1589.

_CPU_INT4_ATTR = "_cpu_int4"  # Int4Weight.__dict__ key: a _CpuInt4
_CPU_FP8_ATTR = "_cpu_int8"  # attribute of a prepared FP8 weight tensor: (int8 [N, K], bfloat16 scale [N])
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)  # those torch's CPU INT4 kernel takes
CPU_INT4_DEQUANT_ROWS = 32  # int4_gemm: from this many rows of x, dequantize to bfloat16 + bfloat16 matmul
CPU_INT8_MATMUL_ROWS = 16  # fp8_gemm: from this many rows, int8 -> bfloat16 + bfloat16 matmul


class _CpuInt4(NamedTuple):
    """An INT4 weight [N, K] in the layouts of the CPU kernels int4_gemm uses (prepare_int4_cpu)."""

    dtype: torch.dtype  # the activations' (bfloat16 or float16), for which scales are rounded
    weight: torch.Tensor  # uint8 [N, K/2], _weight_int4pack_mm_for_cpu's blocked order
    scale_zeros: torch.Tensor  # [K/G, N, 2] in dtype: (scale, (8 - z) * scale) per group
    q_minus_z: torch.Tensor | None  # int8 [N, K] q - z, for the bfloat16 matmul; None for float16
    scales: torch.Tensor | None  # [N, K/G, 1] in dtype, the scales broadcast over each group's q - z


def prepare_int4_cpu(w: Int4Weight, dtype: torch.dtype) -> Int4Weight:
    """Attach to a CPU weight [N, K] the layouts int4_gemm's CPU kernels read with `dtype` (bfloat16/
    float16) activations (a _CpuInt4): for ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (below
    CPU_INT4_DEQUANT_ROWS rows) the weight repacked (uint8 [N, K/2], the kernel's blocked order: 0.5
    more byte per weight) and scale_zeros [K/G, N, 2] in `dtype`; for bfloat16, also q - z as int8
    [N, K] (1 more byte per weight), which int4_gemm dequantizes to bfloat16 per call for more rows
    (one vectorized multiply by the group scales; float16 has no fast CPU matmul, so it stays on the
    INT4 kernel). Nothing is attached where that kernel does not apply (not on the CPU, N not a
    multiple of 16, group size not in CPU_INT4_GROUP_SIZES). Returns w.

    Both dequantize with the scale rounded to `dtype`: (q - 8) * scale + zero, zero = (8 - z) * scale,
    in `dtype` for the kernel; (q - z) * scale rounded to bfloat16 for the matmul. The same weight up to
    those roundings."""
    n, k = w.shape
    if w.qweight.device.type != "cpu" or n % 16 or w.group_size not in CPU_INT4_GROUP_SIZES:
        return w
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"prepare_int4_cpu: dtype={dtype}; expected torch.bfloat16 or torch.float16")
    q = w.unpack()  # uint8 [N, K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # uint8 [N, K/2]
    scales = w.scales.float()
    zeros = w._zero_points()  # int16 [N, K/G]
    scale_zeros = torch.stack([scales, (8 - zeros.float()) * scales], dim=-1)  # [N, K/G, 2]
    q_minus_z = scales_g = None
    if dtype == torch.bfloat16:
        groups = k // w.group_size
        q_minus_z = (q.view(n, groups, w.group_size).to(torch.int8) - zeros.to(torch.int8)[..., None]).view(n, k)
        scales_g = scales.to(dtype).unsqueeze(-1)
    w.__dict__[_CPU_INT4_ATTR] = _CpuInt4(dtype, packed, scale_zeros.transpose(0, 1).contiguous().to(dtype),
                                          q_minus_z, scales_g)  # fmt: skip
    return w


def prepare_fp8_cpu(wq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Give a CPU FP8 weight wq [N, K] (K a multiple of 16) its int8 requantization per output channel
    (int8 [N, K], scale bfloat16 [N]): 1 more byte per weight, which :func:`fp8_gemm` multiplies with
    ``torch.ops.aten._weight_int8pack_mm`` (below CPU_INT8_MATMUL_ROWS rows) or converts to bfloat16 for
    a bfloat16 matmul (above), instead of converting wq on every call (PyTorch's CPU e4m3 -> bfloat16
    conversion is ~30x slower than int8's, its CPU FP8 matmul slower still). Otherwise, or not on the
    CPU, wq is left as is. `dtype` (fp8_gemm's out_dtype) does not matter: the sums are in float32 /
    bfloat16 either way. Returns wq.

    Lossy, unlike the definition: scale[n] = amax_k |wq[n, k]| / 127 rounded up to a bfloat16 (exact in
    the kernel), int8 = round(wq / scale), so |int8 * scale - wq| <= scale / 2 for every weight, where
    an e4m3 weight is itself within 2^-4 relative of what it quantized."""
    n, k = wq.shape
    if wq.device.type != "cpu" or k % 16:  # _weight_int8pack_mm reads K in blocks of 16
        return wq
    w = wq.float()
    step = w.abs().amax(dim=1) / 127
    scale = step.to(torch.bfloat16)
    up = (scale.view(torch.int16) + 1).view(torch.bfloat16)  # the next bfloat16 (scale is >= 0)
    scale = torch.where(scale.float() < step, up, scale)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row
    q = torch.round(w / scale.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    setattr(wq, _CPU_FP8_ATTR, (q, scale))
    return wq


# the bfloat16 value of each e4m3 bit pattern (exact: every e4m3 value is a bfloat16), NaN included
_E4M3_TO_BF16 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).to(torch.bfloat16)  # [256]


def _e4m3_to_bf16(xq: torch.Tensor) -> torch.Tensor:
    """xq [M, K] float8_e4m3fn (CPU) -> bfloat16 [M, K], exactly: a table lookup, 6x faster than PyTorch's CPU
    conversion (scalar) at 256 x 576 (97 vs 620 us, 1 thread), which prefill otherwise spends a third of its
    FP8 time in."""
    m, k = xq.shape
    return _E4M3_TO_BF16.index_select(0, xq.contiguous().view(torch.uint8).view(-1).int()).view(m, k)


def _cpu_int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, K] bfloat16 @ (q [N, K] int8 * scale [N] bfloat16).T, summed in float32 and rounded to bfloat16
    once: (y [M, N] bfloat16, None) with the scale applied (by _weight_int8pack_mm, below CPU_INT8_MATMUL_ROWS
    rows), or (x @ q.T, scale as float32 [N]) for the caller to fold into its own scaling (above: a bfloat16
    matmul of q converted to bfloat16)."""
    if x.shape[0] < CPU_INT8_MATMUL_ROWS:
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale), None
    return F.linear(x, q.to(torch.bfloat16)), scale.float()


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), skipped when t already has it (the same tensor either way; .to's argument parsing costs about
    a microsecond, and the decode step's norms, RoPE and attention call it hundreds of times)."""
    return t if t.dtype == dtype else t.to(dtype)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _rms_normalize(r: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rf = _f32(r)
    inv = torch.rsqrt(rf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return rf * inv * _f32(weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight. x [M, H], weight [H]; y [M, H] in x's dtype."""
    return _to(_rms_normalize(x, weight, eps), x.dtype)


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    if residual is None:
        return x.clone()
    return _to(_f32(x) + _f32(residual), x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_out = x + residual (rounded to x's dtype); y = rms_norm(residual_out).

    x, residual [M, H] (residual may be None: residual_out = x); weight [H]; both outputs [M, H].
    """
    residual_out = _add_residual(x, residual)
    return _to(_rms_normalize(residual_out, weight, eps), x.dtype), residual_out


def add_rms_norm_fp8(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    scale_ub: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_rms_norm whose float32 output is quantized row-wise to FP8 as in quantize_fp8.

    Returns (yq [M, H] e4m3, y_scale [M] float32, residual_out [M, H] in x's dtype).
    """
    residual_out = _add_residual(x, residual)
    yq, y_scale = quantize_fp8(_rms_normalize(residual_out, weight, eps), scale_ub)
    return yq, y_scale, residual_out


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32, with Hugging Face `rope_scaling` applied.

    scaling: None / {"rope_type" or "type": "default"}, "linear" (factor) or "llama3"
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), computed in
    the order transformers uses so the tables agree to float32 rounding.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope_scaling_type(scaling)
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_scaling_type(scaling: dict | None) -> str:
    """The scaling kind of a Hugging Face `rope_scaling` dict ("default", "linear" or "llama3").

    Raises ValueError naming the dict when the kind is unknown or a key it needs is missing.
    """
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        raise ValueError(f"rope scaling: expected a dict or None, got {type(scaling).__name__}: {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise ValueError(
            f"rope scaling: rope_type {kind!r} is not supported; expected one of {sorted(_ROPE_KEYS)} ({scaling!r})"
        )
    missing = [k for k in _ROPE_KEYS[kind] if k not in scaling]
    if missing:
        raise ValueError(f"rope scaling: {kind!r} needs keys {missing}, got {scaling!r}")
    return kind


def rope_cos_sin(
    head_dim: int,
    max_positions: int,
    theta: float,
    scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, head_dim // 2] float32: angle[p, i] = p * inv_freq[i]."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return angles.cos().to(device), angles.sin().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, H, D] float32, cos/sin [T, 1, D/2]: rotate pairs (i, i + D/2) or (2i, 2i + 1)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _cache_store(cache: torch.Tensor, values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """values [T, Hkv, D] float32 -> cache dtype; FP8 stores values / scale[h], saturated."""
    if cache.dtype == FP8_DTYPE:
        return _saturate_fp8(values / scale.float()[None, :, None])
    return _to(values, cache.dtype)


def _write_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache [num_blocks, block_size, Hkv, D] (contiguous): token rows [T, Hkv, D] into slots [T] int64 (all >= 0)."""
    flat = cache.view(-1, *cache.shape[2:])  # [slots, Hkv, D]
    if cache.dtype == FP8_DTYPE:
        flat[slots] = rows  # index_copy_ has no float8 kernel on the CPU
    else:
        flat.index_copy_(0, slots, rows)  # cheaper than flat[slots] = rows at decode sizes


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
    """Rotary embedding of q and k, and the paged-cache write of k_rot and v (in place).

    q [T, Hq, D], k and v [T, Hkv, D]; positions [T] int; cos/sin [P, D/2] float32;
    caches [num_blocks, block_size, Hkv, D]; slot_mapping [T] int, slot = block * block_size +
    offset, negative = skip; k_scale/v_scale [Hkv] float32 for FP8 caches.
    Returns (q_rot [T, Hq, D], k_rot [T, Hkv, D]) in q's dtype.
    """
    c = _f32(cos).index_select(0, positions).unsqueeze(1)  # [T, 1, D/2]; index_select: cheaper than cos[positions]
    s = _f32(sin).index_select(0, positions).unsqueeze(1)
    # q and k rotated as one [T, Hq + Hkv, D] tensor: half the elementwise calls (the same values)
    q_rot, k_rot = _rotate(_f32(torch.cat((q, k), dim=1)), c, s, interleaved).split([q.shape[1], k.shape[1]], dim=1)
    q_rot, k_rot = q_rot.contiguous(), k_rot.contiguous()  # views of the joint tensor (copies only when T > 1)
    slots = _to(slot_mapping, torch.int64)
    if slots.numel() and k_cache.is_contiguous() and v_cache.is_contiguous() and int(slots.min()) >= 0:
        # every token is written (decode, most prefills): rows of the caches' [slots, Hkv, D] views, no masking
        _write_rows(k_cache, slots, _cache_store(k_cache, k_rot, k_scale))
        _write_rows(v_cache, slots, _cache_store(v_cache, _f32(v), v_scale))
        return _to(q_rot, q.dtype), _to(k_rot, k.dtype)
    keep = slots >= 0
    block_size = k_cache.shape[1]
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    k_cache[blocks, offsets] = _cache_store(k_cache, k_rot[keep], k_scale)
    v_cache[blocks, offsets] = _cache_store(v_cache, _f32(v)[keep], v_scale)
    return _to(q_rot, q.dtype), _to(k_rot, k.dtype)


def gather_kv(
    cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int, scale: torch.Tensor | None
) -> torch.Tensor:
    """The first seq_len tokens of one sequence from a paged cache, as float32 [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    n_blocks = (seq_len + block_size - 1) // block_size
    # index_select: a third of the time of advanced indexing at decode sizes
    kv = _f32(cache.index_select(0, block_table_row[:n_blocks]).flatten(0, 1)[:seq_len])
    if cache.dtype == FP8_DTYPE:
        kv = kv * scale.float()[None, :, None]
    return kv


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
    """Attention of one new query token per sequence over its paged KV cache (GQA).

    q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D] (bf16/fp16 or e4m3 with per-head
    float32 k_scale/v_scale [Hkv]); block_table [B, max_blocks] int32; seq_lens [B] int32 >= 1.
    Query head h reads KV head h // (Hq // Hkv). out [B, Hq, D] in q's dtype.
    """
    batch, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):  # one host read for all lengths
        k = gather_kv(k_cache, block_table[b], n, k_scale)  # [n, Hkv, D]
        v = gather_kv(v_cache, block_table[b], n, v_scale)
        qb = _f32(q[b]).view(1, hkv, group, d)  # [1, Hkv, G, D]: a KV head's G query heads are its query rows
        # softmax(qb k^T * scale) v over all n keys (no mask: one query position), in one fused op
        o = F.scaled_dot_product_attention(qb, k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=sm_scale)
        out[b].copy_(o.reshape(hq, d))  # [1, Hkv, G, D] -> [Hq, D], cast to q's dtype
    return out


PREFILL_ROWS = 1024  # query tokens per step of paged_prefill_attention: bounds its [rows, n] mask (and the
# [Hq, rows, n] logits where SDPA has no fused kernel for the inputs, e.g. float32 on CUDA with GQA)


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
) -> torch.Tensor:
    """Causal attention of the newest tokens of each sequence over its paged KV cache (GQA).

    q [T, Hq, D] packs the query_lens[b] new tokens of each sequence b in order (sum T); they are
    the last query_lens[b] of the seq_lens[b] tokens of sequence b in the cache, so query token i
    of b sits at position p = seq_lens[b] - query_lens[b] + i and attends to cache positions 0..p.
    Caches, block_table, scales and the head mapping as in decode_attention. out [T, Hq, D] in
    q's dtype. Math: the gathered (dequantized) cache and q in float32, softmax of the masked
    logits, through scaled_dot_product_attention (on the CPU its fused flash kernel: no logits
    tensor). At most PREFILL_ROWS query tokens are attended at once (rows are independent, so
    this does not change the result). plans: unused (kernels' work plans; the math has none).
    """
    sm_scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    out = torch.empty_like(q)
    start = 0
    for b in range(seq_lens.shape[0]):
        n, m = int(seq_lens[b]), int(query_lens[b])
        k = gather_kv(k_cache, block_table[b], n, k_scale).transpose(0, 1)  # [Hkv, n, D]
        v = gather_kv(v_cache, block_table[b], n, v_scale).transpose(0, 1)
        for r0 in range(0, m, PREFILL_ROWS):
            rows = min(PREFILL_ROWS, m - r0)
            end = n - m + r0 + rows  # one past the last row's position: no row sees a later key
            qb = q[start + r0 : start + r0 + rows].float().transpose(0, 1)  # [Hq, rows, D]
            # Row i sits at position end - rows + i: causal aligned to the bottom-right corner.
            visible = torch.ones(rows, end, dtype=torch.bool, device=q.device).tril(end - rows)  # [rows, end]
            kb, vb = k[None, :, :end], v[None, :, :end]  # [1, Hkv, end, D]
            o = F.scaled_dot_product_attention(qb[None], kb, vb, attn_mask=visible, scale=sm_scale, enable_gqa=True)
            out[start + r0 : start + r0 + rows] = o[0].transpose(0, 1).to(q.dtype)  # o [1, Hq, rows, D]
        start += m
    return out
