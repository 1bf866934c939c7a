"""CPU-side checks of the built CUDA extension ``llama_kernels._C`` (no GPU needed).

What is checked here, on a machine with nvcc but possibly without a GPU or a driver:
  * ``_C`` imports and answers without touching the CUDA driver (static cudart, no libtorch),
    and agrees with ``_build_info`` about the architectures it was built for;
  * the launchers reject unsupported configurations with a RuntimeError naming the kernel,
    the shapes and the reason, before any CUDA call;
  * the SASS in the .so has the add_rms_norm kernels for every built arch, 16-byte vector
    loads, no local memory, and the hardware FP8 convert (F2FP...E4M3) on sm_89 and newer;
  * ptxas reports no register spills for any kernel in csrc/*.cu, for every built arch;
  * CMake falls back to a pure-Python build (CUDA_BUILT False) when no CUDA compiler exists,
    and honours LLAMA_KERNELS_CUDA_ARCHS.
Numerical correctness on a GPU is tested elsewhere.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
if NVCC is None:
    pytest.skip(
        "nvcc is not on PATH: llama_kernels._C is not built on this machine (pure-Python install)",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
DEFAULT_ARCHS = ["80", "89", "90a"]
# Mirrors the CUDA flags in CMakeLists.txt (Release adds -O3 -DNDEBUG).
NVCC_FLAGS = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-std=c++17"]
# Mangled template arguments of add_rms_norm_kernel<T, kVecsPerThread, kFp8Out>.
KERNEL_RE = re.compile(r"add_rms_norm_kernelI(f|6__half|13__nv_bfloat16)Li(\d+)ELb([01])E")
DTYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}


# --------------------------------------------------------------------------- helpers


def _installed_file(pattern: str) -> Path | None:
    """A file of the installed llama-kernels distribution (glob on its RECORD path)."""
    try:
        dist = importlib.metadata.distribution("llama-kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if fnmatch.fnmatch(str(f), pattern):
            return Path(dist.locate_file(f))
    return None


def _load_from(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Built:
    def __init__(self, C, info):
        self.C, self.info = C, info
        self.so = Path(C.__file__)
        self.archs = list(info.CUDA_ARCHS)


@pytest.fixture(scope="module")
def built() -> Built:
    try:
        info = importlib.import_module("llama_kernels._build_info")
    except ImportError:
        # `llama_kernels` may resolve to the source tree, which has no build products.
        path = _installed_file("llama_kernels/_build_info.py")
        if path is None:
            pytest.fail("llama_kernels is not installed (no _build_info.py): run `pip install .`")
        info = _load_from("llama_kernels._build_info", path)
    assert info.CUDA_BUILT, (
        f"nvcc is on PATH ({NVCC}) but the installed build has no CUDA extension: {info.REASON!r}; "
        "reinstall with `pip install .`"
    )
    try:
        C = importlib.import_module("llama_kernels._C")
    except ImportError as e:
        path = _installed_file("llama_kernels/_C*.so")
        if path is None:
            pytest.fail(f"llama_kernels._C cannot be imported ({e}) and is not in the installed package")
        C = _load_from("llama_kernels._C", path)
    return Built(C, info)


def _arch_num(arch: str) -> int:
    return int(re.match(r"\d+", arch).group())


# --------------------------------------------------------------------------- build info, import


def test_build_info_matches_extension(built):
    info, C = built.info, built.C
    assert isinstance(info.CUDA_ARCHS, list) and info.CUDA_ARCHS, info.CUDA_ARCHS
    assert all(re.fullmatch(r"\d+[af]?", a) for a in info.CUDA_ARCHS), info.CUDA_ARCHS
    assert C.compiled_archs() == info.CUDA_ARCHS
    assert info.REASON == ""
    m = re.fullmatch(r"(\d+)\.(\d+)\.\d+", info.CUDA_COMPILER_VERSION)
    assert m, info.CUDA_COMPILER_VERSION
    # The statically linked runtime comes from the same toolkit as the compiler.
    assert C.cuda_runtime_version() == int(m.group(1)) * 1000 + int(m.group(2)) * 10


def test_links_cudart_statically_and_not_torch(built):
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed")
    out = subprocess.run([readelf, "-d", str(built.so)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert needed, out
    for lib in needed:
        assert not re.match(r"lib(cudart|cuda|torch|c10|nvrtc)", lib), f"_C depends on {lib}: {needed}"


def test_import_does_not_touch_the_driver(built):
    """Import + metadata calls + argument validation must not load libcuda (lazy driver)."""
    code = r"""
import sys, importlib.util
spec = importlib.util.spec_from_file_location("llama_kernels._C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
archs = C.compiled_archs()
C.add_rms_norm(0, 0, 0, 0, 0, 0, 4096, 1e-6, 2, 0)  # rows == 0: a validated no-op
try:
    C.add_rms_norm_fp8(256, 0, 256, 256, 256, 0, 3, 577, 1e-6, 0.0, 2, 0)
except RuntimeError:
    pass
with open("/proc/self/maps") as f:
    maps = f.read()
print("LIBCUDA_LOADED" if "libcuda.so" in maps else "NO_LIBCUDA", ",".join(archs))
"""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-c", code, str(built.so)], capture_output=True, text=True,
                       env=env, cwd="/", timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["NO_LIBCUDA", ",".join(built.archs)], p.stdout


# --------------------------------------------------------------------------- launcher validation


def _raises(fn, *args) -> str:
    with pytest.raises(RuntimeError) as e:
        fn(*args)
    return str(e.value)


def test_rejects_unsupported_configs(built):
    C = built.C
    A = 1 << 20  # a 16-byte aligned fake device address: nothing is launched for bad arguments
    msg = _raises(C.add_rms_norm_fp8, A, 0, A, A, A, 0, 3, 577, 1e-6, 0.0, 2, 0)
    assert msg == ("add_rms_norm_fp8: invalid argument (rows=3, hidden=577, dtype=bfloat16): "
                   "hidden must be a multiple of 8")
    msg = _raises(C.add_rms_norm, A, 0, A, A, 0, 2, 4096, 1e-6, 7, 0)
    assert msg == ("add_rms_norm: invalid argument (rows=2, hidden=4096, dtype=7): "
                   "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)")
    cases = [
        # (kernel, args, reason)
        ("add_rms_norm", (A + 8, 0, A, A, 0, 2, 4096, 1e-6, 1, 0), "x must be 16-byte aligned"),
        ("add_rms_norm", (A, A + 4, A, A, 0, 2, 4096, 1e-6, 1, 0), "residual must be 16-byte aligned"),
        ("add_rms_norm", (A, 0, A, A, A + 2, 2, 4096, 1e-6, 1, 0), "residual_out must be 16-byte aligned"),
        ("add_rms_norm", (A, 0, A, 0, 0, 2, 4096, 1e-6, 1, 0), "y must not be null"),
        ("add_rms_norm", (A, 0, A, A, 0, 2, 32776, 1e-6, 2, 0), "hidden must be <= 32768 for float16/bfloat16"),
        ("add_rms_norm", (A, 0, A, A, 0, 2, 16392, 1e-6, 0, 0), "hidden must be <= 16384 for float32"),
        ("add_rms_norm", (A, 0, A, A, 0, 2, 0, 1e-6, 0, 0), "hidden must be positive"),
        ("add_rms_norm_fp8", (A, 0, A, A, 0, 0, 2, 4096, 1e-6, 0.0, 2, 0), "y_scale must not be null"),
        ("add_rms_norm_fp8", (A, 0, A, A + 4, A, 0, 2, 4096, 1e-6, 0.0, 2, 0), "yq must be 8-byte aligned"),
        ("add_rms_norm_fp8", (A, 0, A, A, A + 2, 0, 2, 4096, 1e-6, 0.0, 0, 0), "y_scale must be 4-byte aligned"),
    ]
    for kernel, args, reason in cases:
        msg = _raises(getattr(C, kernel), *args)
        assert msg.startswith(f"{kernel}: invalid argument (rows=") and msg.endswith(": " + reason), msg
    # rows == 0 is a no-op that needs no pointers (and no GPU); the largest hidden sizes are accepted.
    assert C.add_rms_norm(0, 0, 0, 0, 0, 0, 32768, 1e-6, 2, 0) is None
    assert C.add_rms_norm_fp8(0, 0, 0, 0, 0, 0, 0, 16384, 1e-6, 0.0, 0, 0) is None


def test_launch_error_is_reported_without_a_gpu(built):
    """With valid arguments the launch itself fails on a machine without a GPU: cudaGetLastError
    after the launch is checked and turned into a RuntimeError naming the kernel and shapes."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this test would launch on fake pointers")
    A = 1 << 20
    msg = _raises(built.C.add_rms_norm, A, A, A, A, A, 2, 4096, 1e-6, 1, 0)
    assert msg.startswith("add_rms_norm: ") and "(rows=2, hidden=4096, dtype=float16)" in msg, msg
    assert "invalid argument" not in msg, msg
    msg = _raises(built.C.add_rms_norm_fp8, A, 0, A, A, A, 0, 5, 576, 1e-6, 1.0, 2, 0)
    assert msg.startswith("add_rms_norm_fp8: ") and "(rows=5, hidden=576, dtype=bfloat16)" in msg, msg


# --------------------------------------------------------------------------- SASS


def _cuobjdump_candidates() -> list[str]:
    cands = [shutil.which("cuobjdump"), str(Path(NVCC).resolve().parent / "cuobjdump"),
             "/usr/local/cuda/bin/cuobjdump"]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        cands.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    seen = []
    for c in cands:
        if c and os.access(c, os.X_OK) and c not in seen:
            seen.append(c)
    return seen


@pytest.fixture(scope="module")
def sass(built) -> dict[str, dict[str, str]]:
    """{arch: {function name: SASS text}} of the built .so."""
    out, errors = _disassemble(str(built.so))
    if out is None:
        pytest.skip("no working cuobjdump (PATH, CUDA toolkit or triton wheel): " + "; ".join(errors or ["none found"]))
    return out


@functools.cache
def _disassemble(so: str) -> tuple[dict[str, dict[str, str]] | None, list[str]]:
    """cuobjdump -sass of the .so, parsed once per test session (every kernel family's tests read it)."""
    errors = []
    for tool in _cuobjdump_candidates():
        p = subprocess.run([tool, "-sass", so], capture_output=True, text=True, timeout=300)
        if p.returncode == 0 and "Function :" in p.stdout:
            out: dict[str, dict[str, str]] = {}
            arch, func = None, None
            for line in p.stdout.splitlines():
                m = re.match(r"\s*arch = (sm_\w+)", line)
                if m:
                    arch, func = m.group(1), None
                    out.setdefault(arch, {})
                    continue
                m = re.match(r"\s*Function : (\S+)", line)
                if m and arch:
                    func = m.group(1)
                    out[arch][func] = ""
                    continue
                if func:
                    out[arch][func] += line + "\n"
            return out, errors
        errors.append(f"{tool}: rc={p.returncode} {p.stderr.strip()[:200]}")
    return None, errors


def test_sass_has_every_kernel_for_every_arch(built, sass):
    assert sorted(sass) == sorted(f"sm_{a}" for a in built.archs)
    for arch, funcs in sass.items():
        kernels = {KERNEL_RE.search(f).groups(): body for f, body in funcs.items() if KERNEL_RE.search(f)}
        variants = {(DTYPES[t], fp8) for t, _, fp8 in kernels}
        assert variants == {(d, fp8) for d in DTYPES.values() for fp8 in "01"}, (arch, sorted(variants))
        for (t, vpt, fp8), body in kernels.items():
            where = f"{arch} add_rms_norm_kernel<{DTYPES[t]}, {vpt}, fp8={fp8}>"
            assert re.search(r"\bLDG\.E[.\w]*\.128\b", body), f"{where}: no 16-byte vector load"
            assert re.search(r"\bSTG\.E[.\w]*\.128\b", body), f"{where}: no 16-byte vector store"
            assert not re.search(r"\b(LDL|STL)\b", body), f"{where}: uses local memory (spills)"


def test_sass_fp8_uses_hardware_convert(built, sass):
    # sm_89+ has F2FP.SATFINITE.E4M3.F32.PACK_AB(_MERGE_C): two floats -> two saturated e4m3 bytes.
    f2fp = re.compile(r"\bF2FP\.SATFINITE\.E4M3\.F32\.PACK_AB")
    checked = 0
    for arch, funcs in sass.items():
        for f, body in funcs.items():
            m = KERNEL_RE.search(f)
            if not m:
                continue
            t, vpt, fp8 = m.groups()
            where = f"{arch} add_rms_norm_kernel<{DTYPES[t]}, {vpt}, fp8={fp8}>"
            n = len(f2fp.findall(body))
            if fp8 == "0":
                assert "E4M3" not in body, where
            elif _arch_num(arch[3:]) >= 89:
                # kElems e4m3 per 16-byte vector, 2 per instruction: at least one per vector.
                assert n >= int(vpt), f"{where}: {n} F2FP...E4M3 instructions"
                checked += 1
            else:
                assert n == 0, f"{where}: sm_80 has no FP8 convert instruction"
    if any(_arch_num(a) >= 89 for a in built.archs):
        assert checked >= 3, "no FP8 kernel for sm_89+ found"


# --------------------------------------------------------------------------- ptxas spills


def _ptxas_report(src: Path, archs: list[str]) -> str:
    """`ptxas -v` output of one source for the given archs (compiled once per test session: the
    spill tests of every kernel family share it)."""
    return _ptxas_log(Path(src), tuple(archs))


@functools.cache
def _ptxas_log(src: Path, archs: tuple[str, ...]) -> str:
    outdir = Path(tempfile.mkdtemp(prefix="llama-kernels-ptxas-"))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [NVCC, "--fatbin", *NVCC_FLAGS, "-Xptxas=-v", *gencode, f"-I{CSRC}", str(src),
           "-o", str(outdir / (src.stem + ".fatbin"))]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    shutil.rmtree(outdir, ignore_errors=True)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


@functools.cache
def ptx(src: Path, arch: str) -> str:
    """The PTX nvcc generates for one source and one virtual arch ("89", "90a"), once per session."""
    outdir = Path(tempfile.mkdtemp(prefix="llama-kernels-ptx-"))
    out = outdir / (Path(src).stem + ".ptx")
    cmd = [NVCC, "-ptx", *NVCC_FLAGS, f"-arch=compute_{arch}", f"-I{CSRC}", str(src), "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr[-4000:]}"
    text = out.read_text()
    shutil.rmtree(outdir, ignore_errors=True)
    return text


def ptx_entries(text: str) -> dict[str, str]:
    """Kernel name -> its PTX body."""
    parts = re.split(r"^\.visible \.entry (\S+)\(", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _parse_ptxas(log: str) -> list[dict]:
    """One entry per (function, arch): registers, stack, spill stores/loads."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            cur = {"func": m.group(1), "arch": m.group(2)}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


def test_no_register_spills(built):
    archs = built.archs or DEFAULT_ARCHS
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no CUDA sources in {CSRC}"
    with ThreadPoolExecutor(max_workers=2) as pool:
        logs = list(pool.map(lambda s: _ptxas_report(s, archs), sources))
    entries = [e for log in logs for e in _parse_ptxas(log)]
    kernels = [e for e in entries if KERNEL_RE.search(e["func"])]
    assert len(kernels) >= 6 * len(archs), f"expected add_rms_norm kernels for {archs}, got {len(kernels)}"
    for e in entries:
        assert {"registers", "spill_stores", "spill_loads"} <= e.keys(), e
        assert e["spill_stores"] == 0 and e["spill_loads"] == 0, f"register spill: {e}"
    for e in kernels:
        print(f"{e['arch']:7s} {e['func'][:90]} regs={e['registers']} stack={e['stack']}")


# --------------------------------------------------------------------------- CMake configure paths


def _cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    ver = tuple(int(x) for x in re.search(r"version (\d+)\.(\d+)", out).groups())
    if ver < (3, 26):
        pytest.skip(f"cmake {ver} is older than the 3.26 CMakeLists.txt needs (pip install cmake)")
    return cmake


def _read_build_info(path: Path) -> dict:
    ns: dict = {}
    exec(path.read_text(), ns)
    return {k: ns[k] for k in ("CUDA_BUILT", "CUDA_ARCHS", "CUDA_COMPILER_VERSION", "REASON", "CHECKED",
                               "SOURCES_SHA256")}


def test_cmake_without_cuda_compiler_still_configures(tmp_path):
    cmake = _cmake()
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "LLAMA_KERNELS_CUDA_ARCHS")}
    env["LLAMA_KERNELS_CHECKED"] = "1"  # asked for, but with no kernels built nothing is checked
    build, prefix = tmp_path / "build", tmp_path / "prefix"
    p = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), "-DCMAKE_CUDA_COMPILER=/nonexistent/nvcc"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "not building the CUDA extension _C" in p.stderr, p.stderr
    p = subprocess.run([cmake, "--install", str(build), "--prefix", str(prefix)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    installed = sorted(str(f.relative_to(prefix)) for f in prefix.rglob("*") if f.is_file())
    assert installed == ["llama_kernels/_build_info.py"], installed
    info = _read_build_info(prefix / "llama_kernels" / "_build_info.py")
    assert info["CUDA_BUILT"] is False and info["CUDA_ARCHS"] == [] and info["CUDA_COMPILER_VERSION"] == ""
    assert info["CHECKED"] is False and info["SOURCES_SHA256"] == ""
    assert "no CUDA compiler (nvcc) was found" in info["REASON"], info


def test_cmake_arch_override(tmp_path):
    """LLAMA_KERNELS_CUDA_ARCHS=90a gives SASS for sm_90a only (configure only, no compile)."""
    cmake = _cmake()
    import pybind11

    env = {k: v for k, v in os.environ.items() if k != "LLAMA_KERNELS_CHECKED"}
    env["LLAMA_KERNELS_CUDA_ARCHS"] = "90a"
    build = tmp_path / "build"
    p = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
                        "-DCMAKE_BUILD_TYPE=Release"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    info = _read_build_info(build / "llama_kernels" / "_build_info.py")
    assert info["CUDA_BUILT"] is True and info["CUDA_ARCHS"] == ["90a"] and info["REASON"] == "", info
    assert info["CHECKED"] is False, info  # the default: not a checked build
    # the digest of the sources (part of backends.code_id("cuda")): csrc/, python/*.cpp, CMakeLists.txt
    assert re.fullmatch(r"[0-9a-f]{64}", info["SOURCES_SHA256"]), info
    flags = "\n".join(f.read_text() for f in build.rglob("*") if f.name in ("build.ninja", "flags.make"))
    assert "arch=compute_90a,code=[sm_90a]" in flags, flags[:2000]
    assert "sm_80" not in flags and "sm_89" not in flags
    assert "LLAMA_KERNELS_CHECKED" not in flags
    assert 'LLAMA_KERNELS_CUDA_ARCHS=\\"90a\\"' in flags or 'LLAMA_KERNELS_CUDA_ARCHS="90a"' in flags
    digest = info["SOURCES_SHA256"]
    # LLAMA_KERNELS_CHECKED=1 reaches the compile flags and _build_info.CHECKED (a reconfigure: seconds).
    p = subprocess.run([cmake, "-S", str(REPO), "-B", str(build)], capture_output=True, text=True,
                       env={**env, "LLAMA_KERNELS_CHECKED": "1"}, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    info = _read_build_info(build / "llama_kernels" / "_build_info.py")
    assert info["CUDA_BUILT"] is True and info["CHECKED"] is True, info
    assert info["SOURCES_SHA256"] == digest  # the same sources
    flags = "\n".join(f.read_text() for f in build.rglob("*") if f.name in ("build.ninja", "flags.make"))
    assert "-DLLAMA_KERNELS_CHECKED=1" in flags, flags[:2000]


def test_fp8_norm_quantizes_with_ieee_division_like_the_reference():
    """add_rms_norm_fp8 stores y / scale (div.rn.f32), as reference.quantize_fp8 does, not
    y * (1 / scale), which rounds differently at e4m3 rounding boundaries."""
    kernels = ptx_entries(ptx(CSRC / "add_rms_norm_fp8.cu", "89"))
    fp8 = {name: body for name, body in kernels.items() if KERNEL_RE.search(name).group(3) == "1"}
    assert fp8, list(kernels)
    for name, body in fp8.items():
        assert "rcp." not in body, name
        vecs = int(KERNEL_RE.search(name).group(2))
        elems = 4 if KERNEL_RE.search(name).group(1) == "f" else 8
        assert body.count("div.rn.f32") >= vecs * elems, name  # one per element (plus the scale's)
