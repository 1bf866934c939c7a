"""The CPU rehearsal of benchmarks/gpu_check.sh (the one-shot GPU run): its dry-run plan, its budget
with and without prebuilt wheels, the build check, the SIGINT-first time limits, every step's command
run in smoke mode, and the peak GPU memory of every benchmark case at full size."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
GPU_CHECK_SH = BENCH / "gpu_check.sh"
GiB = 1 << 30
MEMORY_LIMIT = 60 * GiB  # an 80 GB H100 with room for the CUDA context, the caching allocator and fragmentation


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")


def _sh(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_CHECK_SH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **env})  # fmt: skip


def _wheel(path: Path, tag: str, change: str | None = None) -> Path:
    """A stand-in wheel holding the source tree's package files (one of them edited when `change`)."""
    wheel = path / f"llama_kernels-0.1.0-{tag}-{tag}-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as z:
        for p in (REPO / "llama_kernels").rglob("*.py"):
            name = p.relative_to(REPO).as_posix()
            z.writestr(name, p.read_bytes() + (b"\n# edited\n" if name == change else b""))
        z.writestr("llama_kernels/_build_info.py", "CUDA_BUILT = True\n")
    return wheel


def test_dry_run_prints_the_plan_within_the_budget_and_writes_nothing(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_CHECK_SH)]).returncode == 0
    done = _sh(str(tmp_path / "out"), "--dry-run")
    assert done.returncode == 0, done.stderr
    total = int(re.search(r"step limits sum to (\d+) s of the 420 s budget", done.stdout).group(1))
    assert total <= 420 and f"# total {total} s" in done.stdout
    plan = gc.plan(tmp_path / "out", REPO / ".whl")
    assert total == plan.total_s
    for step in plan.steps:  # one line per step: phase, name, limit, the command
        assert re.search(rf"^\w+ +{step.name} +{step.limit_s}s  ", done.stdout, re.M), step.name
    assert "# build: " in done.stdout and "# checked build: " in done.stdout
    assert not (tmp_path / "out").exists()
    assert _sh().returncode == 2 and _sh("a", "b").returncode == 2  # OUTDIR required, one only


def test_steps_are_ordered_correctness_first_and_contained(tmp_path):
    steps = gc.plan(tmp_path, tmp_path / "no-wheels").steps
    names = [s.name for s in steps]
    phases = [s.phase for s in steps]
    assert phases == sorted(phases, key=["setup", "correctness", "speed"].index)  # correctness before speed
    assert names.index("selftest_triton") < names.index("selftest_cuda_norm_rope")  # Triton before CUDA
    assert names.index("pytest_triton") < names.index("pytest_cuda")
    sm90 = [n for n in names if "fp8_gemm" in n]  # the TMA/wgmma GEMM launches in these: the last correctness steps
    assert [n for n in names if steps[names.index(n)].phase == "correctness"][-len(sm90):] == sm90
    for step in steps:
        if "selftest" in step.name:
            assert step.argv[1:4] == ["-m", "llama_kernels", "selftest"] and "--bench" not in step.argv
        if step.name.startswith("bench_") or step.name.startswith("generate"):
            script = Path(step.argv[1]).name
            assert script != "bench_vs_transformers.py" and (BENCH / script).exists()
    assert "--compile-workers" in steps[names.index("selftest_triton")].argv
    cuda_groups = [s for s in steps if s.name.startswith("selftest_cuda")]  # one op group a process, all ops covered
    ops = [s.argv[i + 1] for s in cuda_groups for i, a in enumerate(s.argv) if a == "--op"]
    assert len(ops) == len(set(ops)) and set(ops) >= set(gc.NORM_ROPE_OPS) | {"decode_attention", "int4_gemm", "fp8_gemm"}


def test_the_limits_fit_the_budget_with_a_wheel_a_checked_wheel_or_none(tmp_path):
    tag = gc.python_tag()
    source = gc.plan(tmp_path / "out", tmp_path / "none")
    _wheel(tmp_path / "whl", tag)
    wheel = gc.plan(tmp_path / "out", tmp_path / "whl")
    _wheel(tmp_path / "whl" / "checked", tag)
    checked = gc.plan(tmp_path / "out", tmp_path / "whl")
    for p in (source, wheel, checked):
        assert p.total_s <= gc.BUDGET_S == 420, [(s.name, s.limit_s) for s in p.steps]
    limit = {name: {s.name: s.limit_s for s in p.steps} for name, p in (("source", source), ("wheel", wheel))}
    assert limit["source"]["build"] > limit["wheel"]["build"]
    assert {"bench_attention", "bench_norm_rope"} <= set(limit["wheel"]) - set(limit["source"])
    assert any(n.startswith("dropped to fit") for n in source.notes) and not any("dropped" in n for n in wheel.notes)
    # the checked build: used for the first FP8 GEMM step only when prebuilt; otherwise the plan says why not
    fp8 = [next(s for s in p.steps if s.name == "pytest_cuda_fp8_gemm") for p in (wheel, checked)]
    assert "PYTHONPATH" in fp8[1].env and "build_checked" in [s.name for s in checked.steps]
    assert not fp8[0].env and any(n.startswith("checked build: not used") for n in wheel.notes)


def test_a_wheel_built_from_other_sources_is_not_used(tmp_path):
    tag = gc.python_tag()
    _wheel(tmp_path / "other", "cp39" if tag != "cp39" else "cp310")
    assert gc.usable_wheel(tmp_path / "other")[0] is None  # another Python's wheel
    _wheel(tmp_path / "stale", tag, change="llama_kernels/ops.py")
    wheel, why = gc.usable_wheel(tmp_path / "stale")
    assert wheel is None and "built from other sources" in why and "llama_kernels/ops.py" in why
    fresh = _wheel(tmp_path / "fresh", tag)
    assert gc.usable_wheel(tmp_path / "fresh")[0] == fresh


def test_the_build_installs_our_wheel_with_the_carried_ones_only(tmp_path):
    """--smoke prints and records the pip command without running it: our wheel for this Python and the other
    packages carried in the folder (here a stand-in gguf), never our wheel for another Python."""
    tag = gc.python_tag()
    ours = _wheel(tmp_path / "whl", tag)
    _wheel(tmp_path / "whl", "cp39" if tag != "cp39" else "cp310")
    (tmp_path / "whl" / "gguf-0.17.1-py3-none-any.whl").write_bytes(b"")
    assert gc.run_build(tmp_path / "build.json", tmp_path / "whl", None, False, smoke=True) == 0
    build = json.loads((tmp_path / "build.json").read_text())
    cmd = build["command"].split()
    assert build["source"] == "wheel" and build["smoke"] and "--no-index" in cmd and "--no-deps" in cmd
    assert str(ours) in cmd and str(tmp_path / "whl" / "gguf-0.17.1-py3-none-any.whl") in cmd
    assert not any("cp39" in a or "cp310" in a for a in cmd if a.endswith(".whl") and a != str(ours))
    # the check ran on what this machine imports: an error exactly when verify_build finds one in the recorded
    # info (no _C from a source tree; a CUDA build here has _C, with 90a when nvcc built the default archs)
    info = {k: v for k, v in build.items()
            if k not in ("source", "wheel", "why", "command", "seconds", "smoke", "installed", "error")}
    assert build["error"] == gc.verify_build(info, False)
    if "import_error" in build:  # a tree without the extension never passes the check
        assert build["error"] and "import llama_kernels._C failed" in build["error"]


@pytest.mark.parametrize("info,checked,error", [
    ({"import_error": "ModuleNotFoundError: No module named 'llama_kernels._C'"}, False, "import llama_kernels._C failed"),
    ({"archs": ["80", "89"], "cuda_built": True}, False, "no sm_90a code"),
    ({"archs": [], "cuda_built": False}, False, "no sm_90a code"),
    ({"archs": ["90a"], "cuda_built": True, "checked": False}, True, "expected a checked build"),
    ({"archs": ["90a"], "sm90_unavailable": "loaded code is not sm_90a (binaryVersion 89)"}, False, "cannot run on this GPU"),
    ({"archs": ["90a"], "cuda_built": True, "checked": False}, False, None),
    ({"archs": ["80", "90a"], "cuda_built": True, "checked": True}, True, None),
])  # fmt: skip
def test_the_build_check_fails_unless_the_extension_imports_with_sm90a(info, checked, error):
    got = gc.verify_build(info, checked)
    assert (got is None) if error is None else (error in got)


CHILD = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("started", flush=True)
try:
    time.sleep(60)
except KeyboardInterrupt:
    out.write_text("interrupted")  # what pytest does on SIGINT: write its summary and junit XML
"""


def test_a_step_over_its_limit_gets_sigint_first_then_is_killed(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    t0 = time.monotonic()
    rc, cut = gc.run_limited([sys.executable, str(script), str(tmp_path / "polite"), "polite"], 2, tmp_path / "a.log",
                             tmp_path, dict(os.environ))  # fmt: skip
    assert cut and rc == 0 and (tmp_path / "polite").read_text() == "interrupted"  # SIGINT came first
    assert time.monotonic() - t0 < 2 and "started" in (tmp_path / "a.log").read_text()
    t0 = time.monotonic()
    rc, cut = gc.run_limited([sys.executable, str(script), str(tmp_path / "stubborn"), "stubborn"], 2,
                             tmp_path / "b.log", tmp_path, dict(os.environ))  # fmt: skip
    assert cut and rc == -9 and not (tmp_path / "stubborn").exists()  # SIGKILL at the limit
    assert 1.9 < time.monotonic() - t0 < 3
    rc, cut = gc.run_limited([sys.executable, "-c", "import sys; sys.exit(3)"], 5, tmp_path / "c.log", tmp_path,
                             dict(os.environ))  # fmt: skip
    assert (rc, cut) == (3, False)


def test_pytest_cut_at_its_limit_still_writes_its_junit_xml(tmp_path):
    """The reason for SIGINT first: interrupted, pytest ends its session (summary, junit XML); `timeout`'s SIGTERM
    would leave neither."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_hangs():\n"
                                           "    time.sleep(60)\n")  # fmt: skip
    xml = tmp_path / "junit.xml"
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "test_slow.py"), "-q", "-p", "no:cacheprovider",
            f"--junitxml={xml}"]  # fmt: skip
    rc, cut = gc.run_limited(argv, 12, tmp_path / "pytest.log", tmp_path, dict(os.environ))
    assert cut and rc == 2, (tmp_path / "pytest.log").read_text()  # pytest's exit code for an interrupted run
    assert "KeyboardInterrupt" in (tmp_path / "pytest.log").read_text()
    assert gc._junit(xml)["passed"] == 1


def test_every_gpu_test_file_is_run_by_a_pytest_step():
    marked = {p.name for p in (REPO / "tests").glob("test_*.py") if re.search(r"pytest\.mark\.gpu|pytestmark = pytest\.mark\.gpu",
                                                                            p.read_text())}  # fmt: skip
    assert marked and marked <= set(gc.PYTEST_TRITON) | set(gc.PYTEST_CUDA), marked - set(gc.PYTEST_TRITON + gc.PYTEST_CUDA)


def _selftest_flags() -> set[str]:
    """The flags `llama-kernels selftest` takes in this source tree."""
    import argparse

    from llama_kernels import selftest

    parser = argparse.ArgumentParser()
    selftest.add_arguments(parser)
    return {o for a in parser._actions for o in a.option_strings}


def test_smoke_rehearsal_runs_every_step_and_writes_every_file(tmp_path):
    """Every step's command with its smoke arguments, on the CPU: each parses all its flags and writes its files.
    (Three at a time: the order and the driver's bookkeeping are the next test's; this one is about the commands.)"""
    out = tmp_path / "out"
    out.mkdir()
    steps = gc.plan(out, REPO / ".whl").steps
    env = {**gc.step_env(out, smoke=True), "PYTHONPATH": str(REPO)}

    def run(step):
        return gc.run_limited(step.argv + list(step.smoke), 300, out / f"{step.name}.log", out, env)

    with ThreadPoolExecutor(3) as pool:
        done = dict(zip((s.name for s in steps), pool.map(run, steps)))
    missing = _selftest_flags()
    for step in steps:
        rc, cut = done[step.name]
        log = (out / f"{step.name}.log").read_text()
        flags = {a for a in step.argv if a.startswith("--")} - missing if "selftest" in step.argv else set()
        if flags:  # a flag another branch adds to the selftest: the step must fail on exactly that, until merged
            assert rc == 2 and "unrecognized arguments" in log and all(f in log for f in flags), log
            warnings.warn(f"{step.name}: waiting for selftest {sorted(flags)} (another branch)", stacklevel=1)
            continue
        assert (rc, cut) == (0, False), f"{step.name}: rc {rc}\n{log[-3000:]}"
        for f in step.writes:
            assert (out / f).exists(), f"{step.name} did not write {f}"
        assert gc.figures(step, out) and "unreadable" not in gc.figures(step, out), step.name


def test_the_driver_runs_in_order_records_each_step_and_contains_failures(tmp_path, monkeypatch):
    """execute(): results.json and summary.txt after every step; a failing or cut step costs only itself; a step
    after a cut one it depends on is skipped, a fallback runs when its condition failed; the budget is enforced."""
    py = sys.executable
    out = tmp_path / "out"

    def step(name, code, limit=10, **kw):
        return gc.Step(name, "correctness", [py, "-c", code], limit, **kw)

    check = "import json, pathlib; r = json.loads(pathlib.Path('results.json').read_text()); assert r['steps'][1]['status'] == 'failed'"
    plan = gc.Plan([
        step("first", "open('first.json', 'w').write('[]')", writes=("first.json",)),
        step("fails", "raise SystemExit(3)"),
        step("sees_results_so_far", check),
        step("hangs", "import time; time.sleep(60)", limit=3),
        step("after_hang", "pass", unless_cut="hangs"),
        step("with_fallback", "raise SystemExit(5)", fallback=("fails", [py, "-c", "print('fallback ran')"])),
        step("slow", "import time; time.sleep(6)"),
        step("over_budget", "pass"),
    ], ["a note"])  # fmt: skip
    monkeypatch.setattr(gc, "BUDGET_S", 13)  # after 2 + 6 s and more, 'over_budget' finds less than MIN_STEP_S left
    assert gc.execute(plan, out, smoke=False) == 1
    r = json.loads((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in r["steps"]}
    assert status == {"first": "ok", "fails": "failed", "sees_results_so_far": "ok", "hangs": "cut",
                      "after_hang": "skipped", "with_fallback": "ok", "slow": "ok", "over_budget": "skipped"}  # fmt: skip
    assert r["finished"] and r["steps"][0]["files"] == ["first.json"] and r["steps"][1]["rc"] == 3
    assert r["plan"] == ["a note"] and all("command" in s for s in r["steps"])
    assert "fallback ran" in (out / "with_fallback.log").read_text()
    summary = (out / "summary.txt").read_text()
    assert "FAILED steps: fails hangs after_hang over_budget" in summary and "time budget spent" in summary


def memory_table() -> list[tuple[str, str, str, int]]:
    """(benchmark, op, shape, peak GPU bytes) of every benchmark case gpu_check runs, at full size."""
    import torch

    # Listing the cases allocates nothing (their tensors are made when a case runs), and their sizes do not
    # depend on the device: list them here, at full size.
    cpu = torch.device("cpu")
    rows = []
    for name in ("bench_gemm", "bench_prefill", "bench_attention", "bench_norm_rope"):
        module = _load(name)
        cases = (module.cases if hasattr(module, "cases") else module.decode_cases)(cpu, False, "triton")
        rows += [(name, c.op, c.shape, c.peak_bytes) for c in cases]
    generate = _load("bench_generate")
    for quant in ("fp8", "int4"):
        rows.append(("bench_generate", f"8B {quant} generate", "batch 8, 128 + 64 tokens",
                     generate.peak_bytes("llama-3.1-8b", quant, 8, 192)))  # fmt: skip
    return rows


def test_every_benchmark_case_fits_the_gpu_at_full_size(capsys):
    rows = memory_table()
    assert all(peak > 0 for *_, peak in rows)
    with capsys.disabled():  # the table, once per benchmark and op: the largest case
        largest: dict[tuple[str, str], tuple[str, int]] = {}
        for bench, op, shape, peak in rows:
            if peak > largest.get((bench, op), ("", -1))[1]:
                largest[(bench, op)] = (shape, peak)
        print(f"\n{'benchmark':<16} {'op':<24} {'cases':>5}  {'largest case':<40} {'peak GiB':>8}")
        for (bench, op), (shape, peak) in largest.items():
            n = sum(1 for b, o, *_ in rows if (b, o) == (bench, op))
            print(f"{bench:<16} {op:<24} {n:>5}  {shape:<40} {peak / GiB:8.2f}")
    over = [(b, o, s, round(p / GiB, 1)) for b, o, s, p in rows if p > MEMORY_LIMIT]
    assert not over, over


def test_the_driver_interrupted_records_the_step_and_leaves_no_process(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(BENCH)!r})
        import gpu_check as gc
        from pathlib import Path
        step = gc.Step("sleeper", "speed", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], 90)
        sys.exit(gc.execute(gc.Plan([step], []), Path({str(tmp_path / 'out')!r}), False))
    """))  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the driver announces the step before starting it
        if line.startswith("== sleeper"):
            break
    log, deadline = tmp_path / "out" / "sleeper.log", time.monotonic() + 20
    while not (log.exists() and "up" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    (step,) = json.loads((tmp_path / "out" / "results.json").read_text())["steps"]
    assert step["status"] == "interrupted" and step["seconds"] < 30
    ps = subprocess.run(["ps", "-eo", "pid,ppid,stat,args"], capture_output=True, text=True).stdout
    assert "print('up', flush=True); time.sleep(60)" not in ps, [l for l in ps.splitlines() if "sleep(60)" in l]
