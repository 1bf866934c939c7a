"""The serving engine (continuous batching, chunked prefill, per-request sampling) that LLM.generate
and `llama-kernels serve` run on. It is built from a LoadedModel and imports neither the LLM facade
nor the HTTP front end (llama_kernels.server)."""

from .engine import Engine, EngineStats, LoadedModel, RequestOutput
from .sampling import SamplingParams, TokenLogprob

__all__ = ["Engine", "EngineStats", "LoadedModel", "RequestOutput", "SamplingParams", "TokenLogprob"]
