"""paged_prefill_attention: the reference against independent definitions, the triton kernel
against the reference, the argument checks, and compiles of the kernel for sm_90 / sm_89 / sm_80.

The reference (the torch backend) is checked against SDPA with a causal mask when the new tokens
are the whole sequence, and, with a cached prefix, token by token against decode_attention: new
token i of sequence b is one decode step over the first p + 1 cached tokens. Without a GPU the
triton kernel runs under the interpreter, so the cases are a covering subset of the sizes, not
their cross product.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import TOL, assert_rel_close, paged_attention_case, poison_allocator, randn
from llama_kernels import BackendUnavailableError, backends, ops, reference
from llama_kernels.triton import prefill_attention
from triton_compile import compile_for, ptxas_report

FP8 = torch.float8_e4m3fn
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


@pytest.mark.parametrize("rows", [reference.PREFILL_ROWS, 5])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, FP8)])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_reference_with_prefix_is_decode_token_by_token(group, dtype, cache_dtype, rows, monkeypatch):
    # Prefixes 0, 5 and 130 (cached tokens before the new ones), mixed query lengths; with 5 rows
    # per step the 17 new tokens take 4 steps, each over the keys up to its own last position.
    monkeypatch.setattr(reference, "PREFILL_ROWS", rows)
    seq_lens, query_lens = [3, 22, 147, 1], [3, 17, 17, 1]
    args = prefill_case(seq_lens, query_lens, 2 * group, 2, 64, 16, dtype, cache_dtype, seed=group)
    out = ops.paged_prefill_attention(*args[:6], 0.07, *args[6:])
    assert_rel_close(out, decode_token_by_token(*args, scale=0.07), TOL[dtype] + 1e-6)


def test_reference_runs_on_the_fused_cpu_kernel():
    # On the CPU the reference must not fall back to SDPA's math kernel (the [Hq, rows, n] logits
    # in memory, several times slower): with only the flash kernel allowed it still runs.
    args = prefill_case([150, 9], [20, 9], 12, 4, 64, 16, torch.bfloat16, FP8, seed=5)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = ops.paged_prefill_attention(*args[:6], None, *args[6:])
    assert_rel_close(out, decode_token_by_token(*args), TOL[torch.bfloat16] + 1e-6)


# --- the triton kernel ------------------------------------------------------------------


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Outputs the kernel allocates start as NaN also on the CPU (poison_allocator does it on a
    GPU), so a row it fails to write shows."""
    if DEVICE.type == "cuda":
        poison_allocator(DEVICE)
        return
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))


def _check_triton(args, scale=None, name="paged_prefill_attention"):
    want = reference.paged_prefill_attention(*args[:6], scale, *args[6:])
    assert torch.isfinite(want).all()  # the reference writes every row (outputs start as NaN here)
    out = ops.paged_prefill_attention(*args[:6], scale, *args[6:], backend="triton")
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert_rel_close(out, want, TOL[args[0].dtype], name)  # also asserts no NaN/inf
    return out


# (seq_lens, query_lens) of 4 sequences packed in one call: query lengths 1, 3, 17, 64 over
# prefixes 0, 5, 130 in rotating combinations.
LENS = [([1, 8, 147, 64], [1, 3, 17, 64]),
        ([135, 17, 69, 3], [5, 17, 64, 3]),
        ([3, 147, 5, 194], [3, 17, 5, 64]),
        ([131, 6, 22, 64], [1, 1, 17, 64])]  # fmt: skip
CASES = [  # (lens, group, D, block_size, q dtype, cache dtype)
    (LENS[0], 1, 64, 16, torch.float32, torch.float32),
    (LENS[1], 3, 128, 32, torch.bfloat16, torch.bfloat16),
    (LENS[2], 4, 64, 32, torch.float16, torch.float16),
    (LENS[3], 8, 128, 16, torch.bfloat16, FP8),
    (LENS[0], 16, 64, 16, torch.float16, FP8),
    (LENS[1], 16, 128, 32, torch.float32, torch.float32),
    (LENS[2], 8, 64, 16, torch.bfloat16, torch.float32),  # q and cache of different dtypes
    (LENS[3], 1, 128, 32, torch.float16, torch.bfloat16),
]


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("lens,group,d,block_size,dtype,cache_dtype", CASES,
                         ids=[f"g{c[1]}-d{c[2]}-bs{c[3]}-{c[4]}-{c[5]}".replace("torch.", "") for c in CASES])  # fmt: skip
def test_triton_matches_reference(lens, group, d, block_size, dtype, cache_dtype):
    args = prefill_case(*lens, 2 * group, 2, d, block_size, dtype, cache_dtype, seed=group + d, device=DEVICE)
    _check_triton(args, name=f"group {group} D {d} block {block_size} {dtype}/{cache_dtype}")


def test_triton_fp8_cache_against_dequantized_float32_cache():
    # The FP8 decode in the kernel (integer ops, scales folded into the logit scale and the output)
    # against the same cache dequantized by torch: with q in float32 all the math is float32, so the
    # float32 tolerance holds.
    q, kc, vc, table, lens, qlens, ks, vs = prefill_case([150, 9], [20, 9], 8, 2, 64, 16, torch.float32, FP8, 4,
                                                         device=DEVICE)  # fmt: skip
    out = ops.paged_prefill_attention(q, kc, vc, table, lens, qlens, None, ks, vs, backend="triton")
    kf, vf = kc.float() * ks[:, None], vc.float() * vs[:, None]
    want = ops.paged_prefill_attention(q, kf, vf, table, lens, qlens, backend="torch")
    assert_rel_close(out, want, TOL[torch.float32], "fp8 cache")


@pytest.mark.usefixtures("poisoned_outputs")
def test_triton_many_tiles_and_sequences_custom_scale():
    # 9 sequences, one long (10 query tiles of 32 tokens at group 2 in float32, a prefix spanning
    # several KV tiles) among short ones with one or two new tokens: exercises the tile -> sequence
    # map and the bound on the number of tiles.
    query_lens = [1, 2, 300, 1, 1, 2, 1, 40, 1]
    seq_lens = [q + p for q, p in zip(query_lens, [0, 7, 260, 33, 1, 64, 127, 0, 300])]
    args = prefill_case(seq_lens, query_lens, 4, 2, 64, 16, torch.float32, torch.float32, seed=9, device=DEVICE)
    _check_triton(args, scale=0.3)


@pytest.mark.parametrize("d", [32, 96])
def test_triton_unsupported_head_dim_raises(d):
    args = prefill_case([4], [4], 4, 2, d, 16, torch.float16, torch.float16, seed=0)
    with pytest.raises(ValueError, match=f"head_dim D in \\(64, 128\\), got D={d}"):
        ops.paged_prefill_attention(*args[:6], backend="triton")


def test_triton_fake_registration_matches_kernel():
    q, kc, vc, table, lens, qlens, _, _ = prefill_case([30, 5], [10, 5], 4, 2, 64, 16, torch.bfloat16, torch.bfloat16,
                                                       seed=3)  # fmt: skip
    plan = prefill_attention.make_plan(q, kc, table, lens, qlens)
    torch.library.opcheck(prefill_attention.planned_attention, (q, kc, vc, table, plan.items, plan.merges,
                          plan.max_slots), test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_tile_config_fits_every_group():
    for group in (1, 3, 4, 8, 16, 24, 80, 128):
        for dtype, capability in ((torch.bfloat16, (9, 0)), (torch.bfloat16, (8, 0)), (torch.float32, None)):
            for fp8 in (False, True):
                block_m, block_n, _, _ = prefill_attention.tile_config(group, 128, dtype, fp8, capability)
                assert block_m >= 16 and block_m & (block_m - 1) == 0 and block_n >= 16  # tl.dot's shapes
                assert block_m // group * group > block_m // 2  # at least one token, padding under half the rows


@pytest.mark.gpu
def test_triton_realistic_sizes():
    # An 8B-shaped layer (32 query heads, 8 KV heads, D 128): a 2048-token chunk over a 6000-token
    # prefix packed with a 512-token prompt and three decode-like sequences.
    query_lens = [2048, 512, 1, 1, 1]
    seq_lens = [8048, 512, 4000, 17, 1]
    for cache_dtype in (torch.bfloat16, FP8):
        args = prefill_case(seq_lens, query_lens, 32, 8, 128, 16, torch.bfloat16, cache_dtype, seed=1, device=DEVICE)
        _check_triton(args, name=f"8B-shaped {cache_dtype}")


# --- compile for sm_90 / sm_89 / sm_80 ---------------------------------------------------------

_INTS = ("num_tokens", "num_kv_heads", "max_blocks")
_CONSTEXPRS = ("GROUP", "HEAD_DIM", "BLOCK_SIZE", "BLOCK_M", "SMALL_M", "BLOCK_N", "IS_FP8", "DOT_F32", "TRANSPOSED",
               "EMULATE_CASTS", "INTERPRETED")  # fmt: skip


def _compile_item_kernel(group, d, cache, capability):
    """The item kernel as a launch with bf16 q (fp16 for an fp16 cache) over `cache` ("bf16", "fp16",
    or "u8": e4m3 bits) would compile it for sm_<capability>, in the configuration call_config picks;
    returns (compiled, config)."""
    dtype = "fp16" if cache == "fp16" else "bf16"
    signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{cache}", "v_ptr": f"*{cache}", "table_ptr": "*i32",
                 "items_ptr": "*i32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "out_ptr": f"*{dtype}",
                 "part_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale": "fp32", **dict.fromkeys(_INTS, "i32"),
                 **dict.fromkeys(_CONSTEXPRS, "constexpr")}  # fmt: skip
    q_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    cache_dtype = {"u8": FP8, "fp16": torch.float16, "bf16": torch.bfloat16}[cache]
    cfg = prefill_attention.call_config(q_dtype, group, d, cache_dtype, divmod(capability, 10))
    assert not cfg.dot_f32 and cfg.small_m == max(16, group)
    constexprs = dict(GROUP=group, HEAD_DIM=d, BLOCK_SIZE=16, BLOCK_M=cfg.block_m, SMALL_M=cfg.small_m,
                      BLOCK_N=cfg.block_n, IS_FP8=cache == "u8", DOT_F32=False, TRANSPOSED=cfg.transposed,
                      EMULATE_CASTS=False, INTERPRETED=False)  # fmt: skip
    compiled = compile_for(prefill_attention._item_kernel, signature, constexprs, capability,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
    return compiled, cfg


@pytest.mark.parametrize("group,d,cache,capability", [
    (1, 128, "bf16", 90), (8, 128, "bf16", 90), (3, 64, "fp16", 90),
    (8, 128, "u8", 90), (16, 64, "u8", 90),
    (8, 128, "u8", 89), (16, 64, "u8", 89), (8, 128, "bf16", 80), (1, 128, "fp16", 89),
    (4, 128, "u8", 80),  # FP8 caches decode in integer ops: no sm_89 needed
])  # fmt: skip
def test_kernel_compiles_without_spills(group, d, cache, capability):
    # The item kernel, both its row counts (prefill tiles and decode rows) in one program.
    compiled, _ = _compile_item_kernel(group, d, cache, capability)
    report = ptxas_report(compiled, capability)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["log"]
    assert "mma" in compiled.asm["ptx"]  # the dots run on tensor cores


_SSA = r"(%[\w#]+)"


def decoded_tiles(ttgir: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Where the e4m3-decoded K/V tiles go in a compiled item kernel's TTGIR: the dots (tt.dot, or
    ttng.warp_group_dot under wgmma) with an operand that is a decoded tile in registers, and the
    decoded tiles written to shared memory (ttg.local_alloc of one: the round trip).

    A decoded tile is the f16 bitcast that ends _e4m3_as_f16 (its i16 -> f16 bitcast is the kernel's
    only one), followed through its conversion to bf16 (tt.fp_to_fp; arith.extf + truncf on triton 3.6),
    tt.trans and ttg.convert_layout."""
    decoded = set(re.findall(_SSA + r" = tt\.bitcast %\S+ : tensor<\d+x\d+xi16[^\n]*-> tensor<\d+x\d+xf16", ttgir))
    follow = r"(?:tt\.fp_to_fp|arith\.extf|arith\.truncf|tt\.trans|ttg\.convert_layout)"
    derived = re.findall(_SSA + " = " + follow + " " + _SSA, ttgir)
    while True:
        more = {out for out, src in derived if src in decoded} - decoded
        if not more:
            break
        decoded |= more
    dots = re.findall(r"= (tt\.dot|ttng\.warp_group_dot) " + _SSA + ", " + _SSA, ttgir)
    fed = [(op, a if a in decoded else b) for op, a, b in dots if a in decoded or b in decoded]
    stored = [v for v in re.findall(r"= ttg\.local_alloc " + _SSA, ttgir) if v in decoded]
    return fed, stored


@pytest.mark.parametrize("group,d,capability,transposed", [
    (8, 128, 89, False), (16, 64, 89, False), (8, 128, 90, False), (16, 64, 90, False),  # as compiled above
    (1, 128, 90, True), (16, 64, 90, True),
])  # fmt: skip
def test_fp8_decoded_tiles_reach_the_dots_from_registers(monkeypatch, group, d, capability, transposed):
    # Issue 22 item 3. Each of the 8 dots (QK and PV, in the unmasked and masked loops, of prefill tiles
    # and decode rows) takes its decoded K or V tile from registers on mma.sync (sm_89; decode rows on
    # sm_90) and on wgmma in transposed space (FP8_TRANSPOSED: the decoded K and V^T are A operands).
    # Today's sm_90 prefill tiles store the decoded K and V to shared memory, wgmma's B operand: 4 tiles.
    monkeypatch.setattr(prefill_attention, "FP8_TRANSPOSED", transposed)
    compiled, cfg = _compile_item_kernel(group, d, "u8", capability)
    assert cfg.transposed == transposed
    fed, stored = decoded_tiles(compiled.asm["ttgir"])
    wgmma_b = 4 if capability >= 90 and not transposed else 0
    assert len(fed) == 8 - wgmma_b and len(stored) == wgmma_b, (fed, stored)
    if capability >= 90:
        assert sum(op == "ttng.warp_group_dot" for op, _ in fed) == (4 if transposed else 0)
    report = ptxas_report(compiled, capability)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["log"]


@pytest.mark.parametrize("capability", [80, 90])
def test_merge_kernel_compiles_without_spills(capability):
    constexpr_names = ("GROUP", "HEAD_DIM", "BLOCK_M", "MERGE_M", "EMULATE_CASTS", "INTERPRETED")
    signature = {"merges_ptr": "*i32", "part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16",
                 "num_tokens": "i32", "num_kv_heads": "i32", **dict.fromkeys(constexpr_names, "constexpr")}
    constexprs = dict(GROUP=16, HEAD_DIM=128, BLOCK_M=128, MERGE_M=prefill_attention.MERGE_M, EMULATE_CASTS=False,
                      INTERPRETED=False)  # fmt: skip
    compiled = compile_for(prefill_attention._merge_kernel, signature, constexprs, capability, num_warps=4)
    report = ptxas_report(compiled, capability)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["log"]


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
