"""One-shot validation of llama-kernels on a fresh Hopper GPU (H100 / H200) with no network.

    bash benchmarks/gpu_check.sh OUTDIR [--dry-run | --smoke]      (python3 benchmarks/gpu_check.py ...)

Runs the steps of `plan()` in order, each in its own process group with its own time limit, so a
faulting or hanging kernel costs only its own step: at the limit minus GRACE_S the step gets SIGINT
(pytest then writes its summary and junit XML, a benchmark keeps the JSON it rewrote after every
case, the selftest its record), SIGTERM TERM_S before the limit, SIGKILL at it. The order is proof per
second: the environment and the build (which fails unless `import llama_kernels._C` works and the
extension holds sm_90a code), then correctness (Triton, the default dispatch, before CUDA; the CUDA
op groups one process each; the sm_90a TMA/wgmma FP8 GEMM last), then speed (8B FP8 and INT4 end
to end, then the kernel benchmarks). The step limits sum to at most BUDGET_S (420 s, from a cold
start on one H100); a step never runs past what is left of the budget.

OUTDIR gets each step's log (<step>.log) and the files it writes, validated.json (the selftest
record dispatch reads: copy it to ~/.cache/llama-kernels/ to use it), and results.json and
summary.txt, both rewritten after every step: device, driver, versions, the build, and each step's
status (ok / failed / cut / skipped), seconds and key figures. Exit status 0 when every step passed.

--dry-run prints the plan (steps, limits, commands, files, the build and checked-build decisions)
and writes nothing. --smoke runs every step's command on the CPU with small shapes (the CI
rehearsal, tests/test_gpu_check.py): every flag is parsed and every file is written.

This driver needs only the standard library: it runs even where torch does not import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 420  # the whole run, from a cold start on one H100 (the lease is ~15 min, machine start included)
GRACE_S = 8  # SIGINT this long before a step's limit (pytest writes its junit XML and summary)
TERM_S = 2  # SIGTERM this long before it; SIGKILL at the limit
MIN_STEP_S = 5  # a step with less time left than this (or than its own limit, if smaller) is skipped
SMOKE_LIMIT_S = 120  # each step's limit in --smoke runs (CPU, Triton interpreter)
BUILD_FROM_SOURCE_S = 75  # cmake + nvcc of _C for sm_90a on 16 cores (the largest TU, fp8_gemm.cu, ~25-45 s)
BUILD_FROM_WHEEL_S = 25  # pip install of a prebuilt wheel, then the import check
COMPILE_WORKERS = 16  # the GPU machine's cores: the selftest compiles its Triton specializations in a pool
ITERS = 20  # timed runs per benchmark configuration (median)

# The test files holding `gpu` tests, by step (tests/test_gpu_check.py checks that none is left out). They are
# named, not collected from tests/: the GPU image lacks fastapi/gguf, which some other test modules import.
PYTEST_TRITON = ("test_triton_attention.py", "test_prefill_attention.py", "test_attention_plan.py", "test_backends.py")
PYTEST_CUDA = ("test_gpu_norm.py", "test_gpu_rope.py", "test_gpu_attention.py", "test_gpu_gemm.py",
               "test_gpu_generate.py", "test_speculative.py", "test_selftest.py")  # fmt: skip
PYTEST_FP8_GEMM = ("test_gpu_gemm.py",)
NORM_ROPE_OPS = ("quantize_fp8", "rms_norm", "add_rms_norm", "add_rms_norm_fp8", "rope_and_cache")


@dataclass
class Step:
    """One process of the run."""

    name: str
    phase: str  # setup, correctness or speed
    argv: list[str]
    limit_s: int  # wall-clock limit: SIGINT at limit - GRACE_S, SIGTERM at limit - TERM_S, SIGKILL at limit
    writes: tuple[str, ...] = ()  # files it writes in OUTDIR (besides <name>.log)
    smoke: tuple[str, ...] = ()  # arguments appended in --smoke runs (small shapes, CPU)
    env: dict[str, str] = field(default_factory=dict)
    unless_cut: str | None = None  # skipped when this earlier step was cut at its limit (a hang would repeat)
    fallback: tuple[str, list[str]] | None = None  # (step, argv): run argv instead unless that step passed
    note: str = ""  # one line in the plan: why this step is shaped so


@dataclass
class Plan:
    steps: list[Step]
    notes: list[str]  # the build and checked-build decisions, steps dropped to fit the budget

    @property
    def total_s(self) -> int:
        return sum(s.limit_s for s in self.steps)


# --- the build: which wheel, and the check that it is the real thing -------------------------------


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def find_wheel(wheel_dir: Path) -> Path | None:
    """The llama_kernels wheel in wheel_dir built for this Python (cpXY), or None."""
    tag = python_tag()
    found = sorted(wheel_dir.glob(f"llama_kernels-*-{tag}-{tag}-*.whl")) if wheel_dir.is_dir() else []
    return found[-1] if found else None


def stale_files(wheel: Path, repo: Path = REPO) -> list[str]:
    """The package's .py files whose text differs between the wheel and the source tree (or that only
    one has): a wheel built from other sources would test other code."""
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {n: z.read(n) for n in z.namelist() if n.startswith("llama_kernels/") and n.endswith(".py")}
    in_wheel.pop("llama_kernels/_build_info.py", None)  # generated by the build
    in_tree = {p.relative_to(repo).as_posix(): p.read_bytes() for p in (repo / "llama_kernels").rglob("*.py")}
    in_tree.pop("llama_kernels/_build_info.py", None)
    return sorted(n for n in in_wheel.keys() | in_tree.keys() if in_wheel.get(n) != in_tree.get(n))


def usable_wheel(wheel_dir: Path) -> tuple[Path | None, str]:
    """(the wheel to install, or None to build from source; why, in one line)."""
    wheel = find_wheel(wheel_dir)
    if wheel is None:
        return None, f"no llama_kernels wheel for {python_tag()} in {wheel_dir}"
    stale = stale_files(wheel)
    if stale:
        return None, f"{wheel.name} was built from other sources ({len(stale)} files differ, e.g. {stale[0]})"
    return wheel, f"prebuilt wheel {wheel}"


def verify_build(info: dict, checked: bool = False) -> str | None:
    """Why the installed build is not the one to validate (None when it is): `info` is what
    VERIFY_SNIPPET printed."""
    if info.get("import_error"):
        return f"import llama_kernels._C failed: {info['import_error']}"
    archs = info.get("archs") or []
    if "90a" not in archs:
        return f"the extension holds no sm_90a code (archs {archs or 'none'}; built with LLAMA_KERNELS_CUDA_ARCHS=90a?)"
    if info.get("sm90_unavailable"):
        return f"the sm_90a GEMM cannot run on this GPU: {info['sm90_unavailable']}"
    if checked and not info.get("checked"):
        return "expected a checked build (LLAMA_KERNELS_CHECKED=1): _build_info.CHECKED is not True"
    return None


VERIFY_SNIPPET = """
import json
info = {}
try:
    import llama_kernels
    info["package"] = llama_kernels.__file__
    import llama_kernels._C as C
    from llama_kernels import _build_info as b
    info.update(archs=[str(a) for a in C.compiled_archs()], build_info_archs=list(b.CUDA_ARCHS),
                checked=bool(getattr(b, "CHECKED", False)))
    import torch
    if torch.cuda.is_available():  # the extension's own check that the code loaded here is the real sm_90a kernel
        from llama_kernels.cuda import fp8_gemm
        info["sm90_unavailable"] = fp8_gemm.sm90_unavailable(0) if torch.cuda.get_device_capability(0) == (9, 0) else None
except Exception as err:
    info["import_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(info))
"""


def run_build(out_json: Path, wheel_dir: Path, target: Path | None, checked: bool, smoke: bool) -> int:
    """The build step: install the prebuilt wheel from wheel_dir, else build from source with every
    core (not for a checked build: that one only ever comes prebuilt), then check the import in a fresh
    process outside the source tree. Writes out_json; exit 1 unless the check passed. --smoke: the
    pip command is printed, not run, and a failed check is only reported."""
    wheel, why = usable_wheel(wheel_dir)
    env = dict(os.environ)
    if wheel is not None:
        # the other packages carried as wheels (e.g. gguf, fastapi), not our wheels for other Pythons
        extra = [] if checked else [str(w) for w in sorted(wheel_dir.glob("*.whl")) if not w.name.startswith("llama_kernels-")]
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--force-reinstall",
               "--find-links", str(wheel_dir), str(wheel), *extra]  # fmt: skip
    elif checked:
        print(f"no checked wheel: {why}")
        return 1
    else:
        cores = str(os.cpu_count() or 8)
        env.update(LLAMA_KERNELS_CUDA_ARCHS="90a", CMAKE_BUILD_PARALLEL_LEVEL=cores)
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", str(REPO)]
    if target is not None:
        cmd[4:4] = ["--target", str(target)]
    print(f"# build from {'the ' + why if wheel else 'source (' + why + ')'}\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    rc = 0 if smoke else subprocess.call(cmd, env=env)
    seconds = time.monotonic() - t0
    venv = dict(os.environ)
    if target is not None:
        venv["PYTHONPATH"] = str(target)
    done = subprocess.run([sys.executable, "-c", VERIFY_SNIPPET], capture_output=True, text=True, env=venv,
                          cwd=out_json.parent)  # fmt: skip
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"import_error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    error = f"pip install exited {rc}" if rc else verify_build(info, checked)
    result = {"source": "wheel" if wheel else "source", "wheel": wheel.name if wheel else None, "why": why,
              "command": shlex.join(cmd), "seconds": round(seconds, 1), "checked": checked, "smoke": smoke,
              "installed": "package" in info, **info, "error": error}  # fmt: skip
    out_json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if error:
        print(f"{'(smoke) ' if smoke else ''}build check: {error}")
    return 1 if error and not smoke else 0


def write_environment(path: Path) -> int:
    """The environment step: GPU, driver, versions, as JSON to `path` (imports torch: its own process)."""

    def output(cmd: list[str]) -> str | None:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return done.stdout.strip() if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    env: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    smi = output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"])
    if smi:
        env.update(zip(("gpu", "driver", "gpu_memory", "max_sm_clock"), (v.strip() for v in smi.splitlines()[0].split(","))))
    nvcc = output(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    for module in ("torch", "triton", "numpy", "pytest"):
        try:
            env[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 (recorded: the steps that need it will fail and say so)
            env[module] = f"not importable: {type(err).__name__}"
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                       memory_gib=round(p.total_memory / 2**30, 1))  # fmt: skip
        else:
            env["device"] = "no CUDA GPU visible"
    except Exception as err:  # noqa: BLE001
        env["device"] = f"torch failed: {type(err).__name__}: {err}"
    path.write_text(json.dumps(env, indent=1))
    print(json.dumps(env, indent=1))
    return 0


# --- the plan -------------------------------------------------------------------------------------


def plan(out: Path, wheel_dir: Path, py: str = sys.executable) -> Plan:
    """The steps for this machine's state (which wheels are in wheel_dir), their limits summing to at
    most BUDGET_S: building from source costs more than installing a wheel, so it drops the last
    (least informative) benchmarks."""
    me = str(Path(__file__).resolve())
    tests, bench = REPO / "tests", REPO / "benchmarks"
    notes = []
    wheel, why = usable_wheel(wheel_dir)
    checked_wheel, checked_why = usable_wheel(wheel_dir / "checked")
    notes.append(f"build: {'installs the ' + why if wheel else 'from source with every core, ' + str(BUILD_FROM_SOURCE_S) + ' s (' + why + ')'}")

    def selftest(name: str, backends: str, ops: tuple[str, ...], limit: int, compile_workers: bool = False, **kw) -> Step:
        argv = [py, "-m", "llama_kernels", "selftest", "--backends", backends, "--json", str(out / f"{name}.json")]
        argv += ["--compile-workers", str(COMPILE_WORKERS)] if compile_workers else []
        for op in ops:
            argv += ["--op", op]
        return Step(name, "correctness", argv, limit, (f"{name}.json",), **kw)

    def pytest(name: str, files: tuple[str, ...], limit: int, select: str | None = None, **kw) -> Step:
        argv = [py, "-m", "pytest", *(str(tests / f) for f in files), "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                f"--junitxml={out / (name + '.xml')}"]  # fmt: skip
        if select:
            argv += ["-k", select]
        return Step(name, "correctness", argv, limit, (f"{name}.xml",), **kw)

    def benchmark(name: str, script: str, limit: int, *args: str, smoke: tuple[str, ...] = (), **kw) -> Step:
        argv = [py, str(bench / script), *args, "--out", str(out / f"{name}.json")]
        return Step(name, "speed", argv, limit, (f"{name}.json",), smoke=("--smoke", *smoke), **kw)

    kernels = ("--backends", "cuda,triton", "--iters", str(ITERS))
    generate = ("--preset", "llama-3.1-8b", "--batch-sizes", "1,8", "--prompt-len", "128", "--new-tokens", "64",
                "--repeat", "2")  # fmt: skip
    small_generate = ("--batch-sizes", "1", "--prompt-len", "16", "--new-tokens", "4", "--repeat", "1")
    steps = [
        Step("environment", "setup", [py, me, "--environment", str(out / "environment.json")], 15, ("environment.json",)),
        Step("build", "setup", [py, me, "--build", str(out / "build.json"), "--wheels", str(wheel_dir)],
             BUILD_FROM_WHEEL_S if wheel else BUILD_FROM_SOURCE_S, ("build.json",), smoke=("--smoke",)),  # fmt: skip
    ]
    fp8_env = {}
    if checked_wheel is not None:
        site = out / "checked-site"
        steps.append(Step("build_checked", "setup", [py, me, "--build", str(out / "build_checked.json"), "--wheels",
                                                     str(wheel_dir / "checked"), "--target", str(site), "--checked"],
                          15, ("build_checked.json",), smoke=("--smoke",)))  # fmt: skip
        fp8_env = {"PYTHONPATH": str(site)}
        notes.append(f"checked build: pytest_cuda_fp8_gemm (the first step to launch the TMA/wgmma GEMM) runs the "
                     f"checked wheel ({checked_why}): a wrong mbarrier byte count traps with a message, not a hang")  # fmt: skip
    else:
        notes.append(f"checked build: not used ({checked_why}): building it here is a second full nvcc build "
                     f"(~{BUILD_FROM_SOURCE_S - 25} s on 16 cores) that the {BUDGET_S} s budget has no room for; "
                     "bring it prebuilt in .whl/checked/ (README)")  # fmt: skip
    steps += [
        selftest("selftest_triton", "triton", (), 55, smoke=("--op", "rms_norm"), compile_workers=True,
                 note=f"every op at full shapes; Triton specializations compiled by {COMPILE_WORKERS} workers first"),
        pytest("pytest_triton", PYTEST_TRITON, 25),
        selftest("selftest_cuda_norm_rope", "cuda", NORM_ROPE_OPS, 15),
        selftest("selftest_cuda_decode_attention", "cuda", ("decode_attention",), 15),
        selftest("selftest_cuda_int4_gemm", "cuda", ("int4_gemm",), 15),
        pytest("pytest_cuda", PYTEST_CUDA, 35, "not fp8_gemm", note="the FP8 GEMM (sm_90a path at M > 64) comes last"),
        pytest("pytest_cuda_fp8_gemm", PYTEST_FP8_GEMM, 25, "fp8_gemm", env=fp8_env,
               note="mma.sync and the sm_90a TMA/wgmma kernel" + (" (checked build)" if fp8_env else "")),
        selftest("selftest_cuda_fp8_gemm", "cuda", ("fp8_gemm",), 20, unless_cut="pytest_cuda_fp8_gemm",
                 note="records fp8_gemm:cuda for dispatch; skipped if the GEMM tests hung"),
        benchmark("generate_8b_fp8", "bench_generate.py", 30, *generate, "--quant", "fp8", smoke=small_generate,
                  note="random weights made on the GPU, CUDA graphs; tokens/s and % of the HBM roofline"),
        benchmark("generate_8b_int4", "bench_generate.py", 30, *generate, "--quant", "int4", smoke=small_generate),
        benchmark("bench_gemm", "bench_gemm.py", 30, *kernels, "--only", "^[a-z0-9_]+ 8B ", smoke=("--backends", "torch", "--only", " 1x"),
                  fallback=("selftest_cuda_fp8_gemm", [py, str(bench / "bench_gemm.py"), "--backends", "triton",
                                                       "--iters", str(ITERS), "--only", "^[a-z0-9_]+ 8B ",
                                                       "--out", str(out / "bench_gemm.json")]),
                  note="8B projections, M 1..4096; triton only unless selftest_cuda_fp8_gemm passed"),  # fmt: skip
        benchmark("bench_prefill", "bench_prefill.py", 30, *kernels, smoke=("--backends", "torch", "--only", "bfloat16")),
        benchmark("bench_attention", "bench_attention.py", 20, *kernels, smoke=("--backends", "torch")),
        benchmark("bench_norm_rope", "bench_norm_rope.py", 15, *kernels, smoke=("--backends", "torch")),
    ]
    dropped = []
    while sum(s.limit_s for s in steps) > BUDGET_S:
        dropped.insert(0, steps.pop().name)
    if dropped:
        notes.append(f"dropped to fit {BUDGET_S} s (the build from source takes {BUILD_FROM_SOURCE_S - BUILD_FROM_WHEEL_S} s "
                     f"more than a wheel): {', '.join(dropped)}")  # fmt: skip
    return Plan(steps, notes)


def print_plan(p: Plan, out: Path) -> None:
    print(f"# gpu_check plan: {len(p.steps)} steps, each in its own process group, output in {out}/<step>.log")
    print(f"# step limits sum to {p.total_s} s of the {BUDGET_S} s budget; SIGINT {GRACE_S} s before a step's "
          f"limit, SIGTERM {TERM_S} s before, SIGKILL at it")  # fmt: skip
    for note in p.notes:
        print(f"# {note}")
    print(f"{'phase':<12} {'step':<31} {'limit':>5}  command  -> files")
    for s in p.steps:
        env = "".join(f"{k}={shlex.quote(v)} " for k, v in s.env.items())
        print(f"{s.phase:<12} {s.name:<31} {s.limit_s:>4}s  {env}{shlex.join(s.argv)}"
              + (f"  -> {', '.join(s.writes)}" if s.writes else ""))  # fmt: skip
        if s.note:
            print(f"{'':<12} {'':<31} {'':>5}  # {s.note}")
    print(f"# total {p.total_s} s")


# --- running ----------------------------------------------------------------------------------------


def run_limited(argv: list[str], limit_s: float, log: Path, cwd: Path, env: dict) -> tuple[int | None, bool]:
    """Run argv in its own process group, output to log; (exit code, cut at the limit)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + limit_s
        cut = False
        try:
            for sig, before in ((signal.SIGINT, min(GRACE_S, limit_s / 3)), (signal.SIGTERM, min(TERM_S, limit_s / 10)),
                                (signal.SIGKILL, 0)):  # fmt: skip
                try:
                    return proc.wait(timeout=max(0.0, deadline - before - time.monotonic())), cut
                except subprocess.TimeoutExpired:
                    cut = True
                    with _quiet():
                        os.killpg(proc.pid, sig)
            return proc.wait(), cut
        finally:  # the driver itself interrupted: take the step's processes with it
            if proc.poll() is None:
                with _quiet():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class _quiet:
    """Ignore a process group that is already gone."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is ProcessLookupError or kind is PermissionError


def figures(step: Step, out: Path) -> dict:
    """The key figures of a finished (or cut) step, from the files it wrote."""
    try:
        if step.name == "environment":
            return json.loads((out / "environment.json").read_text())
        if step.name.startswith("build"):
            b = json.loads((out / f"{step.name}.json").read_text())
            return {k: b.get(k) for k in ("source", "wheel", "archs", "checked", "seconds", "error")}
        path = out / step.writes[0] if step.writes else None
        if path is None or not path.exists():
            return {}
        if path.suffix == ".xml":
            return _junit(path)
        data = json.loads(path.read_text())
        if step.name.startswith("selftest"):
            return _selftest(data)
        if step.name.startswith("generate"):
            return {f"batch {r['batch']}": {"decode_tok_s": round(r["decode_tok_s"], 1),
                                            "pct_roofline": round(r["pct_roofline"], 1),
                                            "prefill_tok_s": round(r["prefill_tok_s"], 1)} for r in data["rows"]}  # fmt: skip
        return _bench(data) if isinstance(data, dict) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ET.ParseError) as err:
        return {"unreadable": f"{type(err).__name__}: {err}"}


def _junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = suite.attrib if suite is not None else {}
    bad = [f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    n = {k: int(a.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed_tests": bad[:10]}


def _selftest(rows: list[dict]) -> dict:
    checked = [r for r in rows if r.get("status") != "no kernel"]
    bad = [f"{r['op']} {r['backend']} {r.get('shape', '')}".strip() for r in checked if not r.get("passed")]
    return {"checks": len(checked), "passed": len(checked) - len(bad), "failed": bad[:10]}


def _bench(data: dict) -> dict:
    """Per op and implementation: the best TFLOP/s (or GB/s when the op does no FLOPs counted) over its
    cases; errors and skipped baselines; straggler ratios where measured."""
    best: dict[str, str] = {}
    score: dict[str, float] = {}
    for r in data.get("rows", []):
        key = f"{r['op']} {r['impl']}"
        if "time_us" in r:
            value, unit = (r["TFLOPps"], "TFLOP/s") if r.get("TFLOPps") else (r["GBps"], "GB/s")
            if value > score.get(key, -1):
                score[key], best[key] = value, f"{value:.1f} {unit} ({r['shape']})"
    out: dict = {"rows": len(data.get("rows", [])), "best": best}
    errors = [f"{r['op']} {r['shape']} {r['impl']}: {r['error']}" for r in data.get("rows", []) if "error" in r]
    if errors:
        out["errors"] = errors[:10]
    skipped = sorted({f"{r['impl']}: {r['skipped']}" for r in data.get("rows", []) if "skipped" in r})
    if skipped:
        out["skipped"] = skipped[:10]
    if "straggler" in data:
        out["straggler_ratio"] = {f"{s['impl']} {s['mix']}": round(s["straggler_ratio"], 2) for s in data["straggler"]}
    return out


def _commit() -> str:
    """The source tree's commit, '?' where there is no git or no .git (a copied tree)."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


def write_results(out: Path, results: dict) -> None:
    """results.json and summary.txt, each replaced in one rename."""
    for name, text in (("results.json", json.dumps(results, indent=1)), ("summary.txt", summary(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def summary(r: dict) -> str:
    env = r.get("environment", {})
    lines = [f"llama-kernels gpu_check  {r['started']}  commit {r['commit']}  {'(smoke) ' if r['smoke'] else ''}"
             f"{'finished' if r['finished'] else 'running'} after {r['elapsed_s']:.0f} s of {r['budget_s']} s",
             f"device {env.get('device', '?')} (capability {env.get('capability', '?')}, {env.get('sms', '?')} SMs, "
             f"{env.get('memory_gib', '?')} GiB)  driver {env.get('driver', '?')}",
             f"python {env.get('python', '?')}  torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')})  "
             f"triton {env.get('triton', '?')}  numpy {env.get('numpy', '?')}  {env.get('nvcc') or 'no nvcc'}"]  # fmt: skip
    for s in r["steps"]:
        line = f"{s['name']:<31} {s['status']:<8} {s.get('seconds', 0):5.0f}/{s['limit_s']:<4}s"
        fig = s.get("figures") or {}
        if s["name"] == "environment":
            fig = {}
        elif "best" in fig:
            fig = {**fig["best"], **({"errors": len(fig["errors"])} if "errors" in fig else {}),
                   **fig.get("straggler_ratio", {})}  # fmt: skip
        if fig:
            line += "  " + "; ".join(f"{k}: {v}" for k, v in fig.items() if v not in (None, [], {}))
        if s.get("why"):
            line += f"  ({s['why']})"
        lines.append(line)
    failed = [s["name"] for s in r["steps"] if s["status"] not in ("ok", "pending")]
    lines.append(f"FAILED steps: {' '.join(failed)}" if failed else "all steps passed" if r["finished"] else "")
    return "\n".join(lines) + "\n"


def step_env(out: Path, smoke: bool) -> dict[str, str]:
    """The environment every step runs in (a step's own `env` goes on top)."""
    # PIP_NO_INDEX: there is no network there; pip (the build, the tests' default-model lookup) fails at once
    # instead of retrying a registry it cannot reach.
    env = {**os.environ, "LLAMA_KERNELS_VALIDATED": str(out / "validated.json"), "PYTHONUNBUFFERED": "1",
           "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # the CPU's Triton (the selftest would re-exec itself to set it)
    return env


def execute(p: Plan, out: Path, smoke: bool) -> int:
    """Run the plan; results.json and summary.txt after every step. Exit status 0 when every step passed."""
    out.mkdir(parents=True, exist_ok=True)
    start, t0 = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    base_env = step_env(out, smoke)
    results = {"started": start.isoformat(timespec="seconds"), "commit": _commit(), "budget_s": BUDGET_S,
               "smoke": smoke, "plan": p.notes, "finished": False, "elapsed_s": 0.0, "environment": {},
               "steps": [{"name": s.name, "phase": s.phase, "limit_s": s.limit_s, "status": "pending",
                          "command": shlex.join(s.argv)} for s in p.steps]}  # fmt: skip
    by_name: dict[str, dict] = {}
    write_results(out, results)
    for step, rec in zip(p.steps, results["steps"]):
        by_name[step.name] = rec
        left = BUDGET_S - (time.monotonic() - t0)
        limit = SMOKE_LIMIT_S if smoke else min(step.limit_s, left)
        argv, env = step.argv, {**base_env, **step.env}
        if step.unless_cut and by_name.get(step.unless_cut, {}).get("status") == "cut":
            rec.update(status="skipped", why=f"{step.unless_cut} was cut at its limit: the kernel would hang again")
        elif limit < min(MIN_STEP_S, step.limit_s):
            rec.update(status="skipped", why="time budget spent")
        else:
            if step.fallback and by_name.get(step.fallback[0], {}).get("status") != "ok":
                argv = step.fallback[1]
                rec.update(command=shlex.join(argv), why=f"{step.fallback[0]} did not pass: its fallback command")
            if smoke:
                argv = argv + list(step.smoke)
            build = by_name.get("build", {}).get("figures", {})
            if build and not build.get("installed", True) and "PYTHONPATH" not in env:
                env["PYTHONPATH"] = str(REPO)  # nothing installed: the source tree (Triton) still checks
            print(f"== {step.name} (limit {limit:.0f} s): {shlex.join(argv)}", flush=True)
            t = time.monotonic()
            try:
                rc, cut = run_limited(argv, limit, out / f"{step.name}.log", out, env)
            except KeyboardInterrupt:  # the driver itself stopped (Ctrl-C): its step's processes are gone too
                rec.update(status="interrupted", seconds=round(time.monotonic() - t, 1))
                results["elapsed_s"] = round(time.monotonic() - t0, 1)
                write_results(out, results)
                return 130
            rec.update(rc=rc, seconds=round(time.monotonic() - t, 1),
                       status="cut" if cut else "ok" if rc == 0 else "failed")  # fmt: skip
            rec["figures"] = figures(step, out)
            if step.name == "build" and (out / "build.json").exists():
                rec["figures"]["installed"] = json.loads((out / "build.json").read_text()).get("installed", False)
            if step.name == "environment":
                results["environment"] = rec["figures"]
            rec["files"] = [f for f in step.writes if (out / f).exists()]
            with _quiet():
                print("   " + "\n   ".join((out / f"{step.name}.log").read_text().strip().splitlines()[-3:]))
        print(f"== {step.name}: {rec['status']}" + (f" ({rec['why']})" if rec.get("why") else ""), flush=True)
        results["elapsed_s"] = round(time.monotonic() - t0, 1)
        write_results(out, results)
    results["finished"] = True
    write_results(out, results)
    print((out / "summary.txt").read_text())
    return 0 if all(s["status"] == "ok" for s in results["steps"]) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", help="where the logs, results.json and summary.txt go")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    mode.add_argument("--smoke", action="store_true", help="run every step's command on the CPU at small sizes (CI)")
    ap.add_argument("--build", metavar="JSON", help=argparse.SUPPRESS)  # the build step itself
    ap.add_argument("--environment", metavar="JSON", help=argparse.SUPPRESS)  # the environment step itself
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="prebuilt wheels (default: .whl/ in the repository)")
    ap.add_argument("--target", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checked", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.environment:
        return write_environment(Path(args.environment))
    if args.build:
        target = Path(args.target) if args.target else None
        return run_build(Path(args.build).resolve(), Path(args.wheels), target, args.checked, args.smoke)
    if not args.outdir:
        ap.error("OUTDIR is required")
    out = Path(args.outdir).resolve()
    p = plan(out, Path(args.wheels).resolve())
    if args.dry_run:
        print_plan(p, out)
        return 0
    print_plan(p, out)
    return execute(p, out, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
