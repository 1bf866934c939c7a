"""The triton decode_attention (split-KV over a paged cache) against the reference.

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
lengths stay modest; the compile tests build the same kernels for sm_90 and read ptxas's spills.
"""

from __future__ import annotations

import functools

import pytest
import torch
import triton
import triton.language as tl

from conftest import TOL, assert_rel_close, paged_attention_case, poison_allocator
from llama_kernels import ops, reference
from llama_kernels.triton import attention
from triton_compile import compile_for, ptxas_report

FP8 = torch.float8_e4m3fn
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_case = functools.partial(paged_attention_case, device=DEVICE)
# Numpy warns about the 0/0 and log2(0) that an empty split computes in lanes it never stores.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning"),
]


def _check(args, scale=None, splits=None, name="decode_attention"):
    q, kc, vc, table, lens, ks, vs = args
    want = reference.decode_attention(q, kc, vc, table, lens, scale, ks, vs)
    poison_allocator(q.device)
    if splits is None:
        out = ops.decode_attention(q, kc, vc, table, lens, scale, ks, vs, backend="triton")
    else:
        out = attention.decode_attention_splits(q, kc, vc, table, lens, scale, ks, vs, splits)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_rel_close(out, want, TOL[q.dtype], name)  # also asserts no NaN/inf
    return out


DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
          (torch.bfloat16, FP8), (torch.float16, FP8)]  # fmt: skip


@pytest.mark.parametrize("dtype,cache_dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8, 16])
def test_matches_reference(group, d, dtype, cache_dtype):
    # Lengths 1, 17, 1000 in one batch: on the CPU this takes 2 splits of 512, so the short
    # sequences' second split is empty.
    args = _case([1, 17, 1000], 2 * group, 2, d, 16, dtype, cache_dtype, seed=group * d)
    _check(args, name=f"group {group} D {d} {dtype}/{cache_dtype}")


@pytest.mark.parametrize("block_size", [1, 64])
def test_block_sizes_and_custom_scale(block_size):
    args = _case([5, 70, 300], 8, 2, 64, block_size, torch.float32, torch.float32, seed=block_size)
    _check(args, scale=0.05, name=f"block_size {block_size}")


MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
         (torch.float32, torch.float16)]  # fmt: skip


@pytest.mark.parametrize("dtype,cache_dtype", MIXED)
def test_q_and_cache_of_different_dtypes(dtype, cache_dtype):
    # float32 q and an fp16 cache: q and p enter the fp16 dots as hi + lo parts, still within float32's tolerance.
    _check(_case([9, 100], 4, 1, 64, 16, dtype, cache_dtype, seed=5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp8_cache_read_as_codes(monkeypatch, dtype):
    """The sm_80 path: e4m3 caches read as uint8 codes and decoded in integer arithmetic."""
    monkeypatch.setattr(attention, "fp8_as_codes", lambda device: True)
    _check(_case([1, 17, 300], 8, 2, 64, 16, dtype, FP8, seed=7), name=f"FP8 as codes, q {dtype}")


def test_e4m3_decode_is_exact():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[torch.isfinite(codes.view(FP8).float())]
    out = torch.empty(codes.shape, dtype=torch.float32)
    _decode_kernel[(1,)](codes, out, codes.numel(), BLOCK=256)
    assert torch.equal(out, codes.view(FP8).float())


@triton.jit
def _decode_kernel(CODES, OUT, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(OUT + offs, attention.e4m3_decode(tl.load(CODES + offs, mask=offs < N)), mask=offs < N)


def test_split_ranges_follow_live_seq_lens():
    """Each sequence's splits share its live length, whatever the block table's width (under CUDA
    graphs, the whole max_context): a wide table gives the same result and the same non-empty
    splits as a tight one, and each split's tokens are bounded by seq_len / splits."""
    lens, splits, block_size = [1, 17, 300, 700], 8, 16
    tight = _case(lens, 8, 2, 64, block_size, torch.float32, torch.float32, seed=21)
    wide = list(tight)  # the same sequences, with 250 more unused (out-of-cache) table entries each
    wide[3] = torch.cat([tight[3], torch.full((len(lens), 250), 1 << 30, dtype=torch.int32, device=DEVICE)], 1)
    assert wide[3].shape[1] * block_size > 4096 > 4 * tight[3].shape[1] * block_size
    out_tight = _check(tight, splits=splits)
    out_wide = _check(wide, splits=splits)
    assert_rel_close(out_wide, out_tight, TOL[torch.float32], "wide vs tight block table")
    for args in (tight, wide):
        _, lse = attention.split_partials(*args[:5], None, *args[5:], splits=splits)
        busy = torch.isfinite(lse[:, 0]).sum(-1).tolist()  # non-empty splits of each sequence
        tile = attention.dot_plan(torch.float32, torch.float32).block_n
        per_split = [-(--(-n // splits) // tile) * tile for n in lens]  # seq_len / splits in whole tiles
        assert busy == [-(-n // p) for n, p in zip(lens, per_split)], busy
    # Split by the table's width (4096+ tokens / 8 = 512+ per split), 700 tokens took 2 splits; now all 8.
    assert busy[-1] == splits


@pytest.mark.parametrize("splits", [5, 24])
def test_many_splits_some_empty(splits):
    # max_len bound 320: splits of 64 tokens, so the length-1 and -17 sequences leave all but their
    # first split empty; 24 splits leaves trailing splits empty for every sequence and makes the
    # merge walk two tiles of 16 splits.
    args = _case([1, 17, 300], 8, 2, 64, 16, torch.float32, torch.float32, seed=splits)
    _check(args, scale=0.3, splits=splits)


def test_more_splits_than_one_merge_tile():
    # 1100 tokens in splits of 64: 18 non-empty splits, so the merge combines two tiles of data.
    args = _case([1100, 3], 2, 1, 64, 16, torch.bfloat16, torch.bfloat16, seed=11)
    _check(args, splits=40)


@pytest.mark.parametrize("group", [24, 80])
def test_groups_larger_than_16(group):
    # 24 pads to a 32-row tile; 80 takes two programs of 64 query heads per KV head.
    _check(_case([3, 90], group, 1, 64, 16, torch.float16, torch.float16, seed=group))


@pytest.mark.parametrize("d", [32, 96, 256])
def test_unsupported_head_dim_raises(d):
    q, kc, vc, table, lens, _, _ = _case([4], 4, 2, d, 16, torch.float16, torch.float16, seed=0)
    with pytest.raises(ValueError, match=f"head_dim D in \\(64, 128\\), got D={d}"):
        ops.decode_attention(q, kc, vc, table, lens, backend="triton")


def test_fake_registration_matches_kernel():
    args = _case([3, 20], 4, 2, 64, 16, torch.bfloat16, torch.bfloat16, seed=3)
    torch.library.opcheck(attention.decode_attention, tuple(args[:5]) + (None, *args[5:]),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


@pytest.mark.gpu
def test_repeat_runs_bit_identical():
    args = _case([1, 17, 1000, 4000], 32, 8, 128, 16, torch.bfloat16, torch.bfloat16, seed=1)
    first = _check(args)
    poison_allocator(DEVICE)
    assert torch.equal(first, ops.decode_attention(*args[:5], None, *args[5:], backend="triton"))


# --- split policy ----------------------------------------------------------------------


@pytest.mark.parametrize("batch,kv_heads,max_len,sms,want", [
    (1, 8, 131072, 132, 33),  # 33 splits x 8 heads = 264 programs: two waves on 132 SMs
    (1, 1, 131072, 132, 264),
    (1, 8, 1000, 132, 3),  # at least 256 tokens per split
    (4, 8, 8192, 132, 9),  # ceil(264 / 32)
    (256, 8, 4096, 132, 1),  # enough programs already
    (1, 1, 100, 132, 1),  # shorter than one split
    (3, 2, 1024, 4, 2),  # the CPU case of test_matches_reference
    (0, 8, 0, 132, 1),
])  # fmt: skip
def test_num_splits(batch, kv_heads, max_len, sms, want):
    assert attention.num_splits(batch, kv_heads, max_len, sms) == want


def test_num_splits_policy_holds_across_shapes():
    for batch in (1, 2, 7, 64):
        for kv_heads in (1, 8):
            for max_len in (1, 255, 256, 4096, 100_000):
                n = attention.num_splits(batch, kv_heads, max_len, 132)
                assert n >= 1 and (n == 1 or n * attention.MIN_SPLIT_TOKENS <= max_len)
                assert n * batch * kv_heads >= 2 * 132 or n == max(1, max_len // attention.MIN_SPLIT_TOKENS)


# --- compile for sm_90 -------------------------------------------------------------------


_SPLIT_INTS = ("min_split_len", "num_splits", "num_kv_heads", "max_blocks")
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8e4nv": FP8}


def _split_report(q: str, cache: str, group: int, d: int, capability: int) -> dict:
    """ptxas's report on the split kernel as a launch on sm_<capability> configures it (on sm_80
    FP8 caches are read as uint8 codes)."""
    bits = cache == "fp8e4nv" and capability < 89
    plan = attention.dot_plan(_TORCH[q], _TORCH[cache], bits, interpreted=False)
    ptr = "*u8" if bits else f"*{cache}"
    constexprs = dict(GROUP=group, HEAD_DIM=d, BLOCK_SIZE=16, BLOCK_G=attention.group_block(group, plan.max_block_g),
                      BLOCK_N=plan.block_n, IS_FP8=cache == "fp8e4nv", FP8_BITS=bits, SPLIT_Q=plan.split_q)  # fmt: skip
    signature = {"q_ptr": "*fp32" if plan.fp32 else f"*{q}", "k_ptr": ptr, "v_ptr": ptr, "table_ptr": "*i32",
                 "lens_ptr": "*i32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "part_ptr": "*fp32",
                 "lse_ptr": "*fp32", "qk_scale": "fp32", **dict.fromkeys(_SPLIT_INTS, "i32"),
                 **dict.fromkeys(constexprs, "constexpr")}  # fmt: skip
    return ptxas_report(compile_for(attention._split_kernel, signature, constexprs, capability), capability)


@pytest.mark.parametrize("capability", [80, 89, 90])
@pytest.mark.parametrize("cache", ["bf16", "fp8e4nv"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 64])
def test_split_kernel_compiles_without_spills(group, d, cache, capability):
    report = _split_report("bf16", cache, group, d, capability)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["log"]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("q,cache", [("fp32", "bf16"), ("fp32", "fp16"), ("fp16", "bf16"), ("fp32", "fp8e4nv"),
                                     ("fp32", "fp32"), ("bf16", "fp32")])  # fmt: skip
@pytest.mark.parametrize("group", [64])
def test_split_kernel_with_mixed_dtypes_compiles_without_spills(group, q, cache, capability):
    # float32 dots on 64-token tiles spilled 6-35 KB per thread (float32 q, 16-bit cache)
    report = _split_report(q, cache, group, 128, capability)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["log"]


@pytest.mark.parametrize("d", [64, 128])
def test_merge_kernel_compiles_for_sm90_without_spills(d):
    signature = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "num_splits": "i32",
                 "HEAD_DIM": "constexpr", "BLOCK_S": "constexpr"}  # fmt: skip
    kernel = compile_for(attention._merge_kernel, signature, dict(HEAD_DIM=d, BLOCK_S=attention.BLOCK_S))
    report = ptxas_report(kernel)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["log"]
