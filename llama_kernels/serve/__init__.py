"""The serving engine (continuous batching, chunked prefill, per-request sampling) that LLM.generate
and `llama-kernels serve` run on. The HTTP layer (api_server, needing the `serve` extra) is not
imported here."""

from .engine import Engine, EngineStats, RequestOutput
from .sampling import SamplingParams, TokenLogprob

__all__ = ["Engine", "EngineStats", "RequestOutput", "SamplingParams", "TokenLogprob"]
