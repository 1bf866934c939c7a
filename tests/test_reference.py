"""Each reference op checked against an independent formula (float64, other libraries, loops).

The reference is what every backend is tested against, so it gets its own ground truth here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FP8_TOL, TOL, assert_rel_close, paged_attention_case, randn
from llama_kernels import ops, reference

FP8 = torch.float8_e4m3fn
HALF = [torch.bfloat16, torch.float16]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


# --- quantize_fp8 ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", [(1, 64), (3, 576), (17, 1040)])
def test_quantize_fp8_matches_formula(dtype, m, k):
    x = randn(m, k, dtype=dtype, seed=m + k, scale=3.0)
    xq, scale = ops.quantize_fp8(x)
    xd = x.double()
    want_scale = xd.abs().amax(1).clamp(min=1 / (448 * 512)) / 448
    torch.testing.assert_close(scale.double(), want_scale, rtol=1e-6, atol=0)
    assert xq.dtype == FP8 and scale.dtype == torch.float32
    # The row's largest element lands on 448 exactly; everything else within one e4m3 rounding.
    assert torch.equal(xq.float().abs().amax(1), torch.full((m,), 448.0))
    assert_rel_close(xq.double() * scale.double()[:, None], xd, FP8_TOL, "dequantized xq")


def test_quantize_fp8_far_above_448_never_nan():
    x = randn(5, 256, scale=1e6, seed=1)
    x[2, 7] = 3e38  # close to float32 max
    xq, scale = ops.quantize_fp8(x)
    assert torch.isfinite(xq.float()).all() and torch.isfinite(scale).all()
    assert_rel_close(xq.double()[[0, 1, 3, 4]] * scale.double()[[0, 1, 3, 4], None], x.double()[[0, 1, 3, 4]],
                     FP8_TOL, "dequantized xq")  # fmt: skip


def test_quantize_fp8_scale_ub_saturates_without_nan():
    x = randn(4, 128, seed=2, scale=50.0)
    ub = 20.0
    xq, scale = ops.quantize_fp8(x, scale_ub=ub)
    assert torch.allclose(scale, torch.full((4,), ub / 448))
    assert torch.isfinite(xq.float()).all()
    clipped = (x.abs() >= ub)
    assert clipped.any() and torch.equal(xq.float()[clipped].abs(), torch.full((int(clipped.sum()),), 448.0))
    inside = x.abs() < ub * 0.9
    assert_rel_close(xq.double()[inside] * (ub / 448), x.double()[inside], FP8_TOL, "unclipped values")


def test_quantize_fp8_zero_row_uses_floor_scale():
    x = randn(2, 64, seed=3)
    x[1] = 0
    xq, scale = ops.quantize_fp8(x)
    assert scale[1].item() == pytest.approx(1 / (448 * 512) / 448, rel=1e-6)
    assert torch.equal(xq[1].float(), torch.zeros(64))


# --- fp8_gemm --------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", HALF)
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 24, 64), (3, 40, 576), (17, 72, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_gemm_matches_float64(out_dtype, per_tensor, m, n, k, with_bias):
    xq, xs = ops.quantize_fp8(randn(m, k, seed=m, scale=2.0))
    wq, ws = ops.quantize_fp8(randn(n, k, seed=n + 1, scale=0.05))
    if per_tensor:
        xs, ws = xs.max(), ws.max()
    bias = randn(n, dtype=torch.bfloat16, seed=9) if with_bias else None
    y = ops.fp8_gemm(xq, xs, wq, ws, out_dtype=out_dtype, bias=bias)
    want = (xq.double() * xs.double().reshape(-1, 1)) @ (wq.double() * ws.double().reshape(-1, 1)).T
    if with_bias:
        want = want + bias.double()
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert_rel_close(y, want, TOL[out_dtype], "fp8_gemm")


# --- int4_gemm -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,n,k,group", [(1, 16, 128, 128), (3, 24, 576, 64), (17, 40, 256, None)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_gemm_matches_dequantized_matmul(dtype, m, n, k, group, symmetric):
    w = randn(n, k, dtype=dtype, seed=n, scale=0.02)
    qw = ops.quantize_int4(w, group_size=group, symmetric=symmetric)
    x = randn(m, k, dtype=dtype, seed=m)
    y = ops.int4_gemm(x, qw)
    # Independent dequantization from the packed nibbles.
    nib = torch.stack([(qw.qweight >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(n, k).double()
    g = k if group is None else group
    zeros = torch.full_like(qw.scales, 8, dtype=torch.float64) if qw.zeros is None else qw.zeros.double()
    deq = (nib - zeros.repeat_interleave(g, 1)) * qw.scales.double().repeat_interleave(g, 1)
    assert_rel_close(y, x.double() @ deq.T, TOL[dtype], "int4_gemm")
    # And the quantization itself is close to the original weight: a 4-bit step is amax/7
    # (symmetric) or range/15, i.e. about 0.37 sigma for gaussian groups, so ~0.11 as a norm.
    assert_rel_close(deq, w.double(), 0.16 if symmetric else 0.13, "dequantized weight")


# --- RMSNorm ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,h", [(1, 576), (3, 1024), (17, 4104)])
def test_rms_norm_matches_torch_functional(dtype, m, h):
    x = randn(m, h, dtype=dtype, seed=h, scale=2.0)
    w = randn(h, dtype=dtype, seed=h + 1)
    y = ops.rms_norm(x, w, 1e-5)
    want = F.rms_norm(x.double(), (h,), w.double(), eps=1e-5)
    assert y.dtype == dtype
    assert_rel_close(y, want, TOL[dtype], "rms_norm")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,h", [(1, 576), (3, 1024), (17, 4104)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_huggingface_order(dtype, m, h, with_residual):
    x = randn(m, h, dtype=dtype, seed=h, scale=2.0)
    res = randn(m, h, dtype=dtype, seed=h + 2) if with_residual else None
    w = randn(h, dtype=dtype, seed=h + 1)
    y, r = ops.add_rms_norm(x, res, w, 1e-6)
    # Hugging Face's Llama: the residual add happens in the model dtype, the norm in float32.
    want_r = x + res if with_residual else x
    assert torch.equal(r, want_r)
    hs = want_r.double()
    want_y = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert_rel_close(y, want_y, TOL[dtype], "add_rms_norm y")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,h", [(1, 576), (17, 2056)])
@pytest.mark.parametrize("scale_ub", [None, 1.5])
def test_add_rms_norm_fp8_dequantizes_to_norm(dtype, m, h, scale_ub):
    x = randn(m, h, dtype=dtype, seed=h, scale=2.0)
    res = randn(m, h, dtype=dtype, seed=h + 2)
    w = randn(h, dtype=dtype, seed=h + 1)
    yq, ys, r = ops.add_rms_norm_fp8(x, res, w, 1e-5, scale_ub=scale_ub)
    hs = (x + res).double()
    y_ref = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert torch.equal(r, (x + res))
    assert yq.dtype == FP8 and ys.shape == (m,) and torch.isfinite(yq.float()).all()
    deq = yq.double() * ys.double()[:, None]
    if scale_ub is None:
        assert_rel_close(deq, y_ref, FP8_TOL + TOL[dtype], "dequantized yq")
    else:
        assert torch.allclose(ys, torch.full((m,), scale_ub / 448))
        assert_rel_close(deq, y_ref.clamp(-scale_ub, scale_ub), FP8_TOL + TOL[dtype], "dequantized yq (clipped)")


def test_add_rms_norm_fp8_huge_weight_never_nan():
    x = randn(3, 256, seed=1)
    w = randn(256, seed=2, scale=1e30)
    yq, ys, _ = ops.add_rms_norm_fp8(x, None, w, 1e-5)
    assert torch.isfinite(yq.float()).all() and torch.isfinite(ys).all()


# --- RoPE tables -----------------------------------------------------------------------

LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _meta_llama3_freqs(head_dim: int, theta: float, s: dict) -> list[float]:
    """Meta's scalar apply_scaling (llama-models), in float64."""
    freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            out.append((1 - smooth) * f / s["factor"] + smooth * f)
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_rope_llama3_matches_meta_formula(head_dim, key):
    scaling = {key if k == "rope_type" else k: val for k, val in LLAMA31.items()}
    cos, sin = ops.rope_cos_sin(head_dim, 20000, 500000.0, scaling)
    assert cos.shape == (20000, head_dim // 2) and cos.dtype == torch.float32
    freqs = torch.tensor(_meta_llama3_freqs(head_dim, 500000.0, LLAMA31), dtype=torch.float64)
    torch.testing.assert_close(reference.rope_inv_freq(head_dim, 500000.0, scaling).double(), freqs,
                               rtol=6e-7, atol=0)  # fmt: skip (a few float32 ulps)
    # Angles are p * freq in float32: at p = 2e4 one ulp of the angle is ~1e-3.
    pos = torch.arange(20000, dtype=torch.float64)[:, None]
    torch.testing.assert_close(cos.double(), (pos * freqs).cos(), rtol=0, atol=2e-3)
    torch.testing.assert_close(sin.double(), (pos * freqs).sin(), rtol=0, atol=2e-3)
    torch.testing.assert_close(cos[:512].double(), (pos[:512] * freqs).cos(), rtol=0, atol=6e-5)


def test_rope_linear_and_default():
    cos, _ = ops.rope_cos_sin(64, 400, 10000.0, {"type": "linear", "factor": 4.0})
    cos0, _ = ops.rope_cos_sin(64, 400, 10000.0, None)
    assert torch.allclose(cos[100], cos0[25], atol=1e-6)  # linear: position p behaves as p / factor
    inv = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert_rel_close(cos0, (torch.arange(400, dtype=torch.float64)[:, None] * inv).cos(), 1e-5, "cos")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_llama3_matches_transformers(head_dim):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_theta=500000.0,
        rope_scaling=dict(LLAMA31), max_position_embeddings=131072,
    )  # fmt: skip
    positions = torch.tensor([[0, 1, 17, 1000, 8191, 8192, 9000, 32768, 131071]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(config=config)(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = ops.rope_cos_sin(head_dim, 131072, 500000.0, dict(LLAMA31))
    torch.testing.assert_close(cos[positions[0]], hf_cos[0, :, : head_dim // 2], rtol=0, atol=2e-6)
    torch.testing.assert_close(sin[positions[0]], hf_sin[0, :, : head_dim // 2], rtol=0, atol=2e-6)


# --- rope_and_cache --------------------------------------------------------------------


def _rope_complex(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotation as complex multiplication (Meta's formulation), float64. x [T, H, D], angles [T, D/2]."""
    d = x.shape[-1]
    if interleaved:
        pairs = x.double().reshape(*x.shape[:-1], d // 2, 2)
    else:
        pairs = torch.stack((x.double()[..., : d // 2], x.double()[..., d // 2 :]), dim=-1)
    z = torch.view_as_complex(pairs.contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    out = torch.view_as_real(z)
    return out.flatten(-2) if interleaved else torch.cat((out[..., 0], out[..., 1]), dim=-1)


def _cache_case(t, hq, hkv, d, block_size, num_blocks, dtype, cache_dtype, seed):
    q = randn(t, hq, d, dtype=dtype, seed=seed)
    k = randn(t, hkv, d, dtype=dtype, seed=seed + 1)
    v = randn(t, hkv, d, dtype=dtype, seed=seed + 2)
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4000, (t,), generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[::3] = -1  # some tokens are not cached
    poison = 1e4 if cache_dtype != FP8 else 400.0
    k_cache = torch.full((num_blocks, block_size, hkv, d), poison).to(cache_dtype)
    v_cache = torch.full((num_blocks, block_size, hkv, d), -poison).to(cache_dtype)
    return q, k, v, positions, slots, k_cache, v_cache


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, FP8),
                                               (torch.float32, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 1, 128)])
def test_rope_and_cache_matches_complex_rotation(interleaved, dtype, cache_dtype, hq, hkv, d):
    t, block_size, num_blocks = 17, 16, 5
    q, k, v, positions, slots, k_cache, v_cache = _cache_case(t, hq, hkv, d, block_size, num_blocks, dtype,
                                                              cache_dtype, seed=hq * d)  # fmt: skip
    untouched_k, untouched_v = k_cache.clone(), v_cache.clone()
    cos, sin = ops.rope_cos_sin(d, 4096, 500000.0, dict(LLAMA31))
    # Per-head scales with headroom: a rotated pair's elements are at most sqrt(2) * amax|k|.
    k_scale = k.float().abs().amax(dim=(0, 2)) * 1.5 / 448 if cache_dtype == FP8 else None
    v_scale = v.float().abs().amax(dim=(0, 2)) * 1.1 / 448 if cache_dtype == FP8 else None
    q_rot, k_rot = ops.rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slots, k_scale, v_scale,
                                      interleaved=interleaved)  # fmt: skip
    # The tables are checked above; here the rotation is, so use the table's own float32 angles.
    angles = (positions.float()[:, None] * reference.rope_inv_freq(d, 500000.0, dict(LLAMA31))).double()
    assert_rel_close(q_rot, _rope_complex(q, angles, interleaved), TOL[dtype] + 1e-5, "q_rot")
    assert_rel_close(k_rot, _rope_complex(k, angles, interleaved), TOL[dtype] + 1e-5, "k_rot")
    # The cache holds k_rot and v at their slots (token-by-token loop), and nothing else changed.
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    tol = FP8_TOL if cache_dtype == FP8 else TOL[dtype] + 1e-5
    for i in range(t):
        s = int(slots[i])
        if s < 0:
            continue
        blk, off = divmod(s, block_size)
        written[blk, off] = True
        got_k, got_v = k_cache[blk, off].double(), v_cache[blk, off].double()
        if cache_dtype == FP8:
            got_k, got_v = got_k * k_scale.double()[:, None], got_v * v_scale.double()[:, None]
        assert_rel_close(got_k, _rope_complex(k[i : i + 1], angles[i : i + 1], interleaved)[0], tol, f"k_cache[{s}]")
        assert_rel_close(got_v, v[i].double(), tol, f"v_cache[{s}]")
    assert torch.equal(k_cache[~written].float(), untouched_k[~written].float())
    assert torch.equal(v_cache[~written].float(), untouched_v[~written].float())


def test_rope_and_cache_fp8_saturates():
    q, k, v, positions, slots, k_cache, v_cache = _cache_case(4, 2, 2, 64, 16, 2, torch.float32, FP8, seed=5)
    slots = torch.tensor([0, 1, 2, 3])
    cos, sin = ops.rope_cos_sin(64, 4096, 10000.0)
    tiny = torch.full((2,), 1e-6)
    ops.rope_and_cache(q, k * 1e6, v * 1e6, positions, cos, sin, k_cache, v_cache, slots, tiny, tiny)
    assert torch.isfinite(k_cache.float()).all() and torch.isfinite(v_cache.float()).all()
    assert v_cache[0, :4].float().abs().max() == 448.0


# --- decode_attention ------------------------------------------------------------------


def _gather_loop(cache, table_row, n, scale):
    """Token-by-token gather through the block table, float64 [n, Hkv, D]."""
    bs = cache.shape[1]
    rows = [cache[int(table_row[t // bs]), t % bs].double() for t in range(n)]
    kv = torch.stack(rows)
    return kv * scale.double()[:, None] if scale is not None else kv


@pytest.mark.parametrize("group", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, FP8),
                                               (torch.float32, torch.float32)])  # fmt: skip
def test_decode_attention_matches_sdpa(group, d, dtype, cache_dtype):
    hkv = 2
    seq_lens = [1, 17, 100, 33]
    q, kc, vc, table, lens, ks, vs = paged_attention_case(seq_lens, hkv * group, hkv, d, 16, dtype, cache_dtype, seed=group)
    out = ops.decode_attention(q, kc, vc, table, lens, k_scale=ks, v_scale=vs)
    assert out.dtype == dtype and out.shape == q.shape
    for b, n in enumerate(seq_lens):
        k = _gather_loop(kc, table[b], n, ks).transpose(0, 1)  # [Hkv, n, D]
        v = _gather_loop(vc, table[b], n, vs).transpose(0, 1)
        want = F.scaled_dot_product_attention(
            q[b].double()[None, :, None, :], k.repeat_interleave(group, 0)[None], v.repeat_interleave(group, 0)[None]
        )[0, :, 0, :]
        assert_rel_close(out[b], want, TOL[dtype] + 1e-6, f"decode_attention seq {b} (len {n})")


def test_decode_attention_custom_scale_and_block_sizes():
    for block_size in (1, 8, 64):
        q, kc, vc, table, lens, _, _ = paged_attention_case([5, 70], 8, 2, 64, block_size, torch.float32, torch.float32, 7)
        out = ops.decode_attention(q, kc, vc, table, lens, scale=0.05)
        for b, n in enumerate([5, 70]):
            k = _gather_loop(kc, table[b], n, None).transpose(0, 1).repeat_interleave(4, 0)
            v = _gather_loop(vc, table[b], n, None).transpose(0, 1).repeat_interleave(4, 0)
            want = F.scaled_dot_product_attention(q[b].double()[:, None], k, v, scale=0.05)[:, 0]
            assert_rel_close(out[b], want, 1e-5, f"block_size {block_size} seq {b}")


# --- the torch backend's CPU kernels (weights prepared at load) ---------------------------


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,n,k,group,symmetric,act_order", [
    (1, 16, 128, 128, False, False), (3, 48, 576, 64, True, False), (17, 96, 576, 64, False, True),
    (64, 48, 96, 32, False, False), (64, 80, 576, 64, False, True), (33, 32, 512, 256, True, False),
    (5, 32, 512, 256, False, False), (2, 32, 512, 32, False, False)])  # fmt: skip
def test_int4_gemm_on_torch_cpu_kernels_matches_definition(dtype, m, n, k, group, symmetric, act_order):
    """ops.prepare_int4 on the CPU attaches the layouts of its CPU kernels to the weight (kept as is, for every
    backend); int4_gemm through them (the INT4 kernel, or from CPU_INT4_DEQUANT_ROWS rows in bfloat16 the
    per-call bfloat16 dequantization and matmul) equals the dequantized matmul of the plain weight."""
    plain = ops.quantize_int4(randn(n, k, dtype=dtype, seed=n, scale=0.02), group_size=group, symmetric=symmetric)
    if act_order:  # a GPTQ act-order permutation of the input channels
        g = torch.Generator().manual_seed(1)
        plain = type(plain)(plain.qweight, plain.scales, plain.zeros, group, torch.randperm(k, generator=g))
    want_deq = plain.dequantize(torch.float64)
    x = randn(m, k, dtype=dtype, seed=m + 7)
    definition = reference.int4_linear_reference(x, plain)
    qweight = plain.qweight.clone()
    assert ops.prepare_int4(plain, dtype) == (plain, None)  # the same weight: any backend reads it
    plain.qweight.zero_()  # poisoned: only the attached layouts still hold the weight
    y = ops.int4_gemm(x, plain)
    xp = x if plain.perm is None else x[:, plain.perm]
    assert y.dtype == dtype and y.shape == (m, n)
    assert_rel_close(y, xp.double() @ want_deq.T, TOL[dtype], "int4_gemm (torch CPU kernels)")
    assert_rel_close(y, definition, TOL[dtype], "vs the definition")
    plain.qweight.copy_(qweight)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16  # not prepared for: the definition
    assert torch.equal(ops.int4_gemm(x.to(other), plain), reference.int4_linear_reference(x.to(other), plain))


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_int4_gemm_cpu_path_by_rows(m):
    """bfloat16: the INT4 kernel below CPU_INT4_DEQUANT_ROWS rows, the dequantized bfloat16 matmul from there
    (each poisoned in turn: only the path that runs changes the result); float16 always the INT4 kernel."""
    w = ops.quantize_int4(randn(32, 256, seed=3, scale=0.02), group_size=64)
    ops.prepare_int4(w, torch.bfloat16)
    prepared = w.__dict__[reference._CPU_INT4_ATTR]
    x = randn(m, 256, dtype=torch.bfloat16, seed=m)
    want = reference.int4_linear_reference(x, w)
    dequantizes = m >= reference.CPU_INT4_DEQUANT_ROWS
    prepared.q_minus_z.neg_()  # poisoned
    assert_rel_close(ops.int4_gemm(x, w), -want if dequantizes else want, TOL[torch.bfloat16], "q - z negated")
    prepared.q_minus_z.neg_()
    prepared.weight.zero_()
    assert dequantizes == bool((ops.int4_gemm(x, w).float() - want.float()).abs().max() < 1e-2 * want.abs().max())
    w16 = ops.quantize_int4(randn(32, 256, seed=3, scale=0.02), group_size=64)
    ops.prepare_int4(w16, torch.float16)
    assert w16.__dict__[reference._CPU_INT4_ATTR].q_minus_z is None


@pytest.mark.parametrize("n,k,group", [(24, 128, 128), (32, 96, None), (32, 128, 16)])
def test_int4_weight_outside_the_cpu_kernel_stays_plain(n, k, group):
    """N not a multiple of 16, or a group size the kernel lacks: the weight is left as is, for the definition."""
    plain = ops.quantize_int4(randn(n, k, seed=2), group_size=group)
    assert ops.prepare_int4(plain, torch.bfloat16) == (plain, None)
    assert reference._CPU_INT4_ATTR not in plain.__dict__


def _fp8_case(m: int, n: int, k: int, per_tensor: bool, zero_row: bool = False):
    xq, xs = ops.quantize_fp8(randn(m, k, seed=m, scale=2.0))
    w = randn(n, k, seed=n + k, scale=0.05)
    w[0] *= 1e3  # rows of very different ranges: per-tensor scales then leave small rows far below 448
    if zero_row:
        w[1] = 0
    wq, ws = ops.quantize_fp8(w)
    if per_tensor:  # small rows far below 448, down to e4m3's subnormals
        ws = w.abs().max() / 448
        wq, xs = (w / ws).to(FP8), xs.max()
    return xq, xs, wq, ws


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("n,k", [(40, 1536), (37, 48), (5, 80)])
@pytest.mark.parametrize("per_tensor,with_bias", [(False, False), (True, True), (False, True)])
def test_fp8_gemm_with_cpu_int8_within_its_bound(m, n, k, per_tensor, with_bias):
    """ops.prepare_fp8 on the CPU requantizes an FP8 weight to int8 per output channel; fp8_gemm then runs
    _weight_int8pack_mm (below CPU_INT8_MATMUL_ROWS rows) or a bfloat16 matmul. Its error against the FP8
    definition in float64 is within the bound the requantization and roundings give: half an int8 step per
    weight (|int8 * scale - wq| <= scale / 2), summed over |xq|, plus two bfloat16 roundings (of the sum,
    and of the output); against the int8 weight's own product, within those roundings alone."""
    xq, xs, wq, ws = _fp8_case(m, n, k, per_tensor, zero_row=n > 1)
    bias = randn(n, dtype=torch.bfloat16, seed=9) if with_bias else None
    assert ops.prepare_fp8(wq, torch.bfloat16) is wq
    q, scale = getattr(wq, reference._CPU_FP8_ATTR)
    assert q.dtype == torch.int8 and q.shape == (n, k) and scale.dtype == torch.bfloat16 and scale.shape == (n,)
    wd, sd = wq.double(), scale.double()[:, None]
    assert (q.abs() <= 127).all() and ((q.double() * sd - wd).abs() <= sd / 2).all()  # the requantization
    assert (sd[:, 0] * 127 >= wd.abs().amax(1)).all()  # scale rounded up: no weight clamped
    assert (q[1] == 0).all()  # the all-zero row
    xs64 = xs.double().reshape(-1, 1) if xs.dim() else xs.double()
    ws64 = ws.double().reshape(1, -1) if ws.dim() else ws.double()
    exact = (xq.double() @ wd.T) * xs64 * ws64  # the definition without bias, in float64
    want = exact + (bias.double() if with_bias else 0)
    half_step = (xq.double().abs() @ (sd / 2).expand(n, k).T) * xs64 * ws64  # >= |int8 error| of each output
    summed = k * 2.0**-24 * (xq.double().abs() @ wd.abs().T) * xs64 * ws64  # float32 accumulation
    u = 2.0**-8  # bfloat16's unit roundoff (float16's is smaller)
    rounded_sum = u * (exact.abs() + half_step + summed)  # the sum rounded to bfloat16
    bound = half_step + summed + rounded_sum + u * (want.abs() + half_step + summed + rounded_sum)  # + the output's
    # what it computes exactly: the int8 weight's product, up to the two roundings (catches a 1% error)
    exact8 = (xq.double() @ (q.double() * sd).T) * xs64 * ws64
    want8 = exact8 + (bias.double() if with_bias else 0)
    rounded_sum8 = u * (exact8.abs() + summed)
    bound8 = summed + rounded_sum8 + u * (want8.abs() + summed + rounded_sum8)
    for out_dtype in HALF:
        y = ops.fp8_gemm(xq, xs, wq, ws, out_dtype=out_dtype, bias=bias)
        assert y.dtype == out_dtype and y.shape == (m, n)
        err = (y.double() - want).abs()
        assert (err <= bound * (1 + 1e-6) + 1e-30).all(), f"{out_dtype}: worst excess {(err - bound).max():.3g}"
        err8 = (y.double() - want8).abs()
        assert (err8 <= bound8 * (1 + 1e-6) + 1e-30).all(), f"{out_dtype}: int8 product off by {err8.max():.3g}"
        assert_rel_close(y, want, FP8_TOL, "vs the FP8 definition")  # and close as a whole
    q.neg_()  # poisoned: the prepared int8 weight is what runs
    assert_rel_close(ops.fp8_gemm(xq, xs, wq, ws), -exact, FP8_TOL, "int8 weight negated")


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_fp8_gemm_cpu_path_by_rows(m):
    """_weight_int8pack_mm below CPU_INT8_MATMUL_ROWS rows, the bfloat16 matmul from there: the same result up to
    the bfloat16 rounding of the sum; a weight with K not a multiple of 16 is never prepared (the kernel reads
    K in blocks of 16; fp8_gemm refuses such K anyway)."""
    xq, xs, wq, ws = _fp8_case(m, 24, 256, False)
    ops.prepare_fp8(wq, torch.bfloat16)
    q, scale = getattr(wq, reference._CPU_FP8_ATTR)
    by_kernel = torch.ops.aten._weight_int8pack_mm(xq.to(torch.bfloat16), q, scale).double()
    by_matmul = (xq.double() @ q.double().T) * scale.double()
    got, still_to_scale = reference._cpu_int8_matmul(xq.to(torch.bfloat16), q, scale)
    assert got.dtype == torch.bfloat16 and (still_to_scale is None) == (m < reference.CPU_INT8_MATMUL_ROWS)
    got = got.double() * (1 if still_to_scale is None else still_to_scale.double())
    assert_rel_close(got, by_matmul, TOL[torch.bfloat16], "int8 product")
    assert_rel_close(by_kernel, by_matmul, TOL[torch.bfloat16], "the kernel")
    odd = torch.zeros(8, 40).to(FP8)
    assert ops.prepare_fp8(odd, torch.bfloat16) is odd and not hasattr(odd, reference._CPU_FP8_ATTR)


def test_e4m3_to_bf16_lookup_is_exact_for_every_bit_pattern():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
    for x in (every.view(16, 16), every.view(256, 1), every[::3].reshape(1, -1), every.view(16, 16).t()):
        got, want = reference._e4m3_to_bf16(x), x.to(torch.bfloat16)  # PyTorch's conversion: the definition
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_quantized_linears_prepare_their_cpu_layouts():
    """On the CPU, Int4Linear and Fp8Linear load into the torch backend's CPU-kernel layouts (through ops)."""
    from llama_kernels.model import Fp8Linear, Int4Linear

    w = randn(64, 256, seed=4, scale=0.05)
    lin4 = Int4Linear(256, 64, torch.float32, 128)
    lin4.load(w)
    assert lin4.backend is None and reference._CPU_INT4_ATTR in lin4.weight.__dict__
    plain = ops.quantize_int4(w, group_size=128)
    lin8 = Fp8Linear(256, 64, torch.float32)
    lin8.load(w)
    assert hasattr(lin8.weight, reference._CPU_FP8_ATTR)
    for m in (3, 40):  # both paths of each
        x = randn(m, 256, seed=5)
        want4 = reference.int4_linear_reference(x.bfloat16(), plain)
        assert_rel_close(lin4(x), want4, TOL[torch.bfloat16], "Int4Linear")
        xq, xs = ops.quantize_fp8(x)
        want8 = reference.fp8_gemm(xq, xs, lin8.weight.clone(), lin8.weight_scale)
        assert_rel_close(lin8(x), want8, FP8_TOL, "Fp8Linear")


def test_reference_module_exports_every_op():
    for name in ("quantize_fp8", "fp8_gemm", "int4_gemm", "rms_norm", "add_rms_norm", "add_rms_norm_fp8",
                 "rope_cos_sin", "rope_and_cache", "decode_attention", "paged_prefill_attention"):  # fmt: skip
        assert callable(getattr(reference, name))
