"""The cuda decode_attention kernel against the reference, on a GPU (marked `gpu`)."""

from __future__ import annotations

import pytest
import torch

from conftest import TOL, assert_rel_close, paged_attention_case, poison_allocator, randn
from llama_kernels import ops, reference

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn


def _check(args, scale=None, name="decode_attention"):
    q, kc, vc, table, lens, ks, vs = args
    want = reference.decode_attention(q, kc, vc, table, lens, scale, ks, vs)
    poison_allocator(q.device)
    out = ops.decode_attention(q, kc, vc, table, lens, scale, ks, vs, backend="cuda")
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_rel_close(out, want, TOL[q.dtype], name)  # also asserts no NaN/inf
    again = ops.decode_attention(q, kc, vc, table, lens, scale, ks, vs, backend="cuda")
    assert torch.equal(out, again), f"{name}: repeat runs must be bit-identical"
    return out


@pytest.mark.parametrize("cache", ["same", "fp8"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", list(range(1, 17)))
def test_all_groups(gpu, group, d, cache):
    block_size = (16, 32, 64)[group % 3]
    cache_dtype = FP8 if cache == "fp8" else torch.bfloat16
    args = paged_attention_case([1, 17, 1000], 2 * group, 2, d, block_size, torch.bfloat16, cache_dtype, group * d, gpu)
    _check(args, name=f"group {group} D {d} bs {block_size} {cache}")


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float16, torch.float16), (torch.float16, FP8),
                                               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, FP8)])  # fmt: skip
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_block_sizes_and_dtypes(gpu, block_size, dtype, cache_dtype):
    args = paged_attention_case([5, 64, 65, 333, 2048], 32, 8, 128, block_size, dtype, cache_dtype, block_size, gpu)
    _check(args, name=f"bs {block_size} {dtype}/{cache_dtype}")


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("group,d", [(1, 128), (4, 128), (8, 128), (16, 64)])
def test_long_context(gpu, group, d, cache_dtype):
    # Batch 1 at 32769 tokens: many splits, the last one holding a single token.
    args = paged_attention_case([32769], 8 * group, 8, d, 16, torch.bfloat16, cache_dtype, 7 + group, gpu)
    _check(args, name=f"32769 tokens group {group} D {d} {cache_dtype}")


def test_mixed_batch_single_split(gpu):
    # Batch 64 x 8 KV heads fills the GPU without splitting: the split kernel writes out directly.
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 4097, (64,), generator=g).tolist()
    args = paged_attention_case(lens, 32, 8, 128, 16, torch.bfloat16, torch.bfloat16, 11, gpu)
    _check(args, name="batch 64 mixed lengths")


def test_mixed_batch_with_splits_and_spare_capacity(gpu):
    # A wide block table (max_len far above every length): most splits of most sequences are
    # empty and must contribute nothing.
    lens = [1, 17, 1000, 32769, 2, 4095]
    args = paged_attention_case(lens, 16, 2, 128, 32, torch.bfloat16, FP8, 5, gpu, spare_blocks=300)
    _check(args, name="mixed lengths, spare capacity")


def test_custom_scale(gpu):
    args = paged_attention_case([17, 1000], 16, 2, 64, 16, torch.float16, torch.float16, 9, gpu)
    _check(args, scale=0.3, name="scale=0.3")


def test_cuda_graph_capture(gpu):
    case = paged_attention_case([1000, 17, 32769], 32, 8, 128, 16, torch.bfloat16, FP8, 13, gpu)
    q, kc, vc, table, lens, ks, vs = case
    ops.decode_attention(q, kc, vc, table, lens, None, ks, vs, backend="cuda")  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, kc, vc, table, lens, None, ks, vs, backend="cuda")
    # New queries and shorter lengths (same shapes): the replay must follow the tensors' contents.
    q.copy_(randn(*q.shape, dtype=q.dtype, seed=14, device=gpu))
    lens.copy_(torch.tensor([999, 1, 20000], dtype=torch.int32, device=gpu))
    graph.replay()
    torch.cuda.synchronize()
    want = reference.decode_attention(q, kc, vc, table, lens, None, ks, vs)
    assert_rel_close(out, want, TOL[torch.bfloat16], "graph replay")


def test_side_stream(gpu):
    args = paged_attention_case([1000, 3], 8, 1, 128, 16, torch.bfloat16, torch.bfloat16, 17, gpu)
    q, kc, vc, table, lens, ks, vs = args
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.decode_attention(q, kc, vc, table, lens, backend="cuda")
    stream.synchronize()
    assert_rel_close(out, reference.decode_attention(q, kc, vc, table, lens), TOL[torch.bfloat16], "side stream")


@pytest.mark.parametrize("hq,hkv,d,bs,match", [
    (34, 2, 128, 16, r"group sizes Hq / Hkv in 1..16, got 34 / 2 = 17"),
    (8, 2, 96, 16, r"head_dim D in \(64, 128\), got D=96"),
    (8, 2, 128, 8, r"block_size in \(16, 32, 64\), got block_size=8"),
])  # fmt: skip
def test_unsupported_configs_are_rejected(gpu, hq, hkv, d, bs, match):
    q, kc, vc, table, lens, ks, vs = paged_attention_case([20], hq, hkv, d, bs, torch.bfloat16, torch.bfloat16, 1, gpu)
    with pytest.raises(ValueError, match=match):
        ops.decode_attention(q, kc, vc, table, lens, backend="cuda")


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_short_sequences_in_a_long_context_table(gpu, cache_dtype):
    """2K live tokens in a table sized for 128K (as under CUDA graphs): the splits come from the
    live lengths, so the result is right and the work does not depend on the table width."""
    args = paged_attention_case([2048, 100, 1], 32, 8, 128, 16, torch.bfloat16, cache_dtype, 21, gpu)
    table = args[3]
    wide = torch.full((table.shape[0], 131072 // 16), 1 << 30, dtype=table.dtype, device=gpu)  # never read
    wide[:, : table.shape[1]] = table
    args[3] = wide
    _check(args, name=f"2K live of a 128K table {cache_dtype}")


def test_over_long_seq_lens_are_clamped_to_the_table(gpu):
    """A length past max_blocks * block_size (not range-checked for GPU tensors) reads only the
    table's row: the result is attention over the whole row."""
    q, kc, vc, table, lens, ks, vs = paged_attention_case([40, 64], 8, 2, 128, 16, torch.bfloat16, torch.bfloat16,
                                                          5, gpu, spare_blocks=0)  # fmt: skip
    capacity = table.shape[1] * 16
    table = table.clone()
    table[table >= kc.shape[0]] = 0  # every entry of the row is a real block now
    want = reference.decode_attention(q, kc, vc, table, torch.full_like(lens, capacity))
    poison_allocator(gpu)
    out = ops.decode_attention(q, kc, vc, table, lens + capacity, backend="cuda")
    torch.cuda.synchronize()
    assert_rel_close(out, want, TOL[q.dtype], "clamped lengths")
