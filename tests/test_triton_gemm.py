"""Triton FP8 and INT4 GEMMs against llama_kernels.reference, and their GPU builds.

Without a GPU the kernels run under the Triton interpreter, so the shapes are per-GPU Llama 3.1
projections shrunk (ratios and alignments kept) plus SmolLM2-135M's, at M values on both sides of
the decode / prefill split (M <= 64). The compile tests build every kernel at every configuration
a launch can pick (the tables' and the defaults') for sm_80 (INT4), sm_89 and sm_90, and read the
PTX, the TTGIR and ptxas's spill counts.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from conftest import TOL, assert_rel_close, randn
from llama_kernels import Int4Weight, backends, ops, reference
from llama_kernels.triton import fp8_gemm, gemm_configs, int4_gemm
from llama_kernels.triton.gemm_configs import TABLE, TABLES, GemmConfig, Gpu
from triton_compile import compile_for, ptxas_report

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_fp8 = pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 0),
                               reason="the triton FP8 GEMM needs sm_80 or newer")  # fmt: skip

# (M, N, K, label): Llama 3.1 TP 8 projections shrunk, SmolLM2-135M (hidden 576, intermediate
# 1536, 3 KV heads of 64), and N, K that are no multiple of any block.
FP8_CASES = [
    (1, 768, 1024, "8B qkv (K/4)"),
    (17, 512, 256, "8B o (/8)"),
    (3, 448, 512, "70B gate_up (/16)"),
    (200, 512, 224, "70B down (/16)"),
    (64, 1024, 208, "405B down (/16, K/32)"),
    (1, 576, 576, "SmolLM q/o"),
    (65, 1536, 576, "SmolLM gate/up"),
    (17, 576, 1536, "SmolLM down"),
    (200, 192, 576, "SmolLM k/v"),
    (3, 200, 592, "odd N, K"),
    (65, 200, 592, "odd N, K"),
]


def _fp8_inputs(m, n, k, seed, x_scale=1.0):
    xq, xs = ops.quantize_fp8(randn(m, k, seed=seed, scale=x_scale, device=DEVICE))
    wq, ws = ops.quantize_fp8(randn(n, k, seed=seed + 1, scale=0.05, device=DEVICE))
    return xq, xs, wq, ws


@needs_fp8
@pytest.mark.parametrize("m,n,k,label", FP8_CASES, ids=[f"{c[3]} {c[0]}x{c[1]}x{c[2]}" for c in FP8_CASES])
def test_fp8_gemm_matches_reference(m, n, k, label):
    # Rotate dtype, scale kind and bias across the cases rather than multiplying them.
    i = FP8_CASES.index((m, n, k, label))
    out_dtype = (torch.bfloat16, torch.float16)[i % 2]
    per_tensor = i % 3 == 1
    bias_dtype = (None, torch.float32, torch.bfloat16, torch.float16)[i % 4]
    bias = None if bias_dtype is None else randn(n, seed=i, dtype=bias_dtype, device=DEVICE)
    xq, xs, wq, ws = _fp8_inputs(m, n, k, seed=i)
    if per_tensor:
        xs, ws = xs.amax(), ws.amax()
    y = ops.fp8_gemm(xq, xs, wq, ws, out_dtype, bias, backend="triton")
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert_rel_close(y, reference.fp8_gemm(xq, xs, wq, ws, out_dtype, bias), TOL[out_dtype], label)


@needs_fp8
@pytest.mark.parametrize("m", [3, 130])
def test_fp8_gemm_inputs_far_above_448_stay_finite(m):
    x = randn(m, 256, seed=5, scale=1e5, device=DEVICE)
    x[0, 3] = 1e30  # the rest of row 0 quantizes to 0 or subnormals
    xq, xs = ops.quantize_fp8(x)
    wq, ws = ops.quantize_fp8(randn(320, 256, seed=6, scale=2e3, device=DEVICE))
    y = ops.fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="triton")
    assert torch.isfinite(y.float()).all()
    assert_rel_close(y, reference.fp8_gemm(xq, xs, wq, ws, torch.bfloat16), TOL[torch.bfloat16])


def _int4_weight(n, k, group, symmetric, dtype, seed):
    return ops.quantize_int4(randn(n, k, seed=seed, scale=0.05, dtype=dtype, device=DEVICE), group, symmetric)


INT4_CASES = [  # (M, N, K, group_size (None: per-channel), symmetric, label)
    (1, 768, 1024, 128, False, "8B qkv (K/4)"),
    (17, 448, 512, 32, True, "70B gate_up (/16)"),
    (200, 512, 256, 64, False, "8B o (/8)"),
    (64, 1536, 576, 64, False, "SmolLM gate/up"),
    (65, 576, 1536, 128, True, "SmolLM down"),
    (3, 192, 576, 32, False, "SmolLM k/v"),
    (200, 576, 576, None, False, "SmolLM q/o per-channel"),
    (3, 200, 592, None, True, "odd N, K per-channel"),
    (65, 200, 592, 16, False, "odd N, K"),
]


@pytest.mark.parametrize("m,n,k,group,symmetric,label", INT4_CASES,
                         ids=[f"{c[5]} {c[0]}x{c[1]}x{c[2]} g{c[3]}{' sym' * c[4]}" for c in INT4_CASES])  # fmt: skip
def test_int4_gemm_matches_reference(m, n, k, group, symmetric, label):
    i = INT4_CASES.index((m, n, k, group, symmetric, label))
    dtype = (torch.bfloat16, torch.float16)[i % 2]
    w = _int4_weight(n, k, group, symmetric, dtype, seed=i)
    x = randn(m, k, seed=i + 100, dtype=dtype, device=DEVICE)
    y = ops.int4_gemm(x, w, backend="triton")
    assert y.dtype == dtype and y.shape == (m, n)
    assert_rel_close(y, reference.int4_gemm(x, w), TOL[dtype], label)


@pytest.mark.parametrize("m", [5, 80])
def test_int4_gemm_act_order_perm(m):
    """A GPTQ act-order weight (random g_idx) sets perm: y = x[:, perm] @ W.T."""
    n, k, group = 256, 512, 128
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(m)) // group
    gptq = _int4_weight(n, k, group, False, torch.float16, seed=m).to_gptq()
    w = Int4Weight.from_gptq(gptq["qweight"], gptq["qzeros"], gptq["scales"], g_idx, group_size=group)
    assert w.perm is not None
    x = randn(m, k, seed=m, dtype=torch.float16, device=DEVICE)
    assert_rel_close(ops.int4_gemm(x, w, backend="triton"), reference.int4_gemm(x, w), TOL[torch.float16])


@needs_fp8
def test_decode_split_k_is_bit_reproducible():
    m, n, k = 3, 256, 1024
    cpu = Gpu(*gemm_configs.CPU_GPU)
    assert gemm_configs.get_config("fp8_gemm", m, n, k, cpu).split_k > 1
    assert gemm_configs.get_config("int4_gemm", m, n, k, cpu).split_k > 1
    xq, xs, wq, ws = _fp8_inputs(m, n, k, seed=7)
    y1, y2 = (ops.fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="triton") for _ in range(2))
    assert torch.equal(y1.view(torch.int16), y2.view(torch.int16))
    w = _int4_weight(n, k, 128, False, torch.bfloat16, seed=7)
    x = randn(m, k, seed=8, dtype=torch.bfloat16, device=DEVICE)
    y1, y2 = (ops.int4_gemm(x, w, backend="triton") for _ in range(2))
    assert torch.equal(y1.view(torch.int16), y2.view(torch.int16))


@needs_fp8
@pytest.mark.parametrize("m,n,k", [(3, 256, 1024), (65, 200, 592)])
def test_fp8_gemm_on_gpus_without_e4m3_reads_codes_as_fp16(m, n, k, monkeypatch):
    """The sm_80 path (e4m3 codes moved into fp16 fields, products scaled by 2^-16) computes the same
    exact products and sums: bit-identical to the e4m3 path, decode (split-K) and prefill tiles."""
    xq, xs, wq, ws = _fp8_inputs(m, n, k, seed=m)
    want = ops.fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="triton")
    monkeypatch.setattr(fp8_gemm, "fp8_as_codes", lambda device: True)
    got = ops.fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="triton")
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert_rel_close(got, reference.fp8_gemm(xq, xs, wq, ws, torch.bfloat16), TOL[torch.bfloat16], "fp8 as fp16")


# Explicit configurations: splits that leave some empty (split_k > K tiles), other block shapes,
# and the persistent walk with fewer programs than tiles (a 3-SM "GPU").
EXPLICIT = [GemmConfig(16, 32, 64, 1, 16, 4, 3), GemmConfig(32, 128, 256, 1, 3, 4, 3),
            GemmConfig(16, 64, 64, 2, 1, 4, 3)]  # fmt: skip


@needs_fp8
@pytest.mark.parametrize("cfg", EXPLICIT, ids=str)
def test_explicit_configs(cfg, monkeypatch):
    monkeypatch.setattr(fp8_gemm, "num_sms", lambda device: 3)
    m, n, k = 40, 96, 320
    xq, xs, wq, ws = _fp8_inputs(m, n, k, seed=9)
    y = fp8_gemm.launch(xq, xs, wq, ws, torch.float16, None, config=cfg)
    assert_rel_close(y, reference.fp8_gemm(xq, xs, wq, ws, torch.float16), TOL[torch.float16], "fp8")
    w = _int4_weight(n, k, 64, False, torch.float16, seed=9)
    x = randn(m, k, seed=10, dtype=torch.float16, device=DEVICE)
    y = int4_gemm.launch(x, w.qweight, w.scales, w.zeros, w.group_size, config=cfg)
    assert_rel_close(y, reference.int4_gemm(x, w), TOL[torch.float16], "int4")


@needs_fp8
def test_custom_ops_trace():
    """The custom ops' schemas and fake implementations pass torch.library.opcheck (FP8's schema test
    is left out: it perturbs the inputs with a multiply that CPU float8 lacks)."""
    xq, xs, wq, ws = _fp8_inputs(2, 32, 64, seed=11)
    torch.library.opcheck(fp8_gemm.fp8_gemm, (xq, xs, wq, ws, torch.bfloat16, None),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
    w = _int4_weight(32, 64, 32, False, torch.bfloat16, seed=11)
    x = randn(2, 64, seed=12, dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(int4_gemm._int4_gemm_op, (x, w.qweight, w.scales, w.zeros, 32, None))


def test_registration_and_config_table():
    impl = backends._REGISTRY["fp8_gemm"]["triton"]
    assert impl.min_capability == (8, 0) and "Ampere" in impl.instead
    assert "triton" in backends._REGISTRY["int4_gemm"]
    assert eval(gemm_configs.format_table(TABLE).split("=", 1)[1]) == TABLE
    for op, entries in TABLE.items():
        for key, entry in entries.items():
            cfg = GemmConfig(*entry)  # tl.dot needs tiles of at least 16 x 16 x 16
            assert min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16 and cfg.block_k % 16 == 0, (op, key)
    unknown = ("fp8_gemm", 3, 200, 592, Gpu((9, 0), 132))
    assert gemm_configs.get_config(*unknown) == gemm_configs.default_config(*unknown)


def test_configs_depend_on_the_gpu():
    """TABLE was tuned for an H100 SXM (132 SMs): another GPU gets defaults computed for its SM count
    and architecture (an L4's 58 SMs need more K splits than an H100's 132 to fill the GPU)."""
    key = next(k for k, v in TABLE["fp8_gemm"].items() if k[0] == 16 and v[4] > 1)
    h100, l4 = Gpu((9, 0), 132), Gpu((8, 9), 58)
    for op in ("fp8_gemm", "int4_gemm"):
        assert gemm_configs.get_config(op, 1, *key[1:], h100) == GemmConfig(*TABLE[op][key])
        assert gemm_configs.get_config(op, 1, *key[1:], l4) == gemm_configs.default_config(op, 1, *key[1:], l4)
    small, big = (gemm_configs.default_config("fp8_gemm", 1, 4096, 4096, Gpu((9, 0), sms)) for sms in (58, 132))
    assert small.split_k < big.split_k
    assert gemm_configs.default_config("int4_gemm", 100, 4096, 4096, Gpu((8, 0), 108)).num_warps == 8


# --- GPU builds ------------------------------------------------------------------------


@functools.cache
def _compile(kernel, signature: tuple, constexprs: tuple, cfg: GemmConfig, capability: int):
    """Build `kernel` for sm_<capability> as a launch specializes it: pointers and N, K 16-aligned
    (as for the table's shapes), so loads vectorize and pipeline like on the GPU. Cached: a
    configuration several tests check compiles once per session."""
    constexprs = {**dict(constexprs), "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                  "GROUP_M": cfg.group_m, "SPLIT_K": cfg.split_k, "EVEN_K": True}  # fmt: skip
    signature = {**dict(signature), **{name: "constexpr" for name in constexprs}}
    return compile_for(kernel, signature, constexprs, capability, aligned_ints=("N", "K"),
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip


def _launch_configs(op: str, capability: int) -> list[GemmConfig]:
    """Every configuration a launch on sm_<capability> can pick: each table's entries and the defaults
    for each M regime and SM count, split-K values > 1 counted once (only SPLIT_K > 1's code differs)."""
    gpus = [Gpu(divmod(capability, 10), sms) for sms in (58, 108, 132)]
    cfgs = [GemmConfig(*e) for table in TABLES.values() for e in table[op].values()]
    cfgs += [gemm_configs.default_config(op, m, 4096, 4096, gpu) for m in (1, 16, 64, 128, 4096) for gpu in gpus]
    seen: dict = {}
    for cfg in cfgs:
        seen.setdefault(cfg._replace(split_k=min(cfg.split_k, 2)), cfg)
    return list(seen.values())


def _mma_lines(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if re.search(r"\b(wgmma\.mma_async|mma\.sync)", line)]


def _check_build(compiled, capability: int, want: str, label: str) -> None:
    lines = _mma_lines(compiled.asm["ptx"])
    assert any(re.search(want, line) for line in lines), f"{label}: no /{want}/ in {sorted(set(lines))[:4]}"
    report = ptxas_report(compiled, capability)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{label}: {report['log']}"


_FP8_SIGNATURE = dict(x_ptr="*fp8e4nv", w_ptr="*fp8e4nv", M="i32", N="i32", K="i32", x_scale_ptr="*fp32",
                      w_scale_ptr="*fp32", bias_ptr="*bf16")  # fmt: skip


def _fp8_build(cfg: GemmConfig, capability: int):
    """On sm_80 (no e4m3) the operands are e4m3 codes, multiplied as fp16."""
    signature = dict(_FP8_SIGNATURE, out_ptr="*bf16" if cfg.split_k == 1 else "*fp32")
    if capability < 89:
        signature.update(x_ptr="*u8", w_ptr="*u8")
    signature = {name: signature[name] for name in ("x_ptr", "w_ptr", "out_ptr", "M", "N", "K", "x_scale_ptr",
                                                    "w_scale_ptr", "bias_ptr")}  # fmt: skip
    constexprs = dict(X_SCALE=2, W_SCALE=2, HAS_BIAS=True, AS_F16=capability < 89)
    return _compile(fp8_gemm._fp8_gemm_kernel, tuple(signature.items()), tuple(constexprs.items()), cfg, capability)


FP8_BUILDS = [(cap, cfg) for cap in (80, 89, 90) for cfg in _launch_configs("fp8_gemm", cap)]


@pytest.mark.parametrize("capability,cfg", FP8_BUILDS, ids=str)
def test_fp8_kernel_builds_without_spills(cfg, capability):
    # Hopper's wgmma takes e4m3 directly (M tiles >= 64); Ada's mma.sync takes e4m3 at any M.
    # Hopper's mma.sync (decode tiles of 16 rows) has no e4m3 form: Triton upcasts to f16 there.
    # Ampere multiplies the e4m3 codes as fp16.
    wgmma = capability == 90 and cfg.block_m >= 64
    want = {80: r"mma\.sync.*f16\.f16", 89: r"mma\.sync.*e4m3", 90: r"wgmma\.mma_async.*e4m3\.e4m3" if wgmma
            else r"mma\.sync"}[capability]  # fmt: skip
    _check_build(_fp8_build(cfg, capability), capability, want, f"sm_{capability} {cfg}")


@pytest.mark.parametrize("cfg", [c for c in _launch_configs("fp8_gemm", 90) if c.block_m >= 64], ids=str)
def test_fp8_wgmma_promotes_accumulation_every_k_step(cfg):
    """Hopper's wgmma sums e4m3 products in reduced precision; Triton's default lets it do so over all
    of K (maxNumImpreciseAcc 2^30). The kernel caps it at BLOCK_K, so each K step's partial sum is
    added to the float32 accumulator (as decode's mma tiles and the reference sum)."""
    ttgir = _fp8_build(cfg, 90).asm["ttgir"]
    caps = set(re.findall(r"maxNumImpreciseAcc = (\d+)", ttgir))
    assert caps == {str(cfg.block_k)}, caps


INT4_BUILDS = [(cap, cfg, 128) for cap in (80, 89, 90) for cfg in _launch_configs("int4_gemm", cap)]
INT4_BUILDS += [(90, cfg, 32) for cfg in _launch_configs("int4_gemm", 90)]  # groups shorter than BLOCK_K


@pytest.mark.parametrize("capability,cfg,group", INT4_BUILDS, ids=str)
def test_int4_kernel_builds_without_spills(cfg, group, capability):
    out = "*bf16" if cfg.split_k == 1 else "*fp32"
    signature = dict(x_ptr="*bf16", qweight_ptr="*i32", scales_ptr="*bf16", zeros_ptr="*u8", out_ptr=out,
                     M="i32", N="i32", K="i32")  # fmt: skip
    constexprs = dict(GROUP_SIZE=group, HAS_ZEROS=True, DOT_F32=False)
    compiled = _compile(int4_gemm._int4_gemm_kernel, tuple(signature.items()), tuple(constexprs.items()), cfg,
                        capability)  # fmt: skip
    wgmma = capability == 90 and cfg.block_m >= 64
    want = r"wgmma\.mma_async.*bf16\.bf16" if wgmma else r"mma\.sync.*bf16\.bf16"
    _check_build(compiled, capability, want, f"sm_{capability} {cfg} g{group}")


def test_splitk_reduce_builds_without_spills():
    signature = dict(ws_ptr="*fp32", out_ptr="*bf16", M="i32", N="i32", x_scale_ptr="*fp32",
                     w_scale_ptr="*fp32", bias_ptr="*fp32")  # fmt: skip
    constexprs = dict(X_SCALE=2, W_SCALE=1, HAS_BIAS=True, SPLIT_K=16, BLOCK=1024)
    compiled = compile_for(fp8_gemm.splitk_reduce_kernel, {**signature, **{name: "constexpr" for name in constexprs}},
                           constexprs, 90, num_warps=4)  # fmt: skip
    report = ptxas_report(compiled, 90)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["log"]
