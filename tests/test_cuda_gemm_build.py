"""CPU-side checks of the CUDA GEMMs (csrc/fp8_gemm*, csrc/int4_gemm*), no GPU needed.

  * the built module holds every whitelisted GEMM kernel for every built arch;
  * SASS: the Hopper large-M FP8 kernel (csrc/fp8_gemm_sm90.cu) is wgmma with e4m3 operands
    (QGMMA...E4M3.E4M3) fed by TMA (UTMALDG) through mbarriers (SYNCS), with setmaxnreg, on
    sm_90a, and a trapping stub elsewhere;
  * SASS: the sm_89 FP8 kernels use the native e4m3 MMA (QMMA.16832.F32.E4M3.E4M3), the sm_90a
    ones the e4m3 -> f16 conversion + HMMA lowering, both stream the weight with 16-byte
    no-L1-allocate loads; the INT4 kernels use HMMA with bf16 / fp16 operands, LOP3 (the
    magic-number dequantization) and 16-byte cp.async (LDGSTS); no local memory anywhere;
  * ptxas reports no spills (and no stack) for the GEMM sources, for every built arch;
  * the launchers and the Python dispatch reject unsupported shapes / alignments before launch;
  * the INT4 repack layout, read back the way the kernel reads it (a torch emulation of the
    kernel's index math and lop3 conversion), gives exactly the dequantized weight.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import TOL, assert_rel_close, randn
from test_cuda_build import (  # noqa: F401  (fixtures)
    CSRC,
    DEFAULT_ARCHS,
    _parse_ptxas,
    _ptxas_report,
    built,
    ptx,
    ptx_entries,
    sass,
)

from llama_kernels.cuda import gemm_configs as G

FP8_RE = re.compile(r"fp8gemm15fp8_gemm_kernelILi(\d)ELi(\d)E")
INT4_RE = re.compile(r"int4gemm16int4_gemm_kernelI(6__half|13__nv_bfloat16)Li(\d)ELi(\d)E")
REDUCE = "_ZN13llama_kernels4gemm20splitk_reduce_kernel"
SM90_RE = re.compile(r"fp8sm9020fp8_gemm_sm90_kernel")
FP8_CONFIGS = {("1", "4"), ("2", "3"), ("4", "2")}  # (m16 tiles, stages) of kFp8M16/M32/M64
INT4_CONFIGS = {("1", "4"), ("4", "3")}  # kInt4M16 / kInt4M64


def _kernels(funcs: dict[str, str], pattern: re.Pattern) -> dict[tuple, str]:
    return {pattern.search(f).groups(): body for f, body in funcs.items() if pattern.search(f)}


# --------------------------------------------------------------------------- SASS


def test_sass_has_every_gemm_kernel(built, sass):
    for arch, funcs in sass.items():
        assert set(_kernels(funcs, FP8_RE)) == FP8_CONFIGS, arch
        int4 = _kernels(funcs, INT4_RE)
        assert set(int4) == {(t, *c) for t in ("6__half", "13__nv_bfloat16") for c in INT4_CONFIGS}, arch
        assert any(f.startswith(REDUCE) for f in funcs), arch
        for body in [*_kernels(funcs, FP8_RE).values(), *int4.values()]:
            assert not re.search(r"\b(LDL|STL)\b", body), f"{arch}: a GEMM kernel uses local memory"


def test_sass_fp8_mma(built, sass):
    """sm_89: native e4m3 MMA. sm_90a: the same PTX becomes e4m3->f16 converts + HMMA.16816
    (native FP8 on Hopper is wgmma/QGMMA only). sm_80: a trapping stub, no MMA at all."""
    checked = set()
    for arch, funcs in sass.items():
        for (mt, stages), body in _kernels(funcs, FP8_RE).items():
            where = f"{arch} fp8_gemm_kernel<{mt}, {stages}>"
            qmma = len(re.findall(r"\bQMMA\.16832\.F32\.E4M3\.E4M3\b", body))
            hmma = len(re.findall(r"\bHMMA\.16816\.F32\b", body))
            per_step = int(mt) * 4 * 2  # m16 tiles x n8 tiles x 2 MMAs per 64-byte step
            if arch == "sm_89":
                assert qmma >= per_step and hmma == 0, f"{where}: {qmma} QMMA, {hmma} HMMA"
            elif arch.startswith("sm_90"):
                assert qmma == 0 and hmma >= 2 * per_step, f"{where}: {qmma} QMMA, {hmma} HMMA"
                assert re.search(r"\bF2FP\.F16\.E4M3\.UNPACK_B\b", body), where
            else:
                assert qmma == 0 and hmma == 0 and "BPT.TRAP" in body, where
                continue
            # the weight stream: 16-byte, non-coherent, no L1 allocation
            assert re.search(r"\bLDG\.E\.NA[.\w]*\.128\b", body), f"{where}: no 16-byte streaming load"
            checked.add(arch)
    assert checked == {f"sm_{a}" for a in built.archs if a in ("89", "90a")}


def test_sass_fp8_sm90_wgmma_tma(built, sass):
    """sm_90a: 4 x m64n128k32 e4m3 wgmma per 128-byte K block, 2 TMA loads per stage, mbarrier
    ops (init / expect_tx / wait / arrive), setmaxnreg both ways. Elsewhere: a trapping stub."""
    checked = False
    for arch, funcs in sass.items():
        bodies = [body for f, body in funcs.items() if SM90_RE.search(f)]
        assert len(bodies) == 1, f"{arch}: {len(bodies)} fp8_gemm_sm90_kernel"
        body = bodies[0]
        qgmma = re.findall(r"\bQGMMA\.64x128x32\.F32\.E4M3\.E4M3\b", body)
        if arch != "sm_90a":
            assert not qgmma and "UTMALDG" not in body and "BPT.TRAP" in body, arch
            continue
        assert len(qgmma) >= 4, f"{arch}: {len(qgmma)} QGMMA.64x128x32.F32.E4M3.E4M3"
        assert not re.search(r"\bHGMMA\b|\bHMMA\b", body), f"{arch}: fp16 MMA in the wgmma kernel"
        assert len(re.findall(r"\bUTMALDG\.2D\b", body)) >= 2, f"{arch}: no 2D TMA loads"
        for op in ("SYNCS.EXCH.64", "SYNCS.ARRIVE.TRANS64", "SYNCS.PHASECHK.TRANS64.TRYWAIT"):
            assert op in body, f"{arch}: no {op} (mbarrier)"
        assert "WARPGROUP.ARRIVE" in body and "WARPGROUP.DEPBAR.LE" in body, arch
        assert "USETMAXREG.DEALLOC" in body and "USETMAXREG.TRY_ALLOC" in body, f"{arch}: no setmaxnreg"
        # The epilogue is staged in shared memory and stored as 16-byte row segments.
        assert re.search(r"\bSTS\b", body) and re.search(r"\bLDS\.128\b", body), f"{arch}: no staged epilogue"
        stores = re.findall(r"\bSTG\.E[.\w]*", body)
        assert stores and set(stores) == {"STG.E.128"}, f"{arch}: global stores {sorted(set(stores))}"
        assert not re.search(r"\b(ST|LD)\.E", body), f"{arch}: generic (not shared) accesses to the staging tile"
        assert not re.search(r"\b(LDL|STL)\b", body), f"{arch}: the wgmma kernel uses local memory"
        checked = True
    assert checked == ("90a" in built.archs)


def test_sass_int4_mma_and_lop3(built, sass):
    for arch, funcs in sass.items():
        for (t, mt, stages), body in _kernels(funcs, INT4_RE).items():
            where = f"{arch} int4_gemm_kernel<{t}, {mt}, {stages}>"
            bf16 = len(re.findall(r"\bHMMA\.16816\.F32\.BF16\b", body))
            f16 = len(re.findall(r"\bHMMA\.16816\.F32(?!\.BF16)\b", body))
            per_chunk = int(mt) * 4 * 2  # m16 tiles x n8 tiles x 2 k16 MMAs per 32 values of K
            if t == "13__nv_bfloat16":
                assert bf16 >= per_chunk and f16 == 0, f"{where}: {bf16} bf16 / {f16} f16 HMMA"
            else:
                assert f16 >= per_chunk and bf16 == 0, f"{where}: {bf16} bf16 / {f16} f16 HMMA"
            assert len(re.findall(r"\bLOP3\.LUT\b", body)) >= 16, f"{where}: no lop3 dequantization"
            assert re.search(r"\bLDGSTS\.E\.BYPASS\.128\b", body), f"{where}: no 16-byte cp.async"
            assert re.search(r"\bLDS\.128\b", body), f"{where}: no 16-byte shared loads"
            # The group scales / zeros arrive by cp.async with the stage, not by 16-byte global
            # loads in the compute phase: the only 16-byte global reads are LDGSTS.
            assert not re.search(r"\bLDG\.E\.128", body), f"{where}: 16-byte global loads (__ldg)"


def test_gemm_no_register_spills(built):
    archs = built.archs or DEFAULT_ARCHS
    with ThreadPoolExecutor(max_workers=2) as pool:
        logs = pool.map(lambda name: _ptxas_report(CSRC / name, archs),
                        ("fp8_gemm.cu", "int4_gemm.cu", "fp8_gemm_sm90.cu"))  # fmt: skip
    entries = [e for log in logs for e in _parse_ptxas(log)]
    gemm = [e for e in entries if FP8_RE.search(e["func"]) or INT4_RE.search(e["func"]) or SM90_RE.search(e["func"])]
    assert len(gemm) == (len(FP8_CONFIGS) + 2 * len(INT4_CONFIGS) + 1) * len(archs), [e["func"] for e in gemm]
    for e in entries:
        assert e["spill_stores"] == 0 and e["spill_loads"] == 0 and e["stack"] == 0, f"spill / stack: {e}"
        assert e["registers"] <= 255, e
        print(f"{e['arch']:7s} {e['func'][:100]} regs={e['registers']}")


# --------------------------------------------------------------------------- launcher validation

A = 1 << 20  # a 16-byte aligned fake device address: nothing is launched for bad arguments


def _raises(fn, *args) -> str:
    with pytest.raises(RuntimeError) as e:
        fn(*args)
    return str(e.value)


def test_fp8_launcher_rejects_before_launch(built):
    C = built.C
    #       xq xs rows wq ws rows bias bdt y out ws M N K cfg split stream
    ok = [A, A, True, A, A, True, 0, -1, A, 2, 0, 4, 4096, 4096, 0, 1, 0]

    def args(**kw):
        names = ["xq", "xs", "xr", "wq", "ws", "wr", "bias", "bdt", "y", "out", "work", "M", "N", "K",
                 "cfg", "split", "stream"]  # fmt: skip
        a = list(ok)
        for k, v in kw.items():
            a[names.index(k)] = v
        return a

    cases = [
        (dict(K=4104), "no kernel for this shape: K must be a multiple of 16"),
        (dict(N=4100), "no kernel for this shape: N must be a multiple of 8"),
        (dict(cfg=4), "config must be 0 (m16), 1 (m32), 2 (m64) or 3 (sm90 wgmma)"),
        (dict(cfg=-1), "config must be 0 (m16), 1 (m32), 2 (m64) or 3 (sm90 wgmma)"),
        (dict(split=65), "split_k must be in [1, 64]"),
        (dict(cfg=3, split=2, work=A), "config 3 (sm90 wgmma) needs split_k == 1"),
        (dict(cfg=3, K=4104), "no kernel for this shape: K must be a multiple of 16"),
        (dict(cfg=3, N=4100), "no kernel for this shape: N must be a multiple of 8"),
        (dict(cfg=3, wq=A + 8), "xq and wq must be 16-byte aligned"),
        (dict(cfg=3, y=A + 4), "config 3 (sm90 wgmma) needs y 16-byte aligned"),
        (dict(split=4), "workspace must be non-null and 16-byte aligned when split_k > 1"),
        (dict(xq=A + 8), "xq and wq must be 16-byte aligned"),
        (dict(wq=0), "xq and wq must not be null"),
        (dict(out=0), "out_dtype must be 1 (float16) or 2 (bfloat16)"),
        (dict(y=A + 2), "y must be 4-byte aligned"),
        (dict(xs=0), "x_scale and w_scale must not be null"),
        (dict(bias=A + 2, bdt=0), "bias must be aligned to its element size"),
        (dict(bias=A, bdt=5), "bias_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)"),
    ]
    for kw, reason in cases:
        msg = _raises(C.fp8_gemm, *args(**kw))
        assert msg.startswith("fp8_gemm: invalid argument (M=") and msg.endswith(": " + reason), msg
    assert C.fp8_gemm(*args(M=0)) is None  # M == 0: a validated no-op, no GPU needed
    assert C.fp8_gemm(*args(M=0, cfg=3)) is None


def test_int4_launcher_rejects_before_launch(built):
    C = built.C
    #     x  qp sz y  ws M  N     K     G    dt cfg split stream
    ok = [A, A, A, A, 0, 4, 4096, 4096, 128, 2, 0, 1, 0]
    names = ["x", "qp", "sz", "y", "work", "M", "N", "K", "G", "dt", "cfg", "split", "stream"]

    def args(**kw):
        a = list(ok)
        for k, v in kw.items():
            a[names.index(k)] = v
        return a

    cases = [
        (dict(K=4104, G=4104), "no kernel for this shape: K must be a multiple of 16"),
        (dict(N=4112), "no kernel for this shape: N must be a multiple of 32"),
        (dict(G=16), "no kernel for this shape: group_size must divide K and be a multiple of 32 (or equal K)"),
        (dict(G=96), "no kernel for this shape: group_size must divide K and be a multiple of 32 (or equal K)"),
        (dict(dt=0), "dtype must be 1 (float16) or 2 (bfloat16)"),
        (dict(cfg=2), "config must be 0 (m16) or 1 (m64)"),
        (dict(x=A + 4), "x, qpacked and scale_zero must be 16-byte aligned"),
        (dict(sz=0), "x, qpacked, scale_zero and y must not be null"),
        (dict(split=2), "workspace must be non-null and 16-byte aligned when split_k > 1"),
    ]
    for kw, reason in cases:
        msg = _raises(C.int4_gemm, *args(**kw))
        assert msg.startswith("int4_gemm: invalid argument (M=") and msg.endswith(": " + reason), msg
    assert C.int4_gemm(*args(M=0)) is None
    assert C.int4_gemm(*args(M=0, K=4112, G=4112)) is None  # per-channel with K % 32 == 16 is supported


def test_gemm_launch_error_without_gpu(built):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this test would launch on fake pointers")
    msg = _raises(built.C.fp8_gemm, A, A, True, A, A, True, 0, -1, A, 2, 0, 4, 4096, 4096, 0, 1, 0)
    assert msg.startswith("fp8_gemm: ") and "invalid argument" not in msg, msg
    # the wgmma config asks the runtime for the device before anything else: no launch either
    msg = _raises(built.C.fp8_gemm, A, A, True, A, A, True, 0, -1, A, 2, 0, 256, 4096, 4096, 3, 1, 0)
    assert msg.startswith("fp8_gemm: ") and "invalid argument" not in msg, msg
    msg = _raises(built.C.int4_gemm, A, A, A, A, 0, 4, 4096, 4096, 128, 2, 0, 1, 0)
    assert msg.startswith("int4_gemm: ") and "invalid argument" not in msg, msg


# --------------------------------------------------------------------------- Python dispatch

FP8 = torch.float8_e4m3fn


def _fp8_args(m, n, k, *, offset=0):
    xq = torch.zeros(m * k + 16, dtype=torch.uint8)[offset : offset + m * k].view(FP8).view(m, k)
    wq = torch.zeros(n, k, dtype=FP8)
    return xq, torch.ones(m), wq, torch.ones(n)


def test_fp8_plan_errors_are_named_before_launch():
    from llama_kernels.cuda import fp8_gemm as F
    from llama_kernels.cuda.common import NoKernelError

    assert issubclass(NoKernelError, ValueError)
    with pytest.raises(NoKernelError, match=r"no kernel for this shape: K=72 must be a multiple of 16"):
        F.plan(*_fp8_args(2, 64, 72), torch.bfloat16, None)
    with pytest.raises(NoKernelError, match=r"no kernel for this shape: N=60 must be a multiple of 8"):
        F.plan(*_fp8_args(2, 60, 64), torch.bfloat16, None)
    with pytest.raises(NoKernelError, match=r"argument 'xq' .* not 16-byte aligned"):
        F.plan(*_fp8_args(2, 64, 64, offset=8), torch.bfloat16, None)
    with pytest.raises(NoKernelError, match=r"out_dtype=torch.float32"):
        F.plan(*_fp8_args(2, 64, 64), torch.float32, None)
    assert F.plan(*_fp8_args(3, 6144, 4096), torch.bfloat16, None, (8, 9), 128).config == 0
    assert F.plan(*_fp8_args(64, 256, 128), torch.bfloat16, None, (9, 0), 132).config == 2


def test_fp8_large_m_on_hopper_uses_wgmma_once_its_tiles_fill_the_gpu():
    from llama_kernels.cuda import gemm_configs as G

    for m, n, k in [(4096, 6144, 4096), (1000, 28672, 4096), (129, 16384, 2048), (300, 8192, 1040)]:
        assert G.sm90_tiles(m, n) >= 132
        assert G.choose("fp8_gemm", (9, 0), m, n, k, 132, sm90a=True) == G.Choice(G.SM90_CONFIG, 1)
        assert G.choose("fp8_gemm", (9, 0), m, n, k, 132, sm90a=False).config == 2
        assert G.choose("fp8_gemm", (8, 9), m, n, k, 128, sm90a=True).config == 2
        assert G.choose("fp8_gemm", (10, 0), m, n, k, 148, sm90a=True).config == 2
    for m in (1, 16, 17, 64):
        assert G.choose("fp8_gemm", (9, 0), m, 6144, 4096, 132, sm90a=True).config != G.SM90_CONFIG


@pytest.mark.parametrize("m", [65, 100, 128])
@pytest.mark.parametrize("n,k", [(4096, 4096), (6144, 4096), (1280, 8192), (4096, 14336)])
def test_fp8_m65_to_128_on_hopper_fills_the_gpu_with_split_k(m, n, k):
    """M = 65..128 gives the 128 x 128 wgmma kernel 10-48 tiles on 132 SMs: the split-K mma.sync
    path runs instead, with at least one block per SM (split over K where the steps allow)."""
    from llama_kernels.cuda import gemm_configs as G

    assert G.sm90_tiles(m, n) < 132
    choice = G.choose("fp8_gemm", (9, 0), m, n, k, 132, sm90a=True)
    assert choice.config == 2 and choice.split_k > 1
    blocks = -(-n // G.BLOCK_N) * -(-m // 64) * choice.split_k
    steps_per_split = k // G.STEP_K["fp8_gemm"] // choice.split_k
    assert blocks >= 132 or steps_per_split < 2 * G.MIN_STEPS_PER_SPLIT["fp8_gemm"] or choice.split_k == G.MAX_SPLIT_K
    assert G.choose("int4_gemm", (9, 0), 4096, 6144, 4096, 132, sm90a=True).config == 1


def test_sm90_wgmma_accumulator_is_promoted_every_k_block():
    """Each 128-value K block's 4 wgmmas start a fresh accumulator that is added, in float32, to the
    tile's total once they completed (wait_group 0 per block; no group left in flight), instead of
    one reduced-precision FP8 accumulator chained through all of K."""
    kernels = ptx_entries(ptx(CSRC / "fp8_gemm_sm90.cu", "90a"))
    body = next(b for name, b in kernels.items() if SM90_RE.search(name))
    assert body.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 4
    assert "wgmma.wait_group.sync.aligned 1;" not in body
    assert body.count("wgmma.wait_group.sync.aligned 0;") >= 1
    adds = len(re.findall(r"\badd(\.rn)?\.f32\b", body))
    assert adds >= 64 + 64, f"{adds} add.f32: expected the 64-register promotion plus the bias adds"


def test_sm90_epilogue_staging_covers_the_tile_without_bank_conflicts():
    """Lane-accurate emulation of csrc/fp8_gemm_sm90.cu's epilogue staging: the accumulator pairs
    (warp, lane, j, h) land on every 4-byte pair of the 64 x 128 tile once, with each warp's
    32 stores on 32 distinct banks; the 16-byte reads cover each row segment once, each quarter
    warp's 8 reads on 32 distinct banks."""
    pitch = 128 * 2 + 16  # kOutPitch
    written = {}
    for j in range(16):
        for h in range(2):
            for warp in range(4):
                banks = set()
                for lane in range(32):
                    row, col = warp * 16 + lane // 4 + 8 * h, 2 * (lane % 4) + 8 * j
                    addr = row * pitch + col * 2
                    written[addr] = written.get(addr, 0) + 1
                    banks.add(addr // 4 % 32)
                assert len(banks) == 32, (j, h, warp)
    assert sorted(written) == [r * pitch + 4 * p for r in range(64) for p in range(64)]
    assert set(written.values()) == {1}
    read = []
    for i in range(64 * 16 // 128):
        for quarter in range(16):
            banks = []
            for t in range(8 * quarter, 8 * quarter + 8):
                v = t + 128 * i
                addr = (v // 16) * pitch + (v % 16) * 16
                read.append(addr)
                banks += [(addr // 4 + k) % 32 for k in range(4)]
            assert sorted(banks) == list(range(32)), (i, quarter)
    assert sorted(read) == [r * pitch + 16 * s for r in range(64) for s in range(16)]


def _fake_sm90_device(monkeypatch, why):
    """launch() on CPU tensors with a fake extension that records the config it is asked for."""
    from llama_kernels import backends
    from llama_kernels.cuda import fp8_gemm as F

    calls = []

    class FakeExt:
        def fp8_gemm(self, *args):
            calls.append(args[-3])  # config

    monkeypatch.setattr(backends, "device_index", lambda device: 0)
    monkeypatch.setattr(backends, "device_capability", lambda index: (9, 0))
    monkeypatch.setattr(backends, "sm_count", lambda index: 132)
    monkeypatch.setattr(F, "sm90_unavailable", lambda index: why)
    monkeypatch.setattr(F, "ext", lambda: FakeExt())
    monkeypatch.setattr(F, "stream", lambda t: 0)
    monkeypatch.setattr(F, "choose", lambda *a, **kw: G.Choice(G.SM90_CONFIG, 1))
    return F, calls


def test_sm90_kernel_is_never_launched_where_its_sm90a_code_did_not_load(monkeypatch):
    """The extension's check (device 9.0, loaded code compiled from compute_90a with the real
    kernel) decides before any launch: automatic dispatch then takes the mma.sync path, an
    explicit config 3 raises the backend's NoKernelError; the __trap() stub is never reached."""
    from llama_kernels.cuda.common import NoKernelError

    why = "config 3 (sm90 wgmma): the code loaded for this GPU is not the sm_90a kernel"
    F, calls = _fake_sm90_device(monkeypatch, why)
    args = _fp8_args(256, 8192, 4096)
    F.launch(*args, torch.bfloat16)
    assert calls == [2]
    with pytest.raises(NoKernelError, match="not the sm_90a kernel"):
        F.launch(*args, torch.bfloat16, choice=G.Choice(G.SM90_CONFIG, 1))
    assert calls == [2]
    F, calls = _fake_sm90_device(monkeypatch, None)
    F.launch(*args, torch.bfloat16)
    assert calls == [G.SM90_CONFIG]


def test_sm90_availability_check_needs_no_kernel_launch(built):
    """Without a GPU the extension says why config 3 cannot run instead of failing or trapping."""
    import torch as _torch

    if _torch.cuda.is_available():
        pytest.skip("checks the answer without a GPU")
    assert built.C.fp8_gemm_sm90_unavailable() == "config 3 (sm90 wgmma): no CUDA device"


def test_int4_plan_errors_are_named_before_launch():
    from llama_kernels import ops
    from llama_kernels.cuda import int4_gemm as I
    from llama_kernels.cuda.common import NoKernelError

    for (n, k, g), what in [((48, 256, 128), "N=48 must be a multiple of 32"),
                            ((64, 256, 16), "group_size=16 must divide K=256"),
                            ((64, 264, 264), "K=264 must be a multiple of 16")]:  # fmt: skip
        w = ops.quantize_int4(torch.randn(n, k), group_size=g)
        with pytest.raises(NoKernelError, match="no kernel for this shape: " + re.escape(what)):
            I.repack_int4(w, torch.bfloat16)
        with pytest.raises(NoKernelError):
            I.int4_gemm(torch.zeros(2, k, dtype=torch.bfloat16), w)
        assert "_cuda_int4_packed" not in w.__dict__ or not w.__dict__["_cuda_int4_packed"]
    w = ops.quantize_int4(torch.randn(64, 256), group_size=64)
    packed = I.repack_int4(w, torch.float16)
    with pytest.raises(NoKernelError, match="repacked for torch.float16"):
        I.plan(torch.zeros(2, 256, dtype=torch.bfloat16), packed)
    x = torch.zeros(2 * 256 + 8, dtype=torch.float16)[4 : 4 + 512].view(2, 256)
    with pytest.raises(NoKernelError, match=r"argument 'x' .* not 16-byte aligned"):
        I.plan(x, packed)
    assert I.plan(torch.zeros(2, 256, dtype=torch.float16), packed).split_k >= 1


@pytest.mark.parametrize("op", ["fp8_gemm", "int4_gemm"])
def test_default_choices_are_whitelisted(op):
    from llama_kernels.cuda import gemm_configs as G

    for m in (1, 2, 3, 16, 17, 33, 64, 65, 128, 1000, 4096):
        for n, k in [(6144, 4096), (1280, 8192), (16384, 6656), (7168, 8192), (256, 64)]:
            for sms in (46, 108, 132):
                c = G.choose(op, (8, 9), m, n, k, sms)
                assert 0 <= c.config < len(G.ROWS[op]) and 1 <= c.split_k <= G.MAX_SPLIT_K, (m, n, k, c)
                assert G.ROWS[op][c.config] >= min(m, G.ROWS[op][-1]), (m, c)
                steps = -(-k // G.STEP_K[op])
                assert c.split_k == 1 or steps // c.split_k >= G.MIN_STEPS_PER_SPLIT[op], (m, n, k, c)
    assert G.arch_name((9, 0)) == "sm_90a" and G.arch_name((8, 9)) == "sm_89"


def test_fp8_needs_sm89_and_is_not_the_default():
    from llama_kernels import backends

    impl = backends._REGISTRY["fp8_gemm"]["cuda"]
    assert impl.min_capability == (8, 9) and "int4_gemm" in impl.instead
    assert backends._REGISTRY["int4_gemm"]["cuda"].min_capability == (8, 0)
    assert not any(k["op"] in ("fp8_gemm", "int4_gemm") and k["backend"] == "cuda"
                   for k in backends.validated_kernels())  # fmt: skip


def test_custom_ops_have_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llama_kernels.cuda import fp8_gemm as F
    from llama_kernels.cuda import int4_gemm as I

    with FakeTensorMode():
        y = F.fp8_gemm(torch.empty(3, 64, dtype=FP8), torch.empty(3), torch.empty(96, 64, dtype=FP8),
                       torch.empty(()), torch.float16, None)  # fmt: skip
        assert y.shape == (3, 96) and y.dtype == torch.float16
        y = I.int4_gemm_packed(torch.empty(5, 256, dtype=torch.bfloat16), torch.empty(2, 1024, dtype=torch.int32),
                               torch.empty(2, 2, 8, 8, dtype=torch.bfloat16), 64, 128)  # fmt: skip
        assert y.shape == (5, 64) and y.dtype == torch.bfloat16


# --------------------------------------------------------------------------- INT4 repack layout


def emulate_int4_kernel_weight(packed) -> torch.Tensor:
    """The weight [N, Kp] as the kernel forms it in registers, following its index math: lane
    (g, t) word i of tile (nt, kc) covers n = 32 nt + 8 i + g, k = 32 kc + 8 t + (2r, 2r + 1) from
    nibbles (r, r + 4) of q >> 4r (r = 0..3); W = round_T((MAGIC + v) - (MAGIC + z)) * s)."""
    from llama_kernels.cuda.int4_gemm import MAGIC

    n, k, gs, dtype = packed.n, packed.k, packed.group_size, packed.dtype
    kc = -(-k // 32)
    ng, nt = k // gs, n // 32
    words = packed.qpacked.reshape(nt, kc, 8, 4, 4).to(torch.int64) & 0xFFFFFFFF  # [nt, kc, g, t, i]
    r = torch.arange(4)
    lo = (words[..., None] >> (4 * r)) & 0xF  # [nt, kc, g, t, i, r]: k offset 2r
    hi = (words[..., None] >> (4 * r + 16)) & 0xF  # k offset 2r + 1
    v = torch.stack([lo, hi], dim=-1).float()  # [nt, kc, g, t, i, r, e]
    grp = torch.clamp(torch.arange(kc) * 32 // gs, max=ng - 1)
    sz = packed.scale_zero.reshape(ng, nt, 8, 8)[grp]  # [kc, nt, g, 8]
    s = sz[..., :4].permute(1, 0, 2, 3).float()[:, :, :, None, :, None, None]  # [nt, kc, g, 1, i, 1, 1]
    zz = sz[..., 4:].permute(1, 0, 2, 3).float()[:, :, :, None, :, None, None]
    w = (((v + MAGIC[dtype]) - zz) * s).to(dtype)  # exact difference, one rounding of the product
    return w.permute(0, 4, 2, 1, 3, 5, 6).reshape(n, kc * 32)  # [nt, i, g, kc, t, r, e] -> [N, Kp]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group_size,symmetric", [
    (64, 256, 32, False), (96, 512, 64, True), (128, 384, 128, False), (32, 208, None, False),
    (64, 1040, None, True), (160, 4096, 128, True),
])  # fmt: skip
def test_repack_layout_matches_the_weight(dtype, n, k, group_size, symmetric):
    from llama_kernels import reference
    from llama_kernels.cuda.int4_gemm import repack_int4

    w = reference.quantize_int4(randn(n, k, dtype=torch.float32, seed=n + k), group_size=group_size,
                                symmetric=symmetric)  # fmt: skip
    packed = repack_int4(w, dtype)
    assert repack_int4(w, dtype) is packed  # cached on the weight
    kp = -(-k // 32) * 32
    assert packed.qpacked.shape == (n // 32, kp * 4) and packed.qpacked.dtype == torch.int32
    assert packed.scale_zero.shape == (k // w.group_size, n // 32, 8, 8) and packed.scale_zero.dtype == dtype
    got = emulate_int4_kernel_weight(packed)
    q, z = w.unpack().float(), w._zero_points().float()
    s = w.scales.to(dtype).float()
    g = torch.arange(k) // w.group_size
    want = ((q - z[:, g]) * s[:, g]).to(dtype)
    assert torch.equal(got[:, :k], want)
    assert torch.equal(got[:, k:].float() * 0, torch.zeros(n, kp - k))  # padding is finite
    # and the GEMM it implies is the reference's, within one rounding of W and of y
    x = randn(5, k, dtype=dtype, seed=k)
    y = (x.float() @ got[:, :k].float().T).to(dtype)
    assert_rel_close(y, reference.int4_gemm(x, w), 2 * TOL[dtype], "emulated int4 gemm")
