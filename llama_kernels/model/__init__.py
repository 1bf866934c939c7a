"""The Llama model (gpt-fast style): config, decoder, swappable linears, paged KV cache."""

from .config import LlamaConfig
from .kv_cache import AttentionBatch, KVCache
from .linear import Fp8Activation, Fp8Linear, Int4Linear, Linear, int4_group_size, quantize_model
from .model import Transformer

__all__ = [
    "AttentionBatch",
    "Fp8Activation",
    "Fp8Linear",
    "Int4Linear",
    "KVCache",
    "LlamaConfig",
    "Linear",
    "Transformer",
    "int4_group_size",
    "quantize_model",
]
