"""The triton rope_and_cache against the reference run on clones of the same poisoned caches.

Without a GPU the kernel runs under the Triton interpreter; the compile tests build it for
sm_90 / sm_89 anyway and check that ptxas spills nothing.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TOL, assert_rel_close, poison_allocator, randn
from llama_kernels import ops, reference
from llama_kernels.triton import rope
from test_triton_norm import DEVICE, e4m3_conversions
from triton_compile import compile_for, ptxas_report

FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (T, Hq, Hkv, D, index dtype): SmolLM2-135M (9/3 heads, D 64), Llama GQA 32/8 shrunk to 8/2 (D 128).
SHAPES = [(1, 9, 3, 64, torch.int32), (17, 8, 2, 128, torch.int64)]
BLOCKS, BLOCK_SIZE, MAX_POS = 5, 4, 4096


def _case(t, hq, hkv, d, dtype, cache_dtype, index_dtype, seed):
    """Inputs with random positions and distinct random slots, about a third negative (skipped)."""
    g = torch.Generator().manual_seed(seed)
    q = randn(t, hq, d, dtype=dtype, seed=seed, device=DEVICE)
    k = randn(t, hkv, d, dtype=dtype, seed=seed + 1, device=DEVICE)
    v = randn(t, hkv, d, dtype=dtype, seed=seed + 2, device=DEVICE)
    cos, sin = reference.rope_cos_sin(d, MAX_POS, 500000.0, device=DEVICE)
    positions = torch.randint(0, MAX_POS, (t,), generator=g).to(index_dtype).to(DEVICE)
    slots = 1 + torch.randperm(BLOCKS * BLOCK_SIZE - 2, generator=g)[:t]
    slots[0] = BLOCKS * BLOCK_SIZE - 1  # the cache's last slot
    if t > 1:
        slots[1] = 0  # and its first
        skip = torch.rand(t, generator=g) < 1 / 3
        skip[:2], skip[-1] = False, True
        slots[skip] = -1
        slots[-1] = -(2**40) if index_dtype == torch.int64 else -7  # any negative value skips
    slots = slots.to(index_dtype).to(DEVICE)
    # Caches poisoned with 0xFF bytes: NaN in every cache dtype, so stray or missing writes show.
    k_cache = torch.empty(BLOCKS, BLOCK_SIZE, hkv, d, dtype=cache_dtype, device=DEVICE)
    k_cache.view(torch.uint8).fill_(0xFF)
    v_cache = k_cache.clone()
    scales = (None, None)
    if cache_dtype == FP8:  # per-head scales, small enough that some values saturate at 448
        scales = tuple((torch.rand(hkv, generator=g) * 0.006 + 0.002).to(DEVICE) for _ in range(2))
    return q, k, v, positions, cos, sin, k_cache, v_cache, slots, *scales


def _assert_cache_matches(cache, want, slots, dtype, name):
    flat, want_flat = cache.flatten(0, 1), want.flatten(0, 1)
    written = slots[slots >= 0].long()
    unwritten = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    unwritten[written] = False
    assert torch.equal(flat[unwritten].view(torch.uint8), want_flat[unwritten].view(torch.uint8)), (
        f"{name}: a slot that was not in slot_mapping changed"
    )
    got, ref = flat[written].float(), want_flat[written].float()
    if cache.dtype == FP8:
        differ = got != ref
        assert differ.float().mean() < 0.01, f"{name}: {int(differ.sum())} of {differ.numel()} FP8 codes differ"
        assert_rel_close(got, ref, 1e-2, name)
    else:
        assert_rel_close(got, ref, TOL[dtype], name)


def _run_and_compare(args, interleaved, dtype):
    q, k, v, positions, cos, sin, k_cache, v_cache, slots, k_scale, v_scale = args
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    want_q, want_k = reference.rope_and_cache(q, k, v, positions, cos, sin, want_k_cache, want_v_cache, slots,
                                              k_scale, v_scale, interleaved)  # fmt: skip
    poison_allocator(DEVICE)
    q_rot, k_rot = ops.rope_and_cache(*args, interleaved=interleaved, backend="triton")
    assert q_rot.dtype == k_rot.dtype == dtype
    assert_rel_close(q_rot, want_q, TOL[dtype], "q_rot")
    assert_rel_close(k_rot, want_k, TOL[dtype], "k_rot")
    _assert_cache_matches(k_cache, want_k_cache, slots, dtype, "k_cache")
    _assert_cache_matches(v_cache, want_v_cache, slots, dtype, "v_cache")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8_cache", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("t,hq,hkv,d,index_dtype", SHAPES)
def test_rope_and_cache(dtype, fp8_cache, interleaved, t, hq, hkv, d, index_dtype):
    cache_dtype = FP8 if fp8_cache else dtype
    args = _case(t, hq, hkv, d, dtype, cache_dtype, index_dtype, seed=t + d)
    _run_and_compare(args, interleaved, dtype)
    if fp8_cache:  # the scales are small enough that some values saturate
        k_cache, v_cache = args[6], args[7]
        assert (k_cache.float().abs() == 448).any() and (v_cache.float().abs() == 448).any()


@pytest.mark.parametrize("d,interleaved", [(2, False), (96, False), (96, True), (rope.MAX_HEAD_DIM, True)])
def test_other_head_dims(d, interleaved):
    """The smallest head dim, one whose half (48) is not a power of two, and the largest."""
    args = _case(3, 4, 2, d, torch.bfloat16, torch.bfloat16, torch.int64, seed=d)
    _run_and_compare(args, interleaved, torch.bfloat16)


def test_head_dim_too_large_is_rejected_before_launch():
    d = 2 * rope.MAX_HEAD_DIM
    args = _case(2, 2, 1, d, torch.bfloat16, torch.bfloat16, torch.int64, seed=0)
    before = args[6].clone()
    with pytest.raises(ValueError, match=f"head_dim D <= {rope.MAX_HEAD_DIM}; got D={d}"):
        ops.rope_and_cache(*args, backend="triton")
    assert torch.equal(args[6].view(torch.uint8), before.view(torch.uint8))


def test_no_tokens():
    args = _case(1, 4, 2, 64, torch.bfloat16, torch.bfloat16, torch.int64, seed=0)
    empty = [a[:0] if i in (0, 1, 2, 3, 8) else a for i, a in enumerate(args)]
    q_rot, k_rot = ops.rope_and_cache(*empty, backend="triton")
    assert q_rot.shape == (0, 4, 64) and k_rot.shape == (0, 2, 64)


def test_custom_op_schema_and_fake():
    """opcheck's schema test fails if the op mutated something other than the declared caches."""
    args = _case(2, 4, 2, 64, torch.bfloat16, torch.bfloat16, torch.int64, seed=1)
    torch.library.opcheck(rope.rope_and_cache, (*args, True), test_utils=("test_schema", "test_faketensor"))


# --- compiles for the GPU, without spills -----------------------------------------------


def _rope_build(hq, hkv, d, fp8_cache, capability, interleaved):
    (block_hq, block_half), (block_hkv, _) = rope.config(hq, d), rope.config(hkv, d)
    cache = "*u8" if fp8_cache else "*bf16"  # FP8 caches are written as e4m3 codes
    sig = dict(Q="*bf16", K="*bf16", V="*bf16", POS="*i64", COS="*fp32", SIN="*fp32", K_CACHE=cache, V_CACHE=cache,
               SLOTS="*i64", K_SCALE="*fp32", V_SCALE="*fp32", Q_OUT="*bf16", K_OUT="*bf16",
               HQ="i32", HKV="i32", D="i32", HALF="i32")  # fmt: skip
    constexprs = dict(INTERLEAVED=interleaved, FP8_CACHE=fp8_cache, EMULATE_CASTS=False, FP8_PTX=capability >= 89,
                      BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half)  # fmt: skip
    return compile_for(rope._rope_and_cache_kernel, {**sig, **dict.fromkeys(constexprs, "constexpr")}, constexprs,
                       capability, num_warps=rope.NUM_WARPS)  # fmt: skip


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128), (128, 8, 128)])
@pytest.mark.parametrize("fp8_cache,capability", [(False, 90), (True, 90), (True, 89), (True, 80)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_kernel_compiles_without_spills(hq, hkv, d, fp8_cache, capability, interleaved):
    report = ptxas_report(_rope_build(hq, hkv, d, fp8_cache, capability, interleaved), capability)
    assert (report["spill_stores"], report["spill_loads"]) == (0, 0), report["log"]


@pytest.mark.parametrize("capability", [89, 90])
def test_fp8_cache_write_rounds_once_to_nearest_even(capability):
    """As test_triton_norm's: FP8 KV writes never go through Triton's per-version float8e4nv cast."""
    got = e4m3_conversions(_rope_build(32, 8, 128, True, capability, False))
    assert got["triton_cast"] == 0 and got["to_f16"] == 0 and got["e4m3_other"] == 0 and got["rn_e4m3_f32"], got
