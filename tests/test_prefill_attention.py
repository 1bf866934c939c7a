"""paged_prefill_attention: the reference against independent definitions, the argument checks.

The reference (the torch backend) is checked against SDPA with a causal mask when the new tokens
are the whole sequence, and, with a cached prefix, token by token against decode_attention: new
token i of sequence b is one decode step over the first p + 1 cached tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TOL, assert_rel_close, paged_attention_case, randn
from llama_kernels import BackendUnavailableError, backends, ops

FP8 = torch.float8_e4m3fn


def prefill_case(seq_lens, query_lens, hq, hkv, d, block_size, dtype, cache_dtype, seed, device="cpu"):
    """Inputs [q, k_cache, v_cache, block_table, seq_lens, query_lens, k_scale, v_scale]: the caches
    of paged_attention_case and q [sum(query_lens), Hq, D]."""
    _, kc, vc, table, lens, ks, vs = paged_attention_case(seq_lens, hq, hkv, d, block_size, dtype, cache_dtype,
                                                          seed, device=device)  # fmt: skip
    q = randn(sum(query_lens), hq, d, dtype=dtype, seed=seed + 7, device=device)
    qlens = torch.tensor(query_lens, dtype=torch.int32, device=device)
    return [q, kc, vc, table, lens, qlens, ks, vs]


def decode_token_by_token(q, kc, vc, table, lens, qlens, ks, vs, scale=None):
    """The prefill output as len(q) decode steps: the query token at position p of sequence b
    attends to that sequence's first p + 1 tokens."""
    rows, steps = [], []
    for b, (n, m) in enumerate(zip(lens.tolist(), qlens.tolist())):
        rows += [b] * m
        steps += list(range(n - m + 1, n + 1))
    step_lens = torch.tensor(steps, dtype=torch.int32, device=q.device)
    return ops.decode_attention(q, kc, vc, table[rows], step_lens, scale, ks, vs, backend="torch")


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_without_prefix_is_causal_sdpa(group, dtype):
    seq_lens = [1, 17, 40]
    q, kc, vc, table, lens, qlens, _, _ = prefill_case(seq_lens, seq_lens, 2 * group, 2, 64, 16, dtype, dtype, 1)
    out = ops.paged_prefill_attention(q, kc, vc, table, lens, qlens)
    assert out.dtype == dtype and out.shape == q.shape
    start = 0
    for b, n in enumerate(seq_lens):
        blocks = table[b, : -(-n // 16)].long()
        k = kc[blocks].flatten(0, 1)[:n].double().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, n, D]
        v = vc[blocks].flatten(0, 1)[:n].double().transpose(0, 1).repeat_interleave(group, 0)
        want = F.scaled_dot_product_attention(q[start : start + n].double().transpose(0, 1), k, v, is_causal=True)
        assert_rel_close(out[start : start + n], want.transpose(0, 1), TOL[dtype] + 1e-6, f"sequence {b}")
        start += n


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, FP8)])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_reference_with_prefix_is_decode_token_by_token(group, dtype, cache_dtype):
    # Prefixes 0, 5 and 130 (cached tokens before the new ones), mixed query lengths.
    seq_lens, query_lens = [3, 22, 147, 1], [3, 17, 17, 1]
    args = prefill_case(seq_lens, query_lens, 2 * group, 2, 64, 16, dtype, cache_dtype, seed=group)
    out = ops.paged_prefill_attention(*args[:6], 0.07, *args[6:])
    assert_rel_close(out, decode_token_by_token(*args, scale=0.07), TOL[dtype] + 1e-6)


# --- argument checks --------------------------------------------------------------------


def _args(**change):
    q, kc, vc, table, lens, qlens, _, _ = prefill_case([40, 20], [5, 20], 8, 2, 64, 16, torch.bfloat16,
                                                       torch.bfloat16, seed=3)  # fmt: skip
    return dict(q=q, k_cache=kc, v_cache=vc, block_table=table, seq_lens=lens, query_lens=qlens) | change


I32 = dict(dtype=torch.int32)


@pytest.mark.parametrize("change,err,match", [
    (dict(q=randn(25, 8, 64, dtype=torch.float64)), TypeError,
     r"'q' has dtype torch.float64; expected one of: float32, float16, bfloat16"),
    (dict(q=randn(25, 5, 64, dtype=torch.bfloat16)), ValueError, r"Hq=5 must be a multiple of KV heads Hkv=2"),
    (dict(q=randn(25, 8, 128, dtype=torch.bfloat16)), ValueError, r"'k_cache' has shape .*; expected \[\*, \*, 2, 128\]"),
    (dict(q=randn(8, 25, 64, dtype=torch.bfloat16).transpose(0, 1)), ValueError, r"'q' \(shape \(25, 8, 64\)\) must be contiguous"),
    (dict(q=randn(26, 8, 64, dtype=torch.bfloat16)), ValueError, r"'query_lens' sums to 25; expected T=26"),
    (dict(query_lens=torch.tensor([5, 21], **I32)), ValueError,
     r"'query_lens' has query_lens\[1\]=21; expected new tokens in \[1, seq_lens\[1\]=20\]"),
    (dict(query_lens=torch.tensor([0, 25], **I32)), ValueError, r"query_lens\[0\]=0; expected new tokens in \[1, "),
    (dict(query_lens=torch.tensor([5, 20])), TypeError, r"'query_lens' has dtype torch.int64; expected one of: int32"),
    (dict(query_lens=torch.tensor([25], **I32)), ValueError, r"'query_lens' has shape \(1,\); expected \[2\]"),
    (dict(seq_lens=torch.tensor([40, 0], **I32)), ValueError, r"'seq_lens' has values in \[0, 40\]; expected lengths"),
    (dict(seq_lens=torch.tensor([[40, 20]], **I32)), ValueError, r"'seq_lens' has shape \(1, 2\) \(2-D\); expected 1-D"),
    (dict(block_table=torch.zeros(3, 3, **I32)), ValueError, r"'block_table' has shape \(3, 3\); expected \[2, \*\]"),
    (dict(block_table=torch.full((2, 4), 99, **I32)), ValueError, r"'block_table' has values in \[99, 99\]"),
    (dict(v_cache=randn(11, 16, 2, 64, dtype=torch.float16)), TypeError,
     r"'v_cache' has dtype torch.float16; expected torch.bfloat16 \(the dtype of 'k_cache'\)"),
    (dict(v_cache=randn(12, 16, 2, 64, dtype=torch.bfloat16)), ValueError, r"'v_cache' has shape \(12, 16, 2, 64\)"),
    (dict(k_scale=torch.ones(2)), ValueError, r"'k_scale' is only for float8_e4m3fn caches"),
    (dict(scale=0.0), ValueError, r"'scale'=0.0; expected a positive float"),
])  # fmt: skip
def test_errors_name_the_argument(change, err, match):
    with pytest.raises(err, match=f"paged_prefill_attention: .*{match}"):
        ops.paged_prefill_attention(**_args(**change))


def test_fp8_cache_needs_scales():
    args = _args(k_cache=_args()["k_cache"].to(FP8), v_cache=_args()["v_cache"].to(FP8))
    with pytest.raises(ValueError, match=r"'k_cache' is float8_e4m3fn, so 'k_scale' \(float32 \[2\]\) is required"):
        ops.paged_prefill_attention(**args)


def test_cuda_backend_has_no_kernel_and_is_never_chosen():
    with pytest.raises(BackendUnavailableError, match=r"paged_prefill_attention: backend='cuda' cannot run here: "
                       r"the cuda backend has no kernel for paged_prefill_attention"):  # fmt: skip
        ops.paged_prefill_attention(**_args(), backend="cuda")
    # The same reason on a CUDA device (found before any GPU query), so automatic selection skips cuda.
    reason = backends.unavailable_reason("paged_prefill_attention", "cuda", torch.device("cuda"))
    assert reason == "the cuda backend has no kernel for paged_prefill_attention"
