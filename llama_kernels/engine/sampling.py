"""Per-request sampling: the parameters, their checks, and the batch's logits processing and sampling
as tensor ops over [N, V] logits (one row per sequence, each with its own parameters), and logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most top logprobs a request may ask for
MAX_LOGIT_BIAS = 100.0  # logit_bias values are clamped to [-100, 100] (as OpenAI does)


@dataclass(frozen=True)
class Grammar:
    """A constraint the output must match, compiled by engine.structured (llguidance)."""

    kind: str  # "json": spec is a JSON schema (JSON text; "" = any JSON object); "regex"; "lark"
    spec: str  # the schema / regex / Lark grammar source


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens at most (>= 1)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]; the most likely token is always kept
    top_k: int | None = None  # None or >= 1
    min_p: float = 0.0  # [0, 1]: drop tokens less likely than min_p x the most likely one
    seed: int | None = None  # per-request generator (same seed + prompt -> same output, whatever the batch)
    stop: tuple[str, ...] = ()  # stop strings: output ends before the first occurrence (see include_stop_str_in_output)
    stop_token_ids: tuple[int, ...] = ()  # besides the model's eos ids
    ignore_eos: bool = False  # keep going past the model's eos ids (stop_token_ids still stop)
    min_tokens: int = 0  # eos / stop token ids masked and stop strings unchecked until this many tokens are out
    presence_penalty: float = 0.0  # [-2, 2]: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # [-2, 2]: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0: logits of tokens seen (prompt or output) / it if > 0, else x it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit, clamped to [-100, 100])
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob + the top k (k <= 20)
    prompt_logprobs: int | None = None  # None, or k: each prompt token's logprob (the first has none) + top k
    skip_special_tokens: bool = True  # leave special tokens out of the text
    include_stop_str_in_output: bool = False  # the text ends after the stop string instead of before it
    grammar: Grammar | None = None  # the output must match it (greedy or sampled within the grammar's tokens)

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
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "0 <= min_p <= 1")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "None or an int")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a tuple of non-empty strings")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a tuple of token ids >= 0")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens:
            raise bad("min_tokens", "an int >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_real(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "a number in [-2, 2]")
        if not is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1 = off)")
        if not isinstance(self.logit_bias, (tuple, list)) or not all(
            isinstance(p, (tuple, list)) and len(p) == 2 and is_int(p[0]) and p[0] >= 0 and is_real(p[1])
            for p in self.logit_bias
        ):
            raise bad("logit_bias", "a tuple of (token id >= 0, finite bias) pairs")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise bad(name, f"None or an int in [0, {MAX_LOGPROBS}]")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise bad("grammar", "None or a Grammar")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class TokenLogprob:
    token_id: int  # the chosen token
    logprob: float  # its log-probability under the model (before penalties, bias, temperature, top-k/p)
    top: list[tuple[int, float]]  # the top-k (token id, logprob), most likely first


# --- logits processors: each changes the rows of logits [N, V] float32 in place --------------------


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> None:  # fmt: skip
    """Repetition (HF/vLLM: over prompt and output), frequency and presence (OpenAI: over the output)
    penalties of each row's own parameters; rows without penalties are left as they are."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return
    n, v, dev = len(rows), logits.shape[-1], logits.device
    sub = logits[rows]
    out = _padded([outputs[i] for i in rows], v, dev)  # [n, L], padding = v
    counts = torch.zeros(n, v + 1, device=dev).scatter_add_(1, out, torch.ones(out.shape, device=dev))[:, :v]
    rep = torch.tensor([params[i].repetition_penalty for i in rows], device=dev)[:, None]
    if (rep != 1).any():
        seen = counts > 0
        seen |= torch.zeros(n, v + 1, dtype=torch.bool, device=dev).scatter_(
            1, _padded([prompts[i] for i in rows], v, dev), True)[:, :v]  # fmt: skip
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([params[i].frequency_penalty for i in rows], device=dev)[:, None]
    pres = torch.tensor([params[i].presence_penalty for i in rows], device=dev)[:, None]
    sub = sub - freq * counts - pres * (counts > 0)
    logits[rows] = sub


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """Add each row's logit_bias (values clamped to [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]) as one scatter."""
    pairs = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if pairs:
        rows, cols, vals = zip(*pairs)
        bias = torch.tensor(vals, dtype=logits.dtype, device=logits.device).clamp(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        logits.index_put_((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                          bias, accumulate=True)  # fmt: skip


def ban_tokens(logits: torch.Tensor, banned: list[tuple[int, ...]]) -> None:
    """Set the logits of each row's banned token ids to -inf (min_tokens: the stop ids)."""
    pairs = [(i, t) for i, ids in enumerate(banned) for t in ids if t < logits.shape[-1]]
    if pairs:
        rows, cols = zip(*pairs)
        logits[list(rows), list(cols)] = float("-inf")


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf the logits of the tokens a grammar forbids: bitmask [len(rows), ceil(V / 32)] int32,
    bit j of word w allows token 32 w + j (llguidance's and xgrammar's layout); rows: the logits rows."""
    if not rows:
        return
    v = logits.shape[-1]
    bits = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=bitmask.device)
    forbidden = (bitmask[:, :, None] & bits).eq(0).flatten(1)[:, :v].to(logits.device)
    forbidden = torch.nn.functional.pad(forbidden, (0, v - forbidden.shape[1]), value=True)  # past the mask
    sub = logits[rows]
    sub.masked_fill_(forbidden, float("-inf"))
    logits[rows] = sub


def _padded(lists: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(1, max(map(len, lists)))
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.int64, device=device)


# --- sampling -------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """logits [N, V] / temperature [N] (> 0), restricted per row to its top_k [N] (int64, >= V = off) most
    likely tokens, then to the smallest set whose probability reaches top_p [N], then to the tokens at
    least min_p [N] x as likely as the most likely one; the rest -inf. The most likely token is always
    kept (a tiny top_p never empties a row)."""
    logits = logits / temperature[:, None]
    v = logits.shape[-1]
    if bool((top_k < v).any() or (top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(v, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p[:, None]  # tokens after the nucleus is complete
        drop[:, 0] = False
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Next token of each row of logits [N, V] (already penalized / biased / masked): argmax at
    temperature 0, else drawn with the row's own generator from softmax(filter_logits(...))."""
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return tokens
    dev = logits.device
    v = logits.shape[-1]
    sel = [params[i] for i in rows]
    probs = filter_logits(
        logits[rows].float(),
        torch.tensor([p.temperature for p in sel], device=dev),
        torch.tensor([p.top_k or v for p in sel], device=dev),
        torch.tensor([p.top_p for p in sel], dtype=torch.float64, device=dev),
        torch.tensor([p.min_p for p in sel], device=dev),
    ).softmax(dim=-1)
    for j, i in enumerate(rows):  # one draw per sequence, from its own generator (reproducible whatever the batch)
        tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
    return tokens


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [N, V] float32 that sample() draws from for rows of logits [N, V] (already processed)
    of one request (temperature > 0): what speculative verification compares its drafts against."""
    n, v, dev = logits.shape[0], logits.shape[-1], logits.device
    return filter_logits(logits.float(), torch.full((n,), float(params.temperature), device=dev),
                         torch.full((n,), params.top_k or v, device=dev),
                         torch.full((n,), float(params.top_p), dtype=torch.float64, device=dev),
                         torch.full((n,), float(params.min_p), device=dev)).softmax(dim=-1)  # fmt: skip


def logprobs_of(logits: torch.Tensor, tokens: list[int], k: list[int]) -> list[TokenLogprob]:
    """TokenLogprob of tokens[i] with the top k[i] of row i of logits [N, V] (raw model logits)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    kmax = max(k, default=0)
    top = logp.topk(kmax, dim=-1) if kmax else None
    ids, vals = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    return [TokenLogprob(t, c, list(zip(ids[i][: k[i]], vals[i][: k[i]])) if k[i] else [])
            for i, (t, c) in enumerate(zip(tokens, chosen))]  # fmt: skip
