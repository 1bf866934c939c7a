"""The cuda rope_and_cache kernel against the reference, on a GPU (marked `gpu`).

The kernel rotates in float32 with separate roundings (no FMA), as the reference does, so its
outputs and the cache contents are compared bit for bit."""

from __future__ import annotations

import pytest
import torch

from conftest import poison_allocator, randn
from llama_kernels import ops, reference

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn


def _case(t, hq, hkv, d, dtype, cache_dtype, index_dtype, seed, device, block_size=16, k_mag=1.0):
    g = torch.Generator().manual_seed(seed)
    q = randn(t, hq, d, dtype=dtype, seed=seed, device=device)
    k = randn(t, hkv, d, dtype=dtype, seed=seed + 1, scale=k_mag, device=device)
    v = randn(t, hkv, d, dtype=dtype, seed=seed + 2, device=device)
    max_pos = 4096
    cos, sin = reference.rope_cos_sin(d, max_pos, 500000.0, device=device)
    positions = torch.randint(0, max_pos, (t,), generator=g).to(index_dtype).to(device)
    num_blocks = t // block_size + 4
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[torch.rand(t, generator=g) < 0.2] = -1  # some tokens are not cached
    slots = slots.to(index_dtype).to(device)
    shape = (num_blocks, block_size, hkv, d)
    k_scale = v_scale = None
    if cache_dtype == FP8:
        k_cache = (randn(*shape, seed=seed + 3, device=device) * 100).clamp(-448, 448).to(FP8)  # stale
        v_cache = (randn(*shape, seed=seed + 4, device=device) * 100).clamp(-448, 448).to(FP8)
        k_scale = torch.linspace(0.01, 0.05, hkv, device=device)
        v_scale = torch.linspace(0.02, 0.004, hkv, device=device)
    else:
        k_cache = randn(*shape, dtype=cache_dtype, seed=seed + 3, device=device)
        v_cache = randn(*shape, dtype=cache_dtype, seed=seed + 4, device=device)
    return q, k, v, positions, cos, sin, k_cache, v_cache, slots, k_scale, v_scale


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _check(args, interleaved, name):
    q, k, v, positions, cos, sin, k_cache, v_cache, slots, k_scale, v_scale = args
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    want_q, want_k = reference.rope_and_cache(q, k, v, positions, cos, sin, want_kc, want_vc, slots, k_scale,
                                              v_scale, interleaved)  # fmt: skip
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    poison_allocator(q.device)
    q_rot, k_rot = ops.rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slots, k_scale, v_scale,
                                      interleaved, backend="cuda")  # fmt: skip
    assert torch.equal(q_rot, want_q), f"{name}: q_rot differs from the reference"
    assert torch.equal(k_rot, want_k), f"{name}: k_rot differs from the reference"
    assert torch.equal(_bits(k_cache), _bits(want_kc)), f"{name}: k_cache differs (written or untouched slots)"
    assert torch.equal(_bits(v_cache), _bits(want_vc)), f"{name}: v_cache differs (written or untouched slots)"
    if k_cache.dtype == FP8:
        assert not torch.isnan(k_cache.float()).any() and not torch.isnan(v_cache.float()).any()
    # Repeat on the original caches: bit-identical.
    kc1, vc1 = kc0.clone(), vc0.clone()
    q2, k2 = ops.rope_and_cache(q, k, v, positions, cos, sin, kc1, vc1, slots, k_scale, v_scale, interleaved,
                                backend="cuda")  # fmt: skip
    assert torch.equal(q2, q_rot) and torch.equal(k2, k_rot)
    assert torch.equal(_bits(kc1), _bits(k_cache)) and torch.equal(_bits(vc1), _bits(v_cache))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("cache", ["same", "fp8"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(gpu, dtype, d, interleaved, cache, index_dtype):
    cache_dtype = FP8 if cache == "fp8" else dtype
    for t, hq, hkv in ((1, 32, 8), (17, 8, 8), (1000, 24, 4)):
        args = _case(t, hq, hkv, d, dtype, cache_dtype, index_dtype, t + d, gpu)
        _check(args, interleaved, f"T={t} Hq={hq} Hkv={hkv} D={d} {dtype} {cache} interleaved={interleaved}")


def test_fp8_saturates_never_nan(gpu):
    args = _case(64, 8, 2, 128, torch.bfloat16, FP8, torch.int64, 5, gpu, k_mag=1e4)
    _check(args, False, "FP8 far above 448 * scale")
    k_cache = args[6]
    assert k_cache.float().abs().max() == 448.0


def test_all_slots_skipped(gpu):
    args = list(_case(9, 8, 2, 64, torch.bfloat16, torch.bfloat16, torch.int32, 6, gpu))
    args[8] = torch.full_like(args[8], -1)
    k_before = args[6].clone()
    _check(args, False, "all slots negative")
    assert torch.equal(args[6], k_before)


def test_cuda_graph_capture(gpu):
    args = _case(16, 32, 8, 128, torch.bfloat16, FP8, torch.int64, 8, gpu)
    q, k, v, positions, cos, sin, k_cache, v_cache, slots, ks, vs = args
    ops.rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slots, ks, vs, backend="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_rot, k_rot = ops.rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slots, ks, vs,
                                          backend="cuda")  # fmt: skip
    q.copy_(randn(*q.shape, dtype=q.dtype, seed=99, device=gpu))
    positions.copy_(positions.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    want_q, want_k = reference.rope_and_cache(q, k, v, positions, cos, sin, k_cache.clone(), v_cache.clone(),
                                              slots, ks, vs)  # fmt: skip
    assert torch.equal(q_rot, want_q) and torch.equal(k_rot, want_k)


def test_unsupported_head_dim_is_rejected(gpu):
    args = _case(3, 8, 2, 96, torch.bfloat16, torch.bfloat16, torch.int64, 1, gpu)
    with pytest.raises(ValueError, match=r"rope_and_cache: the cuda kernel supports head_dim D in \(64, 128\), got D=96"):
        ops.rope_and_cache(*args, backend="cuda")
