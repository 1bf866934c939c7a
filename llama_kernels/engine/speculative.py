"""Speculative decoding: proposers, exact verification and rollback.

Each decoding sequence may bring a draft of up to k proposed tokens into a step. The target model
scores [its last token, d1 .. dk] in the same forward pass as the step's other chunks (query length
k + 1 over the paged cache: ops.paged_prefill_attention), which gives k + 1 rows of logits: row i is
the target's distribution of the token after d1 .. di. verify() keeps the longest prefix of the draft
the target accepts and adds one token of the target's own (the correction at the first rejection, or
a bonus token when every draft token is accepted), so each verification yields 1 to k + 1 tokens:

- greedy (temperature 0): d_i is accepted while it is the target's argmax; the result is exactly the
  tokens non-speculative greedy decoding gives.
- sampling: exact rejection sampling (Leviathan et al. 2023; Chen et al. 2023): d_i is accepted with
  probability min(1, p_i(d_i) / q_i(d_i)), p the target's sampling distribution (temperature, top-k,
  top-p, min-p applied) and q the proposer's; at the first rejection the token is drawn from
  normalize(max(0, p_i - q_i)). Every token then follows the target's distribution exactly. A
  deterministic proposer (n-gram) has a one-hot q. The draws use the request's own generator, so a
  seeded request is reproducible, but its tokens are not those of non-speculative sampling (the same
  distribution, other draws), and whether a step speculates depends on the batch (see below).

On CUDA a step whose chunks are all verifications and plain decodes runs as a CUDA graph (runner.py:
VerifyGraphs; shorter drafts are padded, see verify_layout); steps with prefill chunks run eagerly.

Requests whose logits processing depends on the tokens before each position (penalties, logit_bias,
min_tokens not yet reached, a grammar) are not speculated: speculable().

The cache then holds k/v for the rejected draft tokens too; rollback() sets the sequence's computed
length back to its accepted tokens and frees the blocks that hold none of them.

When to speculate (SpeculativeConfig.max_verify_tokens): a verify step runs B (k + 1) tokens through
the model instead of B, and pays off while the mean accepted length L (tokens per verification)
exceeds cost(B (k + 1)) / cost(B). The rule is simpler: a step speculates only while (decoding
sequences) x (k + 1) <= max_verify_tokens (32); larger steps decode one token per sequence. Measured
on SmolLM2 on the CPU (bench_generate --speculative: benchmarks/results/spec_ngram_cpu_smollm2_*.json),
a pass of T tokens costs 1.9x a 1-token pass at T = 6 (one sequence, k = 5), 3.0x at 32 and 4.2x at
64, while prompt lookup on quoting prompts accepts ~4 tokens per verification: up to 32 tokens that
still pays at every batch size, and past it the pass turns compute-bound (on a GPU much later: there
the bound can be raised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .. import distributed
from .block_allocator import BlockAllocator
from .runner import Chunk
from .sampling import sampling_probs

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"  # "ngram" (prompt lookup) | "draft" (a smaller model with the same tokenizer)
    num_tokens: int = 3  # k: draft tokens per sequence per step at most
    max_verify_tokens: int = 32  # speculate in a step only while decoding sequences x (k + 1) <= this
    ngram_max: int = 4  # the n-gram proposer matches the last ngram_max .. ngram_min tokens, longest first
    ngram_min: int = 2

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and what was expected."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"speculative: {name}={getattr(self, name)!r}; expected {expected}")

        def pos(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        if self.method not in METHODS:
            raise bad("method", " or ".join(map(repr, METHODS)))
        if not pos(self.num_tokens):
            raise bad("num_tokens", "an int >= 1")
        if not pos(self.max_verify_tokens):
            raise bad("max_verify_tokens", "an int >= 1")
        if not pos(self.ngram_min) or not pos(self.ngram_max) or self.ngram_min > self.ngram_max:
            raise bad("ngram_min", f"an int in [1, ngram_max={self.ngram_max}]")


@dataclass
class Draft:
    """A proposal for one sequence."""

    tokens: list[int]  # d1 .. dn (n <= k)
    probs: torch.Tensor | None = None  # [n, V] float32 q_i of each d_i's position; None: deterministic (one-hot)


class Proposer(Protocol):
    """Proposes drafts for a batch of sequences (a draft model or an EAGLE-style head runs them as one batch)."""

    # the model runners it runs passes on, by key: under tensor parallel rank 0's proposer sends each pass to
    # the other ranks (runner.run(..., lead=True, key=key)), whose Engine.follow runs it on theirs
    runners: dict

    def propose(self, seqs: list, ks: list[int]) -> list[Draft]:
        """One draft per sequence (engine Sequences: request_id, ids = prompt + output so far, params,
        generator) of at most ks[i] tokens (may be empty)."""
        ...

    def release(self, request_id: str) -> None:
        """Drop what is kept for a request that ended (a draft model's cache blocks)."""
        ...


class NgramIndex:
    """The latest end position of every n-gram (ngram_min <= n <= ngram_max) of a growing token list,
    updated with the tokens appended since the last call (sequences only ever grow)."""

    def __init__(self, ngram_max: int, ngram_min: int) -> None:
        self.sizes = range(ngram_max, ngram_min - 1, -1)  # longest first
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> the position of its last token, latest
        self.indexed = 0  # n-grams ending before this position are in `latest`

    def lookup(self, ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of ids found."""
        end = len(ids) - 1  # n-grams ending at the last token are the suffixes, not earlier occurrences
        for i in range(self.indexed, end):
            for n in self.sizes:
                if i + 1 >= n:
                    self.latest[tuple(ids[i + 1 - n : i + 1])] = i
        self.indexed = max(self.indexed, end)
        if k < 1:
            return []
        for n in self.sizes:
            i = self.latest.get(tuple(ids[len(ids) - n :])) if len(ids) >= n else None
            if i is not None:
                return ids[i + 1 : i + 1 + k]
        return []


class NgramProposer:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n tokens (n from
    ngram_max down to ngram_min) and propose the tokens that followed it. No model; per request an
    NgramIndex (so a step costs O(new tokens), not O(context))."""

    runners: dict = {}  # no model

    def __init__(self, ngram_max: int = 4, ngram_min: int = 2) -> None:
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.indexes: dict[str, NgramIndex] = {}  # request id -> its index

    def propose(self, seqs: list, ks: list[int]) -> list[Draft]:
        return [Draft(self._index(s.request_id).lookup(s.ids, k)) for s, k in zip(seqs, ks)]

    def _index(self, request_id: str) -> NgramIndex:
        index = self.indexes.get(request_id)
        if index is None:
            index = self.indexes[request_id] = NgramIndex(self.ngram_max, self.ngram_min)
        return index

    def lookup(self, ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier match of the last n tokens of ids (no state kept)."""
        return NgramIndex(self.ngram_max, self.ngram_min).lookup(ids, k)

    def release(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)


def verify(rows: torch.Tensor, draft: Draft, params, generator: torch.Generator | None) -> list[int]:
    """The tokens a verification yields (accepted draft tokens, then one of the target's own).

    Args:
        rows: [n + 1, V] float32 target logits; row i scores the token after draft.tokens[:i].
        draft: n proposed tokens (and their proposal distributions, None: one-hot).
        params: the request's SamplingParams (temperature 0: greedy).
        generator: the request's generator (sampling).
    """
    tokens = draft.tokens
    if params.temperature == 0:
        target = rows.argmax(dim=-1).tolist()
        out = []
        for d, t in zip(tokens, target):
            if d != t:
                break
            out.append(d)
        return out + [target[len(out)]]
    p = sampling_probs(rows, params)  # [n + 1, V]
    u = torch.rand(len(tokens), generator=generator, device=rows.device).tolist()
    out = []
    for i, d in enumerate(tokens):
        q_d = 1.0 if draft.probs is None else float(draft.probs[i, d])
        if u[i] * q_d < float(p[i, d]):  # accept with probability min(1, p / q)
            out.append(d)
            continue
        if draft.probs is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - draft.probs[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is exact
            residual = p[i]
        return out + [int(torch.multinomial(residual, 1, generator=generator))]
    return out + [int(torch.multinomial(p[len(tokens)], 1, generator=generator))]


def rollback(seq, accepted: int, allocator: BlockAllocator) -> None:
    """After a verification of seq.draft that accepted `accepted` of its tokens (seq.ids not yet extended):
    the cache keeps k/v of seq.ids and the accepted drafts; the rejected ones' slots are dropped (blocks
    that hold none of the kept tokens go back to the pool)."""
    seq.num_computed = len(seq.ids) + accepted
    allocator.shrink(seq.blocks, seq.num_computed)
    seq.draft = []


def speculable(seq) -> bool:
    """Whether a sequence's next tokens may be speculated: its sampling distribution at a position is the
    model's, filtered by temperature / top-k / top-p / min-p alone (no penalties, logit_bias, pending
    min_tokens or grammar)."""
    p = seq.params
    return not (p.penalized or p.logit_bias or seq.matcher is not None or len(seq.output_ids) < p.min_tokens)


@dataclass
class SpecCounters:
    """Since start-up (engine stats, /metrics) or per LLM.generate call."""

    proposed: int = 0  # draft tokens verified
    accepted: int = 0  # of those, accepted
    verifications: int = 0  # (sequence, step) pairs that verified a non-empty draft

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification: accepted drafts + the target's own token (1 .. k + 1)."""
        return (self.accepted + self.verifications) / self.verifications if self.verifications else 0.0


@dataclass
class Speculator:
    """The engine's speculation: picks each step's drafts, verifies them, rolls back."""

    config: SpeculativeConfig
    proposer: Proposer
    totals: SpecCounters = field(default_factory=SpecCounters)  # since start-up

    def propose(self, running: list, max_context: int) -> None:
        """Set seq.draft on each decoding sequence of `running` (none when the step would be too large) whose
        sampling has no logits processing that depends on the tokens before each position (penalties,
        logit_bias, min_tokens still pending, a grammar): verifying those would need it per draft position."""
        k = self.config.num_tokens
        if sum(s.is_decoding for s in running) * (k + 1) > self.config.max_verify_tokens:
            return
        decoding = [s for s in running if s.is_decoding and speculable(s)]
        if not decoding:
            return
        # no draft past the context or past max_tokens (the verification adds one token of its own)
        ks = [min(k, max_context - len(s.ids), s.params.max_tokens - len(s.output_ids) - 1) for s in decoding]
        for seq, draft in zip(decoding, self.proposer.propose(decoding, ks)):
            seq.draft = draft.tokens
            seq.draft_probs = draft.probs

    def release(self, seq) -> None:
        """A sequence ended (finished or aborted)."""
        self.proposer.release(seq.request_id)

    def verify(self, seq, rows: torch.Tensor, *counters: SpecCounters) -> list[int]:
        """The new tokens of a sequence whose draft its rows [1 + len(seq.draft), V] score (see verify());
        self.totals and `counters` count the draft and its accepted tokens."""
        tokens = verify(rows, Draft(seq.draft, seq.draft_probs), seq.params, seq.generator)
        for c in (self.totals, *counters):
            c.proposed += len(seq.draft)
            c.accepted += len(tokens) - 1
            c.verifications += 1
        return tokens


def make_speculator(config: SpeculativeConfig, proposer: Proposer | None = None) -> Speculator:
    """The Speculator of `config`; the n-gram proposer unless another is given (the draft model's)."""
    config.validate()
    if proposer is None:
        if config.method != "ngram":
            raise ValueError(f"speculative: method={config.method!r} needs a proposer (a draft model)")
        proposer = NgramProposer(config.ngram_max, config.ngram_min)
    return Speculator(config, proposer)


class DraftModelProposer:
    """Proposals from a smaller model with the same tokenizer, run on its own paged cache and block pool.

    Each sequence's draft-cache state is kept by request id: the tokens whose k/v the draft cache holds.
    A proposal first rolls that back to the longest prefix shared with the sequence's tokens now (the
    accepted drafts stay cached), prefills the rest (in passes of at most prefill_chunk tokens, as the
    memory planner assumes), then decodes k tokens one step at a time, all sequences batched. Greedy
    requests take the draft's argmax (q one-hot); sampled ones draw from the draft's sampling distribution
    (same temperature / top-k / top-p) with the request's generator, and pass q to the verification. A sequence whose draft cache is full proposes nothing; state of
    sequences that ended is dropped then (release), of those preempted at the next proposal.

    Under tensor parallel the draft model is sharded over the same ranks as the target: rank 0 proposes
    and sends each draft pass to the other ranks (key "draft"), which run it in Engine.follow.
    """

    def __init__(self, runner, allocator: BlockAllocator, max_context: int, prefill_chunk: int) -> None:
        self.runner = runner  # a ModelRunner over the draft model and its cache
        self.runners = {"draft": runner}
        self.lead = runner.model.tp is not None and distributed.is_main()  # rank 0 under tensor parallel
        self.allocator = allocator  # the draft cache's blocks
        self.max_context = max_context  # the draft model's positions
        self.prefill_chunk = prefill_chunk  # tokens per prefill pass at most
        self.state: dict[str, tuple[list[int], list[int]]] = {}  # request id -> (cached tokens, blocks)

    def propose(self, seqs: list, ks: list[int]) -> list[Draft]:
        live = {s.request_id for s in seqs}
        for rid in [r for r in self.state if r not in live]:
            self.release(rid)  # preempted, or decoding without speculation now
        active = []
        for seq, k in zip(seqs, ks):
            cached, blocks = self.state.setdefault(seq.request_id, ([], []))
            keep = next((i for i, (a, b) in enumerate(zip(cached, seq.ids)) if a != b), min(len(cached), len(seq.ids)))
            keep = min(keep, len(seq.ids) - 1)  # the last token runs again: its logits propose d1
            del cached[keep:]
            self.allocator.shrink(blocks, keep)
            if k > 0 and len(seq.ids) + k <= self.max_context and self.allocator.grow(blocks, len(seq.ids) + k - 1):
                active.append((seq, k, cached, blocks))
        self._prefill([(seq, cached, blocks) for seq, _, cached, blocks in active])
        drafts = {id(seq): Draft([], None) for seq in seqs}
        step = [(seq, seq.ids[len(cached) :]) for seq, _, cached, _ in active]
        probs: dict[int, list[torch.Tensor]] = {id(seq): [] for seq, *_ in active}
        for i in range(max((k for _, k, _, _ in active), default=0)):
            chunks = [Chunk(new, len(cached), blocks, True) for (seq, new), (_, _, cached, blocks) in
                      zip(step, [a for a in active if a[1] > i])]  # fmt: skip
            if not chunks:
                break
            logits = self._run(chunks)  # [n, V] float32
            nxt = []
            for (seq, new), row, (_, k, cached, _) in zip(step, logits, [a for a in active if a[1] > i]):
                cached.extend(new)
                p = seq.params
                if p.temperature == 0:
                    token = int(row.argmax())
                else:
                    q = sampling_probs(row[None], p)[0]
                    token = int(torch.multinomial(q, 1, generator=seq.generator))
                    probs[id(seq)].append(q)
                drafts[id(seq)].tokens.append(token)
                if k > i + 1:
                    nxt.append((seq, [token]))
            step = nxt
        for seq, *_ in active:
            if probs[id(seq)]:
                drafts[id(seq)].probs = torch.stack(probs[id(seq)])
        return [drafts[id(seq)] for seq in seqs]

    def _prefill(self, pending: list[tuple]) -> None:
        """Run each (seq, cached tokens, blocks)'s uncached tokens but its last (that one proposes d1) into
        the draft cache, in passes of at most prefill_chunk tokens."""
        while pending := [p for p in pending if len(p[0].ids) - len(p[1]) > 1]:
            chunks, budget = [], self.prefill_chunk
            for seq, cached, blocks in pending:
                n = min(len(seq.ids) - 1 - len(cached), budget)
                if n == 0:
                    break
                chunks.append(Chunk(seq.ids[len(cached) : len(cached) + n], len(cached), blocks, False))
                budget -= n
            self._run(chunks)
            for chunk, (_, cached, _) in zip(chunks, pending):
                cached.extend(chunk.tokens)

    def _run(self, chunks: list[Chunk]) -> torch.Tensor:
        return self.runner.run(chunks, lead=self.lead, key="draft")

    def release(self, request_id: str) -> None:
        state = self.state.pop(request_id, None)
        if state is not None:
            self.allocator.free(state[1])
