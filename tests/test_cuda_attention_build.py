"""CPU-side checks of the rope_and_cache and decode_attention CUDA kernels (no GPU needed).

  * the built .so has every instantiation for every built arch; the decode split kernel's SASS
    uses tensor cores (HMMA), cp.async (LDGSTS) and ldmatrix (LDSM), the rope kernel 16-byte
    accesses and, on sm_89+, the hardware FP8 convert; nothing uses local memory;
  * ptxas reports no spills for csrc/rope_cache.cu and csrc/decode_attention.cu on every arch;
  * the launchers reject unsupported configurations with a RuntimeError naming the kernel, the
    shapes and the reason (the dispatch whitelists included) before any CUDA call, and the split
    policy is a pure function of shapes;
  * the Python-side checks of the cuda backend raise ValueError for unsupported head dims, block
    sizes, group sizes and dtypes, before anything launches.
Numerical correctness on a GPU: tests/test_gpu_attention.py and tests/test_gpu_rope.py.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from test_cuda_build import (  # noqa: F401  (built, sass are fixtures)
    CSRC,
    DEFAULT_ARCHS,
    _arch_num,
    _parse_ptxas,
    _ptxas_report,
    _raises,
    built,
    ptx,
    ptx_entries,
    sass,
)

from llama_kernels.cuda import attention as cuda_attention
from llama_kernels.cuda import rope as cuda_rope

# Mangled template arguments of decode_split_kernel<T, kHeadDim, kFp8>, decode_merge_kernel<T>
# and rope_cache_kernel<T, kInterleaved, kFp8Cache>.
T_RE = r"(6__half|13__nv_bfloat16)"
SPLIT_RE = re.compile(r"decode_split_kernelI" + T_RE + r"Li(\d+)ELb([01])E")
MERGE_RE = re.compile(r"decode_merge_kernelI" + T_RE + r"E")
ROPE_RE = re.compile(r"rope_cache_kernelI" + T_RE + r"Lb([01])ELb([01])E")
DTYPES = {"6__half": "float16", "13__nv_bfloat16": "bfloat16"}
A = 1 << 20  # a 16-byte aligned fake device address: nothing is launched for bad arguments


def _kernels(funcs: dict[str, str], regex: re.Pattern) -> dict[tuple, str]:
    return {regex.search(f).groups(): body for f, body in funcs.items() if regex.search(f)}


# --------------------------------------------------------------------------- SASS


def test_sass_has_every_attention_kernel_for_every_arch(built, sass):
    assert sorted(sass) == sorted(f"sm_{a}" for a in built.archs)
    for arch, funcs in sass.items():
        split = {(DTYPES[t], int(d), fp8) for t, d, fp8 in _kernels(funcs, SPLIT_RE)}
        assert split == {(t, d, f) for t in DTYPES.values() for d in (64, 128) for f in "01"}, (arch, split)
        merge = {DTYPES[t] for (t,) in _kernels(funcs, MERGE_RE)}
        assert merge == set(DTYPES.values()), (arch, merge)
        rope = {(DTYPES[t], il, f) for t, il, f in _kernels(funcs, ROPE_RE)}
        assert rope == {(t, il, f) for t in DTYPES.values() for il in "01" for f in "01"}, (arch, rope)


def test_sass_decode_uses_tensor_cores_and_cp_async(sass):
    for arch, funcs in sass.items():
        for (t, d, fp8), body in _kernels(funcs, SPLIT_RE).items():
            where = f"{arch} decode_split_kernel<{DTYPES[t]}, D={d}, fp8={fp8}>"
            ab = "BF16" if t == "13__nv_bfloat16" else "F16"
            hmma = re.findall(r"\bHMMA\.16816\.F32(\.BF16)?\b", body)
            assert all((h == ".BF16") == (ab == "BF16") for h in hmma), f"{where}: HMMA of the wrong type"
            # Per tile and warp: Q.K^T is D/16 k-steps x 2 token blocks, P.V is D/8 dim blocks.
            want = int(d) // 16 * 2 + int(d) // 8
            assert len(hmma) >= want, f"{where}: {len(hmma)} HMMA.16816.F32, expected >= {want}"
            assert re.search(r"\bLDGSTS\.E\b[.\w]*", body), f"{where}: no cp.async (LDGSTS)"
            assert re.search(r"\bLDGDEPBAR\b", body), f"{where}: no cp.async commit (LDGDEPBAR)"
            assert re.search(r"\bLDSM\.16\.M88\.4\b", body), f"{where}: no ldmatrix.x4 (LDSM.16.M88.4)"
            assert re.search(r"\bLDSM\.16\.MT88\.4\b", body), f"{where}: no ldmatrix.x4.trans (LDSM.16.MT88.4)"
            assert not re.search(r"\b(LDL|STL)\b", body), f"{where}: uses local memory (spills)"
        for (t,), body in _kernels(funcs, MERGE_RE).items():
            assert not re.search(r"\b(LDL|STL)\b", body), f"{arch} decode_merge_kernel<{DTYPES[t]}>: local memory"


def test_sass_rope_is_vectorized_and_uses_hardware_fp8(sass):
    f2fp = re.compile(r"\bF2FP\.SATFINITE\.E4M3\.F32\.PACK_AB")
    for arch, funcs in sass.items():
        for (t, il, fp8), body in _kernels(funcs, ROPE_RE).items():
            where = f"{arch} rope_cache_kernel<{DTYPES[t]}, interleaved={il}, fp8={fp8}>"
            assert re.search(r"\bLDG\.E[.\w]*\.128\b", body), f"{where}: no 16-byte vector load"
            assert re.search(r"\bSTG\.E[.\w]*\.128\b", body), f"{where}: no 16-byte vector store"
            assert not re.search(r"\b(LDL|STL)\b", body), f"{where}: uses local memory (spills)"
            if fp8 == "1":
                assert re.search(r"\bSTG\.E[.\w]*\.64\b", body), f"{where}: no 8-byte FP8 cache store"
                if _arch_num(arch[3:]) >= 89:
                    assert f2fp.search(body), f"{where}: no hardware F2FP...E4M3 convert"


# --------------------------------------------------------------------------- ptxas spills


def test_attention_kernels_do_not_spill(built):
    archs = built.archs or DEFAULT_ARCHS
    sources = [CSRC / "rope_cache.cu", CSRC / "decode_attention.cu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        logs = list(pool.map(lambda s: _ptxas_report(s, archs), sources))
    entries = [e for log in logs for e in _parse_ptxas(log)]
    for regex, per_arch in ((SPLIT_RE, 8), (MERGE_RE, 2), (ROPE_RE, 8)):
        found = [e for e in entries if regex.search(e["func"])]
        assert len(found) == per_arch * len(archs), (regex.pattern, len(found))
    for e in entries:
        assert {"registers", "spill_stores", "spill_loads"} <= e.keys(), e
        assert e["spill_stores"] == 0 and e["spill_loads"] == 0, f"register spill: {e}"
        print(f"{e['arch']:7s} {e['func'][13:90]} regs={e['registers']} stack={e['stack']}")


# --------------------------------------------------------------------------- launcher validation


def _decode_args(**over):
    args = dict(q=A, k_cache=A, v_cache=A, block_table=A, seq_lens=A, k_scale=0, v_scale=0, out=A,
                partial=A, lse=A, batch=2, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                max_blocks=8, num_splits=2, sm_scale=0.125, dtype=2, cache_fp8=False, stream=0)  # fmt: skip
    args.update(over)
    return args


def _rope_args(**over):
    args = dict(q=A, k=A, v=A, positions=A, positions_int64=False, cos=A, sin=A, k_cache=A, v_cache=A,
                slot_mapping=A, slots_int64=True, k_scale=0, v_scale=0, q_out=A, k_out=A, num_tokens=3,
                num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=2, cache_fp8=False, interleaved=False,
                stream=0)  # fmt: skip
    args.update(over)
    return args


def test_decode_attention_launcher_rejects_unsupported_configs(built):
    C = built.C
    msg = _raises(lambda: C.decode_attention(**_decode_args(head_dim=96)))
    assert msg == ("decode_attention: invalid argument (batch=2, q_heads=32, kv_heads=8, head_dim=96, "
                   "block_size=16, max_blocks=8, splits=2, dtype=bfloat16, cache=bfloat16): "
                   "DISPATCH_HEAD_DIM: head_dim must be 64 or 128")  # fmt: skip
    cases = [
        (dict(num_q_heads=17 * 8), "DISPATCH_GROUP_SIZE: group size num_q_heads / num_kv_heads must be in 1..16"),
        (dict(num_q_heads=32 * 8), "DISPATCH_GROUP_SIZE: group size num_q_heads / num_kv_heads must be in 1..16"),
        (dict(block_size=8), "block_size must be 16, 32 or 64"),
        (dict(block_size=128), "block_size must be 16, 32 or 64"),
        (dict(dtype=0), "dtype must be 1 (float16) or 2 (bfloat16)"),
        (dict(num_q_heads=30), "num_q_heads must be a positive multiple of num_kv_heads"),
        (dict(batch=65536), "batch must be in 0..65535"),
        (dict(num_splits=0), "num_splits must be in 1..65536"),
        (dict(q=A + 8), "q and out must be 16-byte aligned"),
        (dict(k_cache=A + 4), "k_cache and v_cache must be 16-byte aligned"),
        (dict(partial=0), "partial and lse workspaces are required when num_splits > 1"),
        (dict(cache_fp8=True), "k_scale and v_scale are required for an FP8 cache"),
        (dict(seq_lens=0), "q, k_cache, v_cache, block_table, seq_lens and out must not be null"),
    ]
    for over, reason in cases:
        msg = _raises(lambda: C.decode_attention(**_decode_args(**over)))
        assert msg.startswith("decode_attention: invalid argument (batch=") and msg.endswith(": " + reason), msg
    # batch == 0 is a validated no-op that needs no pointers (and no GPU).
    assert C.decode_attention(**_decode_args(batch=0, q=0, k_cache=0, v_cache=0, out=0)) is None
    # ...but the whitelists still apply to it.
    msg = _raises(lambda: C.decode_attention(**_decode_args(batch=0, head_dim=256)))
    assert msg.endswith("DISPATCH_HEAD_DIM: head_dim must be 64 or 128"), msg


def test_rope_launcher_rejects_unsupported_configs(built):
    C = built.C
    msg = _raises(lambda: C.rope_and_cache(**_rope_args(head_dim=96)))
    assert msg == ("rope_and_cache: invalid argument (tokens=3, q_heads=32, kv_heads=8, head_dim=96, "
                   "dtype=bfloat16, cache=bfloat16): head_dim must be 64 or 128")  # fmt: skip
    cases = [
        (dict(dtype=0), "dtype must be 1 (float16) or 2 (bfloat16)"),
        (dict(num_q_heads=30), "num_q_heads must be a multiple of num_kv_heads"),
        (dict(q=A + 2), "q, k, v must be 16-byte aligned"),
        (dict(cos=A + 4), "cos, sin must be 16-byte aligned"),
        (dict(v_cache=A + 8), "k_cache, v_cache must be 16-byte aligned"),
        (dict(slot_mapping=A + 4), "slot_mapping must be aligned to its element size"),
        (dict(cache_fp8=True), "k_scale and v_scale are required for an FP8 cache"),
        (dict(num_tokens=-1), "num_tokens must be >= 0"),
    ]
    for over, reason in cases:
        msg = _raises(lambda: C.rope_and_cache(**_rope_args(**over)))
        assert msg.startswith("rope_and_cache: invalid argument (tokens=") and msg.endswith(": " + reason), msg
    assert C.rope_and_cache(**_rope_args(num_tokens=0, q=0, k=0, v=0)) is None


def test_launch_error_is_reported_without_a_gpu(built):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this test would launch on fake pointers")
    msg = _raises(lambda: built.C.decode_attention(**_decode_args()))
    assert msg.startswith("decode_attention: ") and "invalid argument" not in msg, msg
    msg = _raises(lambda: built.C.rope_and_cache(**_rope_args()))
    assert msg.startswith("rope_and_cache: ") and "invalid argument" not in msg, msg


def test_split_policy_depends_on_shapes_only(built):
    splits = built.C.decode_attention_num_splits
    assert splits(1, 8, 32768, 132) == 33  # batch 1, long context: ~2 waves of 132 SMs
    assert splits(1, 8, 2048, 132) == 8  # capped by 256 tokens per split
    assert splits(64, 8, 4096, 132) == 1  # enough blocks without splitting: no merge kernel
    assert splits(1, 1, 100, 132) == 1  # shorter than one split
    assert splits(0, 8, 4096, 132) >= 1
    assert splits(1, 1, 1 << 30, 1 << 20) == 65536  # bounded


def test_splits_divide_the_live_length_not_the_table_capacity(built):
    """Split s of a sequence of `len` live tokens covers [s * n, min((s + 1) * n, len)), n =
    decode_attention_split_tokens(len, S): together exactly [0, len), tile-aligned, at least 256
    tokens each; a short sequence in a wide (CUDA-graph, long-context) table still spreads over
    several splits instead of leaving them idle."""
    tokens = built.C.decode_attention_split_tokens
    for num_splits in (1, 2, 7, 33, 264):
        for length in (0, 1, 63, 64, 255, 256, 257, 2048, 2049, 32769, 131072):
            n = tokens(length, num_splits)
            assert n % 64 == 0 and n >= 256
            covered = [t for s in range(num_splits) for t in range(s * n, min((s + 1) * n, length))]
            assert covered == list(range(length)), (length, num_splits)
    # 2K live tokens of a 128K-token table: the grid's 33 splits are shape-fixed; 8 of them get work
    # (they all got nothing past split 0 when the ranges divided the capacity).
    splits = built.C.decode_attention_num_splits(1, 8, 131072, 132)
    assert sum(1 for s in range(splits) if s * tokens(2048, splits) < 2048) == 8


def e4m3_bit_trick(codes: torch.Tensor) -> torch.Tensor:
    """csrc/decode_attention.cuh e4m3x2_to_half2 below sm_89, per byte: sign to bit 15, the other
    7 bits to bits 13..7 of an fp16, times 256."""
    c = codes.to(torch.int32)
    bits = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    return bits.to(torch.int16).view(torch.float16) * torch.tensor(256.0, dtype=torch.float16)


def test_sm80_fp8_bit_trick_is_exact_for_every_finite_e4m3_value():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = codes.view(torch.float8_e4m3fn).to(torch.float32)
    got = e4m3_bit_trick(codes).to(torch.float32)
    finite = torch.isfinite(want)  # 0x7F and 0xFF are NaN in e4m3fn; the cache never holds them
    assert int(finite.sum()) == 254
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))  # -0 stays -0


def test_sm80_fp8_cache_converts_without_the_library_fallback():
    """Below sm_89 the e4m3 -> fp16 conversion is the bit move and one mul.f16x2 (no per-byte
    library routine); from sm_89 on it is the hardware convert."""
    for arch, want, avoid in (("80", "mul.f16x2", "cvt.rn.f16x2.e4m3x2"), ("89", "cvt.rn.f16x2.e4m3x2", "mul.f16x2")):
        kernels = {k: v for k, v in ptx_entries(ptx(CSRC / "decode_attention.cu", arch)).items()
                   if SPLIT_RE.search(k) and SPLIT_RE.search(k).group(3) == "1"}  # fmt: skip
        assert len(kernels) == 4, list(kernels)
        for name, body in kernels.items():
            assert want in body and avoid not in body, (arch, name)


@pytest.mark.parametrize("d", [64, 128])
def test_fp8_conversion_stores_are_free_of_bank_conflicts(d):
    """Lane-accurate emulation of the split kernel's FP8 -> 16-bit tile stores (csrc/decode_attention.cuh):
    each 16-byte store instruction is served per quarter warp (8 lanes x 16 bytes), which must touch
    32 distinct 4-byte banks."""
    chunks, row16 = d // 16, d * 2 + 16  # kChunks (e4m3: D bytes per row), kRow16
    for i in range(16 * chunks // 32):
        for store in (0, 1):  # the two 16-byte stores per chunk (per K or V tile)
            for quarter in range(4):
                banks = []
                for lane in range(8 * quarter, 8 * quarter + 8):
                    c = lane + 32 * i
                    row, ch = c // chunks, c % chunks
                    swap = (ch & 4) != 0
                    half = (16 if swap else 0) if store == 0 else (0 if swap else 16)
                    addr = row * row16 + ch * 32 + half
                    banks += [(addr // 4 + j) % 32 for j in range(4)]
                assert sorted(banks) == list(range(32)), (d, i, store, quarter)


# --------------------------------------------------------------------------- Python-side checks


FP8 = torch.float8_e4m3fn


def _decode_inputs(b=2, hq=8, hkv=2, d=128, block_size=16, dtype=torch.bfloat16, cache_dtype=None):
    q = torch.zeros(b, hq, d, dtype=dtype)
    cache = torch.zeros(4, block_size, hkv, d, dtype=cache_dtype or dtype)
    table = torch.zeros(b, 3, dtype=torch.int32)
    lens = torch.ones(b, dtype=torch.int32)
    return q, cache, cache.clone(), table, lens


def test_python_decode_checks_accept_supported_configs():
    for group in range(1, 17):
        for d in (64, 128):
            for bs in (16, 32, 64):
                cuda_attention.check_decode_attention(*_decode_inputs(hq=2 * group, d=d, block_size=bs))
    cuda_attention.check_decode_attention(*_decode_inputs(dtype=torch.float16, cache_dtype=FP8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d=96), r"decode_attention: the cuda kernel supports head_dim D in \(64, 128\), got D=96"),
        (dict(d=256), r"decode_attention: the cuda kernel supports head_dim D in \(64, 128\), got D=256"),
        (dict(block_size=8), r"decode_attention: the cuda kernel supports block_size in \(16, 32, 64\), got block_size=8"),
        (dict(block_size=128), r"supports block_size in \(16, 32, 64\), got block_size=128"),
        (dict(hq=34, hkv=2), r"decode_attention: the cuda kernel supports group sizes Hq / Hkv in 1..16, got 34 / 2 = 17"),
        (dict(dtype=torch.float32), r"decode_attention: the cuda kernel supports q dtype bfloat16 or float16"),
        (dict(dtype=torch.bfloat16, cache_dtype=torch.float16), r"needs a torch.bfloat16 \(q's dtype\) or float8_e4m3fn cache"),
    ],
)  # fmt: skip
def test_python_decode_checks_reject(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cuda_attention.check_decode_attention(*_decode_inputs(**kwargs))


def _rope_inputs(t=3, hq=8, hkv=2, d=128, dtype=torch.bfloat16, cache_dtype=None, index=torch.int64):
    q = torch.zeros(t, hq, d, dtype=dtype)
    k, v = torch.zeros(t, hkv, d, dtype=dtype), torch.zeros(t, hkv, d, dtype=dtype)
    pos = torch.zeros(t, dtype=index)
    cos = torch.zeros(16, d // 2)
    cache = torch.zeros(4, 16, hkv, d, dtype=cache_dtype or dtype)
    return q, k, v, pos, cos, cos.clone(), cache, cache.clone(), pos.clone()


def test_python_rope_checks():
    for d in (64, 128):
        for cache_dtype in (None, FP8):
            for index in (torch.int32, torch.int64):
                cuda_rope.check_rope_and_cache(*_rope_inputs(d=d, cache_dtype=cache_dtype, index=index))
    with pytest.raises(ValueError, match=r"rope_and_cache: the cuda kernel supports head_dim D in \(64, 128\), got D=80"):
        cuda_rope.check_rope_and_cache(*_rope_inputs(d=80))
    with pytest.raises(ValueError, match=r"rope_and_cache: the cuda kernel supports q/k/v dtype bfloat16 or float16"):
        cuda_rope.check_rope_and_cache(*_rope_inputs(dtype=torch.float32))


def test_python_check_rejects_misaligned_tensors():
    q, kc, vc, table, lens = _decode_inputs()
    base = torch.zeros(q.numel() + 8, dtype=q.dtype)
    q_bad = base[1:].narrow(0, 0, q.numel()).view(q.shape)  # 2-byte offset
    with pytest.raises(ValueError, match=r"decode_attention: argument 'q' has data pointer .* not 16-byte aligned"):
        cuda_attention.check_decode_attention(q_bad, kc, vc, table, lens)


def test_cuda_ops_are_registered_but_not_default():
    from llama_kernels import backends

    for op in ("rope_and_cache", "decode_attention"):
        assert "cuda" in backends._REGISTRY[op], op
        assert not backends.is_validated(op, "cuda", (9, 0)), f"{op}: cuda must not be validated without GPU tests"
