"""Backend selection: defaults, forcing by keyword and environment, clear errors when a forced
backend cannot run, the validated-kernel record, and the torch.library registration."""

from __future__ import annotations

import ast
import contextlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llama_kernels
from conftest import randn
from llama_kernels import BackendUnavailableError, backends, ops, reference

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
    record = [{"op": "rms_norm", "backend": "cuda", "arch": "sm_90", "device": "H100", "date": "2026-01-01",
               "code": backends.code_id("cuda"), "instances": ["bfloat16 hidden<=4096"]}]  # fmt: skip
    monkeypatch.setattr(backends, "validated_kernels", lambda: record)
    assert backends.default_backend("rms_norm", gpu) == "cuda"
    assert backends.auto_order("rms_norm", gpu, "1", "bfloat16 hidden<=4096")[0][0] == "cuda"
    assert backends.auto_order("rms_norm", gpu, "1", "float16 hidden<=4096")[0][0] == "triton"  # not validated
    record[0]["code"] = "0123456789abcdef"  # validated with other code: ignored
    assert backends.default_backend("rms_norm", gpu) == "triton"
    assert backends.stale_shipped() == record
    record[0]["code"] = backends.code_id("cuda")
    monkeypatch.setattr(backends, "device_capability", lambda index: (8, 9))
    assert backends.default_backend("rms_norm", gpu) == "triton"


def test_validated_record_is_well_formed():
    for entry in backends.validated_kernels():
        assert {"op", "backend", "arch", "device", "date", "code", "instances"} <= set(entry)
        assert entry["op"] in CONTRACT and entry["backend"] == "cuda" and entry["arch"].startswith("sm_")


def test_code_id_covers_every_file_a_kernel_depends_on(tmp_path, monkeypatch):
    """The kernel's own sources, int4.py, reference.py, ops.py, for triton attention_workspace.py, and for
    cuda the build info (the digest of csrc/, nvcc's version, checked or not): a change to any of them
    changes the hash; an unrelated file, or the arch list, does not."""
    import shutil

    pkg = Path(backends.__file__).parent
    copy = tmp_path / "llama_kernels"
    for sub in ("cuda", "triton"):
        shutil.copytree(pkg / sub, copy / sub, ignore=shutil.ignore_patterns("__pycache__"))
    for name in backends.SHARED_SOURCES + backends.BACKEND_SOURCES["triton"] + ("llm.py",):
        shutil.copy(pkg / name, copy / name)
    info = types.ModuleType("llama_kernels._build_info")
    info.SOURCES_SHA256, info.CUDA_COMPILER_VERSION, info.CHECKED, info.CUDA_ARCHS = "aa", "13.0.88", False, ["90a"]
    monkeypatch.setitem(sys.modules, "llama_kernels._build_info", info)
    monkeypatch.setattr(llama_kernels, "_build_info", info, raising=False)
    monkeypatch.setattr(backends, "__file__", str(copy / "backends.py"))

    def ids() -> dict[str, str]:
        backends.code_id.cache_clear()
        return {b: backends.code_id(b) for b in backends.KERNEL_BACKENDS}

    try:
        before = ids()
        for name, changes in (("int4.py", {"cuda", "triton"}), ("reference.py", {"cuda", "triton"}),
                              ("ops.py", {"cuda", "triton"}), ("triton/attention.py", {"triton"}),
                              ("cuda/attention.py", {"cuda"}), ("attention_workspace.py", {"triton"}),
                              ("llm.py", set())):  # fmt: skip
            with open(copy / name, "a") as f:
                f.write("\n# changed\n")
            after = ids()
            assert {b for b in before if after[b] != before[b]} == changes, name
            before = after
        for field, value, changes in (("SOURCES_SHA256", "bb", {"cuda"}), ("CUDA_COMPILER_VERSION", "13.1.0", {"cuda"}),
                                      ("CHECKED", True, {"cuda"}), ("CUDA_ARCHS", ["80", "90a"], set())):  # fmt: skip
            setattr(info, field, value)
            after = ids()
            assert {b for b in before if after[b] != before[b]} == changes, field
            before = after
    finally:
        backends.code_id.cache_clear()


def test_info_says_when_shipped_validations_are_ignored(monkeypatch, capsys):
    from llama_kernels import cli

    stale = {"op": "fp8_gemm", "backend": "cuda", "arch": "sm_90", "device": "H100", "date": "2026-01-01",
             "code": "0000000000000000", "instances": ["out bfloat16 M<=16"]}  # fmt: skip
    monkeypatch.setattr(backends, "validated_kernels", lambda: [stale])
    assert not backends.is_validated("fp8_gemm", "cuda", (9, 0), "out bfloat16 M<=16")
    info = cli.collect_info()
    assert info["stale_validations"] == ["fp8_gemm:cuda sm_90"]
    cli._print_info(info)
    lines = [x for x in capsys.readouterr().out.splitlines() if "validated_kernels.json" in x]
    assert lines == ["validated_kernels.json: 1 shipped entries ignored: their code hash no longer matches this build "
                     "(the kernels changed since; llama-kernels selftest checks them here)"]  # fmt: skip
    monkeypatch.setattr(backends, "validated_kernels", lambda: [{**stale, "code": backends.code_id("cuda")}])
    assert backends.is_validated("fp8_gemm", "cuda", (9, 0), "out bfloat16 M<=16")
    assert not backends.is_validated("fp8_gemm", "cuda", (9, 0), "out bfloat16 M<=32")
    assert cli.collect_info()["stale_validations"] == []


def test_cuda_ops_are_registered_with_torch_library():
    with FakeTensorMode():
        x = torch.empty(3, 64, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(64, dtype=torch.bfloat16, device="cuda")
        y = torch.ops.llama_kernels.rms_norm_cuda(x, w, 1e-5)
        y2, r = torch.ops.llama_kernels.add_rms_norm_cuda(x, x, w, 1e-5)
        yq, ys, r2 = torch.ops.llama_kernels.add_rms_norm_fp8_cuda(x, None, w, 1e-5, 4.0)
    assert y.shape == y2.shape == r.shape == r2.shape == (3, 64) and y.device.type == "cuda"
    assert yq.dtype == torch.float8_e4m3fn and ys.shape == (3,) and ys.dtype == torch.float32


# --- what the runner asks on a GPU (a CUDA device of a monkeypatched capability) -------------

GPU0 = torch.device("cuda", 0)


@pytest.fixture
def sm(monkeypatch):
    """Make cuda:0 look like a GPU of the given capability (no validated cuda kernels: triton or torch)."""
    monkeypatch.setattr(backends, "validated_kernels", lambda: [])

    def set_capability(capability):
        monkeypatch.setattr(backends, "device_capability", lambda index: capability)

    return set_capability


def test_fp8_weights_are_refused_at_load_where_no_fp8_gemm_runs(sm):
    sm((7, 5))
    want = (r"^FP8 weights .* cannot run on this sm_75 GPU \(cuda:0\): no GPU kernel for fp8_gemm "
            r"\(.*needs compute capability >= 8\.0.*\); use --quant int4")
    with pytest.raises(ValueError, match=want):
        backends.check_formats(GPU0, fp8_weights=True, fp8_kv=False)
    for capability in ((8, 0), (8, 9), (9, 0)):  # sm_80 reads e4m3 as codes
        sm(capability)
        backends.check_formats(GPU0, fp8_weights=True, fp8_kv=True)
    backends.check_formats(CPU, fp8_weights=True, fp8_kv=True)  # the CPU runs the reference by design


def test_llm_refuses_fp8_on_sm80_before_loading(sm, monkeypatch):
    from llama_kernels.llm import LLM
    from llama_kernels.model import LlamaConfig

    sm((7, 5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA build of torch on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("llama_kernels.llm.random_model", lambda *a, **k: pytest.fail("weights were built"))
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=64)  # fmt: skip
    with pytest.raises(ValueError, match=r"FP8 weights .* sm_75"):
        LLM.from_config(config, quant="fp8", device="cuda:0", max_context=32)


def test_every_fp8_op_selects_a_gpu_kernel_from_sm80(sm):
    """Ampere has no e4m3 type; the Triton kernels read and write it as uint8 codes there."""
    sm((8, 0))
    for op in backends.FP8_KV_OPS + backends.FP8_WEIGHT_OPS:
        assert backends.default_backend(op, GPU0) == "triton", op
    sm((7, 5))
    assert backends.default_backend("fp8_gemm", GPU0) == "torch"


def test_graph_safe(sm):
    assert not backends.graph_safe("decode_attention", CPU) and not backends.graph_safe("rope_and_cache", CPU)
    assert backends.graph_safe("rms_norm", CPU) and backends.graph_safe("fp8_gemm", CPU)
    sm((9, 0))
    assert all(backends.graph_safe(op, GPU0) for op in CONTRACT)
    assert not backends.graph_safe("decode_attention", GPU0, backend="torch")


def test_explain_says_why_not_cuda_and_why_not_triton(sm, monkeypatch):
    monkeypatch.setattr(backends, "_cuda_reason", lambda device: None)
    sm((8, 0))
    assert backends.explain("rms_norm", CPU)[0] == "torch"
    name, why = backends.explain("rms_norm", GPU0)
    assert name == "triton" and "the cuda kernel has not passed llama-kernels selftest on this GPU" in why
    name, why = backends.explain("fp8_gemm", GPU0)
    assert "cuda: the cuda fp8_gemm kernel needs compute capability >= 8.9" in why
    sm((7, 5))
    name, why = backends.explain("fp8_gemm", GPU0)
    assert name == "torch" and "; triton: the triton fp8_gemm kernel needs compute capability >= 8.0" in why


# --- launches happen on the inputs' GPU ----------------------------------------------------


def test_ops_dispatch_on_the_inputs_device(monkeypatch):
    """Kernels launch on the current device and stream: ops make the inputs' device current first."""
    seen = []

    def on_device(where):
        seen.append(where)
        return contextlib.nullcontext()

    monkeypatch.setattr(backends, "on_device", on_device)
    ops.rms_norm(randn(2, 64), randn(64))
    assert seen == [CPU]


def test_every_triton_launch_is_guarded_by_the_inputs_device():
    """Each `kernel[grid](...)` in llama_kernels/triton sits inside `with backends.on_device(...)`."""
    unguarded = []
    for path in sorted(Path(backends.__file__).parent.joinpath("triton").glob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {id(node) for w in ast.walk(tree) if isinstance(w, ast.With)
                   and any("on_device" in ast.unparse(item.context_expr) for item in w.items)
                   for node in ast.walk(w)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and id(node) not in guarded:
                unguarded.append(f"{path.name}:{node.lineno}")
    assert not unguarded, unguarded


def test_info_explains_each_fallback(sm, monkeypatch):
    from llama_kernels import cli

    sm((7, 5))
    monkeypatch.setattr(cli, "_devices", lambda: [GPU0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    dev = cli.collect_info()["devices"][0]
    assert dev["ops"]["rms_norm"] == "triton" and "cuda: " in dev["why"]["rms_norm"]
    assert dev["ops"]["fp8_gemm"] == "torch" and "; triton: the triton fp8_gemm kernel needs" in dev["why"]["fp8_gemm"]


# --- load-time weight preparation --------------------------------------------------------------


def test_int4_weight_is_repacked_once_at_load_in_place_of_its_layout(monkeypatch):
    """Where the cuda INT4 kernel is selected, Int4Linear.load repacks the weight into its tile layout
    once, and the repacked words replace qweight (no second copy, nothing repacked at the first call);
    the layer then asks for that backend."""
    from llama_kernels.cuda import int4_gemm as cuda_int4
    from llama_kernels.cuda.common import NoKernelError
    from llama_kernels.model import Int4Linear

    w = randn(64, 256, seed=3)
    plain = ops.quantize_int4(w, group_size=128, symmetric=False)
    lin = Int4Linear(256, 64, torch.float32, 128)
    lin.load(w)  # on the CPU: the torch backend, plain layout (its CPU kernel's layout attached beside it)
    assert lin.backend is None and torch.equal(lin.qweight, plain.qweight)

    monkeypatch.setattr(backends, "default_backend", lambda op, device: "cuda" if op == "int4_gemm" else "torch")
    lin.load(w)
    packed = lin.weight.__dict__["_cuda_int4_packed"][torch.bfloat16]
    assert lin.backend == "cuda" and lin.qweight.data_ptr() == packed.qpacked.data_ptr()
    assert lin.qweight.shape == plain.qweight.shape and lin.qweight.dtype == torch.int32
    assert torch.equal(packed.qpacked, cuda_int4.repack_int4(plain, torch.bfloat16).qpacked)
    assert cuda_int4.repack_int4(lin.weight, torch.bfloat16) is packed  # the first call finds it
    with pytest.raises(NoKernelError, match=r"repacked in place for \[torch.bfloat16\]; x is torch.float16"):
        cuda_int4.repack_int4(lin.weight, torch.float16)
    seen = []
    monkeypatch.setattr(ops, "int4_gemm", lambda x, weight, backend=None: seen.append(backend) or x[:, :64])
    lin(randn(3, 256))
    assert seen == ["cuda"]


@pytest.mark.gpu
def test_triton_ops_on_a_gpu_that_is_not_the_current_one():
    """A model on cuda:1 while cuda:0 is current: every launch goes to the inputs' GPU and stream."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from conftest import TOL, assert_rel_close, paged_attention_case

    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        x, w = randn(5, 576, dtype=torch.bfloat16, device=dev), randn(576, dtype=torch.bfloat16, device=dev)
        assert_rel_close(ops.rms_norm(x, w, backend="triton"), reference.rms_norm(x, w, 1e-5), TOL[torch.bfloat16])
        xq, xs = ops.quantize_fp8(x, backend="triton")
        wq, ws = ops.quantize_fp8(randn(64, 576, device=dev) / 24, backend="triton")
        y = ops.fp8_gemm(xq, xs, wq, ws, backend="triton")
        assert_rel_close(y, reference.fp8_gemm(xq, xs, wq, ws, torch.bfloat16), TOL[torch.bfloat16])
        w4 = ops.quantize_int4(randn(64, 576, device=dev), group_size=64)
        assert_rel_close(ops.int4_gemm(x, w4, backend="triton"), reference.int4_gemm(x, w4), TOL[torch.bfloat16])
        args = paged_attention_case([3, 300], 8, 2, 128, 16, torch.bfloat16, torch.bfloat16, seed=1, device=dev)
        out = ops.decode_attention(*args[:5], None, *args[5:], backend="triton")
        assert_rel_close(out, reference.decode_attention(*args[:5], None, *args[5:]), TOL[torch.bfloat16])
        torch.cuda.synchronize(dev)


@pytest.mark.parametrize("module", ["llama_kernels.backends", "llama_kernels.cuda", "llama_kernels.triton"])
def test_importing_any_layer_alone_registers_every_backend(module):
    """Importing the backend registry (or one backend package) first still registers the ops of all three backends
    (before, only importing llama_kernels.ops did)."""
    code = (f"import {module}\nfrom llama_kernels import backends\n"
            "print(sorted(backends.ops()), sorted(backends._REGISTRY['rms_norm']))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(llama_kernels.__file__).parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{sorted(backends.ops())} {sorted(backends._REGISTRY['rms_norm'])}"
    assert len(backends.ops()) >= 9 and "torch" in backends._REGISTRY["rms_norm"]
