"""The error paths of every op: bad input fails before anything runs, with a message naming the
argument, the value and what was expected; nothing (caches included) is modified."""

from __future__ import annotations

import pytest
import torch

from conftest import randn
from llama_kernels import ops

FP8 = torch.float8_e4m3fn
META = torch.device("meta")  # a second device that needs no GPU


def fp8(*shape):
    return randn(*shape, seed=sum(shape)).to(FP8)


# --- quantize_fp8 / fp8_gemm -----------------------------------------------------------


@pytest.mark.parametrize(
    "x,scale_ub,err,match",
    [
        (torch.ones(4, 8, dtype=torch.int32), None, TypeError, r"quantize_fp8: argument 'x' has dtype torch.int32"),
        (randn(8), None, ValueError, r"argument 'x' has shape \(8,\) \(1-D\); expected 2-D"),
        (randn(8, 4).t(), None, ValueError, r"argument 'x' \(shape \(4, 8\)\) must be contiguous"),
        (randn(4, 8), -1.0, ValueError, r"argument 'scale_ub'=-1.0; expected a positive float or None"),
        (randn(4, 8), float("nan"), ValueError, r"argument 'scale_ub'=nan"),
        ("x", None, TypeError, r"argument 'x' must be a torch.Tensor, got str"),
    ],
)
def test_quantize_fp8_errors(x, scale_ub, err, match):
    with pytest.raises(err, match=match):
        ops.quantize_fp8(x, scale_ub)


def _gemm_args(m=3, n=24, k=64):
    return dict(xq=fp8(m, k), x_scale=torch.rand(m) + 0.1, wq=fp8(n, k), w_scale=torch.rand(n) + 0.1)


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(xq=randn(3, 64, dtype=torch.bfloat16)), TypeError, r"'xq' has dtype torch.bfloat16; expected one of: float8_e4m3fn"),
        (dict(wq=fp8(24, 48)), ValueError, r"'wq' has shape \(24, 48\); expected \[\*, 64\]"),
        (dict(xq=fp8(3, 72), wq=fp8(24, 72)), ValueError, r"K=72 must be a multiple of 16"),
        (dict(x_scale=torch.rand(4)), ValueError, r"'x_scale' has shape \(4,\); expected \[3\] \(row-wise\) or \[\] \(per-tensor\)"),
        (dict(w_scale=torch.rand(24, 1)), ValueError, r"'w_scale' has shape \(24, 1\); expected \[24\]"),
        (dict(w_scale=torch.rand(24).half()), TypeError, r"'w_scale' has dtype torch.float16; expected one of: float32"),
        (dict(bias=torch.rand(23)), ValueError, r"'bias' has shape \(23,\); expected \[24\]"),
        (dict(out_dtype=torch.float32), TypeError, r"'out_dtype'=torch.float32; expected torch.bfloat16 or torch.float16"),
        (dict(wq=fp8(24, 64).to(META)), ValueError, r"'wq' is on meta; expected cpu"),
    ],
)
def test_fp8_gemm_errors(change, err, match):
    args = _gemm_args() | change
    with pytest.raises(err, match=match):
        ops.fp8_gemm(**args)


# --- int4 ------------------------------------------------------------------------------


def test_int4_errors():
    w = ops.quantize_int4(randn(16, 128), group_size=64)
    with pytest.raises(ValueError, match=r"int4_gemm: argument 'x' has shape \(2, 64\); expected \[M, 128\]"):
        ops.int4_gemm(randn(2, 64, dtype=torch.bfloat16), w)
    with pytest.raises(TypeError, match=r"int4_gemm: argument 'x' has dtype torch.float32"):
        ops.int4_gemm(randn(2, 128), w)
    with pytest.raises(TypeError, match=r"argument 'w' must be an Int4Weight"):
        ops.int4_gemm(randn(2, 128, dtype=torch.bfloat16), randn(16, 128))
    with pytest.raises(ValueError, match=r"K=576 is not divisible by group_size=128; use 64 or 32"):
        ops.quantize_int4(randn(16, 576), group_size=128)


# --- norms -----------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["add_rms_norm", "add_rms_norm_fp8"])
@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(x=randn(3, 64).double()), TypeError, r"argument 'x' has dtype torch.float64"),
        (dict(residual=randn(3, 64, dtype=torch.bfloat16)), TypeError, r"'residual' has dtype torch.bfloat16; expected torch.float32 \(the dtype of 'x'\)"),
        (dict(residual=randn(3, 32)), ValueError, r"'residual' has shape \(3, 32\); expected \[3, 64\]"),
        (dict(weight=randn(63)), ValueError, r"'weight' has shape \(63,\); expected \[64\]"),
        (dict(weight=randn(64).to(META)), ValueError, r"'weight' is on meta; expected cpu"),
        (dict(eps=0.0), ValueError, r"argument 'eps'=0.0; expected a positive float"),
        (dict(x=randn(2, 3, 64)), ValueError, r"'x' has shape \(2, 3, 64\) \(3-D\); expected 2-D"),
    ],
)
def test_norm_errors(op, change, err, match):
    args = dict(x=randn(3, 64), residual=randn(3, 64, seed=1), weight=randn(64, seed=2), eps=1e-5) | change
    with pytest.raises(err, match=f"{op}: .*{match}"):
        getattr(ops, op)(**args)


def test_rms_norm_errors():
    with pytest.raises(ValueError, match=r"rms_norm: argument 'weight' has shape \(8,\); expected \[64\]"):
        ops.rms_norm(randn(3, 64), randn(8))


# --- rope ------------------------------------------------------------------------------


def test_rope_scaling_errors():
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported"):
        ops.rope_cos_sin(64, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"'llama3' needs keys \['low_freq_factor'"):
        ops.rope_cos_sin(64, 16, 10000.0, {"rope_type": "llama3", "factor": 8.0})


def _rope_args(t=5, hq=6, hkv=2, d=64, cache_dtype=torch.bfloat16):
    cos, sin = ops.rope_cos_sin(d, 128, 10000.0)
    return dict(
        q=randn(t, hq, d, dtype=torch.bfloat16), k=randn(t, hkv, d, dtype=torch.bfloat16, seed=1),
        v=randn(t, hkv, d, dtype=torch.bfloat16, seed=2), positions=torch.arange(t), cos=cos, sin=sin,
        k_cache=torch.zeros(4, 16, hkv, d, dtype=cache_dtype), v_cache=torch.zeros(4, 16, hkv, d, dtype=cache_dtype),
        slot_mapping=torch.arange(t) * 3,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(k=randn(5, 4, 64, dtype=torch.bfloat16), v=randn(5, 4, 64, dtype=torch.bfloat16)), ValueError, r"Hq=6 must be a multiple of KV heads Hkv=4"),
        (dict(v=randn(5, 2, 64)), TypeError, r"'v' has dtype torch.float32; expected torch.bfloat16"),
        (dict(positions=torch.arange(5).float()), TypeError, r"'positions' has dtype torch.float32"),
        (dict(positions=torch.tensor([0, 1, 2, 3, 128])), ValueError, r"'positions' has values in \[0, 128\]; expected positions within the cos/sin table in \[0, 127\]"),
        (dict(slot_mapping=torch.tensor([0, 1, 2, 3, 64])), ValueError, r"'slot_mapping' has values in \[0, 64\]"),
        (dict(slot_mapping=torch.arange(4)), ValueError, r"'slot_mapping' has shape \(4,\); expected \[5\]"),
        (dict(k_cache=torch.zeros(4, 16, 2, 128, dtype=torch.bfloat16)), ValueError, r"'k_cache' has shape \(4, 16, 2, 128\); expected \[\*, \*, 2, 64\]"),
        (dict(k_cache=torch.zeros(4, 16, 2, 64, dtype=FP8), v_cache=torch.zeros(4, 16, 2, 64, dtype=FP8)), ValueError, r"'k_cache' is float8_e4m3fn, so 'k_scale' \(float32 \[2\]\) is required"),
        (dict(k_scale=torch.ones(2)), ValueError, r"'k_scale' is only for float8_e4m3fn caches"),
        (dict(cos=torch.zeros(128, 16)), ValueError, r"'cos' has shape \(128, 16\); expected \[\*, 32\]"),
    ],
)
def test_rope_and_cache_errors_leave_caches_untouched(change, err, match):
    args = _rope_args() | change
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(err, match=f"rope_and_cache: .*{match}"):
        ops.rope_and_cache(**args)
    assert torch.equal(args["k_cache"].float(), k_before.float()) and torch.equal(args["v_cache"].float(), v_before.float())


# --- decode attention ------------------------------------------------------------------


def _attn_args(b=2, hq=8, hkv=2, d=64):
    return dict(
        q=randn(b, hq, d, dtype=torch.bfloat16), k_cache=randn(6, 16, hkv, d, dtype=torch.bfloat16, seed=1),
        v_cache=randn(6, 16, hkv, d, dtype=torch.bfloat16, seed=2),
        block_table=torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32),
        seq_lens=torch.tensor([40, 20], dtype=torch.int32),
    )  # fmt: skip


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(q=randn(2, 6, 64, dtype=torch.bfloat16)), ValueError, r"Hq=6 must be a multiple of KV heads Hkv=4|Hq=6"),
        (dict(q=randn(2, 8, 128, dtype=torch.bfloat16)), ValueError, r"'k_cache' has shape \(6, 16, 2, 64\); expected \[\*, \*, 2, 128\]"),
        (dict(seq_lens=torch.tensor([40, 0], dtype=torch.int32)), ValueError, r"'seq_lens' has values in \[0, 40\]; expected lengths \(max_blocks \* block_size\) in \[1, 48\]"),
        (dict(seq_lens=torch.tensor([49, 20], dtype=torch.int32)), ValueError, r"'seq_lens' has values in \[20, 49\]"),
        (dict(seq_lens=torch.tensor([40, 20])), TypeError, r"'seq_lens' has dtype torch.int64; expected one of: int32"),
        (dict(block_table=torch.tensor([[0, 1, 2], [3, 9, -1]], dtype=torch.int32)), ValueError, r"'block_table' has values in \[0, 9\]; expected block ids of k_cache"),
        (dict(block_table=torch.zeros(3, 3, dtype=torch.int32)), ValueError, r"'block_table' has shape \(3, 3\); expected \[2, \*\]"),
        (dict(v_cache=randn(6, 16, 2, 64, dtype=torch.float16)), TypeError, r"'v_cache' has dtype torch.float16; expected torch.bfloat16 \(the dtype of 'k_cache'\)"),
        (dict(scale=-0.1), ValueError, r"'scale'=-0.1; expected a positive float"),
    ],
)
def test_decode_attention_errors(change, err, match):
    args = _attn_args() | change
    if "q" in change and change["q"].shape[1] == 6:
        args["k_cache"] = args["v_cache"] = randn(6, 16, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(err, match=f"decode_attention: .*{match}"):
        ops.decode_attention(**args)


def test_decode_attention_padding_in_unused_blocks_is_fine():
    out = ops.decode_attention(**_attn_args())  # row 1 has -1 in a block it does not use
    assert torch.isfinite(out.float()).all()


def test_value_checks_memoized_only_inside_frozen_values():
    """Inside _validate.frozen_values (the runner's forward pass) a value check that passed is not repeated for the
    same tensor objects and bounds; a new tensor, or other bounds, is still checked, and outside every call checks."""
    from llama_kernels import _validate

    args = _attn_args()
    bad = torch.tensor([[0, 1, 2], [3, 9, -1]], dtype=torch.int32)
    with _validate.frozen_values():
        ops.decode_attention(**args)
        with pytest.raises(ValueError, match=r"'block_table' has values in \[0, 9\]"):
            ops.decode_attention(**(args | dict(block_table=bad)))  # other tensor: checked
        small = dict(k_cache=args["k_cache"][:4], v_cache=args["v_cache"][:4])  # other bounds: checked
        with pytest.raises(ValueError, match=r"'block_table' has values in \[0, 4\]; expected .* in \[0, 3\]"):
            ops.decode_attention(**(args | small))
        ops.decode_attention(**args)  # the same tensors and bounds again: answered by the memo
    args["block_table"][1, 1] = 9
    with pytest.raises(ValueError, match=r"'block_table' has values in \[0, 9\]"):
        ops.decode_attention(**args)  # outside: checked every call
    calls: list[int] = []
    t = torch.zeros(3, dtype=torch.int32)
    with _validate.frozen_values():
        for bounds in (("b", 1), ("b", 1), ("b", 2), ("b", 1)):
            _validate.once((t,), bounds, lambda: calls.append(1))
    assert len(calls) == 2  # once per bounds inside the block
    _validate.once((t,), ("b", 1), lambda: calls.append(1))
    assert len(calls) == 3  # and every time outside it
