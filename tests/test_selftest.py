"""`llama-kernels selftest` and the dispatch that reads its record: the CPU run (Triton under the
interpreter), a wrong kernel reported as FAIL, the record of a (faked) GPU run, and automatic
dispatch trusting what passed, never what failed, preferring the fastest, and falling back when a
kernel has no variant for a shape."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_kernels
from llama_kernels import backends, ops, selftest

GPU = torch.device("cuda", 0)  # a device object only: no GPU is touched by these tests


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No forced backend, and a private record file: the user's real record is never read or written."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setenv(backends.RECORD_ENV_VAR, str(tmp_path / "validated.json"))
    backends.reload_user_record()
    yield
    backends.reload_user_record()


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    selftest.add_arguments(parser)
    args = parser.parse_args([])
    args.__dict__.update(kw)
    return args


def test_every_op_has_a_case_builder():
    assert set(backends.ops()) <= set(selftest.CASES), "add the new op's case builder to selftest.CASES"


def test_cli_selftest_without_a_gpu_checks_triton_under_the_interpreter(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU path")
    out = tmp_path / "rows.json"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}  # it must set it itself
    done = subprocess.run([sys.executable, "-m", "llama_kernels", "selftest", "--json", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=Path(llama_kernels.__file__).parents[1], env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA GPU present" in done.stdout
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == set(backends.ops())
    assert all(r["backend"] == "triton" and r["passed"] and r["relerr"] <= r["tol"] for r in rows)
    assert all({"op", "backend", "shape", "relerr", "passed"} <= set(r) for r in rows)
    assert not Path(backends.user_record_path()).exists()  # nothing recorded without a GPU


def test_a_wrong_kernel_fails_and_the_exit_code_says_so(monkeypatch, capsys):
    good = backends._REGISTRY["rms_norm"]["triton"]
    wrong = backends.Impl(lambda x, w, eps: good.fn(x, w, eps) * 1.02)  # 2% off: over the bf16 tolerance
    monkeypatch.setitem(backends._REGISTRY["rms_norm"], "triton", wrong)
    assert selftest.run(_args(op=["rms_norm", "add_rms_norm"], backends="triton")) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: ['rms_norm on triton']" in out
    assert re.search(r"add_rms_norm +small 1x256 +triton .* pass", out)  # the other op still ran and passed


def test_a_crashing_kernel_is_an_error_row(monkeypatch, tmp_path):
    def crash(x, w, eps):
        raise RuntimeError("illegal memory access")

    monkeypatch.setitem(backends._REGISTRY["rms_norm"], "triton", backends.Impl(crash))
    out = tmp_path / "rows.json"
    assert selftest.run(_args(op=["rms_norm"], backends="triton", json=str(out))) == 1
    rows = json.loads(out.read_text())
    assert rows and all(r["status"] == "error" and not r["passed"] and "illegal memory" in r["detail"] for r in rows)


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    assert selftest.run(_args(op=["gemm"])) == 2
    assert "--op 'gemm' is not an op" in capsys.readouterr().err
    assert selftest.run(_args(backends="cuda,fast")) == 2
    assert "'fast' is not a backend" in capsys.readouterr().err


# --- the record and dispatch, on a faked GPU ------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend device cuda:0 is an H100 on which the cuda and triton backends can run."""
    monkeypatch.setattr(backends, "device_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake H100")
    monkeypatch.setattr(backends, "_cuda_reason", lambda device: None)
    monkeypatch.setattr(backends, "_triton_reason", lambda device: None)
    monkeypatch.setattr(selftest, "environment", lambda device: {
        "device": "Fake H100", "capability": "9.0", "driver": "999.1", "torch": torch.__version__, "cuda": "13.0",
        "triton": "3.6.0", "date": "2026-11-30T10:00:00+00:00"})  # fmt: skip
    monkeypatch.setattr(backends, "is_validated", lambda op, backend, cap, instance=None: False)


def _row(op, backend, shape, status="pass", us=None, rows=1, instance=""):
    return selftest.Row(op, shape, backend, backends.row_bucket(rows), status, instance, relerr=1e-3, tol=8e-3, us=us)


def _decode_args(dtype=torch.bfloat16, d=128, block=16, hq=32, hkv=8, cache_dtype=None):
    """decode_attention's backend arguments (CPU tensors: instance_key reads only dtypes and shapes)."""
    q = torch.empty(2, hq, d, dtype=dtype)
    cache = torch.empty(4, block, hkv, d, dtype=cache_dtype or dtype)
    return (q, cache, cache, torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), None, None, None)


def test_instance_key_separates_what_selects_another_template():
    key = lambda **kw: backends.instance_key("decode_attention", _decode_args(**kw))  # noqa: E731
    assert key() == "bfloat16 D128 cache bfloat16 block 16 group 1-16"  # the selftest's 8B shape
    others = {key(dtype=torch.float16), key(d=64), key(block=32), key(cache_dtype=torch.float8_e4m3fn),
              key(hq=136, hkv=8)}  # fmt: skip
    assert len(others) == 5 and key() not in others
    assert key(hq=24, hkv=8) == key() and key(hq=128, hkv=8) == key()  # groups 3 and 16: one program shape
    assert key(hq=136, hkv=8).endswith("group 17-32")
    x, w = torch.empty(3, 4096, dtype=torch.bfloat16), torch.empty(4096, dtype=torch.bfloat16)
    assert backends.instance_key("rms_norm", (x, w, 1e-5)) == "bfloat16 hidden<=4096"
    assert backends.instance_key("rms_norm", (x[:, :576], w[:576], 1e-5)) == "bfloat16 hidden<=1024"
    xq = torch.empty(1, 64, dtype=torch.float8_e4m3fn)
    gemm = lambda m: backends.instance_key("fp8_gemm", (xq[:1].expand(m, 64), None, xq, None, torch.float16, None))  # noqa: E731
    assert [gemm(m) for m in (1, 16, 17, 32, 64, 65, 4096)] == [f"out float16 M{c}" for c in (
        "<=16", "<=16", "<=32", "<=32", "<=64", ">64", ">64")]  # the CUDA tile configs m16, m32, m64, m64/wgmma
    assert backends.instance_key("rope_and_cache", (torch.empty(1, 4, 64),) * 6 + (torch.empty(2, 32, 2, 64),)) == (
        "float32 D64 cache float32 block 32")  # fmt: skip
    assert set(backends._INSTANCE) == set(backends.ops())  # every op says what its validation covers
    assert backends.instance_key("decode_attention", ()) is None


def test_an_instantiation_no_run_validated_falls_back(fake_gpu, monkeypatch):
    """A pass at the selftest's shapes (bf16, head_dim 128, block 16) trusts the cuda kernel for those only."""
    validated = backends.instance_key("decode_attention", _decode_args())
    selftest.record(GPU, [_row("decode_attention", "cuda", "8B", instance=validated),
                          _row("decode_attention", "triton", "8B", instance=validated)], bench=False)  # fmt: skip
    for args, want in ((_decode_args(), "cuda"), (_decode_args(dtype=torch.float16), "triton"),
                       (_decode_args(d=64), "triton"), (_decode_args(block=32), "triton"),
                       (_decode_args(hq=24), "cuda")):  # fmt: skip
        name, why = backends.auto_order("decode_attention", GPU, "2-16", backends.instance_key("decode_attention", args))[0]
        assert name == want, (args[0].dtype, args[0].shape, args[1].shape, why)
        if want == "triton":
            assert "the cuda kernel has not passed llama-kernels selftest on this GPU for " in why
    name, why = backends.explain("decode_attention", GPU)
    assert name == "cuda" and f"for the validated instantiations only ({validated}), others: triton" in why
    # the calls themselves: backends.call keys each by its arguments
    ran = []
    for name in ("cuda", "triton"):
        monkeypatch.setitem(backends._REGISTRY["decode_attention"], name, backends.Impl(lambda *a, n=name: ran.append(n)))
    backends.call("decode_attention", GPU, None, _decode_args())
    backends.call("decode_attention", GPU, None, _decode_args(dtype=torch.float16))
    assert ran == ["cuda", "triton"]


def test_record_keeps_instances_of_the_same_code_and_drops_other_code(fake_gpu, monkeypatch):
    selftest.record(GPU, [_row("rms_norm", "cuda", "a", instance="bfloat16 hidden<=4096")], bench=False)
    selftest.record(GPU, [_row("rms_norm", "cuda", "b", instance="float16 hidden<=4096", status="FAIL")], bench=False)
    kernels = json.loads(backends.user_record_path().read_text())["devices"]["Fake H100 (sm_90)"]["kernels"]
    entry = kernels["rms_norm:cuda"]
    assert entry["instances"]["bfloat16 hidden<=4096"]["passed"] and not entry["passed"]
    assert entry["instances"]["float16 hidden<=4096"]["failed"] == entry["failed"] and entry["failed"][0].startswith("b: FAIL")
    assert backends.auto_order("rms_norm", GPU, "1", "bfloat16 hidden<=4096")[0][0] == "cuda"
    assert backends.auto_order("rms_norm", GPU, "1", "float16 hidden<=4096")[0][0] == "triton"  # failed there
    assert backends.explain("rms_norm", GPU)[0] == "triton"  # the op as a whole: a failure counts
    monkeypatch.setattr(backends, "code_id", lambda backend: "changed")
    selftest.record(GPU, [_row("rms_norm", "cuda", "c", instance="float32 hidden<=4096")], bench=False)
    kernels = json.loads(backends.user_record_path().read_text())["devices"]["Fake H100 (sm_90)"]["kernels"]
    assert list(kernels["rms_norm:cuda"]["instances"]) == ["float32 hidden<=4096"] and kernels["rms_norm:cuda"]["passed"]


def test_a_one_backend_bench_run_keeps_the_comparison_of_buckets_it_did_not_remeasure(fake_gpu):
    both = [_row("fp8_gemm", "cuda", "1x8", us=9.0, rows=1), _row("fp8_gemm", "triton", "1x8", us=5.0, rows=1),
            _row("fp8_gemm", "cuda", "16x8", us=9.0, rows=16), _row("fp8_gemm", "triton", "16x8", us=5.0, rows=16)]
    selftest.record(GPU, both, bench=True)
    _, entry = selftest.record(GPU, [_row("fp8_gemm", "cuda", "1x8", us=1.0, rows=1)], bench=True)  # --backends cuda
    assert {b: e["backend"] for b, e in entry["fastest"]["fp8_gemm"].items()} == {"1": "triton", "2-16": "triton"}
    # a later two-backend run replaces only the buckets it compared
    _, entry = selftest.record(GPU, [_row("fp8_gemm", "cuda", "1x8", us=1.0, rows=1),
                                     _row("fp8_gemm", "triton", "1x8", us=5.0, rows=1)], bench=True)  # fmt: skip
    assert {b: e["backend"] for b, e in entry["fastest"]["fp8_gemm"].items()} == {"1": "cuda", "2-16": "triton"}


def test_without_a_record_the_gpu_default_is_triton_and_info_says_why(fake_gpu):
    name, why = backends.explain("fp8_gemm", GPU)
    assert name == "triton" and "the cuda kernel has not passed llama-kernels selftest on this GPU" in why


def test_record_then_dispatch_trusts_what_passed_and_never_what_failed(fake_gpu, monkeypatch):
    rows = [
        _row("fp8_gemm", "cuda", "a"), _row("fp8_gemm", "triton", "a"),
        _row("rms_norm", "cuda", "a"), _row("rms_norm", "cuda", "b", status="FAIL"), _row("rms_norm", "triton", "a"),
        _row("add_rms_norm", "triton", "a", status="error"), _row("add_rms_norm", "cuda", "a", status="no kernel"),
        _row("quantize_fp8", "torch", "a"),
    ]  # fmt: skip
    path, entry = selftest.record(GPU, rows, bench=False)
    data = json.loads(Path(path).read_text())
    kernels = data["devices"]["Fake H100 (sm_90)"]["kernels"]
    assert kernels["fp8_gemm:cuda"]["passed"] and kernels["fp8_gemm:cuda"]["driver"] == "999.1"
    assert not kernels["rms_norm:cuda"]["passed"] and kernels["rms_norm:cuda"]["failed"][0].startswith("b: FAIL")
    assert "add_rms_norm:cuda" not in kernels  # it had no kernel for the shapes: nothing to record
    assert "quantize_fp8:torch" not in kernels  # the reference is not a kernel under test
    assert backends.explain("fp8_gemm", GPU)[0] == "cuda"
    assert "passed llama-kernels selftest on this GPU (2026-11-30" in backends.explain("fp8_gemm", GPU)[1]
    name, why = backends.explain("rms_norm", GPU)
    assert name == "triton" and "the cuda kernel failed llama-kernels selftest on this GPU" in why
    name, why = backends.explain("add_rms_norm", GPU)
    assert name == "torch" and "the triton kernel failed" in why
    # a shipped validated entry does not override a failure recorded on this GPU
    monkeypatch.setattr(backends, "is_validated", lambda op, backend, cap, instance=None: True)
    backends.reload_user_record()
    assert backends.explain("rms_norm", GPU)[0] == "triton"


def test_a_record_made_with_other_code_does_not_count(fake_gpu, monkeypatch):
    selftest.record(GPU, [_row("fp8_gemm", "cuda", "a")], bench=False)
    assert backends.explain("fp8_gemm", GPU)[0] == "cuda"
    monkeypatch.setattr(backends, "code_id", lambda backend: "rebuilt")
    backends.reload_user_record()
    assert backends.explain("fp8_gemm", GPU)[0] == "triton"


def test_bench_prefers_the_fastest_passing_backend_per_bucket(fake_gpu):
    rows = [
        _row("fp8_gemm", "cuda", "1x8", us=5.0, rows=1), _row("fp8_gemm", "triton", "1x8", us=9.0, rows=1),
        _row("fp8_gemm", "cuda", "4096x8", us=90.0, rows=4096), _row("fp8_gemm", "triton", "4096x8", us=60.0, rows=4096),
        _row("fp8_gemm", "torch", "4096x8", us=1.0, rows=4096),  # the reference never wins: it syncs the host
        _row("int4_gemm", "cuda", "1x8", us=1.0), _row("int4_gemm", "cuda", "2", status="FAIL"),
        _row("int4_gemm", "triton", "1x8", us=7.0),
    ]  # fmt: skip
    _, entry = selftest.record(GPU, rows, bench=True)
    # int4_gemm: the cuda kernel failed, so triton was compared with nothing: no entry
    assert {op: {b: e["backend"] for b, e in buckets.items()} for op, buckets in entry["fastest"].items()} == {
        "fp8_gemm": {"1": "cuda", ">128": "triton"}}
    assert entry["fastest"]["fp8_gemm"]["1"]["code"] == {b: backends.code_id(b) for b in ("cuda", "triton")}
    x1, x4096 = torch.empty(1, 8), torch.empty(4096, 8)
    assert backends.auto_order("fp8_gemm", GPU, backends.args_bucket((x1,)))[0][0] == "cuda"
    first = backends.auto_order("fp8_gemm", GPU, backends.args_bucket((x4096,)))[0]
    assert first[0] == "triton" and "fastest passing backend for >128 rows" in first[1]
    assert backends.auto_order("int4_gemm", GPU, "1")[0][0] == "triton"  # the failing cuda kernel: never
    assert backends.explain("fp8_gemm", GPU)[1].endswith("by rows, after selftest --bench: 1: cuda, >128: triton")


def test_auto_dispatch_falls_back_when_a_kernel_has_no_variant_for_the_shape(monkeypatch):
    calls = []

    def no_kernel(x, w, eps):
        calls.append("cuda")
        raise backends.NoKernelError("rms_norm: hidden=100 must be a multiple of 8")

    def triton(x, w, eps):
        calls.append("triton")
        return x

    monkeypatch.setitem(backends._REGISTRY["rms_norm"], "cuda", backends.Impl(no_kernel))
    monkeypatch.setitem(backends._REGISTRY["rms_norm"], "triton", backends.Impl(triton))
    monkeypatch.setattr(backends, "auto_order", lambda op, device, bucket=None, instance=None: (("cuda", ""), ("triton", ""), ("torch", "")))
    x = torch.randn(2, 100)
    assert backends.call("rms_norm", torch.device("cpu"), None, (x, torch.ones(100), 1e-5)) is x
    assert calls == ["cuda", "triton"]
    monkeypatch.setattr(backends, "unavailable_reason", lambda op, backend, device: None)
    with pytest.raises(backends.NoKernelError, match="hidden=100"):  # a forced backend: no fallback
        backends.call("rms_norm", torch.device("cpu"), "cuda", (x, torch.ones(100), 1e-5))


def test_cuda_shape_refusals_are_no_kernel_errors():
    """The cuda wrappers' shape checks raise NoKernelError (a ValueError), which dispatch falls back on."""
    from llama_kernels.cuda import attention, norm

    q = torch.empty(1, 4, 96, dtype=torch.bfloat16)
    cache = torch.empty(2, 16, 2, 96, dtype=torch.bfloat16)
    with pytest.raises(backends.NoKernelError, match="head_dim D in"):
        attention.check_decode_attention(q, cache, cache, torch.zeros(1, 2, dtype=torch.int32), torch.ones(1))
    with pytest.raises(backends.NoKernelError, match="hidden=100 must be a multiple of 8"):
        norm._check_norm("rms_norm", torch.empty(2, 100), None, torch.empty(100))
    assert issubclass(backends.NoKernelError, ValueError)


def test_user_record_path_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(backends.RECORD_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert backends.user_record_path() == tmp_path / "llama-kernels" / "validated.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert backends.user_record_path() == Path.home() / ".cache" / "llama-kernels" / "validated.json"
    monkeypatch.setenv(backends.RECORD_ENV_VAR, str(tmp_path / "x.json"))
    assert backends.user_record_path() == tmp_path / "x.json"


def test_gpu_selftest_shapes_cover_the_llama_layers():
    """The GPU shapes: the 8B, 70B/8 and 405B/8 layers at M = 1, 16, 128, 4096."""
    shapes, rows = selftest._gemm_shapes(small=False)
    assert {"8B gate_up", "70B/8 qkv", "405B/8 down"} <= set(shapes) and rows == (1, 16, 128, 4096)
    assert {(m, h) for _, m, h in selftest._norm_shapes(small=False)} == {
        (m, h) for m in (1, 16, 128, 4096) for h in (4096, 8192, 16384)}
    assert {"8B", "70B/8", "405B/8"} == set(selftest._heads(small=False))


def test_bench_rows_have_times_rates_and_percent_of_peak(capsys):
    """The --bench path (CUDA events on a GPU; the host clock here, with made-up peaks)."""
    peaks = {"copy_Bps": 1e10, "bf16_flops": 1e11, "fp8_flops": 2e11}
    rows, missing = selftest.run_cases(torch.device("cpu"), True, ["triton"], ["rms_norm", "fp8_gemm"], True, peaks)
    assert not missing and {r.op for r in rows} == {"rms_norm", "fp8_gemm"} and all(r.passed for r in rows)
    for r in rows:
        assert r.us > 0 and r.gbps > 0 and r.pct_of_peak > 0 and r.bound in ("memory", "compute")
        assert (r.tflops is not None) == (r.op == "fp8_gemm")
        assert {"us", "pct_of_peak"} <= set(r.to_json())
    assert " GB/s " in capsys.readouterr().out


@pytest.mark.gpu
def test_selftest_on_the_gpu_records_and_dispatch_follows(gpu, tmp_path):
    """On a GPU: two ops on every backend with --bench; the record then drives dispatch."""
    out = tmp_path / "rows.json"
    code = selftest.run(_args(op=["add_rms_norm", "decode_attention"], bench=True, json=str(out)))
    rows = json.loads(out.read_text())
    assert {r["backend"] for r in rows} >= {"triton", "torch"}
    assert all(r["us"] > 0 and r["pct_of_peak"] > 0 for r in rows if r["passed"])
    assert code == (0 if all(r["passed"] or r["status"] == "no kernel" for r in rows) else 1)
    record = json.loads(backends.user_record_path().read_text())
    (entry,) = record["devices"].values()
    for op in ("add_rms_norm", "decode_attention"):
        for name in ("cuda", "triton"):
            result = entry["kernels"].get(f"{op}:{name}")
            if result is not None and not result["passed"]:
                assert backends.explain(op, gpu)[0] != name  # a failed kernel is never chosen
        if entry["kernels"].get(f"{op}:cuda", {}).get("passed"):
            assert backends.explain(op, gpu)[0] == "cuda"  # passed here: used (calls without a row bucket)
