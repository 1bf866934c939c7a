"""The checked build (LLAMA_KERNELS_CHECKED=1): bounded spin waits that trap with a message naming the
kernel, barrier and stage instead of hanging. CPU-side (nvcc, no GPU):

  * every software spin wait in csrc/ (mbarrier try_wait/test_wait loops) goes through SpinBound;
  * fp8_gemm_sm90.cu for sm_90a: the checked PTX reads %globaltimer, calls vprintf with a message naming
    fp8_gemm_sm90_kernel and its barriers, and traps; the normal build has none of that; both have 0 spills,
    and the SASS agrees (BPT.TRAP and SR_GLOBALTIMER only in the checked build);
  * a non-boolean LLAMA_KERNELS_CHECKED is refused at configure (that =1 reaches the flags and
    _build_info.CHECKED is test_cuda_build.py's test_cmake_arch_override).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_cuda_build import (
    CSRC,
    NVCC,
    NVCC_FLAGS,
    REPO,
    _cmake,
    _cuobjdump_candidates,
    _parse_ptxas,
)

SM90 = CSRC / "fp8_gemm_sm90.cu"
KERNEL = "fp8_gemm_sm90_kernel"


@functools.cache
def _compile(checked: bool) -> dict:
    """PTX (compute_90a), ptxas -v report and SASS (sm_90a) of fp8_gemm_sm90.cu, normal or checked."""
    out = Path(tempfile.mkdtemp(prefix="llama-kernels-checked-"))
    ptx, cubin = out / "k.ptx", out / "k.cubin"
    defs = ["-DLLAMA_KERNELS_CHECKED=1"] if checked else []
    cmd = [NVCC, "-ptx", *NVCC_FLAGS, *defs, "-arch=compute_90a", f"-I{CSRC}", str(SM90), "-o", str(ptx)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr[-4000:]}"
    ptxas = shutil.which("ptxas") or str(Path(NVCC).resolve().parent / "ptxas")
    q = subprocess.run([ptxas, "-v", "-arch=sm_90a", "-O3", str(ptx), "-o", str(cubin)], capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert q.returncode == 0, q.stderr[-4000:]
    sass = None
    for tool in _cuobjdump_candidates():
        r = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, timeout=300)
        if r.returncode == 0 and "Function :" in r.stdout:
            sass = r.stdout
            break
    result = {"ptx": ptx.read_text(), "ptxas": q.stdout + q.stderr, "sass": sass}
    shutil.rmtree(out, ignore_errors=True)
    return result


@pytest.fixture(scope="module")
def builds() -> dict[bool, dict]:
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two variants compile side by side
        return dict(zip((False, True), pool.map(_compile, (False, True))))


def _ptx_strings(ptx: str) -> list[str]:
    """The string constants of a PTX module (`.b8 $str[n] = {104, 105, ...}`)."""
    return [bytes(int(b) for b in body.split(",")).rstrip(b"\0").decode("latin-1")
            for body in re.findall(r"\$str\S*\[\d+\]\s*=\s*\{([\d,\s]+)\}", ptx)]  # fmt: skip


def test_every_spin_wait_is_bounded():
    """A new mbarrier wait loop in any kernel must use SpinBound (or this test names its file)."""
    for src in sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cuh")]):
        text = src.read_text()
        if re.search(r"mbarrier\.(try_wait|test_wait)", text):
            assert "SpinBound" in text and "LLAMA_KERNELS_CHECKED" in text, f"{src.name}: unbounded spin wait"
    assert "SpinBound bound;" in SM90.read_text()


def test_trap_path_only_in_the_checked_build(builds):
    normal, checked = builds[False], builds[True]
    for name, b in (("normal", normal), ("checked", checked)):
        entries = [e for e in _parse_ptxas(b["ptxas"]) if KERNEL in e["func"]]
        assert len(entries) == 1, (name, b["ptxas"][-2000:])
        assert entries[0]["spill_stores"] == 0 and entries[0]["spill_loads"] == 0, (name, entries[0])
    # The normal build keeps its wgmmas pipelined (the checked one's printf call serializes them: C7510).
    assert "C7510" not in normal["ptxas"], normal["ptxas"][-2000:]
    # PTX: the normal sm_90a kernel never traps, prints or reads the clock.
    assert not re.search(r"\btrap;|vprintf|%globaltimer", normal["ptx"])
    assert re.search(r"\btrap;", checked["ptx"]) and "vprintf" in checked["ptx"] and "%globaltimer" in checked["ptx"]
    strings = _ptx_strings(checked["ptx"])
    assert any(s.startswith("llama_kernels CHECKED: %s: spin wait on %s[%d]") for s in strings), strings
    assert {KERNEL, "full", "empty"} <= set(strings), strings  # the kernel and both barrier rings are named
    assert not _ptx_strings(normal["ptx"])
    if normal["sass"] is None or checked["sass"] is None:
        pytest.skip("no working cuobjdump: the PTX and ptxas checks passed, the SASS is unchecked")
    assert "BPT.TRAP" not in normal["sass"] and "GLOBALTIMER" not in normal["sass"]
    assert "BPT.TRAP" in checked["sass"] and "SR_GLOBALTIMER" in checked["sass"]
    # The hot path is unchanged: the same mbarrier waits and wgmmas in both.
    for op in ("SYNCS.PHASECHK.TRANS64.TRYWAIT", "QGMMA.64x128x32.F32.E4M3.E4M3"):
        assert normal["sass"].count(op) == checked["sass"].count(op) > 0, op


def test_checked_option_refuses_a_non_boolean(tmp_path):
    """(That LLAMA_KERNELS_CHECKED=1 reaches the flags and _build_info.CHECKED: test_cuda_build's
    test_cmake_arch_override, which reconfigures its build with it.)"""
    env = {**os.environ, "LLAMA_KERNELS_CUDA_ARCHS": "90a", "LLAMA_KERNELS_CHECKED": "maybe"}
    p = subprocess.run([_cmake(), "-S", str(REPO), "-B", str(tmp_path / "build")], capture_output=True, text=True,
                       env=env, timeout=300)  # fmt: skip
    assert p.returncode != 0
    assert "LLAMA_KERNELS_CHECKED: 'MAYBE' is not a boolean" in p.stderr, p.stderr
