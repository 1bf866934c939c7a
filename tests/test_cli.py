"""`llama-kernels info`: versions, the CUDA extension's state, and the backend of every op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import llama_kernels
from llama_kernels import backends


def _run(*args: str, env: dict | None = None) -> str:
    # `python -m` puts the working directory first on sys.path: run it beside the llama_kernels this
    # process imported, so the subprocess reports on the same package (installed or source tree).
    done = subprocess.run([sys.executable, "-m", "llama_kernels", *args], capture_output=True, text=True,
                          timeout=120, cwd=Path(llama_kernels.__file__).parents[1], env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_info_table_names_versions_extension_and_backends():
    out = _run("info")
    assert f"torch {torch.__version__}" in out
    assert "CUDA extension: " in out
    ext, reason = backends.cuda_extension()
    if ext is None:
        assert reason in out
    for op in ("add_rms_norm", "fp8_gemm", "decode_attention", "rope_and_cache", "int4_gemm"):
        assert op in out


def test_info_json():
    data = json.loads(_run("info", "--json"))
    assert data["torch"] == torch.__version__
    assert data["devices"][0]["device"] == "cpu"
    assert data["devices"][0]["ops"]["add_rms_norm"] == "torch"
    assert data["cuda_extension"]["built"] == (backends.cuda_extension()[0] is not None)


def test_info_reports_a_forced_backend():
    out = _run("info", env={**os.environ, "LLAMA_KERNELS_BACKEND": "torch"})
    assert "backend forced by LLAMA_KERNELS_BACKEND=torch" in out
