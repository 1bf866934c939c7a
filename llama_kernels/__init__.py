"""llama-kernels: CUDA and Triton kernels for quantized Llama inference.

The ops live in :mod:`llama_kernels.ops` (re-exported here); :mod:`llama_kernels.reference`
defines what each computes; :mod:`llama_kernels.backends` picks the implementation.
:class:`LLM` (:mod:`llama_kernels.llm`) loads a Llama checkpoint and generates text with them.
"""

from .backends import BackendUnavailableError
from .int4 import Int4Weight
from .llm import LLM
from .ops import (
    add_rms_norm,
    add_rms_norm_fp8,
    decode_attention,
    fp8_gemm,
    int4_gemm,
    quantize_fp8,
    quantize_int4,
    rms_norm,
    rope_and_cache,
    rope_cos_sin,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Int4Weight",
    "LLM",
    "add_rms_norm",
    "add_rms_norm_fp8",
    "decode_attention",
    "fp8_gemm",
    "int4_gemm",
    "quantize_fp8",
    "quantize_int4",
    "rms_norm",
    "rope_and_cache",
    "rope_cos_sin",
]
