"""llama-kernels: CUDA and Triton kernels for quantized Llama inference.

The ops live in :mod:`llama_kernels.ops` (re-exported here); :mod:`llama_kernels.reference`
defines what each computes; :mod:`llama_kernels.backends` picks the implementation.
:class:`LLM` (:mod:`llama_kernels.llm`) loads a Llama checkpoint and generates text with them.

The names below are imported on first use (PEP 562), so that importing the package, e.g. for the
command line's --version and --help, does not import torch. Any of them imports :mod:`.ops`
first, which registers every backend.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the submodule defining it
_EXPORTS = {
    "BackendUnavailableError": "backends",
    "Int4Weight": "int4",
    "LLM": "llm",
    **{op: "ops" for op in ("add_rms_norm", "add_rms_norm_fp8", "decode_attention", "fp8_gemm", "int4_gemm",
                            "quantize_fp8", "quantize_int4", "rms_norm", "rope_and_cache", "rope_cos_sin")},
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(".ops", __name__)  # registers every backend
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
