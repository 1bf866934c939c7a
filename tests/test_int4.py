"""Tests for llama_kernels.int4: packing, reference quantizer, AWQ / GPTQ conversion."""

import numpy as np
import pytest
import torch

from llama_kernels.int4 import (
    Int4Weight,
    int4_linear_reference,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

# (N, K, group_size); None = per-channel.
SHAPES = [(8, 64, 32), (24, 576, 64), (200, 1536, 128), (24, 576, None), (200, 576, 32)]
CONV_SHAPES = [(8, 64, 32), (24, 576, 64), (200, 1536, 128), (24, 576, None)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
AWQ_SPEC_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # written from the AutoAWQ spec, not imported


def gen(seed):
    return torch.Generator().manual_seed(seed)


def to_int32(words):
    """numpy uint32 array -> torch int32 with the same bits."""
    return torch.from_numpy(np.ascontiguousarray(words, dtype=np.uint32).view(np.int32))


# ---- straightforward packers written from the checkpoint specs ----------------------------------

def awq_pack_ref(ints):
    """[R, N] ints -> int32 [R, N // 8]: qweight[:, c] |= ints[:, 8c + order[i]] << 4i."""
    ints = np.asarray(ints, dtype=np.uint32)
    out = np.zeros((ints.shape[0], ints.shape[1] // 8), dtype=np.uint32)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= ints[:, 8 * c + AWQ_SPEC_ORDER[i]] << np.uint32(4 * i)
    return to_int32(out)


def gptq_pack_qweight_ref(q_kn):
    """[K, N] ints -> int32 [K // 8, N]: nibble i of row r is q[8r + i]."""
    q_kn = np.asarray(q_kn, dtype=np.uint32)
    out = np.zeros((q_kn.shape[0] // 8, q_kn.shape[1]), dtype=np.uint32)
    for r in range(out.shape[0]):
        for i in range(8):
            out[r] |= q_kn[8 * r + i] << np.uint32(4 * i)
    return to_int32(out)


def gptq_pack_qzeros_ref(z):
    """[G, N] zero points (1..16) -> int32 [G, N // 8] storing z - 1 sequentially along N."""
    stored = np.asarray(z, dtype=np.int64) - 1
    out = np.zeros((stored.shape[0], stored.shape[1] // 8), dtype=np.uint32)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= (stored[:, 8 * c + i] & 15).astype(np.uint32) << np.uint32(4 * i)
    return to_int32(out)


def dense_original_order(w):
    """Dequantized float32 [N, K] in the original input-channel order (undoes perm)."""
    deq = w.dequantize()
    if w.perm is None:
        return deq
    out = torch.empty_like(deq)
    out[:, w.perm] = deq
    return out


# ---- packing ----------------------------------------------------------------------------------

def test_pack_unpack_every_nibble_value_in_every_position():
    # Row v holds (v + k) % 16 at column k, so each nibble position sees all 16 values.
    q = ((torch.arange(16)[:, None] + torch.arange(64)[None, :]) % 16).to(torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (16, 8)
    expected = []
    for row in q.tolist():
        words = [sum(row[8 * j + i] << (4 * i) for i in range(8)) for j in range(8)]
        expected.append([w - 2**32 if w >= 2**31 else w for w in words])
    assert packed.tolist() == expected
    assert torch.equal(unpack_int4(packed), q)


def test_pack_sign_nibble():
    assert pack_int4(torch.full((1, 8), 15, dtype=torch.uint8)).item() == -1
    assert pack_int4(torch.tensor([[0] * 7 + [8]], dtype=torch.uint8)).item() == -(2**31)
    assert unpack_int4(torch.tensor([-(2**31)], dtype=torch.int32)).tolist() == [0] * 7 + [8]


def test_unpack_pack_arbitrary_int32_batched():
    words = torch.randint(-(2**31), 2**31 - 1, (2, 3, 5), generator=gen(1), dtype=torch.int64)
    words = words.to(torch.int32)
    q = unpack_int4(words)
    assert q.shape == (2, 3, 40) and q.dtype == torch.uint8
    assert torch.equal(pack_int4(q), words)


@pytest.mark.parametrize(
    "q, match",
    [
        (torch.tensor([[0] * 7 + [16]]), r"values in \[0, 15\]"),
        (torch.tensor([[0] * 7 + [-1]]), r"values in \[0, 15\]"),
        (torch.zeros(2, 7, dtype=torch.uint8), "multiple of 8"),
        (torch.rand(2, 8, generator=gen(2)), "integer"),
    ],
)
def test_pack_int4_errors(q, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(q)


# ---- reference quantizer ----------------------------------------------------------------------

@pytest.mark.parametrize("N, K, G", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_error(N, K, G, symmetric, dtype):
    w = (torch.randn(N, K, generator=gen(N * K + symmetric)) * 0.02).to(dtype)
    qw = quantize_int4(w, group_size=G, symmetric=symmetric)
    Gr = G or K
    assert qw.shape == (N, K) and qw.group_size == Gr and qw.perm is None
    assert qw.scales.dtype == dtype and qw.scales.shape == (N, K // Gr)
    assert (qw.zeros is None) == symmetric
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16

    # Round to nearest: |error| <= s/2, plus the scale's own rounding (the range spans 15 steps).
    wf = w.float()
    err = qw.dequantize() - wf
    s = qw.scales.float().repeat_interleave(Gr, dim=1)
    bound = s * (0.5 + 16 * UNIT_ROUNDOFF[dtype]) + 1e-6 * wf.abs()
    assert (err.abs() <= bound).all(), float((err.abs() / s).max())
    # Unclamped elements are at most half a step of the *stored* scale away (q uses that scale).
    q = qw.unpack()
    interior = (q > 0) & (q < 15)
    assert (err.abs() <= s * 0.5 * (1 + 1e-5) + 1e-6 * wf.abs())[interior].all()
    # Uniform rounding noise has variance s^2 / 12; floor-instead-of-round would be 4x that.
    assert err.norm() <= 1.15 * (s.square().sum() / 12).sqrt()
    assert err.norm() / wf.norm() < 0.15


@pytest.mark.parametrize("N, K, G", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_value_ranges(N, K, G, symmetric):
    w = torch.randn(N, K, generator=gen(7 + K))
    qw = quantize_int4(w, group_size=G, symmetric=symmetric)
    Gr = G or K
    q = qw.unpack().view(N, K // Gr, Gr).to(torch.int16)
    assert q.min() >= 0 and q.max() <= 15
    if symmetric:
        assert torch.equal((q - 8).abs().amax(-1), torch.full((N, K // Gr), 7, dtype=torch.int16))
    else:
        assert qw.zeros.dtype == torch.uint8 and int(qw.zeros.max()) <= 15
        # Every group straddles 0 here, so its minimum maps to 0 and its maximum to 14 or 15.
        assert (q.amin(-1) == 0).all() and (q.amax(-1) >= 14).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_degenerate_groups(symmetric):
    w = torch.randn(8, 64, generator=gen(3))
    w[0, :32] = 0.0                                             # all-zero group
    w[1, :32] = torch.rand(32, generator=gen(4)) + 1.0          # strictly positive group
    w[2, 32:] = -0.5                                            # constant group
    qw = quantize_int4(w, group_size=32, symmetric=symmetric)
    deq = qw.dequantize()
    assert qw.scales[0, 0] == 1.0 and torch.equal(deq[0, :32], torch.zeros(32))
    s = qw.scales.float().repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= s * (0.5 + 1e-5)).all()


@pytest.mark.parametrize(
    "w, kwargs, match",
    [
        (torch.randn(4, 576), dict(group_size=128),
         r"K=576 is not divisible by group_size=128; use 64 or 32"),
        (torch.randn(4, 200), dict(group_size=16), r"K=200 is not divisible by group_size=16"),
        (torch.randn(64), {}, r"w: expected a 2-D tensor"),
        (torch.ones(4, 64, dtype=torch.int32), {}, r"w: expected a floating-point"),
        (torch.randn(4, 60), dict(group_size=None), r"K=60"),
        (torch.randn(4, 64), dict(group_size=0), r"group_size: expected a positive int"),
        (torch.randn(4, 64), dict(group_size=-2), r"group_size: expected a positive int"),
        (torch.randn(4, 96), dict(group_size=12), r"multiple of 8"),
        (torch.full((4, 64), float("nan")), dict(group_size=32), r"NaN or inf"),
    ],
)
def test_quantize_errors(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_int4(w, **kwargs)


# ---- Int4Weight validation / helpers ----------------------------------------------------------

def _small_weight():
    return quantize_int4(torch.randn(8, 64, generator=gen(5)), group_size=32)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("qweight", torch.zeros(8, 8, dtype=torch.int64), r"Int4Weight.qweight: expected dtype torch.int32"),
        ("scales", torch.ones(8, 3), r"Int4Weight.scales: expected shape \(8, 2\), got \(8, 3\)"),
        ("scales", torch.ones(8, 2, dtype=torch.int32), r"Int4Weight.scales: expected dtype"),
        ("zeros", torch.full((8, 2), 16, dtype=torch.uint8),
         r"Int4Weight.zeros: expected values in \[0, 15\], got max 16"),
        ("zeros", torch.full((8, 2), 3, dtype=torch.int32), r"Int4Weight.zeros: expected dtype torch.uint8"),
        ("perm", torch.zeros(64, dtype=torch.int64), r"Int4Weight.perm: expected a permutation"),
        ("perm", torch.arange(32), r"Int4Weight.perm: expected shape \(64,\)"),
        ("group_size", 48, r"K=64 is not divisible by group_size=48"),
    ],
)
def test_int4weight_validation(field, value, match):
    w = _small_weight()
    fields = dict(qweight=w.qweight, scales=w.scales, zeros=w.zeros, group_size=32, perm=None)
    fields[field] = value
    with pytest.raises(ValueError, match=match):
        Int4Weight(**fields)


def test_to_device_returns_new_weight():
    w = _small_weight()
    w.perm = torch.randperm(64, generator=gen(6))
    moved = w.to("cpu")
    assert moved is not w and moved.shape == (8, 64) and (moved.out_features, moved.in_features) == (8, 64)
    for name in ("qweight", "scales", "zeros", "perm"):
        assert torch.equal(getattr(moved, name), getattr(w, name))


def test_int4_linear_reference_applies_perm_and_keeps_dtype():
    w = quantize_int4(torch.randn(24, 576, generator=gen(8)), group_size=64)
    w.perm = torch.randperm(576, generator=gen(9))
    x = torch.randn(2, 3, 576, generator=gen(10)).to(torch.bfloat16)
    y = int4_linear_reference(x, w)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    expected = x.float() @ dense_original_order(w).T
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="K=576"):
        int4_linear_reference(torch.randn(3, 64), w)


# ---- AWQ ----------------------------------------------------------------------------------------

def _random_awq(N, K, G, sdtype, seed):
    g = gen(seed)
    ng = K // G
    q_kn = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(0, 16, (ng, N), generator=g)
    s = (torch.rand(ng, N, generator=g) * 0.01 + 1e-3).to(sdtype)
    return q_kn, z, s


@pytest.mark.parametrize("N, K, G", CONV_SHAPES)
@pytest.mark.parametrize("sdtype", DTYPES)
def test_from_awq_matches_direct_formula(N, K, G, sdtype):
    Gr = G or K
    q_kn, z, s = _random_awq(N, K, Gr, sdtype, seed=N + K)
    qweight, qzeros = awq_pack_ref(q_kn.numpy()), awq_pack_ref(z.numpy())
    w = Int4Weight.from_awq(qweight, qzeros, s, G)
    assert w.shape == (N, K) and w.group_size == Gr and w.scales.dtype == sdtype
    w_true = (q_kn.float() - z.float().repeat_interleave(Gr, 0)) * s.float().repeat_interleave(Gr, 0)
    assert torch.equal(w.dequantize(), w_true.T)
    assert torch.equal(w.unpack(), q_kn.T.to(torch.uint8))
    # Back to AWQ: bit-exact.
    qweight2, qzeros2, s2 = w.to_awq()
    assert torch.equal(qweight2, qweight) and torch.equal(qzeros2, qzeros) and torch.equal(s2, s)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_round_trip_from_quantized(symmetric, dtype):
    w = quantize_int4(torch.randn(200, 1536, generator=gen(11)).to(dtype), group_size=128,
                      symmetric=symmetric)
    back = Int4Weight.from_awq(*w.to_awq(), group_size=128)
    assert torch.equal(back.qweight, w.qweight) and torch.equal(back.scales, w.scales)
    expected_zeros = torch.full((200, 12), 8, dtype=torch.uint8) if symmetric else w.zeros
    assert torch.equal(back.zeros, expected_zeros)
    assert torch.equal(back.dequantize(), w.dequantize())


def test_awq_errors():
    q_kn, z, s = _random_awq(24, 64, 32, torch.float16, seed=12)
    qweight, qzeros = awq_pack_ref(q_kn.numpy()), awq_pack_ref(z.numpy())
    with pytest.raises(ValueError, match=r"from_awq: qweight: expected dtype torch.int32"):
        Int4Weight.from_awq(qweight.long(), qzeros, s, 32)
    with pytest.raises(ValueError, match=r"from_awq: qweight: expected a 2-D"):
        Int4Weight.from_awq(qweight.flatten(), qzeros, s, 32)
    with pytest.raises(ValueError, match=r"from_awq: scales: expected shape \(2, 24\), got \(2, 16\)"):
        Int4Weight.from_awq(qweight, qzeros, s[:, :16], 32)
    with pytest.raises(ValueError, match=r"from_awq: qzeros: expected shape \(2, 3\)"):
        Int4Weight.from_awq(qweight, qzeros[:1], s, 32)
    with pytest.raises(ValueError, match=r"K=64 is not divisible by group_size=48"):
        Int4Weight.from_awq(qweight, qzeros, s, 48)
    w = Int4Weight.from_awq(qweight, qzeros, s, 32)
    w.perm = torch.randperm(64, generator=gen(13))
    with pytest.raises(ValueError, match="to_awq: perm is set"):
        w.to_awq()


# ---- GPTQ ---------------------------------------------------------------------------------------

# act-order needs more than one group.
GPTQ_CASES = [(N, K, G, act) for (N, K, G) in CONV_SHAPES for act in (False, True)
              if G is not None or not act]


@pytest.mark.parametrize("N, K, G, act_order", GPTQ_CASES)
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16])
def test_from_gptq_matches_direct_formula(N, K, G, act_order, sdtype):
    Gr = G or K
    ng = K // Gr
    g = gen(100 + N + K + act_order)
    q_kn = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(1, 16, (ng, N), generator=g)  # v1 stores z - 1 in 0..14
    s = (torch.rand(ng, N, generator=g) * 0.01 + 1e-3).to(sdtype)
    g_idx = torch.arange(K) // Gr
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    t = dict(qweight=gptq_pack_qweight_ref(q_kn.numpy()), qzeros=gptq_pack_qzeros_ref(z.numpy()),
             scales=s, g_idx=g_idx.to(torch.int32))

    w = Int4Weight.from_gptq(**t, group_size=G if G else -1)
    assert w.shape == (N, K) and w.group_size == Gr and (w.perm is not None) == act_order
    w_true = ((q_kn.float() - z.float()[g_idx]) * s.float()[g_idx]).T  # [N, K], original order
    assert torch.equal(dense_original_order(w), w_true)
    x = torch.randn(5, K, generator=g)
    torch.testing.assert_close(int4_linear_reference(x, w), x @ w_true.T, rtol=1e-5, atol=1e-5)

    back = w.to_gptq()
    assert set(back) == set(t)
    for name in t:
        assert back[name].dtype == t[name].dtype and torch.equal(back[name], t[name]), name


def test_from_gptq_without_g_idx_and_zero_offset():
    q_kn = torch.randint(0, 16, (64, 24), generator=gen(14))
    qzeros = torch.full((2, 3), 0x77777777, dtype=torch.int32)  # stored 7 everywhere
    s = torch.rand(2, 24, generator=gen(15)).half() + 0.01
    qweight = gptq_pack_qweight_ref(q_kn.numpy())
    w = Int4Weight.from_gptq(qweight, qzeros, s, group_size=32)
    assert torch.equal(w.zeros, torch.full((24, 2), 8, dtype=torch.uint8)) and w.perm is None
    w_sym = Int4Weight.from_gptq(qweight, qzeros, s, group_size=32, sym=True)
    assert w_sym.zeros is None
    w_true = ((q_kn.float() - 8) * s.float().repeat_interleave(32, 0)).T
    assert torch.equal(w.dequantize(), w_true) and torch.equal(w_sym.dequantize(), w_true)
    assert torch.equal(w_sym.to_gptq()["qzeros"], qzeros)


def test_gptq_round_trip_with_arbitrary_perm():
    w = quantize_int4(torch.randn(24, 576, generator=gen(16)).half(), group_size=64)
    w.perm = torch.randperm(576, generator=gen(17))
    back = Int4Weight.from_gptq(**w.to_gptq(), group_size=64)
    assert back.perm is not None
    assert torch.equal(dense_original_order(back), dense_original_order(w))
    x = torch.randn(3, 576, generator=gen(18))
    torch.testing.assert_close(int4_linear_reference(x, back), int4_linear_reference(x, w),
                               rtol=1e-5, atol=1e-5)


def test_gptq_round_trip_symmetric():
    w = quantize_int4(torch.randn(24, 576, generator=gen(19)).bfloat16(), group_size=64, symmetric=True)
    back = Int4Weight.from_gptq(**w.to_gptq(), group_size=64, sym=True)
    assert back.zeros is None and back.perm is None
    assert torch.equal(back.qweight, w.qweight) and torch.equal(back.scales, w.scales)


def test_gptq_errors():
    q_kn = torch.randint(0, 16, (64, 24), generator=gen(20))
    qweight = gptq_pack_qweight_ref(q_kn.numpy())
    z = torch.randint(1, 16, (2, 24), generator=gen(21))
    z[0, 0] = 7
    qzeros = gptq_pack_qzeros_ref(z.numpy())
    s = torch.rand(2, 24, generator=gen(22)).half() + 0.01
    kw = dict(group_size=32)
    with pytest.raises(ValueError, match=r"from_gptq: qweight: expected a 2-D"):
        Int4Weight.from_gptq(qweight.flatten(), qzeros, s, **kw)
    with pytest.raises(ValueError, match=r"from_gptq: qweight: expected dtype torch.int32"):
        Int4Weight.from_gptq(qweight.float(), qzeros, s, **kw)
    with pytest.raises(ValueError, match=r"N=20 \(qweight.shape\[1\]\) must be a multiple of 8"):
        Int4Weight.from_gptq(qweight[:, :20], qzeros, s, **kw)
    with pytest.raises(ValueError, match=r"from_gptq: scales: expected shape \(2, 24\), got \(1, 24\)"):
        Int4Weight.from_gptq(qweight, qzeros, s[:1], **kw)
    with pytest.raises(ValueError, match=r"from_gptq: qzeros: expected shape \(2, 3\)"):
        Int4Weight.from_gptq(qweight, qzeros[:, :2], s, **kw)
    with pytest.raises(ValueError, match=r"sym=True but qzeros hold zero points other than 8"):
        Int4Weight.from_gptq(qweight, qzeros, s, sym=True, **kw)
    z16 = z.clone()
    z16[1, 5] = 16  # stored 15
    with pytest.raises(ValueError, match=r"1 stored value\(s\) are 15, i.e. zero point 16"):
        Int4Weight.from_gptq(qweight, gptq_pack_qzeros_ref(z16.numpy()), s, **kw)
    unequal = torch.zeros(64, dtype=torch.int32)
    unequal[:20] = 1
    with pytest.raises(ValueError, match=r"exactly group_size=32 channels"):
        Int4Weight.from_gptq(qweight, qzeros, s, unequal, **kw)
    with pytest.raises(ValueError, match=r"g_idx: expected values in \[0, 2\)"):
        Int4Weight.from_gptq(qweight, qzeros, s, torch.arange(64, dtype=torch.int32) // 16, **kw)
    with pytest.raises(ValueError, match=r"g_idx: expected shape \(64,\)"):
        Int4Weight.from_gptq(qweight, qzeros, s, torch.arange(32) // 16, **kw)

    w = Int4Weight.from_gptq(qweight, qzeros, s, **kw)
    w.zeros[3, 1] = 0
    with pytest.raises(ValueError, match=r"to_gptq: 1 zero point\(s\) are 0"):
        w.to_gptq()
