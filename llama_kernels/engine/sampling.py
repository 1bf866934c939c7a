"""Per-request sampling: the parameters, their checks, one sampling function, and logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most top logprobs a request may ask for


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens at most (>= 1)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int | None = None  # None or >= 1
    seed: int | None = None  # per-request generator (same seed + prompt -> same output, whatever the batch)
    stop: tuple[str, ...] = ()  # stop strings: output ends before the first occurrence; never emitted
    stop_token_ids: tuple[int, ...] = ()  # besides the model's eos ids
    ignore_eos: bool = False  # keep going past the model's eos ids (stop_token_ids still stop)
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob + the top k (k <= 20)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and what was expected."""

        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"SamplingParams: {field}={getattr(self, field)!r}; expected {expected}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if not is_real(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a number >= 0 (0 = greedy)")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "0 < top_p <= 1")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", "None or an int >= 1")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "None or an int")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a tuple of non-empty strings")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a tuple of token ids >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "True or False")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")


@dataclass
class TokenLogprob:
    token_id: int  # the chosen token
    logprob: float  # its log-probability under the model (before temperature / top-k / top-p)
    top: list[tuple[int, float]]  # the top-k (token id, logprob), most likely first


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """Next tokens [B] int64 from logits [B, V]: greedy at temperature 0, else drawn from sampling_probs."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution [B, V] float32 that sampling draws from, for logits [B, V] and temperature > 0:
    softmax(logits / T) restricted to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (speculative verification needs it as well as sample())."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus is complete
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The logprob of `token` and the top k of one row of logits [V]."""
    logp = logits.float().log_softmax(dim=-1)
    top = logp.topk(k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)
