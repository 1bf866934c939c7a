"""The op contract: validated entry points that dispatch to the cuda, triton or torch backend.

Every op checks dtype, shape, device and contiguity of its arguments before anything runs,
then calls the backend chosen by :func:`llama_kernels.backends.select` (``backend=`` forces
one). ``llama_kernels.reference`` defines what each op computes.

Values held in integer index tensors (positions, slots, block tables, sequence lengths) are
range-checked only for CPU tensors: on a GPU that check would cost a device synchronization
on every call, and break CUDA-graph capture.
"""

from __future__ import annotations

import torch

from . import _validate as check
from . import backends, reference
from .int4 import Int4Weight
from .reference import rope_cos_sin

__all__ = [
    "quantize_fp8",
    "fp8_gemm",
    "quantize_int4",
    "int4_gemm",
    "prepare_int4",
    "prepare_fp8",
    "rms_norm",
    "add_rms_norm",
    "add_rms_norm_fp8",
    "rope_cos_sin",
    "rope_and_cache",
    "decode_attention",
    "paged_prefill_attention",
    "Int4Weight",
]

FP8 = torch.float8_e4m3fn


def _call(op: str, device: torch.device, backend: str | None, *args):
    with backends.on_device(device):  # kernels launch on the current device: make it the inputs'
        return backends.call(op, device, backend, args)


# --- FP8 ------------------------------------------------------------------------------


def quantize_fp8(
    x: torch.Tensor, scale_ub: float | None = None, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise dynamic quantization to FP8 e4m3.

    Args:
        x: [M, K] bfloat16, float16 or float32.
        scale_ub: optional upper bound on each row's amax (Meta's activation_scale_ub).
    Returns:
        xq [M, K] float8_e4m3fn and scale [M] float32, with
        scale = max(min(amax|x_row|, scale_ub), 1/(448*512)) / 448 and xq = clamp(x / scale, +-448)
        (saturating: never NaN). Reference: ``reference.quantize_fp8``.
    """
    check.tensor("quantize_fp8", "x", x, dtypes=check.FLOAT_DTYPES, ndim=2)
    check.positive_float("quantize_fp8", "scale_ub", scale_ub, allow_none=True)
    return _call("quantize_fp8", x.device, backend, x, scale_ub)


def _check_scale(op: str, name: str, t: torch.Tensor, rows: int, device: torch.device) -> None:
    check.tensor(op, name, t, dtypes=(torch.float32,), device=device)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == rows):
        return
    raise ValueError(
        f"{op}: argument '{name}' has shape {tuple(t.shape)}; expected [{rows}] (row-wise) or [] (per-tensor)"
    )


def fp8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """FP8 GEMM with row-wise or per-tensor scales: y = (xq @ wq.T) * x_scale[:, None] * w_scale[None, :] + bias.

    Args:
        xq: [M, K] float8_e4m3fn activations; K a multiple of 16.
        x_scale: float32 [M] (row-wise) or 0-d (per-tensor).
        wq: [N, K] float8_e4m3fn weight (nn.Linear layout).
        w_scale: float32 [N] (row-wise) or 0-d (per-tensor).
        out_dtype: torch.bfloat16 or torch.float16.
        bias: optional [N] float32, bfloat16 or float16.
    Returns:
        y [M, N] in out_dtype, accumulated in float32. Reference: ``reference.fp8_gemm``.
    """
    op = "fp8_gemm"
    check.tensor(op, "xq", xq, dtypes=(FP8,), ndim=2)
    m, k = xq.shape
    check.tensor(op, "wq", wq, dtypes=(FP8,), shape=(None, k), device=xq.device)
    n = wq.shape[0]
    check.multiple_of(op, "K", k, 16, "FP8 rows must be 16-byte aligned")
    _check_scale(op, "x_scale", x_scale, m, xq.device)
    _check_scale(op, "w_scale", w_scale, n, xq.device)
    if out_dtype not in check.HALF_DTYPES:
        raise TypeError(f"{op}: argument 'out_dtype'={out_dtype}; expected torch.bfloat16 or torch.float16")
    if bias is not None:
        check.tensor(op, "bias", bias, dtypes=check.FLOAT_DTYPES, shape=(n,), device=xq.device)
    return _call(op, xq.device, backend, xq, x_scale, wq, w_scale, out_dtype, bias)


# --- INT4 weight-only ------------------------------------------------------------------


def quantize_int4(w: torch.Tensor, group_size: int | None = 128, symmetric: bool = False) -> Int4Weight:
    """Group-wise INT4 quantization of a weight w [N, K] (bf16/fp16/fp32) into an Int4Weight.

    One scale (and a zero point unless `symmetric`) per row and group of `group_size` inputs
    along K (None or -1: one group per row). K must be divisible by group_size.
    See ``llama_kernels.int4`` for the packed layout and the AWQ/GPTQ conversions.
    """
    return reference.quantize_int4(w, group_size=group_size, symmetric=symmetric)


def int4_gemm(x: torch.Tensor, w: Int4Weight, *, backend: str | None = None) -> torch.Tensor:
    """Weight-only INT4 GEMM: y = x @ w.dequantize().T (with w.perm applied to x's columns if set).

    Args:
        x: [M, K] bfloat16 or float16.
        w: Int4Weight of shape [N, K] (qweight int32 [N, K/8], scales/zeros [N, K/group_size]).
    Returns:
        y [M, N] in x's dtype. Reference: ``reference.int4_gemm``.
    """
    op = "int4_gemm"
    check.tensor(op, "x", x, dtypes=check.HALF_DTYPES, ndim=2)
    if not isinstance(w, Int4Weight):
        raise TypeError(f"{op}: argument 'w' must be an Int4Weight (see ops.quantize_int4), got {type(w).__name__}")
    n, k = w.out_features, w.in_features
    if x.shape[1] != k:
        raise ValueError(f"{op}: argument 'x' has shape {tuple(x.shape)}; expected [M, {k}] (w is [{n}, {k}])")
    if w.qweight.device != x.device:
        raise ValueError(f"{op}: argument 'w' is on {w.qweight.device}; expected {x.device} (the device of 'x')")
    return _call(op, x.device, backend, x, w)


def prepare_int4(w: Int4Weight, dtype: torch.dtype, *, backend: str | None = None) -> tuple[Int4Weight, str | None]:
    """Once per weight, at load: (w in the layout of the int4_gemm backend selected for its device,
    the backend to pass to int4_gemm for it). A backend that reads its own layout (the cuda kernel's
    tiles) gets it in place of qweight's, and is then the only one that can read the weight; the
    others read w as is (returned with None; on the CPU the torch backend attaches to w the layout of
    PyTorch's CPU INT4 kernel, and for bfloat16 q - z as int8 for its prefill matmul, while every
    backend still reads w). dtype: the activations' (bfloat16 or float16)."""
    name = backends.select("int4_gemm", w.qweight.device, backend)[0]
    prepare = backends.preparer("int4_gemm", name)
    prepared = w if prepare is None else prepare(w, dtype)
    return (w, None) if prepared is w else (prepared, name)  # w itself: left as is, any backend reads it


def prepare_fp8(wq: torch.Tensor, dtype: torch.dtype, *, backend: str | None = None) -> torch.Tensor:
    """Once per FP8 weight wq [N, K] float8_e4m3fn, at load: lets the fp8_gemm backend selected for its
    device attach the layout it reads fastest to wq (on the CPU, the torch backend: wq requantized to
    int8 per output channel, 1 more byte per weight, which PyTorch's CPU int8 kernels read: lossy, see
    ``reference.prepare_fp8_cpu``). dtype: fp8_gemm's out_dtype. Returns wq, which every backend still
    reads as is."""
    check.tensor("prepare_fp8", "wq", wq, dtypes=(FP8,), ndim=2)
    prepare = backends.preparer("fp8_gemm", backends.select("fp8_gemm", wq.device, backend)[0])
    return wq if prepare is None else prepare(wq, dtype)


# --- RMSNorm ---------------------------------------------------------------------------


def _check_norm(op: str, x, residual, weight, eps) -> None:
    check.tensor(op, "x", x, dtypes=check.FLOAT_DTYPES, ndim=2)
    if residual is not None:
        check.tensor(op, "residual", residual, shape=tuple(x.shape), device=x.device)
        check.same_dtype(op, "residual", residual, "x", x)
    check.tensor(op, "weight", weight, shape=(x.shape[1],), device=x.device)
    check.same_dtype(op, "weight", weight, "x", x)
    check.positive_float(op, "eps", eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in float32.

    x [M, H] bf16/fp16/fp32; weight [H] in x's dtype; y [M, H] in x's dtype.
    Reference: ``reference.rms_norm``.
    """
    _check_norm("rms_norm", x, None, weight, eps)
    return _call("rms_norm", x.device, backend, x, weight, eps)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm in one pass.

    x, residual [M, H] bf16/fp16/fp32 (residual may be None); weight [H]; all one dtype.
    Returns (y, residual_out), both [M, H] in x's dtype: residual_out = x + residual rounded to
    the dtype, y = rms_norm(residual_out). Reference: ``reference.add_rms_norm``.
    """
    _check_norm("add_rms_norm", x, residual, weight, eps)
    return _call("add_rms_norm", x.device, backend, x, residual, weight, eps)


def add_rms_norm_fp8(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    scale_ub: float | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_rms_norm whose output is quantized row-wise to FP8 in the same pass, for an FP8 GEMM.

    x, residual [M, H] bf16/fp16/fp32 (residual may be None); weight [H].
    Returns (yq [M, H] float8_e4m3fn, y_scale [M] float32, residual_out [M, H] in x's dtype);
    the float32 normalized rows are quantized as in quantize_fp8 (with scale_ub).
    Reference: ``reference.add_rms_norm_fp8``.
    """
    _check_norm("add_rms_norm_fp8", x, residual, weight, eps)
    check.positive_float("add_rms_norm_fp8", "scale_ub", scale_ub, allow_none=True)
    return _call("add_rms_norm_fp8", x.device, backend, x, residual, weight, eps, scale_ub)


# --- RoPE + KV-cache write -------------------------------------------------------------


def _check_cache_scales(op: str, cache: torch.Tensor, scale, name: str, hkv: int, cache_name: str) -> None:
    if cache.dtype == FP8:
        if scale is None:
            raise ValueError(f"{op}: '{cache_name}' is float8_e4m3fn, so '{name}' (float32 [{hkv}]) is required")
        check.tensor(op, name, scale, dtypes=(torch.float32,), shape=(hkv,), device=cache.device)
    elif scale is not None:
        raise ValueError(f"{op}: '{name}' is only for float8_e4m3fn caches; '{cache_name}' is {cache.dtype}")


def _check_caches(op: str, k_cache, v_cache, k_scale, v_scale, device, hkv: int, d: int) -> None:
    check.tensor(op, "k_cache", k_cache, dtypes=(*check.FLOAT_DTYPES, FP8), shape=(None, None, hkv, d), device=device)
    check.tensor(op, "v_cache", v_cache, shape=tuple(k_cache.shape), device=device)
    check.same_dtype(op, "v_cache", v_cache, "k_cache", k_cache)
    _check_cache_scales(op, k_cache, k_scale, "k_scale", hkv, "k_cache")
    _check_cache_scales(op, v_cache, v_scale, "v_scale", hkv, "v_cache")


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
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k fused with the paged KV-cache write of k_rot and v.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D]; one dtype (bf16/fp16/fp32); Hq % Hkv == 0; D even.
        positions: [T] int32/int64, each in [0, P).
        cos, sin: [P, D/2] float32 tables from rope_cos_sin.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], written in place; bf16/fp16/fp32
            (the dtype of k) or float8_e4m3fn, which stores x / scale with k_scale/v_scale
            float32 [Hkv] (saturating at +-448).
        slot_mapping: [T] int32/int64, slot = block * block_size + offset; negative = skip.
        interleaved: rotate adjacent pairs (2i, 2i+1) instead of the default (i, i + D/2).
    Returns:
        (q_rot [T, Hq, D], k_rot [T, Hkv, D]) in q's dtype. Reference: ``reference.rope_and_cache``.
    """
    op = "rope_and_cache"
    check.tensor(op, "q", q, dtypes=check.FLOAT_DTYPES, ndim=3)
    t, hq, d = q.shape
    check.tensor(op, "k", k, shape=(t, None, d), device=q.device)
    hkv = k.shape[1]
    check.tensor(op, "v", v, shape=(t, hkv, d), device=q.device)
    check.same_dtype(op, "k", k, "q", q)
    check.same_dtype(op, "v", v, "q", q)
    if hq % hkv:
        raise ValueError(f"{op}: query heads Hq={hq} must be a multiple of KV heads Hkv={hkv}")
    check.multiple_of(op, "head_dim D", d, 2, "rotary pairs")
    check.tensor(op, "positions", positions, dtypes=check.INDEX_DTYPES, shape=(t,), device=q.device)
    check.tensor(op, "cos", cos, dtypes=(torch.float32,), shape=(None, d // 2), device=q.device)
    check.tensor(op, "sin", sin, dtypes=(torch.float32,), shape=tuple(cos.shape), device=q.device)
    _check_caches(op, k_cache, v_cache, k_scale, v_scale, q.device, hkv, d)
    if k_cache.dtype != FP8:
        check.same_dtype(op, "k_cache", k_cache, "k", k)
    check.tensor(op, "slot_mapping", slot_mapping, dtypes=check.INDEX_DTYPES, shape=(t,), device=q.device)
    check.values_in_range(op, "positions", positions, 0, cos.shape[0] - 1, "positions within the cos/sin table")
    n_slots = k_cache.shape[0] * k_cache.shape[1]
    check.values_in_range(op, "slot_mapping", slot_mapping, -(2**62), n_slots - 1, "slots (negative = skip)")
    return _call(
        op, q.device, backend, q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        interleaved,
    )  # fmt: skip


# --- decode attention ------------------------------------------------------------------


def _check_paged(op: str, k_cache, block_table, seq_lens, b: int, device) -> None:
    """block_table [b, max_blocks] and seq_lens [b] int32; on the CPU also their values: lengths in
    [1, max_blocks * block_size] and block ids of k_cache in the blocks those lengths use."""
    check.tensor(op, "block_table", block_table, dtypes=(torch.int32,), shape=(b, None), device=device)
    check.tensor(op, "seq_lens", seq_lens, dtypes=(torch.int32,), shape=(b,), device=device)
    capacity = block_table.shape[1] * k_cache.shape[1]
    check.values_in_range(op, "seq_lens", seq_lens, 1, capacity, "lengths (max_blocks * block_size)")
    if block_table.device.type == "cpu" and b:

        def used_blocks() -> None:
            used = torch.arange(block_table.shape[1]) * k_cache.shape[1] < seq_lens.clamp(min=1)[:, None]
            check.values_in_range(op, "block_table", block_table[used], 0, k_cache.shape[0] - 1,
                                  "block ids of k_cache (in the blocks seq_lens uses)")  # fmt: skip

        check.once((block_table, seq_lens), ("blocks", k_cache.shape[0], k_cache.shape[1]), used_blocks)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Split-KV GQA decode attention: one new query token per sequence over a paged KV cache.

    Args:
        q: [B, Hq, D] bf16/fp16/fp32.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], bf16/fp16/fp32 or float8_e4m3fn
            with k_scale/v_scale float32 [Hkv]; Hq % Hkv == 0 (any group size).
        block_table: [B, max_blocks] int32; sequence b's token t is in block
            block_table[b, t // block_size] at offset t % block_size.
        seq_lens: [B] int32, each in [1, max_blocks * block_size].
        scale: softmax scale, default 1/sqrt(D).
    Returns:
        out [B, Hq, D] in q's dtype. Reference: ``reference.decode_attention``.
    """
    op = "decode_attention"
    check.tensor(op, "q", q, dtypes=check.FLOAT_DTYPES, ndim=3)
    b, hq, d = q.shape
    check.tensor(op, "k_cache", k_cache, ndim=4)
    hkv = k_cache.shape[2]
    _check_caches(op, k_cache, v_cache, k_scale, v_scale, q.device, hkv, d)
    if hq % hkv:
        raise ValueError(f"{op}: query heads Hq={hq} must be a multiple of KV heads Hkv={hkv} (k_cache dim 2)")
    _check_paged(op, k_cache, block_table, seq_lens, b, q.device)
    if scale is not None:
        check.positive_float(op, "scale", scale)
    return _call(op, q.device, backend, q, k_cache, v_cache, block_table, seq_lens, scale, k_scale, v_scale)


# --- paged prefill attention -----------------------------------------------------------


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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal GQA attention of a packed chunk of new tokens (prefill) over a paged KV cache.

    Args:
        q: [T, Hq, D] bf16/fp16/fp32: the new tokens of B sequences packed in order, query_lens[0]
            of sequence 0 first.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], bf16/fp16/fp32 or float8_e4m3fn
            with k_scale/v_scale float32 [Hkv]; Hq % Hkv == 0 (query head h reads KV head
            h // (Hq // Hkv)). The new tokens' k/v must already be written (rope_and_cache).
        block_table: [B, max_blocks] int32, as in decode_attention.
        seq_lens: [B] int32, tokens of each sequence in the cache (the new ones included), each in
            [1, max_blocks * block_size].
        query_lens: [B] int32, new tokens of each sequence, each in [1, seq_lens[b]], sum T. They
            are the last query_lens[b] of its seq_lens[b] tokens: new token i of sequence b is at
            position p = seq_lens[b] - query_lens[b] + i and attends to positions 0..p.
        scale: softmax scale, default 1/sqrt(D).
        plans: a forward pass's memo (AttentionBatch.plans), or None: a kernel that plans its work
            from seq_lens and query_lens (the triton one) builds its plan on the first call of the
            step and stores it there; the step's later calls (its other layers) reuse it. Pass it
            only with the same seq_lens and query_lens tensors, unchanged, in every call.
    Returns:
        out [T, Hq, D] in q's dtype. Reference: ``reference.paged_prefill_attention``.

    As for every op, the values in seq_lens, query_lens and block_table (ranges, and
    sum(query_lens) == T) are checked only for CPU tensors; on a GPU a query_lens that does not
    sum to T leaves rows of out unwritten (sum < T) or drops tokens past T (sum > T).
    """
    op = "paged_prefill_attention"
    check.tensor(op, "q", q, dtypes=check.FLOAT_DTYPES, ndim=3)
    t, hq, d = q.shape
    check.tensor(op, "k_cache", k_cache, ndim=4)
    hkv = k_cache.shape[2]
    _check_caches(op, k_cache, v_cache, k_scale, v_scale, q.device, hkv, d)
    if hq % hkv:
        raise ValueError(f"{op}: query heads Hq={hq} must be a multiple of KV heads Hkv={hkv} (k_cache dim 2)")
    check.tensor(op, "seq_lens", seq_lens, dtypes=(torch.int32,), ndim=1, device=q.device)
    b = seq_lens.shape[0]
    _check_paged(op, k_cache, block_table, seq_lens, b, q.device)
    check.tensor(op, "query_lens", query_lens, dtypes=(torch.int32,), shape=(b,), device=q.device)
    if scale is not None:
        check.positive_float(op, "scale", scale)
    if plans is not None and not isinstance(plans, dict):
        raise TypeError(f"{op}: argument 'plans' must be a dict (AttentionBatch.plans) or None, "
                        f"got {type(plans).__name__}")  # fmt: skip
    if query_lens.device.type == "cpu":
        over = (query_lens < 1) | (query_lens > seq_lens)
        if over.any():
            i = int(over.nonzero()[0])
            raise ValueError(f"{op}: argument 'query_lens' has query_lens[{i}]={int(query_lens[i])}; "
                             f"expected new tokens in [1, seq_lens[{i}]={int(seq_lens[i])}]")  # fmt: skip
        total = int(query_lens.sum())
        if total != t:
            raise ValueError(f"{op}: argument 'query_lens' sums to {total}; expected T={t} (q's dim 0)")
    return _call(op, q.device, backend, q, k_cache, v_cache, block_table, seq_lens, query_lens, scale, k_scale,
                 v_scale, plans)  # fmt: skip


# --- backend registration --------------------------------------------------------------

for _name in ("quantize_fp8", "rms_norm", "add_rms_norm", "add_rms_norm_fp8", "rope_and_cache", "decode_attention",
              "paged_prefill_attention"):  # fmt: skip
    backends.register(_name, "torch", getattr(reference, _name))
# The GEMMs' CPU weights get the layouts of PyTorch's CPU kernels at load (reference.prepare_*_cpu).
backends.register("fp8_gemm", "torch", reference.fp8_gemm, prepare=reference.prepare_fp8_cpu)
backends.register("int4_gemm", "torch", reference.int4_gemm, prepare=reference.prepare_int4_cpu)

from . import cuda as _cuda  # noqa: E402,F401  (registers the cuda backend)
from . import triton as _triton  # noqa: E402,F401  (registers the triton backend where triton imports)
