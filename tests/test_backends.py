"""Backend selection: defaults, forcing by keyword and environment, clear errors when a forced
backend cannot run, the validated-kernel record, and the torch.library registration."""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import randn
from llama_kernels import BackendUnavailableError, backends, ops

CPU = torch.device("cpu")
CONTRACT = ["quantize_fp8", "fp8_gemm", "int4_gemm", "rms_norm", "add_rms_norm", "add_rms_norm_fp8",
            "rope_and_cache", "decode_attention", "paged_prefill_attention"]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def test_every_op_has_a_torch_backend_and_it_is_the_cpu_default():
    assert set(CONTRACT) <= set(backends.ops())
    for op in CONTRACT:
        name, fn = backends.select(op, CPU)
        assert name == "torch", op


def test_forcing_cuda_on_cpu_says_why():
    x, w = randn(2, 64), randn(64)
    with pytest.raises(BackendUnavailableError, match=r"add_rms_norm: backend='cuda' cannot run here: "):
        ops.add_rms_norm(x, None, w, backend="cuda")
    ext, missing = backends.cuda_extension()
    reason = "inputs are on cpu; the cuda backend needs CUDA tensors" if ext else missing
    with pytest.raises(BackendUnavailableError, match=re.escape(reason)):
        ops.rms_norm(x, w, backend="cuda")


def test_forcing_by_environment(monkeypatch):
    x, w = randn(2, 64), randn(64)
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match=r"LLAMA_KERNELS_BACKEND='cuda' cannot run here"):
        ops.rms_norm(x, w)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert torch.equal(ops.rms_norm(x, w), ops.rms_norm(x, w, backend="torch"))
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"LLAMA_KERNELS_BACKEND'fast' is not a backend; expected one of"):
        ops.rms_norm(x, w)
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert backends.select("rms_norm", CPU)[0] == "torch"


def test_unknown_backend_keyword():
    with pytest.raises(ValueError, match=r"backend='gpu' is not a backend"):
        ops.rms_norm(randn(2, 64), randn(64), backend="gpu")


def test_forcing_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(backends._REGISTRY["rms_norm"], "triton", backends.Impl(lambda *a: None))
    with pytest.raises(BackendUnavailableError, match=r"Triton kernels run there only under TRITON_INTERPRET=1"):
        ops.rms_norm(randn(2, 64), randn(64), backend="triton")


def test_op_without_a_kernel_in_a_backend(monkeypatch):
    monkeypatch.delitem(backends._REGISTRY["decode_attention"], "triton", raising=False)
    with pytest.raises(BackendUnavailableError, match=r"the triton backend has no kernel for decode_attention"):
        backends.select("decode_attention", CPU, "triton")


@pytest.mark.parametrize(
    "arch,capability,runs",
    [("80", (8, 0), True), ("80", (8, 6), True), ("80", (8, 9), True), ("80", (9, 0), False),
     ("89", (8, 6), False), ("90a", (9, 0), True), ("90a", (10, 0), False), ("90", (9, 0), True)],
)  # fmt: skip
def test_arch_compatibility(arch, capability, runs):
    assert backends._arch_runs_on(arch, capability) is runs


def test_capability_gate_names_what_is_needed(monkeypatch):
    monkeypatch.setattr(backends, "_cuda_reason", lambda device: None)
    monkeypatch.setattr(backends, "device_capability", lambda index: (8, 0))
    monkeypatch.setitem(backends._REGISTRY["fp8_gemm"], "cuda", backends.Impl(
        lambda *a: None, (8, 9), "use int4_gemm or a bf16 linear"))  # fmt: skip
    reason = backends.unavailable_reason("fp8_gemm", "cuda", torch.device("cuda", 0))
    assert reason == (
        "the cuda fp8_gemm kernel needs compute capability >= 8.9 (sm_89); this GPU is 8.0; "
        "use int4_gemm or a bf16 linear"
    )


def test_cuda_is_default_only_where_validated(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "_cuda_reason", lambda device: None)
    monkeypatch.setattr(backends, "_triton_reason", lambda device: None)
    monkeypatch.setattr(backends, "device_capability", lambda index: (9, 0))
    monkeypatch.setitem(backends._REGISTRY["rms_norm"], "triton", backends.Impl(lambda *a: None))
    monkeypatch.setattr(backends, "validated_kernels", lambda: [])
    assert backends.default_backend("rms_norm", gpu) == "triton"
    record = [{"op": "rms_norm", "backend": "cuda", "arch": "sm_90", "device": "H100", "date": "2026-01-01"}]
    monkeypatch.setattr(backends, "validated_kernels", lambda: record)
    assert backends.default_backend("rms_norm", gpu) == "cuda"
    monkeypatch.setattr(backends, "device_capability", lambda index: (8, 9))
    assert backends.default_backend("rms_norm", gpu) == "triton"


def test_validated_record_is_well_formed():
    for entry in backends.validated_kernels():
        assert {"op", "backend", "arch", "device", "date"} <= set(entry)
        assert entry["op"] in CONTRACT and entry["backend"] == "cuda" and entry["arch"].startswith("sm_")


def test_cuda_ops_are_registered_with_torch_library():
    with FakeTensorMode():
        x = torch.empty(3, 64, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(64, dtype=torch.bfloat16, device="cuda")
        y = torch.ops.llama_kernels.rms_norm_cuda(x, w, 1e-5)
        y2, r = torch.ops.llama_kernels.add_rms_norm_cuda(x, x, w, 1e-5)
        yq, ys, r2 = torch.ops.llama_kernels.add_rms_norm_fp8_cuda(x, None, w, 1e-5, 4.0)
    assert y.shape == y2.shape == r.shape == r2.shape == (3, 64) and y.device.type == "cuda"
    assert yq.dtype == torch.float8_e4m3fn and ys.shape == (3,) and ys.dtype == torch.float32
