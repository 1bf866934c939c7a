"""`llama-kernels info`: versions, the CUDA extension's state, and the backend of every op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from llama_kernels import backends


def _run(*args: str, env: dict | None = None) -> str:
    # Run outside the source tree: `python -m` puts the working directory first on sys.path, and
    # the source tree's llama_kernels has no compiled _C.
    done = subprocess.run([sys.executable, "-m", "llama_kernels", *args], capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir(), env=env)  # fmt: skip
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
