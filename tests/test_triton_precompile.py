"""`llama-kernels selftest --compile-workers N` (llama_kernels.precompile): on a GPU, a dry pass records
every Triton specialization the selftest will launch (Triton's jit_cache_hook: nothing compiles or
launches) and a process pool compiles them into Triton's on-disk cache before the first launch. On the
CPU the flag is accepted and is a no-op. Checked here without a GPU: the dry pass over the selftest's
cases finds every kernel the package launches, workers compile specializations for
GPUTarget("cuda", 90, 32), and the launch path then finds them in the cache (no new compile). CI runs
this file under Triton 3.6 and 3.9."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llama_kernels
from llama_kernels import selftest

pytest.importorskip("triton")

ROOT = Path(llama_kernels.__file__).parents[1]


def _parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    selftest.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_compile_workers_parses_and_is_a_no_op_without_a_gpu(capsys, monkeypatch):
    assert _parse().compile_workers == 0  # off by default
    args = _parse("--compile-workers", "3", "--op", "rms_norm", "--backends", "triton")
    assert args.compile_workers == 3 and "--compile-workers" in selftest.selftest_argv(args)  # survives the re-exec
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(selftest.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(selftest, "precompile_triton", lambda *a: pytest.fail("compiled on the CPU"))
    assert selftest.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "compile-workers" in line] == [
        "# --compile-workers 3: nothing to precompile: no CUDA GPU (the Triton interpreter runs the kernels "
        "without compiling them)"]  # fmt: skip
    assert selftest.run(_parse("--compile-workers", "-1")) == 2
    assert "--compile-workers -1: expected an int >= 0" in capsys.readouterr().err


def _launched_kernels() -> set[str]:
    """Every @triton.jit function the package launches (`name[grid](...)` in llama_kernels/triton)."""
    names = set()
    for path in (ROOT / "llama_kernels" / "triton").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
                names.add(node.func.value.id)
    return names


# Runs in a fresh process without TRITON_INTERPRET (the kernels must be JITFunctions, as on a GPU) and
# with a driver that knows only the sm_90 target; under __main__ so that the spawned workers skip it.
SCRIPT = r"""
import json, os, sys, torch
from llama_kernels import backends, ops, precompile, selftest
if __name__ == "__main__":
    precompile.use_target("cuda", 90, 32)
    backends._triton_reason = lambda device: None  # the dry pass launches nothing: no interpreter needed
    cpu = torch.device("cpu")
    specs = selftest.triton_specializations(cpu, True, None)
    first = {s.name: s for s in reversed(specs)}
    chosen = [first["_rms_norm_kernel"], first["_quantize_fp8_kernel"]]
    results = precompile.compile_all(chosen, 2, precompile.use_target, ("cuda", 90, 32))
    cache = os.environ["TRITON_CACHE_DIR"]
    before = set(os.listdir(cache))
    written = [(json.load(open(os.path.join(cache, d, s.name + ".json")))["target"],
                os.path.exists(os.path.join(cache, d, s.name + ".cubin")))
               for d in before for s in chosen if os.path.exists(os.path.join(cache, d, s.name + ".json"))]
    case = next(iter(selftest.CASES["rms_norm"](cpu, True)))
    try:
        ops.rms_norm(*case.make(), backend="triton")  # the launch path: compiles (from the cache), then launches
    except AttributeError as err:
        launch = str(err)  # this driver cannot launch
    print(json.dumps({"names": [s.name for s in specs], "distinct": len({s.data for s in specs}),
                      "errors": [e for _, _, e in results], "written": written,
                      "new_cache_entries": sorted(set(os.listdir(cache)) - before), "launch": launch}))
"""


def test_dry_pass_finds_every_kernel_and_workers_compile_them_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # Every kernel the package launches, from the selftest's small cases: `kernel` in fp8_gemm.py is the
    # FP8 or the INT4 GEMM kernel; the split-K reduction runs only at shapes the small cases do not have.
    want = _launched_kernels() - {"kernel", "splitk_reduce_kernel"} | {"_fp8_gemm_kernel", "_int4_gemm_kernel"}
    assert set(got["names"]) == want, got["names"]
    assert got["distinct"] == len(got["names"])  # each specialization once
    assert got["errors"] == ["", ""]
    # the workers wrote both kernels' sm_90 binaries into Triton's cache
    assert sorted((t["backend"], t["arch"], cubin) for t, cubin in got["written"]) == [("cuda", 90, True)] * 2, got
    # the launch found the workers' compilation in the cache: nothing new was compiled
    assert got["new_cache_entries"] == [] and "launcher" in got["launch"], got
